"""`python -m Training lesion-stats`: what tumours look like against their organ, measured the same way on real
tumour labels and on synthetic lesions painted into labelled organs, so that the synthesis can be checked against
real lesions (docs/lesions.md).

Per lesion (a 26-connected component of the tumour label): its volume; its contrast, the median HU inside minus
the median of the organ around it (5 to 15 mm from its edge); its texture, the HU spread inside (robust std)
over the organ's; and, for lesions of 2 mL or more, its edge width, the distance over which the mean HU across
its boundary goes from 10 % to 90 % of the way between the inside and the organ. HU are clipped to the CT window
the models see, so unclipped real CT and clipped BTCV compare alike.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from MSDSegmentLib.errors import InputError
from MSDSegmentLib.imageio import read_image
from MSDSegmentLib.postprocess import FULL_CONNECTIVITY, lesion_contrast, organ_around, shell_margin
from MSDSegmentLib.preprocessing import from_array, labels_to_canonical, to_array, to_canonical

from .dataset import read_dataset
from .evaluate import case_rng, reference_on_grid
from .lesions import PRESETS, synthesise_lesions
from .models import find_label

WINDOW_HU = (-125.0, 275.0)
EDGE_MIN_ML = 2.0
PROFILE_MM = np.arange(-6.0, 6.01, 0.5)


def robust_spread(values):
    q1, q3 = np.percentile(values, [25, 75])
    return max((q3 - q1) / 1.349, 1.0)


def edge_width_mm(image, lesion, organ, spacing):
    """10-90 % width of the mean HU profile across the lesion's boundary (signed distance, mm), or None."""
    inside = ndimage.distance_transform_edt(lesion, sampling=spacing)
    outside = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    signed = np.where(lesion, -inside, outside)
    usable = lesion | organ
    profile = []
    for low in PROFILE_MM[:-1]:
        band = usable & (signed >= low) & (signed < low + 0.5)
        profile.append(image[band].mean() if band.sum() >= 10 else np.nan)
    profile = np.array(profile)
    centres = PROFILE_MM[:-1] + 0.25
    inner_bins, outer_bins = profile[centres < -4], profile[centres > 4]
    if np.isnan(inner_bins).all() or np.isnan(outer_bins).all():
        return None  # too small or too thin to have an inside and an outside plateau
    inner, outer = np.nanmean(inner_bins), np.nanmean(outer_bins)
    if abs(outer - inner) < 10:
        return None  # an iso-attenuating lesion has no edge to measure
    fraction = (profile - inner) / (outer - inner)
    valid = np.isfinite(fraction)
    rising = np.maximum.accumulate(np.where(valid, fraction, -np.inf))  # monotone envelope
    crossings = [np.interp(level, rising[valid], centres[valid]) for level in (0.1, 0.9)]
    return float(crossings[1] - crossings[0])


def measure_lesions(image_hu, label, spacing, organ_value, tumour_value):
    """One dict per lesion of `tumour_value` inside or beside the organ `organ_value`."""
    image = np.clip(image_hu.astype(np.float32), *WINDOW_HU)
    organ = label == organ_value
    components, count = ndimage.label(label == tumour_value, FULL_CONNECTIVITY)
    voxel_ml = float(np.prod(spacing)) / 1000
    margin = shell_margin(spacing)
    rows = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        box = tuple(slice(max(s.start - m, 0), s.stop + m) for s, m in zip(box, margin))
        lesion = components[box] == index
        shell = organ_around(lesion, organ[box], spacing)
        contrast = lesion_contrast(image[box], lesion, shell)
        if contrast is None:
            continue  # no organ around it to compare with
        inside, around = image[box][lesion], image[box][shell]
        volume = lesion.sum() * voxel_ml
        rows.append({"volume_ml": volume, "contrast_hu": contrast,
                     "texture": robust_spread(inside) / robust_spread(around),
                     "edge_mm": edge_width_mm(image[box], lesion, organ[box], spacing) if volume >= EDGE_MIN_ML
                     else None})
    return rows


def real_lesions(data, organ_name, tumour_names):
    meta, cases = read_dataset(data)
    organ, tumour = find_label([organ_name], meta["labels"]), find_label(tumour_names, meta["labels"])
    if organ is None or tumour is None:
        raise InputError(f"{data} has no '{organ_name}' and tumour labels (looked for {tumour_names})")
    rows = []
    for case in cases:
        image = read_image(case["image"])
        label = reference_on_grid(case["label"], image, {organ: 1, tumour: 2})
        measured = measure_lesions(to_array(image), label, image.GetSpacing(), 1, 2)
        rows += [{"case": case["id"], **row} for row in measured]
    return rows


def synthetic_lesions(data, organ_name, preset, rounds, seed=0):
    meta, cases = read_dataset(data)
    organ = find_label([organ_name], meta["labels"])
    rows = []
    for case in cases:
        image = read_image(case["image"])
        label = reference_on_grid(case["label"], image, {organ: 1})
        hu = to_array(image).astype(np.float32)
        for round_ in range(rounds):
            rng = case_rng(case["id"], seed + round_)
            painted, lesion = synthesise_lesions(hu, label == 1, image.GetSpacing(), rng, PRESETS[preset])
            rows += [{"case": f"{case['id']}/{round_}", **row} for row in
                     measure_lesions(painted, np.where(lesion, 2, label), image.GetSpacing(), 1, 2)]
    return rows


