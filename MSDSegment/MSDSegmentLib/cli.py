"""Command line: `python -m MSDSegmentLib segment ...` and `python -m MSDSegmentLib tasks` (also `msdsegment`)."""

import argparse
import os
import sys
import threading
import time

from .errors import MSDSegmentError
from .atomic import write_json
from .imageio import LABEL_SUFFIXES, label_suffix
from .network import leave_out_monai_extras

PROG = "msdsegment"
EXIT_CANCELLED = 130  # as a shell reports a process stopped by Ctrl+C
FORMATS = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "seg.nrrd": ".seg.nrrd", "mha": ".mha", "dicom-seg": ".dcm"}


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="Segment organs and tumours with MSDSegment's models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("segment", help="segment one case (--output) or several (--output-dir)")
    run.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="NIfTI, NRRD, MHA or DICOM folder; prostate: one 4-D file or T2 then ADC")
    run.add_argument("--task", required=True, help="liver, spleen, pancreas or prostate")
    target = run.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="label map for one case (.nii.gz, .nii, .nrrd, .seg.nrrd, .mha), or a DICOM "
                                         "SEG (.dcm) for a DICOM series input")
    target.add_argument("--output-dir", help="folder for several cases: <input name>.nii.gz each (see --format)")
    run.add_argument("--format", choices=list(FORMATS),
                     help="--output-dir's files (default nii.gz); dicom-seg: a DICOM Segmentation object for each "
                          "DICOM series input, referencing it (with --output: an output ending in .dcm)")
    run.add_argument("--cluster", metavar="local:N|auto|ray://HOST:PORT",
                     help="with --output-dir: run the cases on Ray, N local workers or a running cluster; resumable, "
                          "with OUT/summary.csv and summary.json (pip install \"msdsegment[cluster]\")")
    run.add_argument("--workers", type=int,
                     help="workers on a running cluster (default: one per GPU, else one per 4 CPUs)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="the network's arithmetic; auto: bf16 on CPUs with native bf16, fp16 on a GPU, where "
                          "the model card shows it keeps the validation Dice; fp32 otherwise")
    run.add_argument("--tta", action="store_true", help="test-time mirroring over the model's symmetric axes")
    run.add_argument("--no-largest", action="store_true", help="keep every component, not only the largest")
    run.add_argument("--models-dir", help="folder of model cards and weights (default: the bundled models)")
    run.add_argument("--quiet", action="store_true", help="print errors only")
    run.add_argument("--progress-lines", action="store_true",
                     help="print 'PROGRESS <fraction> <stage>' lines on stdout (for the Slicer module)")
    run.add_argument("--exit-when-stdin-closes", action="store_true",
                     help="stop at once when standard input closes (the Slicer module's cancel)")
    tasks = commands.add_parser("tasks", help="list the bundled models and their validation figures")
    tasks.add_argument("--models-dir")
    return parser


def output_stem(path):
    suffix = ".dcm" if path.lower().endswith(".dcm") else label_suffix(path)
    return path[: -len(suffix)]


