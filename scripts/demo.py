"""`make demo`: segment a real example CT with the liver, spleen and pancreas models on the CPU.

The CT (upper abdomen, 3 mm) and TotalSegmentator's own segmentation of it come from the TotalSegmentator
2.18.0 source distribution on PyPI (see example_data.py). Each task runs through the `msdsegment` command
line, as users run it. Written into --out: one Slicer segmentation (.seg.nrrd) and one summary (.json) per
task, volumes.json (volumes, Dice against TotalSegmentator, timings) and overlay.png (axial, coronal and
sagittal views through the organs with every task's labels in its model card's colours).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import example_data

REPOSITORY = example_data.REPOSITORY
ENGINE_FOLDER = os.path.join(REPOSITORY, "MSDSegment")
if ENGINE_FOLDER not in sys.path:
    sys.path.insert(0, ENGINE_FOLDER)

from MSDSegmentLib import modelcard  # noqa: E402  (needs the path above when the package is not installed)
from MSDSegmentLib.atomic import atomic_output, write_json  # noqa: E402
from MSDSegmentLib.errors import MSDSegmentError  # noqa: E402

DEMO_TASKS = ("liver", "spleen", "pancreas")
CT_WINDOW = (-150.0, 250.0)  # abdominal soft-tissue window (W400, L50)
FILL_ALPHA = 0.45


class DemoError(Exception):
    """A one-line reason why the demo cannot go on."""


# ---------------------------------------------------------------------------------------------- models

def missing_models(tasks, models_dir):
    """One 'task (what is missing)' entry per task the models folder cannot serve."""
    try:
        cards = modelcard.catalogue(models_dir)
    except MSDSegmentError as error:
        return [f"{task} ({error})" for task in tasks]
    missing = []
    for task in tasks:
        if task not in cards:
            missing.append(f"{task} ({task}.json)")
            continue
        absent = modelcard.missing_weights(cards[task])
        if absent:
            missing.append(f"{task} ({', '.join(os.path.basename(path) for path in absent)})")
    return missing


# ---------------------------------------------------------------------------------------------- running

def engine_environment():
    """The command line's environment: the engine importable even where the package is not installed."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [ENGINE_FOLDER, environment.get("PYTHONPATH")]))
    return environment


