"""`python -m Training quality`: calibrate the quality flag on cases the models did not train on.

Reads the per-case CSV files `evaluate --csv` wrote (each row: a segment's Dice and its confidence), picks the
confidence below which a segment is flagged ("check this segment") so that the segments below the Dice that
counts as trustworthy are flagged and the others are not (the best balanced accuracy over the observed values),
and writes it, with the table that chose it, into the given tasks' cards. The flag also fires, whatever the
confidence, for an organ not found or found away from where it lies (see the engine's segment_quality).
"""

import csv
import datetime
import json
import math

from MSDSegmentLib import modelcard
from MSDSegmentLib.errors import InputError

from .export import write_json

GOOD_DICE = 0.8


def read_segments(paths):
    """(case, label, Dice, confidence) of every scored segment in the CSV files (mean rows and segments without a
    defined Dice or confidence left out)."""
    segments = []
    for path in paths:
        with open(path, encoding="utf-8") as stream:
            for row in csv.DictReader(stream):
                if row["case"] == "mean" or not row.get("confidence") or not row.get("dice"):
                    continue
                dice, confidence = float(row["dice"]), float(row["confidence"])
                if math.isfinite(dice):
                    segments.append((row["case"], row["label"], dice, confidence))
    return segments


def choose_threshold(segments, good=GOOD_DICE):
    """The minimum confidence with the best balanced accuracy at telling segments below `good` Dice apart:
    the middle of the widest gap between observed confidences that reaches it (the safest place for a cut)."""
    bad = [s for s in segments if s[2] < good]
    fine = [s for s in segments if s[2] >= good]
    if not bad or not fine:
        raise InputError(f"Need segments both below and above Dice {good} to calibrate ({len(bad)} and {len(fine)})")

    def balanced(threshold):
        return (sum(s[3] < threshold for s in bad) / len(bad) + sum(s[3] >= threshold for s in fine) / len(fine)) / 2

    values = sorted({s[3] for s in segments})
    gaps = [(low, high) for low, high in zip(values, values[1:])]
    low, high = max(gaps, key=lambda gap: (balanced((gap[0] + gap[1]) / 2), gap[1] - gap[0]))
    return round((low + high) / 2, 4), bad, fine


def run_quality(args, log=print):
    segments = read_segments(args.csv)
    threshold, bad, fine = choose_threshold(segments, args.good_dice)
    flagged_bad = [s for s in bad if s[3] < threshold]
    flagged_fine = [s for s in fine if s[3] < threshold]
    calibration = {
        "good_dice": args.good_dice, "segments": len(segments),
        "below_good_flagged": f"{len(flagged_bad)} of {len(bad)}", "above_good_flagged": f"{len(flagged_fine)} of {len(fine)}",
        "missed": [f"{case} {label} (Dice {dice:.2f}, confidence {c:.2f})" for case, label, dice, c in bad
                   if c >= threshold],
        "false_alarms": [f"{case} {label} (Dice {dice:.2f}, confidence {c:.2f})" for case, label, dice, c in flagged_fine],
        "data": args.data_text, "date": datetime.date.today().isoformat(),
    }
    log(f"minimum confidence {threshold:.4f}: flags {calibration['below_good_flagged']} segments below Dice "
        f"{args.good_dice} and {calibration['above_good_flagged']} above it")
    for task in args.task:
        card = modelcard.find_card(task, args.models_dir or modelcard.MODELS_DIR)
        with open(card.path, encoding="utf-8") as stream:
            data = json.load(stream)
        data["quality"] = {"min_confidence": threshold, "calibration": calibration}
        write_json(data, card.path)
        log(f"wrote the quality calibration into {card.path}")
    return threshold