def case_name(path):
    name = os.path.basename(os.path.normpath(path))
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class Reporter:
    """Terminal progress bar, machine-readable progress lines, or silence."""

    def __init__(self, quiet, lines):
        self.lines = lines
        self.bar = None
        if not quiet and not lines and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # not installed in Slicer's Python: no bar
                return
            self.bar = tqdm(total=100, unit="%", leave=False, bar_format="{desc:<32}{bar}| {n:.0f}%")

    def __call__(self, fraction, stage):
        if self.lines:
            print(f"PROGRESS {fraction:.3f} {stage}", flush=True)
        if self.bar is not None:
            self.bar.set_description_str(stage)
            self.bar.update(fraction * 100 - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def segment_case(inputs, output, args, say, progress=None):
    """Segment one case into `output` and its summary beside it. progress(fraction, stage), if given, replaces
    the terminal's progress report (the background worker's JSON lines)."""
    from .engine import discard_preloads, preload, segment
    from .imageio import read_channels, write_labels

    sources = check_output(output, inputs)  # refuse an unsupported output before any work
    preload(args.task, args.device, args.precision, args.models_dir)  # while the input is read
    started = time.perf_counter()
    try:
        channels = read_channels(inputs)
    except BaseException:
        discard_preloads()
        raise
    read_seconds = time.perf_counter() - started
    reporter = Reporter(args.quiet or progress is not None, args.progress_lines)
    try:
        result = segment(channels, args.task, device=args.device, tta=args.tta, keep_largest=not args.no_largest,
                         progress=progress or reporter, models_dir=args.models_dir, precision=args.precision)
    finally:
        reporter.close()
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    started = time.perf_counter()
    if sources is not None:
        from .dicomseg import write_segmentation

        write_segmentation(output, result.labels, result.card, sources)
    else:
        write_labels(output, result.labels, result.card, [value for value, ml in result.volumes_ml.items() if ml > 0])
    timings = {"read": read_seconds, **result.timings, "write": time.perf_counter() - started}
    summary = {
        "task": args.task, "inputs": [os.path.abspath(p) for p in inputs], "output": os.path.abspath(output),
        "model": {"card": os.path.basename(result.card.path), "weights": [s.weights for s in result.card.stages],
                  "sha256": [s.sha256 for s in result.card.stages]},
        "device": result.device,
        "precision": result.precision,
        "volumes_ml": {result.card.label(v).name: round(ml, 3) for v, ml in result.volumes_ml.items()},
        "label_values": {result.card.label(v).name: v for v in result.volumes_ml},
        "quality": {result.card.label(v).name: entry for v, entry in result.quality.items()},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "warnings": result.warnings,
    }
    write_json(summary, output_stem(output) + ".json")
    say(f"{output}: " + ", ".join(f"{n} {ml:.1f} mL" for n, ml in summary["volumes_ml"].items())
        + f" ({sum(timings.values()):.1f} s on {result.device}, {result.precision})")


def check_output(output, inputs):
    """Refuse an output format the inputs cannot give; for a DICOM SEG, the source images' headers."""
    if output.lower().endswith(".dcm"):
        from .dicomseg import source_series

        return source_series(inputs)
    label_suffix(output)
    return None


def output_suffix(args):
    return FORMATS[args.format or "nii.gz"]


def batch_outputs(args):
    """--output-dir's file for each input: <input name><format's suffix>."""
    return [os.path.join(args.output_dir, case_name(path) + output_suffix(args)) for path in args.inputs]


def list_tasks(models_dir):
    from .modelcard import MODELS_DIR, catalogue, missing_weights

    cards = catalogue(models_dir or MODELS_DIR)
    if not cards:
        print(f"No models in {models_dir or MODELS_DIR}")
    for task, card in cards.items():
        missing = " [weights missing]" if missing_weights(card) else ""
        print(f"{task:<9} {card.summary()}{missing}")
        for note in card.notes():
            print(f"{'':<9} {note}")


def exit_when_stdin_closes():
    """End this process as soon as its standard input reaches end-of-file.

    In Slicer the engine runs under the CTK launcher (PythonSlicer), so killing the process that Slicer
    started kills only the launcher, and the real interpreter would run on. Slicer closes the engine's
    standard input on cancel, and every process that shares it sees end-of-file, whatever launched it.
    os._exit stops at once, even inside a network call: nothing is written but temporary files, which
    the caller removes."""
    def watch():
        try:
            descriptor = sys.stdin.fileno()
            while os.read(descriptor, 4096):  # the raw descriptor: a buffered read would hold a lock at exit
                pass
        except (OSError, ValueError, AttributeError):
            pass
        os._exit(EXIT_CANCELLED)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def segment_batch(args, say):
    """Each input on its own into --output-dir: a bad one is reported (its one-line reason) and skipped, the
    others are segmented and kept; the exit status says whether any failed."""
    if not os.path.isdir(args.output_dir):
        raise MSDSegmentError(f"Output folder does not exist: {args.output_dir}")
    failed = []
    for path, output in zip(args.inputs, batch_outputs(args)):
        try:
            segment_case([path], output, args, say)
        except (MSDSegmentError, MemoryError) as error:
            failed.append(path)
            print(f"{PROG}: error: {path}: {error or 'out of memory'}", file=sys.stderr)
    if failed:
        print(f"{PROG}: error: {len(failed)} of {len(args.inputs)} inputs failed: {', '.join(failed)}",
              file=sys.stderr)
        return 2
    return 0


def run():
    """The command line's entry point: main(), then an immediate exit. Every output is written and closed by
    then, and tearing down PyTorch and the interpreter's objects would add about 0.7 s to each run."""
    leave_out_monai_extras()  # this process is the engine's own
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "exit_when_stdin_closes", False):
        exit_when_stdin_closes()
    try:
        if args.command == "tasks":
            list_tasks(args.models_dir)
            return 0
        say = (lambda text: None) if args.quiet else print
        if args.output:
            if args.cluster or (args.format and not args.output.lower().endswith(FORMATS[args.format])):
                raise MSDSegmentError("--cluster and --format go with --output-dir (--output takes its format "
                                      "from its suffix: .dcm for DICOM SEG)")
            segment_case(args.inputs, args.output, args, say)
            return 0
        if args.cluster:
            from .cluster import segment_on_ray

            return segment_on_ray(args, batch_outputs(args), output_suffix(args), segment_case, say)
        return segment_batch(args, say)
    except MSDSegmentError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except MemoryError:
        print(f"{PROG}: error: out of memory", file=sys.stderr)
        return 2
