"""`python -m Training evaluate`: Dice, 95 % Hausdorff distance and volume error per label and case.

The exported model is run through the extension's own engine (`MSDSegmentLib.engine.segment`, the same
preprocessing, fp16 weights, resampling and post-processing), and the metrics are measured on each
case's own grid against its reference labels, read through the dataset's `dataset.json`.
"""

import csv
import datetime
import itertools
import json
import math
import os
import sys
import time
import warnings
import zlib

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from MSDSegmentLib import modelcard
from MSDSegmentLib.atomic import atomic_open, write_json
from MSDSegmentLib.engine import segment
from MSDSegmentLib.errors import InputError, ModelError
from MSDSegmentLib.imageio import read_channels, read_image
from MSDSegmentLib.boxes import bounding_box
from MSDSegmentLib.postprocess import FULL_CONNECTIVITY, min_tumour_voxels
from MSDSegmentLib.preprocessing import from_array, resample, to_array

from .dataset import fold_split, map_labels, read_dataset
from .lesions import preset_for, synthesise_lesions
from .masses import free_tissue, synthesise_neighbour_mass
from .models import MODELS, label_mapping, parse_label_map
from .tasks import TASKS

COLUMNS = ["case", "label", "value", "dice", "hd95_mm", "reference_ml", "predicted_ml", "volume_error_ml",
           "volume_error_percent", "lesions", "detected_lesions", "false_positive_lesions", "confidence",
           "location_distance", "check", "mass_ml", "mass_as_organ_ml", "mass_as_tumour_ml"]
MASS_KEYS = COLUMNS[-3:]


# ---------------------------------------------------------------------------------------------- metrics

def hausdorff_95(prediction, reference, spacing):
    """Symmetric 95th-percentile surface distance in mm (MONAI) of two non-empty boolean masks."""
    from monai.metrics import compute_hausdorff_distance

    box = bounding_box(prediction | reference, margin=1)  # MONAI crops too; this saves copying the volume
    pair = [np.ascontiguousarray(mask[box])[None, None] for mask in (prediction, reference)]
    with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument its own code still passes
        warnings.simplefilter("ignore", FutureWarning)
        distance = compute_hausdorff_distance(pair[0], pair[1], include_background=True, percentile=95,
                                              spacing=[float(s) for s in spacing])
    return float(distance.item())


