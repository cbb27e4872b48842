"""`python -m Training locations`: where each organ of a task lies relative to another (the liver), learnt from
the training labels and written into the task's card. Post-processing then keeps the largest piece of the organ
that lies where it should, instead of a larger false piece elsewhere (a "spleen" in the bowel)."""

import datetime
import json

import numpy as np
import SimpleITK as sitk

from MSDSegmentLib import modelcard
from MSDSegmentLib.errors import InputError
from MSDSegmentLib.imageio import read_image

from .dataset import fold_split, read_dataset
from .evaluate import model_for
from .export import write_json

PRIOR_MM = 10.0           # added to each axis' spread: a covariance from some twenty cases is too tight
MIN_DISTANCE = 4.0        # Mahalanobis: a 3-D normal's 99.9 % region is about 4.0
MARGIN = 1.5              # times the largest distance among the training cases


def centroid_mm(image, mask):
    """Physical (LPS, mm) centroid of a boolean (z, y, x) mask of `image`."""
    return np.array(image.TransformContinuousIndexToPhysicalPoint(np.argwhere(mask).mean(axis=0)[::-1].tolist()))


def measure(cases, values):
    """Each case's label map read once: [{label value: (volume in mL, physical centroid in mm)}] for the given
    values the case labels."""
    measured = []
    for case in cases:
        image = read_image(case["label"])
        array = sitk.GetArrayViewFromImage(image)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        organs = {}
        for value in values:
            mask = array == value
            if mask.any():
                organs[value] = (int(np.count_nonzero(mask)) * voxel_ml, centroid_mm(image, mask))
        measured.append(organs)
    return measured


def location_entry(found, relative_to, data_text):
    mean = found.mean(axis=0)
    covariance = np.cov(found.T) + np.eye(3) * PRIOR_MM ** 2
    inverse = np.linalg.inv(covariance)
    distances = [float(np.sqrt((v - mean) @ inverse @ (v - mean))) for v in found]
    return {"relative_to": relative_to, "mean_mm": [round(float(v), 2) for v in mean],
            "covariance_mm2": [[round(float(v), 2) for v in row] for row in covariance],
            "max_distance": round(max(MIN_DISTANCE, MARGIN * max(distances)), 3),
            "largest_training_distance": round(max(distances), 3), "cases": len(found), "data": data_text,
            "date": datetime.date.today().isoformat()}


def run_locations(args, log=print):
    card = modelcard.find_card(args.task, args.models_dir or modelcard.MODELS_DIR)
    meta, cases = read_dataset(args.data)
    model = model_for(card)
    cases = [case for case in cases if case["id"] not in model["exclude"]]
    if args.fold is not None:
        training = set(fold_split([case["id"] for case in cases], args.fold)[0])
        cases = [case for case in cases if case["id"] in training]
    values = {name.lower(): int(value) for value, name in meta["labels"].items()}
    if args.relative_to not in values:
        raise InputError(f"{args.data} has no label named '{args.relative_to}'")
    with open(card.path, encoding="utf-8") as stream:
        data = json.load(stream)
    selection = f"fold {args.fold} training cases" if args.fold is not None else "all labelled cases"
    data_text = f"{meta.get('name', args.data)}, {selection}"
    organs = [entry for entry in data["labels"] if entry["kind"] == "organ"]
    for entry in organs:
        if entry["source_class"] not in values:
            raise InputError(f"{args.data} has no label named '{entry['source_class']}'")
    reference = values[args.relative_to]
    measured = measure(cases, {values[entry["source_class"]] for entry in organs} | {reference})
    for entry in organs:
        organ = values[entry["source_class"]]
        volumes = [case[organ][0] for case in measured if organ in case]
        entry["volume_ml"] = [round(min(volumes), 1), round(max(volumes), 1)]
        log(f"{args.task}: {entry['name']} {entry['volume_ml'][0]}-{entry['volume_ml'][1]} mL in {len(volumes)} cases")
        if entry["source_class"] == args.relative_to:
            continue
        found = np.array([case[organ][1] - case[reference][1] for case in measured
                          if organ in case and reference in case])
        if len(found) < 5:
            raise InputError(f"Only {len(found)} case(s) label both {entry['source_class']} and {args.relative_to}")
        entry["location"] = location_entry(found, args.relative_to, f"{data_text} ({len(found)})")
        log(f"{args.task}: {entry['name']} lies {entry['location']['mean_mm']} mm from the {args.relative_to} "
            f"(LPS); training cases within Mahalanobis {entry['location']['largest_training_distance']}, "
            f"kept within {entry['location']['max_distance']}")
    write_json(data, card.path)
    log(f"wrote the locations into {card.path}")
