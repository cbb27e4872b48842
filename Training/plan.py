"""Data fingerprint and plan: the nnU-Net idea of deriving spacing, patch and normalisation from the data.

The fingerprint records, per case, the spacing along the canonical (L, P, S) axes, the physical
field of view, and intensity statistics of the labelled voxels. The plan turns it into decisions
that are stored (plan.json, then the model card) rather than scattered as constants.
"""

import json

import numpy as np
import SimpleITK as sitk

from MSDSegmentLib.atomic import write_json
from MSDSegmentLib.imageio import split_channels
from MSDSegmentLib.modelcard import STAGE_SETTINGS, settings_from
from MSDSegmentLib.network import topology_for_patch

SAMPLES_PER_CASE = 20000


def canonical_spacing(image):
    """Spacing along the physical L, P, S axes (axis order and flips in the file do not matter)."""
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    return direction @ np.array(image.GetSpacing())


def case_fingerprint(image_path, label_path, rng):
    channels = split_channels(sitk.ReadImage(image_path))
    label = sitk.GetArrayFromImage(sitk.ReadImage(label_path))  # a copy: a view would outlive its image
    spacing = canonical_spacing(channels[0])
    extent = spacing * np.abs(np.array(channels[0].GetDirection()).reshape(3, 3)) @ np.array(channels[0].GetSize())
    intensities, low, high, at_low, at_high = [], [], [], [], []
    for channel in channels:
        values = sitk.GetArrayViewFromImage(channel)
        foreground = values[label > 0]
        pick = rng.choice(foreground.size, min(SAMPLES_PER_CASE, foreground.size), replace=False)
        intensities.append(foreground[pick].astype(float).tolist())
        vmin, vmax = float(values.min()), float(values.max())
        low.append(vmin)
        high.append(vmax)
        at_low.append(float(np.mean(values == vmin)))
        at_high.append(float(np.mean(values == vmax)))
    return {"spacing": spacing.tolist(), "extent": extent.tolist(), "intensities": intensities,
            "min": low, "max": high, "fraction_at_min": at_low, "fraction_at_max": at_high}


def fingerprint(cases, seed=0):
    rng = np.random.default_rng(seed)
    return {case["id"]: case_fingerprint(case["image"], case["label"], rng) for case in cases}


def choose_spacing(prints, rule, patch_size, min_spacing=0.0):
    spacings = np.array([p["spacing"] for p in prints.values()])
    if rule == "coarse":
        # The coarse stage sees most of the abdomen at once: one patch covers at least 4/5 of the
        # median axial field of view; isotropic, rounded down to 0.5 mm.
        fov = np.median([np.mean(p["extent"][:2]) for p in prints.values()])
        edge = float(np.mean(patch_size[:2]))
        return [float(max(np.floor(fov / (1.25 * edge) * 2) / 2, spacings.max(axis=0).min()))] * 3
    target = np.median(spacings, axis=0)
    if rule == "fine":
        # A cascade's fine stage: the median spacing, but no finer than the CPU budget allows.
        return [float(round(s, 3)) for s in np.maximum(target, min_spacing)]
    worst = int(np.argmax(target))
    if target[worst] > 3 * np.min(target):
        # nnU-Net: for strongly anisotropic data use the 10th percentile of the thick axis.
        target[worst] = np.percentile(spacings[:, worst], 10)
    return [float(round(s, 3)) for s in target]


def choose_ct_window(prints):
    """The HU window to clip to: the data's own clipping if it was saturated, else foreground percentiles."""
    at_min = np.median([p["fraction_at_min"][0] for p in prints.values()])
    at_max = np.median([p["fraction_at_max"][0] for p in prints.values()])
    if at_min > 0.01 and at_max > 0.001:
        # Already clipped upstream (BTCV: [-125, 275] HU): use that window, never a wider one.
        return [float(np.median([p["min"][0] for p in prints.values()])),
                float(np.median([p["max"][0] for p in prints.values()]))]
    values = np.concatenate([p["intensities"][0] for p in prints.values()])
    return [float(np.percentile(values, 0.5)), float(np.percentile(values, 99.5))]


def choose_normalisation(prints, modality):
    if modality != "CT":
        return {"type": "zscore"}
    window = choose_ct_window(prints)
    values = np.clip(np.concatenate([p["intensities"][0] for p in prints.values()]), *window)
    return {"type": "ct", "window": window, "mean": float(values.mean()), "std": float(values.std())}


def make_plan(model_name, model, prints):
    spacing = choose_spacing(prints, model["spacing_rule"], model["patch_size"], model.get("min_spacing_mm", 0.0))
    # One filter count per level: their number caps the depth.
    kernels, strides = topology_for_patch(model["patch_size"], spacing, max_levels=len(model["filters"]))
    return {
        "model": model_name,
        "modality": model["modality"],
        "channels": model["channels"],
        "classes": model["classes"],
        # Classes learnt as context only (the model's neighbours): no task outputs them.
        "context_classes": model.get("context_classes", []),
        "spacing": spacing,
        "patch_size": model["patch_size"],
        "normalisation": choose_normalisation(prints, model["modality"]),
        "mirror_axes": model["mirror_axes"],
        "synthetic_lesions": model.get("synthetic_lesions", {}),
        "lesion_probability": model.get("lesion_probability", 0.0),
        "lesion_centred_fraction": model.get("lesion_centred_fraction", 0.0),
        "neighbour_masses": model.get("neighbour_masses", {}),
        **settings_from(model, STAGE_SETTINGS),
        "merged_classes": model.get("merged_classes", []),
        "network": {
            "in_channels": len(model["channels"]),
            "out_channels": len(model["classes"]),
            "kernel_sizes": kernels,
            "strides": strides,
            "filters": model["filters"][:len(strides)],
        },
        "fingerprint_summary": {
            "cases": len(prints),
            "median_spacing": np.median([p["spacing"] for p in prints.values()], axis=0).tolist(),
            "median_extent_mm": np.median([p["extent"] for p in prints.values()], axis=0).tolist(),
        },
    }


def save_json(data, path):
    """Atomically: a resumed run trusts the plan.json it finds."""
    write_json(data, path)


def load_json(path):
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


LEGACY_PLAN_KEYS = {"inference_overlap": "overlap"}  # plans written before STAGE_SETTINGS named them


def load_plan(path):
    """A plan.json, with a setting stored under an earlier name read under its name in STAGE_SETTINGS."""
    plan = load_json(path)
    for old, new in LEGACY_PLAN_KEYS.items():
        if old in plan:
            plan.setdefault(new, plan.pop(old))
    return plan
