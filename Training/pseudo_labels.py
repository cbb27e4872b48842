"""`python -m Training pseudo-labels`: the unlabelled images of a dataset (dataset.json's `test`) segmented by a
task's shipped model, as whole-structure labels (the union of the task's labels), in a new MSD-layout dataset
beside the source's labelled cases.

Those cases are marked "merged": training scores them against the sum of the model's merged classes (PZ + TZ
for the prostate, see `Training/train.py`, DiceCELoss), so they teach the outline the model already finds
reliably and leave the split between the zones to the expert labels.
"""

import os

import numpy as np
import SimpleITK as sitk

from MSDSegmentLib.engine import segment
from MSDSegmentLib.errors import InputError
from MSDSegmentLib.atomic import atomic_output, write_json
from MSDSegmentLib.imageio import read_channels
from MSDSegmentLib.preprocessing import to_array

from .dataset import read_dataset


def pseudo_label(image_path, task, device, models_dir):
    """(whole-structure label image on the image's grid, {label name: quality}) from the task's engine."""
    result = segment(read_channels([image_path]), task, device=device, models_dir=models_dir, precision="fp32")
    whole = sitk.GetImageFromArray((to_array(result.labels) > 0).astype(np.uint8).transpose(2, 1, 0))
    whole.CopyInformation(result.labels)
    names = {label.value: label.name for label in result.card.labels}
    return whole, {names[value]: quality for value, quality in result.quality.items()}


def run_pseudo_labels(args, log=print):
    meta, cases = read_dataset(args.data)
    # Absolute paths: the new dataset lies elsewhere and names the source's files.
    unlabelled = [os.path.abspath(os.path.join(args.data, entry)) for entry in meta.get("test", [])]
    if not unlabelled:
        raise InputError(f"{args.data}/dataset.json lists no unlabelled images ('test')")
    os.makedirs(os.path.join(args.out, "labelsTr"), exist_ok=True)
    training = [{"image": os.path.abspath(case["image"]), "label": os.path.abspath(case["label"])} for case in cases]
    for image_path in unlabelled:
        case_id = os.path.basename(image_path).split(".")[0]
        label, quality = pseudo_label(image_path, args.task, args.device, args.models_dir)
        path = os.path.join(args.out, "labelsTr", f"{case_id}.nii.gz")
        with atomic_output(path, ".nii.gz") as temporary:
            sitk.WriteImage(label, temporary, useCompression=True)
        volume_ml = float(sitk.GetArrayViewFromImage(label).sum()) * np.prod(label.GetSpacing()) / 1000
        log(f"{case_id}: {volume_ml:.1f} mL; " + "; ".join(
            f"{name} confidence {q.get('confidence')}" + (" (check)" if q.get("check") else "")
            for name, q in quality.items()))
        training.append({"image": image_path, "label": f"./labelsTr/{case_id}.nii.gz", "merged": True,
                         "pseudo_label": f"union of the labels of the '{args.task}' task's shipped model"})
    derived = {**{key: value for key, value in meta.items() if key not in ("training", "test", "numTest")},
               "training": training, "numTraining": len(training), "test": [],
               "derived_from": os.path.abspath(args.data)}
    write_json(derived, os.path.join(args.out, "dataset.json"))
    log(f"wrote {len(unlabelled)} pseudo-label(s) and dataset.json ({len(training)} cases) into {args.out}")
