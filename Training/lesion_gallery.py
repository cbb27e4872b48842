"""A PNG gallery of synthetic lesions in real cases, for a visual check of `Training.lesions`.

    python -m Training.lesion_gallery --data ../shared/data/BTCV-Abdomen --organ liver --out gallery.png [--seed N]

Each row is one case on the canonical grid: an axial slice through the centre of its largest lesion,
before, after, and after with the lesion (red) and organ (green) outlines.
"""

import argparse
import os

import numpy as np
import SimpleITK as sitk

from MSDSegmentLib.atomic import atomic_output
from MSDSegmentLib.preprocessing import labels_to_canonical, to_canonical

from .dataset import read_dataset
from .lesions import PRESETS, synthesise_lesions_detailed

VIEW_MARGIN_MM = 15.0


def organ_label_value(meta, organ):
    """The dataset's label value for `organ`, matched by name in dataset.json."""
    for value, name in meta["labels"].items():
        if name.lower() == organ:
            return int(value)
    raise ValueError(f"dataset has no label named '{organ}' (labels: {sorted(meta['labels'].values())})")


def load_case(case, spacing, window):
    image = sitk.ReadImage(case["image"])
    hu, reference = to_canonical(image, [spacing] * 3, {"type": "ct", "window": list(window)})
    label = labels_to_canonical(sitk.ReadImage(case["label"]), reference)
    return np.clip(hu, *window), label


def pick_cases(cases, count):
    """`count` cases spread evenly over the sorted list (the same ones whatever the seed)."""
    ordered = sorted(cases, key=lambda case: case["id"])
    indices = np.unique(np.linspace(0, len(ordered) - 1, min(count, len(ordered))).round().astype(int))
    return [ordered[i] for i in indices]


def view_box(organ_slice, centre, spacing):
    """In-plane crop around the organ in this slice (and the lesion centre), with a margin."""
    coords = np.argwhere(organ_slice)
    coords = np.vstack([coords, np.array(centre[:2])[None]])
    margin = int(np.ceil(VIEW_MARGIN_MM / spacing))
    lower = np.maximum(coords.min(axis=0) - margin, 0)
    upper = np.minimum(coords.max(axis=0) + margin + 1, organ_slice.shape)
    return slice(lower[0], upper[0]), slice(lower[1], upper[1])


def describe(lesions, most=4):
    """The largest lesions in a few words each (and how many more there are)."""
    largest = sorted(lesions, key=lambda lesion: -lesion.radius_mm)
    parts = [f"r{lesion.radius_mm:.0f}mm {lesion.mode} {lesion.contrast_hu:+.0f}HU"
             + ("" if lesion.shape == "ellipsoid" else f" {lesion.shape}") + (" rim" if lesion.rim else "")
             + (" necrotic" if lesion.necrosis else "") + (" mass" if lesion.mass_effect else "")
             for lesion in largest[:most]]
    more = len(lesions) - most
    return "; ".join(parts) + (f"; +{more} more" if more > 0 else "")


def draw(rows, window, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for row, (case_id, before, after, lesion, organ, text) in zip(axes, rows):
        # Arrays are (x, y): transpose so the patient's right is on the viewer's left, anterior up.
        for axis, image in zip(row, (before, after, after)):
            axis.imshow(image.T, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        row[2].contour(organ.T.astype(float), levels=[0.5], colors="lime", linewidths=0.6)
        if lesion.any():
            row[2].contour(lesion.T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        row[0].set_ylabel(case_id, fontsize=8)
        row[1].set_title(text, fontsize=6)
    axes[0][0].set_title("before", fontsize=8, loc="left")
    figure.tight_layout()
    try:
        with atomic_output(path, ".png") as temporary:
            figure.savefig(temporary, dpi=80)
            _compress(temporary)
    finally:
        plt.close(figure)


def _compress(path):
    """Palette PNG: a grey-level image with two outline colours needs no more than 256 colours."""
    from PIL import Image

    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    palette.save(path, optimize=True)


def make_gallery(data, organ, out, seed=0, count=5, spacing=1.5):
    config = PRESETS[organ]
    meta, cases = read_dataset(data)
    value = organ_label_value(meta, organ)
    rows = []
    for index, case in enumerate(pick_cases(cases, count)):
        hu, label = load_case(case, spacing, config.hu_window)
        organ_mask = label == value
        if not organ_mask.any():
            continue
        rng = np.random.default_rng([seed, index])
        after, lesion_mask, lesions = synthesise_lesions_detailed(hu, organ_mask, [spacing] * 3, rng, config)
        largest = max(lesions, key=lambda lesion: lesion.voxels)
        z = largest.centre[2]
        box = view_box(organ_mask[:, :, z], largest.centre, spacing)
        rows.append((case["id"], hu[box + (z,)], after[box + (z,)], lesion_mask[box + (z,)], organ_mask[box + (z,)],
                     describe(lesions)))
    draw(rows, config.hu_window, out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m Training.lesion_gallery", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="MSD-layout dataset folder (dataset.json)")
    parser.add_argument("--organ", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--spacing", type=float, default=1.5, help="canonical grid spacing in mm")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.data, "dataset.json")):
        parser.error(f"no dataset.json in {args.data}")
    print(make_gallery(args.data, args.organ, args.out, args.seed, args.cases, args.spacing))


if __name__ == "__main__":
    main()