def label_metrics(prediction, reference, spacing):
    """Metrics of one label: boolean (x, y, z) masks on a grid of `spacing` mm.

    Dice is NaN when both masks are empty. HD95 is NaN when both are empty and infinite when only one
    is (an organ missed, or found where there is none). Volume error is predicted - reference.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    predicted, referenced = int(prediction.sum()), int(reference.sum())
    overlap = int(np.logical_and(prediction, reference).sum())
    dice = 2.0 * overlap / (predicted + referenced) if predicted + referenced else math.nan
    if predicted and referenced:
        hd95 = hausdorff_95(prediction, reference, spacing)
    else:
        hd95 = math.nan if predicted == referenced else math.inf
    error_ml = (predicted - referenced) * voxel_ml
    if referenced:
        error_percent = 100.0 * (predicted - referenced) / referenced
    else:
        error_percent = math.nan if predicted == 0 else math.inf
    return {"dice": dice, "hd95_mm": hd95, "reference_ml": referenced * voxel_ml, "predicted_ml": predicted * voxel_ml,
            "volume_error_ml": error_ml, "volume_error_percent": error_percent}


# Lesion sizes a radiologist tells apart: below RECIST's measurable size, small measurable, medium, large.
LESION_SIZES_ML = (("under 0.5 mL", 0.0, 0.5), ("0.5-2 mL", 0.5, 2.0), ("2-10 mL", 2.0, 10.0),
                   ("10 mL and over", 10.0, math.inf))


def size_class(volume_ml):
    return next(name for name, low, high in LESION_SIZES_ML if low <= volume_ml < high)


def lesion_metrics(prediction, reference, min_voxels=0, voxel_ml=None):
    """Lesion-wise counts of one tumour label: reference lesions (connected components, 26-connected) of at
    least `min_voxels` (smaller ones are below what post-processing keeps), those a predicted tumour overlaps
    (detected), and predicted components overlapping no reference lesion (false positives). With `voxel_ml`,
    also `by_size`: every reference lesion, detected or not, and every false positive, by its volume."""
    reference_components, count = ndimage.label(reference, FULL_CONNECTIVITY)
    sizes = np.bincount(reference_components.ravel())
    scored = [index for index in range(1, count + 1) if sizes[index] >= min_voxels]
    predicted_components, predicted = ndimage.label(prediction, FULL_CONNECTIVITY)
    hit = set(np.unique(reference_components[prediction]).tolist()) - {0}
    true_positives = set(np.unique(predicted_components[reference]).tolist()) - {0}
    metrics = {"lesions": len(scored), "detected_lesions": len(hit & set(scored)),
               "false_positive_lesions": predicted - len(true_positives)}
    if voxel_ml:
        by_size = {name: {"lesions": 0, "detected": 0, "false_positives": 0} for name, _, _ in LESION_SIZES_ML}
        for index in range(1, count + 1):
            counts = by_size[size_class(sizes[index] * voxel_ml)]
            counts["lesions"] += 1
            counts["detected"] += index in hit
        predicted_sizes = np.bincount(predicted_components.ravel())
        for index in set(range(1, predicted + 1)) - true_positives:
            by_size[size_class(predicted_sizes[index] * voxel_ml)]["false_positives"] += 1
        metrics["by_size"] = by_size
    return metrics


def lesion_records(prediction, reference, lesions, voxel_ml):
    """Every reference lesion (detected or not, with the highest confidence and peak among the predicted lesions
    that overlap it, and the contrast and elongation of the most confident of them) and every predicted lesion
    that overlaps none (a false lesion), with its volume in mL. `lesions`: the engine's list for the label (one
    voxel, confidence, peak, contrast and elongation of each kept lesion)."""
    predicted_components, count = ndimage.label(prediction, FULL_CONNECTIVITY)
    found = {int(predicted_components[tuple(lesion["index"])]): lesion for lesion in lesions}

    def measures(components):
        known = [found.get(c, {}) for c in components]
        best = max(known, key=lambda lesion: lesion.get("confidence", 1.0), default={})
        return {"confidence": max((k.get("confidence", 1.0) for k in known), default=0.0),
                "peak": max((k.get("peak", 1.0) for k in known), default=0.0),
                "contrast": best.get("contrast", math.nan), "elongation": best.get("elongation", math.nan)}

    reference_components, references = ndimage.label(reference, FULL_CONNECTIVITY)
    predicted_sizes = np.bincount(predicted_components.ravel(), minlength=count + 1)
    records = []
    for index in range(1, references + 1):
        inside = reference_components == index
        overlapping = sorted(set(np.unique(predicted_components[inside]).tolist()) - {0})
        records.append({"kind": "reference", "volume_ml": float(inside.sum()) * voxel_ml,
                        "detected": bool(overlapping), **measures(overlapping)})
    touching = set(np.unique(predicted_components[reference]).tolist()) - {0}
    for component in sorted(set(range(1, count + 1)) - touching):
        records.append({"kind": "false", "volume_ml": float(predicted_sizes[component]) * voxel_ml,
                        "detected": True, **measures([component])})
    return records


CONFIDENCE_STEPS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)


def confidence_sweep(records, volumes, statistic):
    """[(minimum, measurable lesions (0.5 mL or more) still found, of how many, false lesions per volume)]
    were lesions whose `statistic` ("confidence" or "peak") is below each minimum dropped."""
    measurable = [r for r in records if r["kind"] == "reference" and r["volume_ml"] >= 0.5]
    false = [r for r in records if r["kind"] == "false"]
    return [(minimum, sum(r["detected"] and r[statistic] >= minimum for r in measurable), len(measurable),
             sum(r[statistic] >= minimum for r in false) / volumes) for minimum in CONFIDENCE_STEPS]


def log_confidence_sweep(rows, label_name, log):
    mine = [row for row in rows if row["label"] == label_name and "lesion_records" in row]
    if not mine:
        return
    records = [record for row in mine for record in row["lesion_records"]]
    for statistic in ("confidence", "peak"):
        log(f"{'':<16} {label_name}, lesions kept from a {statistic} of: " + "; ".join(
            f"{minimum:.1f}: {found}/{total} found, {false:.2f} false"
            for minimum, found, total, false in confidence_sweep(records, len(mine), statistic)))


def write_lesions_csv(path, rows):
    with atomic_open(path, newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["case", "label", "kind", "volume_ml", "detected", "confidence",
                                                    "peak", "contrast", "elongation"])
        writer.writeheader()
        for row in rows:
            for record in row.get("lesion_records", []):
                writer.writerow({"case": row["case"], "label": row["label"], **record})


def finite_mean(values):
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def summarise(rows, labels):
    """Per label: mean Dice (cases where it is defined), mean HD95 over cases where both masks exist
    (the others counted apart), mean signed and mean absolute volume error."""
    summary = {}
    for label in labels:
        mine = [row for row in rows if row["label"] == label.name]
        summary[label.name] = {
            "dice": finite_mean([r["dice"] for r in mine]),
            "hd95_mm": finite_mean([r["hd95_mm"] for r in mine]),
            "hd95_undefined": sum(1 for r in mine if math.isinf(r["hd95_mm"])),
            "reference_ml": finite_mean([r["reference_ml"] for r in mine]),
            "predicted_ml": finite_mean([r["predicted_ml"] for r in mine]),
            "volume_error_ml": finite_mean([r["volume_error_ml"] for r in mine]),
            "volume_error_percent": finite_mean([r["volume_error_percent"] for r in mine]),
            "abs_volume_error_percent": finite_mean([abs(r["volume_error_percent"]) for r in mine]),
        }
        if mine and "lesions" in mine[0]:
            lesions = sum(r["lesions"] for r in mine)
            summary[label.name].update(
                lesions=lesions, lesion_sensitivity=sum(r["detected_lesions"] for r in mine) / lesions if lesions
                else math.nan, false_positive_lesions_per_volume=float(np.mean([r["false_positive_lesions"]
                                                                                  for r in mine])))
        if mine and "mass_ml" in mine[0]:
            summary[label.name].update({key: finite_mean([r[key] for r in mine]) for key in MASS_KEYS})
        if mine and "by_size" in mine[0]:
            summary[label.name]["lesions_by_size"] = {
                name: {"lesions": sum(r["by_size"][name]["lesions"] for r in mine),
                       "detected": sum(r["by_size"][name]["detected"] for r in mine),
                       "false_positives_per_volume": round(float(np.mean([r["by_size"][name]["false_positives"]
                                                                          for r in mine])), 3)}
                for name, _, _ in LESION_SIZES_ML}
    return summary


# ---------------------------------------------------------------------------------------- labels, cases

def model_for(card):
    name = card.training.get("model") or (TASKS.get(card.task, {}).get("models") or [None])[-1]
    if name not in MODELS:
        raise ModelError(f"Model card {card.path} does not name a known training model (got {name!r})")
    return MODELS[name]


def reference_mapping(card, model, dataset_labels, overrides=None):
    """Dataset label value -> the task's label value, matched by name like training does.

    Every trained label must be found in the dataset, except tumours (BTCV has none). A tumour label
    the model was not trained on counts as its organ: such a model segments the organ with its lesions
    (MSD Task03's liver label excludes the tumour). Other dataset labels (BTCV's other organs) are
    background.
    """
    if overrides:
        return dict(overrides)
    values = {label.name: label.value for label in card.trained_labels}
    targets, optional = {}, set()
    for label in card.labels:
        if label.trained:
            targets[label.source_class] = label.value
        elif label.kind == "tumour" and label.organ in values:
            targets[label.source_class] = values[label.organ]
        else:
            continue
        if label.kind == "tumour":
            optional.add(label.source_class)
    return label_mapping(model, dataset_labels, targets=targets, optional=optional)


def scored_labels(card, mapping, overridden):
    """Trained labels with a reference in this dataset (a trained tumour on BTCV has none)."""
    present = set(mapping.values())
    return [label for label in card.trained_labels if overridden or label.value in present]


def select_cases(cases, exclude, case_ids=None, fold=None):
    """Cases to evaluate: the given ids, or all; with a fold, only its validation cases (the split training
    uses: cases excluded from training are excluded here too, and never scored)."""
    usable = {case["id"]: case for case in cases if case["id"] not in exclude}
    known = {case["id"] for case in cases}
    if case_ids:
        unknown = [case_id for case_id in case_ids if case_id not in known]
        if unknown:
            raise InputError(f"Case(s) not in dataset.json: {', '.join(unknown)}")
        chosen = [case_id for case_id in case_ids if case_id in usable]
    else:
        chosen = sorted(usable)
    if fold is not None:
        if not 0 <= fold < 5:
            raise InputError(f"--fold must be 0 to 4, got {fold}")
        validation = set(fold_split(sorted(usable), fold)[1])
        chosen = [case_id for case_id in chosen if case_id in validation]
    if not chosen:
        raise InputError("No cases to evaluate (check --cases, --fold and the model's excluded cases)")
    return [usable[case_id] for case_id in chosen]


def reference_on_grid(path, grid, mapping):
    """The reference label map on `grid` (the image's grid), as task label values, (x, y, z) order."""
    image = read_image(path)
    if image.GetSize() == grid.GetSize():
        image.CopyInformation(grid)  # MSD label headers can differ from the image's by rounding only
    else:
        image = resample(image, grid, sitk.sitkNearestNeighbor, 0)
    return map_labels(to_array(image), mapping)


# ------------------------------------------------------------------------------------ synthetic lesions

def synthetic_tumour(card, model):
    """(tumour label, its organ's label, lesion preset) when the card's tumour class was learnt from
    synthetic lesions, else None."""
    for label in card.trained_labels:
        entry = model.get("synthetic_lesions", {}).get(label.source_class)
        if label.kind == "tumour" and entry:
            return label, card.organ_of(label), preset_for(entry)
    return None


def case_rng(case_id, seed):
    """The lesions' random stream of one case and seed: the same every time, another for each case."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def paint_lesions(image, reference, tumour, case_id, seed):
    """The CT with synthetic lesions in the reference organ (the same for a case id and seed every time),
    and the reference with them as the tumour label."""
    tumour_label, organ_label, config = tumour
    rng = case_rng(case_id, seed)
    painted, lesion = synthesise_lesions(to_array(image).astype(np.float32), reference == organ_label.value,
                                         image.GetSpacing(), rng, config)
    reference = reference.copy()
    reference[lesion] = tumour_label.value
    return from_array(painted, image), reference


def mass_organ(card, model):
    """The organ label whose model learnt masses beside that organ (`neighbour_masses`), else None."""
    return next((label for label in card.trained_labels
                 if label.kind == "organ" and label.source_class in model.get("neighbour_masses", {})), None)


def paint_mass(image, reference, organ_label, case_id, seed):
    """The CT with a synthetic mass beside the reference organ or pressing into it (the same for a case id and seed
    every time), the reference with the mass as background, and the mass's mask."""
    hu = to_array(image).astype(np.float32)
    painted, mass = synthesise_neighbour_mass(hu, reference == organ_label.value, free_tissue(hu, reference),
                                              image.GetSpacing(), case_rng(case_id, seed))
    reference = reference.copy()
    reference[mass] = 0
    return from_array(painted, image), reference, mass


def mass_row(prediction, mass, organ_label, card, voxel_ml):
    """How much of a mass (beside an organ or pressing into it) the engine called that organ, and how much tumour."""
    tumours = [label.value for label in card.trained_labels if label.kind == "tumour"]
    return {"mass_ml": float(mass.sum()) * voxel_ml,
            "mass_as_organ_ml": float((mass & (prediction == organ_label.value)).sum()) * voxel_ml,
            "mass_as_tumour_ml": float((mass & np.isin(prediction, tumours)).sum()) * voxel_ml}


# ------------------------------------------------------------------------------------------------ output

def lesion_text(row):
    if "lesions" not in row:
        return ""
    text = (f"  lesions {row['lesions']}, detected {row['detected_lesions']}, "
            f"false positives {row['false_positive_lesions']}")
    if "by_size" in row:
        text += " (by size: " + "; ".join(f"{name} {c['detected']}/{c['lesions']} found, {c['false_positives']} false"
                                          for name, c in row["by_size"].items()) + ")"
    return text


def number(value, digits=3):
    return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.{digits}f}")