def run_task(task, ct_path, out_dir, device, models_dir=None):
    """Run `msdsegment segment` for one task; returns the summary the command line writes beside its output."""
    output = os.path.join(out_dir, f"{task}.seg.nrrd")
    command = [sys.executable, "-m", "MSDSegmentLib", "segment", "--task", task, "--output", output,
               "--device", device, "--quiet", ct_path]
    if models_dir:
        command[4:4] = ["--models-dir", models_dir]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=engine_environment())
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        reason = (completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"])[-1]
        raise DemoError(f"msdsegment failed for task {task}: {reason}")
    with open(os.path.join(out_dir, f"{task}.json"), encoding="utf-8") as stream:
        summary = json.load(stream)
    summary["wall_s"] = round(wall, 3)
    return summary


# ---------------------------------------------------------------------------------------------- measures

def dice(first, second):
    """Dice overlap of two boolean masks; NaN where both are empty (nothing to agree on)."""
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    total = int(first.sum()) + int(second.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(first, second).sum()) / total


def best_slice(masks, axis):
    """Index along `axis` of the slice showing most of the structures, each weighed by its own largest
    cross-section (so that a small pancreas counts as much as a large liver). Middle slice if all empty."""
    size = masks[0].shape[axis] if masks else 0
    score = np.zeros(size)
    for mask in masks:
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        areas = np.asarray(mask, bool).sum(axis=other_axes).astype(float)
        if areas.max() > 0:
            score += areas / areas.max()
    if not np.any(score > 0):
        return size // 2
    return int(np.argmax(score))


# ---------------------------------------------------------------------------------------------- overlay

def oriented(image):
    """A SimpleITK image as a (z, y, x) array with x toward the patient's left, y posterior, z superior."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(image, "LPS")
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def view_slices(volume, index):
    """Axial, coronal and sagittal 2-D slices of a (z, y, x) LPS volume in display order.

    Radiological convention: the patient's right on the viewer's left, anterior up in the axial view,
    superior up in the coronal and sagittal views, anterior on the left in the sagittal view.
    """
    z, y, x = index
    return [volume[z], volume[::-1, y, :], volume[::-1, :, x]]


def view_extents(shape, spacing):
    """Width and height in mm of the axial, coronal and sagittal views of a (z, y, x) volume."""
    nz, ny, nx = shape
    sx, sy, sz = spacing
    return [(nx * sx, ny * sy), (nx * sx, nz * sz), (ny * sy, nz * sz)]


def colour_overlay(label_slices, colours):
    """RGBA image: each label filled half-transparent with an opaque outline, later layers on top.

    label_slices: 2-D integer arrays (one per task); colours: for each, {label value: (r, g, b) in 0-255}.
    """
    from scipy import ndimage

    rgba = np.zeros(label_slices[0].shape + (4,), np.float32)
    for labels, palette in zip(label_slices, colours):
        for value, colour in palette.items():
            mask = labels == value
            if not mask.any():
                continue
            edge = mask & ~ndimage.binary_erosion(mask)
            rgba[mask, :3] = np.asarray(colour, np.float32) / 255.0
            rgba[mask, 3] = FILL_ALPHA
            rgba[edge, 3] = 1.0
    return rgba


VIEW_NAMES = ("Axial", "Coronal", "Sagittal")
VIEW_DIRECTIONS = (("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I"))  # left, right, top, bottom


def render_overlay(ct, spacing, columns, legend, path, title, dpi=150):
    """Save a figure: one column per segmentation (name, label volumes, palettes), one row per view, each
    view through the organs and drawn in millimetres (true proportions whatever the voxel spacing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    masks = [labels > 0 for _name, layers, _palettes in columns for labels in layers]
    index = tuple(best_slice(masks, axis) for axis in range(3))
    extents = view_extents(ct.shape, spacing)
    width_mm = max(width for width, _height in extents)
    heights_mm = [height for _width, height in extents]
    figure_width = 5.0 * len(columns)
    figure_height = figure_width * sum(heights_mm) / (width_mm * len(columns)) + 1.2
    figure, axes = plt.subplots(3, len(columns), figsize=(figure_width, figure_height), squeeze=False,
                                gridspec_kw={"height_ratios": heights_mm, "hspace": 0.08, "wspace": 0.03})
    ct_views = view_slices(ct, index)
    for column, (name, layers, palettes) in enumerate(columns):
        label_views = [view_slices(labels, index) for labels in layers]
        for row in range(3):
            axis = axes[row][column]
            width, height = extents[row]
            extent = (0, width, height, 0)
            axis.imshow(ct_views[row], cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], extent=extent,
                        interpolation="bilinear")
            axis.imshow(colour_overlay([views[row] for views in label_views], palettes), extent=extent,
                        interpolation="nearest")
            axis.set_xlim(0, width)
            axis.set_ylim(height, 0)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=10)
            if column == 0:
                axis.set_ylabel(VIEW_NAMES[row], fontsize=10)
            left, right, top, bottom = VIEW_DIRECTIONS[row]
            for text, x, y, h, v in ((left, 0.01, 0.5, "left", "center"), (right, 0.99, 0.5, "right", "center"),
                                     (top, 0.5, 0.98, "center", "top"), (bottom, 0.5, 0.02, "center", "bottom")):
                axis.text(x, y, text, transform=axis.transAxes, color="yellow", fontsize=7, ha=h, va=v)
    handles = [Patch(facecolor=np.asarray(colour) / 255.0, edgecolor="black", label=text) for text, colour in legend]
    columns_of_legend = min(len(handles), 3 * len(columns))  # what fits under the figure's width
    legend_rows = -(-len(handles) // columns_of_legend)
    figure.legend(handles=handles, loc="lower center", ncol=columns_of_legend, frameon=False, fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.subplots_adjust(left=0.05, right=0.99, top=1 - 0.55 / figure_height,
                           bottom=(0.3 + 0.22 * legend_rows) / figure_height)
    with atomic_output(path, ".png") as temporary:
        figure.savefig(temporary, dpi=dpi)
    plt.close(figure)
    return index


def compact_png(source, target, max_bytes=300_000):
    """A small copy for the README: 256-colour palette (octree keeps the small saturated areas, such as the
    label colours, that median cut merges away), narrowed until it is under `max_bytes`."""
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
    for width in (1200, 1000, 800, 600):
        scaled = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        scaled.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)
        if os.path.getsize(target) <= max_bytes:
            break
    return os.path.getsize(target)


# ---------------------------------------------------------------------------------------------- report

def format_table(rows, headers):
    """Plain-text table with right-aligned numbers (strings as given, left-aligned)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(row) for row in cells[1:]])


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return text in ("-", "n/a", "")


def number_text(value, digits=1):
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------- main

def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="output folder (created)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--models-dir", help="model cards and weights (default: the bundled models)")
    parser.add_argument("--readme-image", help="also write a compact copy of the overlay here (< 300 KB)")
    parser.add_argument("--readme-abdomen-image", help="also write a compact copy of the abdomen task's overlay here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    models_dir = args.models_dir or modelcard.MODELS_DIR
    missing = missing_models(DEMO_TASKS, models_dir)
    if missing:
        print(f"demo: error: models missing in {os.path.relpath(models_dir)}: {'; '.join(missing)}. "
              "Train and export them (python -m Training export ...) or copy the released models there.",
              file=sys.stderr)
        return 2
    try:
        return run_demo(args, models_dir)
    except (DemoError, example_data.DataError, MSDSegmentError) as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 2


def run_combined(args, ct_path, ct, spacing, models_dir, single_layers):
    """The abdomen task (the three tasks in one run and one segmentation) on the same CT: its overlay, its time
    and whether its labels are the single tasks' (it must give exactly their voxels)."""
    import SimpleITK as sitk

    summary = run_task("abdomen", ct_path, args.out, args.device, args.models_dir)
    card = modelcard.find_card("abdomen", models_dir)
    labels, _ = oriented(sitk.ReadImage(summary["output"]))
    expected = np.zeros_like(labels)
    for part in card.parts:  # the overlap order: the first task keeps a voxel two of them label
        single = single_layers[DEMO_TASKS.index(part.card.task)]
        for value, combined in part.values.items():
            expected[(single == value) & (expected == 0)] = combined
    same = bool(np.array_equal(labels, expected))
    print(f"  abdomen (one run): {', '.join(f'{name} {ml:.1f} mL' for name, ml in summary['volumes_ml'].items())} "
          f"({summary['wall_s']:.1f} s); the single tasks' voxels: {'yes' if same else 'NO'}")
    path = os.path.join(args.out, "abdomen.png")
    render_overlay(ct, spacing, [("MSDSegment, abdomen task (one run)", [labels],
                                  [{label.value: label.color for label in card.trained_labels}])],
                   [(label.name, label.color) for label in card.trained_labels], path,
                   f"Abdomen task on {example_data.SMALL_CT}, {args.device}, {summary['wall_s']:.1f} s")
    if args.readme_abdomen_image:
        compact_png(path, args.readme_abdomen_image)
    return {"output": os.path.basename(summary["output"]), "volumes_ml": summary["volumes_ml"],
            "wall_s": summary["wall_s"], "timings_s": summary["timings_s"], "warnings": summary["warnings"],
            "same_voxels_as_single_tasks": same}


def run_demo(args, models_dir):
    import SimpleITK as sitk

    ct_path = example_data.example_file(example_data.SMALL_CT)
    reference_path = example_data.example_file(example_data.SMALL_CT_SEGMENTATION)
    os.makedirs(args.out, exist_ok=True)
    ct_image = sitk.ReadImage(ct_path)
    print(f"Segmenting {example_data.SMALL_CT} ({' x '.join(map(str, ct_image.GetSize()))} voxels, "
          f"{' x '.join(f'{s:.1f}' for s in ct_image.GetSpacing())} mm) on {args.device}: "
          f"{', '.join(DEMO_TASKS)}")

    ct, spacing = oriented(ct_image)
    reference, _ = oriented(sitk.ReadImage(reference_path))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    layers, palettes, legend, reference_palettes, reference_layers = [], [], [], [], []
    results, table = {}, []
    for task in DEMO_TASKS:
        summary = run_task(task, ct_path, args.out, args.device, args.models_dir)
        print(f"  {task}: {', '.join(f'{name} {ml:.1f} mL' for name, ml in summary['volumes_ml'].items())} "
              f"({summary['wall_s']:.1f} s)")
        card = modelcard.find_card(task, models_dir)
        labels, _ = oriented(sitk.ReadImage(summary["output"]))
        reference_organ = reference == example_data.REFERENCE_CLASSES[task]
        agreement = dice(labels > 0, reference_organ)  # organ with its tumours, as TotalSegmentator's organ
        reference_ml = float(reference_organ.sum()) * voxel_ml
        organ = next(label for label in card.trained_labels if label.kind == "organ")
        layers.append(labels)
        palettes.append({label.value: label.color for label in card.trained_labels})
        reference_layers.append(reference_organ.astype(np.uint8))
        reference_palettes.append({1: organ.color})
        legend.extend((label.name, label.color) for label in card.trained_labels)
        results[task] = {"output": os.path.basename(summary["output"]), "volumes_ml": summary["volumes_ml"],
                         "totalsegmentator_ml": round(reference_ml, 3),
                         "dice_vs_totalsegmentator": None if agreement != agreement else round(agreement, 4),
                         "timings_s": summary["timings_s"], "wall_s": summary["wall_s"],
                         "warnings": summary["warnings"]}
        for number, label in enumerate(card.trained_labels):
            first = number == 0
            table.append([task if first else "", label.name, number_text(summary["volumes_ml"].get(label.name)),
                          number_text(reference_ml) if first else "-", number_text(agreement, 3) if first else "-",
                          number_text(summary["wall_s"]) if first else ""])

    overlay_path = os.path.join(args.out, "overlay.png")
    index = render_overlay(
        ct, spacing,
        [("MSDSegment", layers, palettes), ("TotalSegmentator 2.18 (reference)", reference_layers, reference_palettes)],
        legend, overlay_path, f"MSDSegment on {example_data.SMALL_CT} (TotalSegmentator's test CT), {args.device}")
    if args.readme_image:
        compact_png(overlay_path, args.readme_image)

    results["abdomen"] = run_combined(args, ct_path, ct, spacing, models_dir, layers)

    volumes = {"input": example_data.SMALL_CT, "input_size": list(ct_image.GetSize()),
               "input_spacing_mm": list(ct_image.GetSpacing()), "device": args.device, "tasks": results,
               "overlay": {"file": "overlay.png", "slice_index_zyx": list(index)}, "credit": example_data.CREDIT}
    write_json(volumes, os.path.join(args.out, "volumes.json"))

    print()
    print(format_table(table, ["Task", "Structure", "MSDSegment mL", "TotalSegmentator mL",
                               "Dice", "CLI time s"]))
    print()
    print("Dice: the task's organ (with its tumours) against TotalSegmentator's own segmentation of the same CT.")
    print("The CT covers only 30 slices (9 cm) of the upper abdomen: the liver and pancreas are only partly in it.")
    for task, result in results.items():
        for warning in result["warnings"]:
            print(f"warning ({task}): {warning}")
    print(f"Wrote {', '.join(f'{t}.seg.nrrd' for t in DEMO_TASKS)}, their .json summaries, volumes.json and "
          f"overlay.png in {args.out}/")
    print(example_data.CREDIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