def small_lesion_config(diameter_mm):
    """Hypo-attenuating spheres of one size, without rim, necrosis or mass effect: the resolution question alone."""
    return dataclasses.replace(PRESETS["liver"], count_probabilities=(1.0,), multifocal_probability=0.0,
                               radius_mm=(diameter_mm / 2,) * 2, max_axis_ratio=1.0, deformation=(0.0, 0.0),
                               shape_probabilities=(1.0, 0.0, 0.0), mode_probabilities=(1.0, 0.0, 0.0),
                               hypo_contrast_hu=(40.0, 40.0), rim_probability=0.0, necrosis_probability=0.0,
                               mass_effect_probability=0.0)


def contrast_after(hu, lesion, organ, spacing):
    """Mean HU in the lesion minus the median of the organ 5-15 mm around it."""
    return float(hu[lesion].mean() - np.median(hu[organ_around(lesion, organ, spacing)]))


def resolution_rows(data, organ_name, spacings, diameter_mm, rounds, seed=0):
    """Small lesions painted at each CT's own resolution, then resampled onto each candidate grid as the engine
    does (anti-aliased linear): per grid, the voxels a lesion spans and the share of its contrast left."""
    meta, cases = read_dataset(data)
    organ_value = find_label([organ_name], meta["labels"])
    config = small_lesion_config(diameter_mm)
    window = {"type": "ct", "window": list(WINDOW_HU)}
    rows = []
    for case in cases:
        image = read_image(case["image"])
        organ = reference_on_grid(case["label"], image, {organ_value: 1}) == 1
        hu = np.clip(to_array(image).astype(np.float32), *WINDOW_HU)
        for round_ in range(rounds):
            rng = case_rng(case["id"], seed + round_)
            painted, lesion = synthesise_lesions(hu, organ, image.GetSpacing(), rng, config)
            native = contrast_after(painted, lesion, organ, image.GetSpacing())
            mask_image = from_array(lesion.astype(np.uint8), image)
            organ_image = from_array(organ.astype(np.uint8), image)
            for spacing in spacings:
                resampled, reference = to_canonical(from_array(painted, image), spacing, window)
                on_grid = labels_to_canonical(mask_image, reference) > 0
                organ_on_grid = labels_to_canonical(organ_image, reference) > 0
                if not on_grid.any():
                    rows.append({"spacing": tuple(spacing), "voxels": 0, "retained": 0.0})
                    continue
                retained = contrast_after(resampled, on_grid, organ_on_grid, spacing) / native
                rows.append({"spacing": tuple(spacing), "voxels": int(on_grid.sum()), "retained": retained})
    return rows


def resolution_table(rows, diameter_mm):
    lines = [f"| grid (mm) | voxels of a {diameter_mm:g} mm lesion | contrast left | voxels per CT (x 1.5 x 1.5 x 3) |",
             "| --- | --- | --- | --- |"]
    for spacing in dict.fromkeys(row["spacing"] for row in rows):
        mine = [row for row in rows if row["spacing"] == spacing]
        voxels = np.median([row["voxels"] for row in mine])
        retained = np.percentile([row["retained"] for row in mine], [10, 50, 90])
        cost = (1.5 * 1.5 * 3.0) / np.prod(spacing)
        lines.append(f"| {' x '.join(f'{s:g}' for s in spacing)} | {voxels:.0f} | {retained[1]:.0%} "
                     f"({retained[0]:.0%} to {retained[2]:.0%}) | {cost:.2f} |")
    return "\n".join(lines)


def summary_line(name, rows):
    """Count, modes and the median (10th-90th percentile) of each measure."""
    def spread(key, digits):
        values = np.array([row[key] for row in rows if row[key] is not None], float)
        if not len(values):
            return "n/a"
        low, median, high = np.percentile(values, [10, 50, 90])
        return f"{median:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"
    contrast = np.array([row["contrast_hu"] for row in rows])
    modes = f"{np.mean(contrast < -10):.0%} / {np.mean(np.abs(contrast) <= 10):.0%} / {np.mean(contrast > 10):.0%}"
    return (f"| {name} | {len(rows)} | {spread('volume_ml', 1)} | {spread('contrast_hu', 0)} | {modes} | "
            f"{spread('texture', 2)} | {spread('edge_mm', 1)} |")


TABLE_HEADER = ("| lesions | count | volume mL | contrast HU | hypo / iso / hyper | texture (x organ) "
                "| edge 10-90 % mm |\n| --- | --- | --- | --- | --- | --- | --- |")


def run_lesion_statistics(args, log=print):
    log(TABLE_HEADER)
    for data in args.real or []:
        rows = real_lesions(data, args.organ, [args.tumour, "liver tumour", "tumour", "tumor"])
        for row in rows:
            log(f"  {row['case']}: {row['volume_ml']:.2f} mL, contrast {row['contrast_hu']:+.0f} HU, texture "
                f"{row['texture']:.2f}, edge " + (f"{row['edge_mm']:.1f} mm" if row["edge_mm"] is not None else "n/a"))
        log(summary_line(f"real, {data}", rows))
    for data in args.synthetic_into or []:
        if args.spacings:
            rows = resolution_rows(data, args.organ, args.spacings, args.diameter_mm, args.rounds)
            log(f"{len(rows) // len(args.spacings)} lesions of {args.diameter_mm:g} mm in {data}:")
            log(resolution_table(rows, args.diameter_mm))
            continue
        log(summary_line(f"synthetic ({args.preset}), painted into {data}, {args.rounds} round(s)",
                         synthetic_lesions(data, args.organ, args.preset, args.rounds)))
