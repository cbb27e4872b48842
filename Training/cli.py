"""python -m Training {train, evaluate, precision, locations, quality, dicom-masks, pseudo-labels, lesion-stats,
export, reproduce}: see Training/README.md."""

import argparse
import importlib
import sys

from MSDSegmentLib.errors import MSDSegmentError

from .models import MODELS, LabelMappingError


def fold_argument(text):
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fold is 0-4 or 'all', not {text!r}") from None


def count_argument(what, least):
    """An argparse type for a whole number of at least `least`, refused in one line naming `what` otherwise."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"{what} is {least} or more, not {text!r}")
        return value
    return parse


def spacing_argument(text):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"a grid spacing is three positive mm values such as 1.5,1.5,3, not {text!r}")
    return values


def add_common(parser):
    parser.add_argument("--model", required=True, choices=sorted(MODELS),
                        help="which network to train (abdomen serves the liver, spleen and pancreas tasks)")
    parser.add_argument("--data", help="MSD-layout dataset folder (default: the model's default data)")
    parser.add_argument("--fold", type=fold_argument, default=0,
                        help="validation fold of the fixed 5-fold split (0-4), or 'all': train on every case")
    parser.add_argument("--out", default="runs", help="folder for plans, caches and runs")
    parser.add_argument("--label-map", help="dataset value:class pairs, e.g. 1:1,6:2,11:3 (default: by label name)")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m Training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="plan, cache and train (resumable)")
    add_common(train)
    train.add_argument("--steps", type=int, default=4000)
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--val-every", type=count_argument("a number of steps between validations", 1), default=250)
    train.add_argument("--time-limit", type=float, default=0, help="minutes; stop cleanly (resumable) after that")
    train.add_argument("--stop-at", type=int, default=0, metavar="STEP",
                       help="stop cleanly (resumable) at this step; the learning rate still follows --steps")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    train.add_argument("--init-from", help="start from exported weights (.pt), e.g. on a new machine")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument("--workers", type=count_argument("a number of worker processes", 0), default=0,
                       help="processes that draw and augment the batches ahead, on the CPU, for a GPU; 0: all in "
                            "the training process, augmented on its device, which a resumed run replays exactly")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                       help="patch size in voxels instead of the model's (a new plan records it)")
    train.add_argument("--filters", type=int, nargs="+", metavar="N",
                       help="feature maps per network level instead of the model's, e.g. 4 8 16 (their count "
                            "caps the depth; a new plan records them)")
    train.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="forward-pass arithmetic: auto = fp16 on a GPU, fp32 on a CPU; bf16 uses a CPU's native "
                            "bf16 (AVX-512 BF16, AMX) or a GPU's")
    train.add_argument("--neighbours", action="store_true",
                       help="learn every neighbouring organ the model lists (abdominal models: each BTCV organ) as "
                            "its own context class; tasks still output only their labels (a new plan records them)")
    train.add_argument("--quiet", action="store_true")

    evaluate = commands.add_parser("evaluate", help="Dice, HD95 and volume error of a task's shipped model")
    evaluate.add_argument("--task", required=True)
    evaluate.add_argument("--data", required=True, help="MSD-layout folder with labels")
    evaluate.add_argument("--cases", help="comma-separated case ids (default: all)")
    evaluate.add_argument("--fold", type=int, help="evaluate only this fold's validation cases")
    evaluate.add_argument("--label-map", help="dataset value:task label pairs (default: by label name)")
    evaluate.add_argument("--models-dir", help="folder of model cards (default: the extension's)")
    evaluate.add_argument("--csv", help="write the per-case table here")
    evaluate.add_argument("--lesions-csv", help="write every reference and false lesion here, with its volume and "
                                                "the engine's confidence (to choose the tumours' minimum confidence)")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                          help="the network's arithmetic (default fp32, the reference)")
    evaluate.add_argument("--synthetic-lesions", type=int, metavar="SEED",
                          help="paint synthetic tumours (seeded per case) into the reference organ first and "
                               "score the tumour class too, with lesion-wise sensitivity and false positives")
    evaluate.add_argument("--synthetic-masses", type=int, metavar="SEED",
                          help="paint a synthetic mass (seeded per case) beside the reference organ or pressing into "
                               "it first, and report how much of it the engine labels organ or tumour")
    evaluate.add_argument("--lesion-rounds", type=int, default=1, metavar="N",
                          help="with --synthetic-lesions or --synthetic-masses: segment each case N times with "
                               "other ones (seed, seed + 1, ...) for more to count")
    evaluate.add_argument("--metrics-json", help="write the mean metrics as {task: validation} into this JSON "
                                                 "(other tasks kept), for export --metrics")
    evaluate.add_argument("--metrics-key", help="with --metrics-json: put these figures under this key of the "
                                                "task's entry (e.g. another dataset's), beside the main ones")

    precision = commands.add_parser("precision", help="validation Dice of a task's model under fp32, bf16 and "
                                    "fp16, written into its card (what `auto` may use)")
    precision.add_argument("--task", required=True)
    precision.add_argument("--data", required=True, help="MSD-layout folder with labels")
    precision.add_argument("--fold", type=int, help="evaluate only this fold's validation cases")
    precision.add_argument("--cases", help="comma-separated case ids (default: all)")
    precision.add_argument("--label-map", help="dataset value:task label pairs (default: by label name)")
    precision.add_argument("--models-dir", help="folder of model cards (default: the extension's)")
    precision.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=None,
                           help="those to measure (default: all three; fp32, the reference, always); one left "
                                "out is never used by auto")
    precision.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    locations = commands.add_parser("locations", help="where each organ of a task lies relative to the liver, "
                                    "learnt from the training labels, written into its card")
    locations.add_argument("--task", required=True)
    locations.add_argument("--data", required=True, help="MSD-layout folder with labels")
    locations.add_argument("--fold", type=int, help="learn from this fold's training cases only")
    locations.add_argument("--relative-to", default="liver", help="the organ the others are placed against")
    locations.add_argument("--models-dir", help="folder of model cards (default: the extension's)")

    quality = commands.add_parser("quality", help="calibrate the quality flag from evaluate --csv files of cases "
                                  "the models did not train on, into the cards")
    quality.add_argument("--csv", nargs="+", required=True, help="per-case CSV files written by evaluate")
    quality.add_argument("--task", nargs="+", required=True, help="the cards to write the calibration into")
    quality.add_argument("--good-dice", type=float, default=0.8, help="segments below this Dice should be flagged")
    quality.add_argument("--data-text", default="", help="what the CSV files measured, for the cards")
    quality.add_argument("--models-dir", help="folder of model cards (default: the extension's)")

    dicom = commands.add_parser("dicom-masks", help="DICOM series with a DICOM mask (a mask series or a SEG "
                                "file) per structure -> an MSD-layout dataset for evaluate")
    dicom.add_argument("cases", nargs="+", metavar="CASE_FOLDER",
                       help="one folder per case, holding the CT series and the masks (see --image-folder)")
    dicom.add_argument("--image-folder", default="PATIENT_DICOM",
                       help="the CT series' folder in each case folder (or its .zip; default PATIENT_DICOM)")
    dicom.add_argument("--masks-folder", default="MASKS_DICOM",
                       help="the folder of a case's masks: <structure>/ series or <structure>.dcm SEG files "
                            "(or its .zip; '.' for the case folder itself; default MASKS_DICOM)")
    dicom.add_argument("--out", required=True, help="the MSD-layout folder to write")
    dicom.add_argument("--structure", action="append", required=True, metavar="PATTERN=LABEL",
                       help="mask folder name pattern and the label it becomes, e.g. 'livertumor*=liver tumour'; "
                            "repeat it; a later one wins where masks overlap")
    dicom.add_argument("--ids", help="comma-separated case ids (default: the folder names)")
    dicom.add_argument("--name", default="DICOM masks", help="the dataset's name in dataset.json")
    dicom.add_argument("--description", help="for dataset.json (source, citation)")
    dicom.add_argument("--licence", help="for dataset.json")

    stats = commands.add_parser("lesion-stats", help="contrast, texture, edge and size of real tumours and of "
                                "synthetic lesions, measured alike")
    stats.add_argument("--real", nargs="+", help="MSD-layout folders with real tumour labels")
    stats.add_argument("--synthetic-into", nargs="+", help="MSD-layout folders whose organs get synthetic lesions")
    stats.add_argument("--organ", default="liver")
    stats.add_argument("--tumour", default="liver tumour", help="the real tumour label's name")
    stats.add_argument("--preset", default="liver", choices=["liver", "pancreas"])
    stats.add_argument("--rounds", type=int, default=1, help="synthetic draws per case")
    stats.add_argument("--spacings", type=spacing_argument, nargs="+", metavar="X,Y,Z",
                       help="with --synthetic-into: instead, how many voxels and how much contrast lesions of "
                            "--diameter-mm keep on these grids (mm), e.g. 1.5,1.5,3 2,2,3")
    stats.add_argument("--diameter-mm", type=float, default=10.0)

    pseudo = commands.add_parser("pseudo-labels", help="a task's shipped model on a dataset's unlabelled images "
                                 "-> whole-structure labels, in a new dataset with the labelled cases")
    pseudo.add_argument("--task", required=True)
    pseudo.add_argument("--data", required=True, help="MSD-layout folder whose dataset.json lists 'test' images")
    pseudo.add_argument("--out", required=True, help="the MSD-layout folder to write (train --data reads it)")
    pseudo.add_argument("--models-dir", help="folder of model cards (default: the extension's)")
    pseudo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    reproduce = commands.add_parser("reproduce", help="replay a shipped stage's recorded recipe (Training/recipes) "
                                    "into a folder and export it there (resumable; CPU, GPU or torchrun)")
    reproduce.add_argument("model", choices=sorted(MODELS))
    reproduce.add_argument("--out", required=True, help="the folder to replay into (runs, weights, models/)")
    reproduce.add_argument("--data", help="dataset folder for every run instead of each model's default")
    reproduce.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    reproduce.add_argument("--shorten", type=int, default=1, metavar="N",
                           help="divide every run's step counts by N: the same runs, shorter (a check of the recipe)")
    reproduce.add_argument("--train-flags", help="more train flags for every run, e.g. '--batch-size 4' or "
                                                 "'--precision bf16'")
    reproduce.add_argument("--recipes", help="folder of recipes (default: Training/recipes)")
    reproduce.add_argument("--dry-run", action="store_true", help="list the runs it would replay, and stop")
    reproduce.add_argument("--quiet", action="store_true")

    export = commands.add_parser("export", help="write weights and model cards into the extension")
    add_common(export)
    export.add_argument("--checkpoint", help="weights (.pt) or a training checkpoint (.ckpt) to export "
                        "(default: the run's best_model.pt)")
    export.add_argument("--steps", type=int, help="training steps behind --checkpoint, for the card "
                        "(default: read from the run's last.ckpt, or from --checkpoint when it is a .ckpt)")
    export.add_argument("--models-dir", help="destination (default: MSDSegment/Resources/Models)")
    export.add_argument("--metrics", help="JSON of measured validation metrics to put in the cards")
    return parser


# Each command's module and function, imported only when that command runs (torch and MONAI are heavy).
COMMANDS = {"train": ("pipeline", "run_training"), "evaluate": ("evaluate", "run_evaluation"),
            "precision": ("precision", "run_precision"), "locations": ("locations", "run_locations"),
            "quality": ("quality", "run_quality"), "dicom-masks": ("dicom_masks", "run_conversion"),
            "pseudo-labels": ("pseudo_labels", "run_pseudo_labels"),
            "lesion-stats": ("lesion_statistics", "run_lesion_statistics"),
            "export": ("export", "run_export"), "reproduce": ("reproduce", "run_reproduce")}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        module, function = COMMANDS[args.command]
        getattr(importlib.import_module(f".{module}", __package__), function)(args)
    except (MSDSegmentError, LabelMappingError) as error:
        print(f"python -m Training {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
