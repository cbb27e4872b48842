"""Preprocessing cache: each case resampled to the plan's canonical grid, normalised, cropped to the
body, stored as one compressed .npz so that training epochs never re-read NIfTI."""

import os

import numpy as np
import SimpleITK as sitk

from MSDSegmentLib.atomic import atomic_output
from MSDSegmentLib.imageio import split_channels
from MSDSegmentLib.boxes import bounding_box, intersect
from MSDSegmentLib.preprocessing import labels_to_canonical, network_input

from .dataset import map_labels

LOCATIONS_PER_CLASS = 20000


def preprocess_case(image_path, label_path, plan, mapping):
    """(image float16 (C, X, Y, Z), label uint8 (X, Y, Z)) on the plan's canonical grid, cropped to the body
    (and to the region of interest for a cascade's fine stage)."""
    channels = split_channels(sitk.ReadImage(image_path))
    image, reference = network_input(channels, plan["spacing"], plan["normalisation"])
    label_image = sitk.ReadImage(label_path)
    if label_image.GetSize() == channels[0].GetSize():
        # MSD label headers can differ from their image's in the last decimals; the voxels correspond.
        label_image.CopyInformation(channels[0])
    label = map_labels(labels_to_canonical(label_image, reference), mapping)
    box = body_box(image[0])
    if plan.get("roi"):
        box = intersect(box, roi_box(label, plan) or box)
    return image[(slice(None),) + box].astype(np.float16), label[box]


def roi_box(label, plan):
    """A cascade's fine stage trains on the region it will see at inference: the box around its ROI
    classes (here from the reference labels, there from the coarse stage) plus the plan's margin."""
    roi = plan["roi"]
    classes = [plan["classes"].index(name) for name in roi["classes"]]
    margin = np.ceil(np.asarray(roi["margin_mm"]) / np.asarray(plan["spacing"])).astype(int)
    return bounding_box(np.isin(label, classes), margin)


def body_box(normalised_channel, margin=2):
    """Bounding box of voxels above the background level (air / no signal), with a margin."""
    box = bounding_box(normalised_channel > normalised_channel.min() + 1e-3, margin)
    return box or tuple(slice(0, n) for n in normalised_channel.shape)


def label_count(plan):
    """Label values a cached label map may hold: the classes, plus one for merged classes (see merged_mapping)."""
    return len(plan["classes"]) + bool(plan.get("merged_classes"))


def merged_mapping(mapping, plan):
    """A partly labelled case (a whole gland for PZ + TZ): every foreground label becomes the plan's merged value,
    which the loss scores against the sum of the merged classes' probabilities."""
    return {source: len(plan["classes"]) for source in mapping}


def foreground_locations(label, classes, rng):
    """Up to LOCATIONS_PER_CLASS voxel coordinates per foreground label value, for oversampling."""
    locations = {}
    for index in range(1, classes):
        coords = np.argwhere(label == index)
        if len(coords) > LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), LOCATIONS_PER_CLASS, replace=False)]
        locations[index] = coords.astype(np.int16)
    return locations


def build_cache(cases, plan, mapping, folder, log=print):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for case in cases:
        path = os.path.join(folder, case["id"] + ".npz")
        if os.path.exists(path):
            continue
        case_mapping = merged_mapping(mapping, plan) if case.get("merged") else mapping
        image, label = preprocess_case(case["image"], case["label"], plan, case_mapping)
        save_case(path, image, label, foreground_locations(label, label_count(plan), rng))
        log(f"cached {case['id']}: {image.shape[1:]}")


def save_case(path, image, label, locations):
    """One case of the cache, as load_case reads it."""
    with atomic_output(path, ".npz") as temporary:
        np.savez_compressed(temporary, image=image, label=label,
                            **{f"locations_{k}": v for k, v in locations.items()})


def load_case(folder, case_id, classes):
    with np.load(os.path.join(folder, case_id + ".npz")) as data:
        return {"id": case_id, "image": data["image"].astype(np.float32), "label": data["label"],
                "locations": {k: data[f"locations_{k}"] for k in range(1, classes) if f"locations_{k}" in data}}