def table_line(case, name, metrics):
    return (f"{case:<16} {name:<18} {number(metrics['dice']):>6} {number(metrics['hd95_mm'], 1):>8} "
            f"{number(metrics['reference_ml'], 1):>9} {number(metrics['predicted_ml'], 1):>9} "
            f"{number(metrics['volume_error_ml'], 1):>9} {number(metrics['volume_error_percent'], 1):>8}")


TABLE_HEADER = (f"{'case':<16} {'label':<18} {'Dice':>6} {'HD95 mm':>8} {'ref mL':>9} {'pred mL':>9} "
                f"{'dV mL':>9} {'dV %':>8}")


def write_csv(path, rows, summary):
    with atomic_open(path, newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
        for name, means in summary.items():
            writer.writerow({"case": "mean", "label": name, "value": "", **means})


def rounded(value):
    return round(value, 4) if math.isfinite(value) else None


def validation_entry(summary, case_ids, data_text, device):
    """The model card's `validation` field: {metric: {label name: mean}} (what ModelCard.summary reads)."""
    def metric(key):
        return {name: rounded(means[key]) for name, means in summary.items()
                if key in means and math.isfinite(means[key])}

    entry = {"dice": metric("dice"), "hd95_mm": metric("hd95_mm"),
             "volume_error_percent": metric("volume_error_percent"),
             "abs_volume_error_percent": metric("abs_volume_error_percent"),
             "cases": list(case_ids), "data": data_text,
             "method": "exported weights through the MSDSegment engine, metrics on each case's own grid; "
                       "HD95: symmetric 95th-percentile surface distance (MONAI), mean over cases where "
                       "both masks exist",
             "device": device, "date": datetime.date.today().isoformat()}
    for key in ("lesion_sensitivity", "false_positive_lesions_per_volume", "lesions", *MASS_KEYS):
        values = metric(key)
        if values:
            entry[key] = values
    by_size = {name: means["lesions_by_size"] for name, means in summary.items() if "lesions_by_size" in means}
    if by_size:
        entry["lesions_by_size"] = by_size
    undefined = {name: means["hd95_undefined"] for name, means in summary.items() if means["hd95_undefined"]}
    if undefined:
        entry["hd95_undefined_cases"] = undefined
    return entry


def update_metrics_json(path, task, entry, key=None):
    """Merge {task: entry} into the JSON file (other tasks kept), atomically; with `key`, the entry goes
    under that key of the task's entry (the synthetic-lesion figures beside the clean ones)."""
    data = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as stream:
                data = json.load(stream)
        except ValueError as error:
            raise InputError(f"Cannot update {path}: not valid JSON ({error})") from None
    if key:
        data.setdefault(task, {})[key] = entry
    else:  # the task's main figures; the entries under keys beside them (their own "dice" in them) stay
        beside = {k: v for k, v in data.get(task, {}).items() if isinstance(v, dict) and "dice" in v}
        data[task] = {**entry, **beside}
    write_json(data, path)


# ------------------------------------------------------------------------------------------------- run

def healthy_row(case_id, label, predicted, min_voxels, voxel_ml, lesions=()):
    """A tumour label in an organ with no tumour (the dataset has no tumour label): Dice and distances are
    undefined, and every predicted tumour is a false lesion, counted by size."""
    undefined = dict.fromkeys(("dice", "hd95_mm", "reference_ml", "volume_error_ml", "volume_error_percent"),
                              math.nan)
    nothing = np.zeros_like(predicted)
    return {"case": case_id, "label": label.name, "value": label.value, **undefined,
            "predicted_ml": float(predicted.sum()) * voxel_ml,
            **lesion_metrics(predicted, nothing, min_voxels, voxel_ml),
            "lesion_records": lesion_records(predicted, nothing, lesions, voxel_ml)}


def evaluate_case(case, task, mapping, labels, models_dir, device, tumour=None, seed=0, precision="fp32",
                  healthy=(), mass_organ_label=None):
    """Segment one case with the engine (with synthetic lesions painted in first if `tumour` is given, or a mass
    beside or into the organ `mass_organ_label`); one row of metrics per scored label, with lesion-wise counts for the
    tumour, how much of the mass became organ or tumour on the organ's row, and false lesions only for the
    `healthy` tumour labels (no tumour in this dataset)."""
    channels = read_channels([case["image"]])
    grid = channels[0]
    reference = reference_on_grid(case["label"], grid, mapping)
    mass = None
    if tumour:
        channels[0], reference = paint_lesions(grid, reference, tumour, case["id"], seed)
    elif mass_organ_label is not None:
        channels[0], reference, mass = paint_mass(grid, reference, mass_organ_label, case["id"], seed)
    result = segment(channels, task, device=device, models_dir=models_dir, precision=precision)
    for warning in result.warnings:
        print(f"{case['id']}: warning: {warning}", file=sys.stderr)
    prediction = to_array(result.labels)
    voxel_ml = float(np.prod(grid.GetSpacing())) / 1000.0
    rows = []
    for label in labels:
        predicted, referenced = prediction == label.value, reference == label.value
        quality = result.quality.get(label.value, {})
        row = {"case": case["id"], "label": label.name, "value": label.value,
               **label_metrics(predicted, referenced, grid.GetSpacing()),
               "confidence": quality.get("confidence"), "location_distance": quality.get("location_distance"),
               "check": quality.get("check")}
        if label.kind == "tumour":  # real tumour labels, or synthetic lesions painted in
            row.update(lesion_metrics(predicted, referenced, min_tumour_voxels(result.card, voxel_ml), voxel_ml))
            row["lesion_records"] = lesion_records(predicted, referenced, quality.get("lesions", []), voxel_ml)
        if mass is not None and label is mass_organ_label:
            row.update(mass_row(prediction, mass, label, result.card, voxel_ml))
        rows.append(row)
    rows += [healthy_row(case["id"], label, prediction == label.value, min_tumour_voxels(result.card, voxel_ml),
                         voxel_ml, result.quality.get(label.value, {}).get("lesions", [])) for label in healthy]
    return rows, result.device


def run_evaluation(args, log=print):
    """Evaluate a task's model on the chosen cases; print the table, write the CSV / metrics JSON if asked,
    and return the mean metrics in the form of the model card's `validation` field."""
    models_dir = args.models_dir or modelcard.MODELS_DIR
    card = modelcard.find_card(args.task, models_dir)
    model = model_for(card)
    meta, cases = read_dataset(args.data)
    overrides = parse_label_map(args.label_map)
    mapping = reference_mapping(card, model, meta.get("labels", {}), overrides)
    labels = scored_labels(card, mapping, bool(overrides))
    tumour = None
    if getattr(args, "synthetic_lesions", None) is not None:
        tumour = synthetic_tumour(card, model)
        if tumour is None:
            raise ModelError(f"Task '{args.task}' has no tumour class learnt from synthetic lesions")
        labels = [label for label in card.trained_labels if label in labels or label is tumour[0]]
    masses = None
    if getattr(args, "synthetic_masses", None) is not None:
        masses = mass_organ(card, model)
        if masses is None or tumour:
            raise ModelError(f"Task '{args.task}' has no organ whose model learnt masses beside it"
                             if masses is None else "Choose --synthetic-lesions or --synthetic-masses, not both")
    # Without tumour labels (BTCV) the organs are healthy: any tumour found there is a false lesion.
    healthy = [] if tumour or overrides else [label for label in card.trained_labels
                                              if label.kind == "tumour" and label not in labels]
    case_ids = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    chosen = select_cases(cases, model["exclude"], case_ids, args.fold)
    skipped = [label.name for label in card.labels if label not in labels + healthy]
    seen_in_training = sorted(set(card.training.get("training_cases", [])) & {case["id"] for case in chosen})
    if seen_in_training:
        print(f"warning: {len(seen_in_training)} case(s) were used to train this model, so these figures are not "
              f"a validation: {', '.join(seen_in_training)} (use --fold)", file=sys.stderr)
    log(f"{args.task}: {len(chosen)} case(s) of {args.data}; dataset value -> label {mapping}"
        + (f"; not scored: {', '.join(skipped)}" if skipped else ""))

    rows, device = [], args.device
    precision = getattr(args, "precision", "fp32")
    log(TABLE_HEADER)
    # With synthetic lesions (or masses) each case is segmented once per round, with other ones each time.
    rounds = range(args.lesion_rounds if tumour or masses else 1)
    first_seed = (args.synthetic_lesions if tumour else getattr(args, "synthetic_masses", None)) or 0
    for case, round_ in itertools.product(chosen, rounds):
        started = time.perf_counter()
        case_rows, device = evaluate_case(case, args.task, mapping, labels, models_dir, args.device, tumour,
                                          first_seed + round_, precision, healthy, masses)
        if len(rounds) > 1:
            for row in case_rows:
                row["case"] = f"{case['id']}/{round_}"
        rows.extend(case_rows)
        for row in case_rows:
            log(table_line(row["case"], row["label"], row) + lesion_text(row))
        log(f"{'':<16} ({time.perf_counter() - started:.1f} s on {device}, {precision})")
    summary = summarise(rows, labels + healthy)
    for name, means in summary.items():
        log(table_line("mean", name, means))
        if "lesions" in means:
            log(f"{'':<16} {name}: {means['lesions']} {'synthetic ' if tumour else ''}lesions, sensitivity "
                f"{number(means['lesion_sensitivity'])}, false-positive lesions per volume "
                f"{number(means['false_positive_lesions_per_volume'], 2)}")
        if "lesions_by_size" in means:
            log(f"{'':<16} {name} by size: " + "; ".join(
                f"{size} {c['detected']} of {c['lesions']} found, {c['false_positives_per_volume']} false per volume"
                for size, c in means["lesions_by_size"].items()))
        if "mass_ml" in means:
            log(f"{'':<16} {name}: synthetic masses beside it {number(means['mass_ml'], 1)} mL on average, "
                f"{number(means['mass_as_organ_ml'], 1)} mL of it labelled {name.lower()}, "
                f"{number(means['mass_as_tumour_ml'], 1)} mL tumour")
        log_confidence_sweep(rows, name, log)
        if means["hd95_undefined"]:
            log(f"{'':<16} {name}: HD95 undefined (organ missed, or found where the reference has none) in "
                f"{means['hd95_undefined']} case(s), left out of its mean")
    if args.csv:
        write_csv(args.csv, rows, summary)
    if getattr(args, "lesions_csv", None):
        write_lesions_csv(args.lesions_csv, rows)

    dataset = meta.get("name", os.path.basename(os.path.normpath(args.data)))
    selection = (f"fold {args.fold} validation cases" if args.fold is not None
                 else "selected cases" if case_ids else "all labelled cases")
    data_text = f"{dataset}, {selection} ({len(chosen)})"
    if healthy:
        data_text += (f"; {', '.join(label.name.lower() for label in healthy)}: no tumour in these organs, "
                      f"every one found is a false lesion")
    if tumour:
        data_text += (f", with synthetic {tumour[0].name.lower()}s painted in (seed {args.synthetic_lesions}, "
                      f"{len(rounds)} round(s) of lesions per case)")
    if masses:
        data_text += (f", with a synthetic mass painted beside the {masses.name.lower()} or pressing into it (seed "
                      f"{args.synthetic_masses}, {len(rounds)} round(s) per case)")
    entry = validation_entry(summary, [case["id"] for case in chosen], data_text, device)
    entry["precision"] = precision
    if getattr(args, "metrics_json", None):
        key = getattr(args, "metrics_key", None) or ("synthetic_lesions" if tumour else
                                                     "synthetic_masses" if masses else None)
        update_metrics_json(args.metrics_json, args.task, entry, key)
        log(f"wrote the {args.task} metrics into {args.metrics_json}")
    return entry
