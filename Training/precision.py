"""`python -m Training precision`: a task's validation Dice under fp32, bf16 and fp16, written into its card.

The engine's `auto` precision uses bf16 (CPU) or fp16 (GPU) for a task only where this measurement shows
every label's mean Dice within TOLERANCE of fp32; a re-exported card has no measurement, so `auto` then
stays at fp32 until it is measured again. On a CPU, fp16 is measured through PyTorch's CPU autocast: the
same number format as on a GPU, not the same kernels, and slow (minutes per CT for a wide network); `--precisions`
leaves it out, and `auto` then keeps a GPU at fp32 for that task.
"""

import argparse
import datetime
import json

from MSDSegmentLib import modelcard

from .evaluate import run_evaluation
from .export import write_json

TOLERANCE = 0.002
PRECISIONS = ("fp32", "bf16", "fp16")


def run_precision(args, log=print):
    models_dir = args.models_dir or modelcard.MODELS_DIR
    path = modelcard.find_card(args.task, models_dir).path
    # fp32 is the reference the others are held to, so it is always measured.
    measured_precisions = ("fp32", *[name for name in (args.precisions or PRECISIONS) if name != "fp32"])
    dice, entry = {}, {}
    for precision in measured_precisions:
        settings = argparse.Namespace(**{**vars(args), "precision": precision, "csv": None, "metrics_json": None,
                                         "synthetic_lesions": None, "lesion_rounds": 1})
        entry = run_evaluation(settings, log=log)
        dice[precision] = entry["dice"]
    measured = {**dice, "tolerance": TOLERANCE, "cases": entry["cases"], "data": entry["data"],
                "device": entry["device"], "date": datetime.date.today().isoformat(),
                "method": "mean Dice per label through the engine; fp16 on a CPU through PyTorch's CPU autocast"}
    with open(path, encoding="utf-8") as stream:
        card = json.load(stream)
    card["precision"] = measured
    write_json(card, path)
    loaded = modelcard.load_card(path)
    for precision in measured_precisions[1:]:
        change = max(abs(dice[precision][label] - value) for label, value in dice["fp32"].items())
        log(f"{args.task}: {precision} changes the mean Dice by at most {change:.4f} "
            f"({'used' if precision in loaded.auto_precisions() else 'not used'} by auto)")
    log(f"wrote the precision figures into {path}")
    return measured
