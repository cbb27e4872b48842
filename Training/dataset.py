"""Reading a Medical Segmentation Decathlon layout dataset through its dataset.json."""

import json
import os

import numpy as np
from MSDSegmentLib.errors import InputError


def read_dataset(folder):
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        raise InputError(f"Not an MSD-layout dataset (no dataset.json): {folder}")
    with open(path, encoding="utf-8") as stream:
        meta = json.load(stream)
    cases = []
    for entry in meta["training"]:
        image = os.path.normpath(os.path.join(folder, entry["image"]))
        label = os.path.normpath(os.path.join(folder, entry["label"]))
        case_id = os.path.basename(image).split(".")[0]
        # "merged": the label marks the union of the model's merged classes (a whole gland, a pseudo-label)
        cases.append({"id": case_id, "image": image, "label": label, "merged": bool(entry.get("merged"))})
    return meta, cases


def map_labels(label_array, mapping):
    out = np.zeros(label_array.shape, np.uint8)
    for source, target in mapping.items():
        out[label_array == source] = target
    return out


def fold_split(case_ids, fold, folds=5):
    """Fixed, documented split: sorted case ids, every `folds`-th case (offset `fold`) is validation;
    fold "all": every case trains (the shipped weights, once a fold has chosen the settings)."""
    ordered = sorted(case_ids)
    if fold == "all":
        return ordered, []
    validation = [case for index, case in enumerate(ordered) if index % folds == fold]
    training = [case for case in ordered if case not in validation]
    return training, validation
