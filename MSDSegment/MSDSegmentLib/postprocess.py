"""Post-processing of the label map on the input grid: the largest cluster of components per organ,
tumours kept only where they touch their organ, exceed a minimum volume and confidence and are not more
elongated than a lesion is, and each kept tumour lesion described (volume, confidence, elongation, contrast
against the organ around it)."""

import numpy as np

# scipy.ndimage is imported where it is used: the engine imports it in its loader thread, beside PyTorch,
# instead of on the command line's start-up path.

FULL_CONNECTIVITY = np.ones((3, 3, 3), bool)
CONTRAST_SHELL_MM = (5.0, 15.0)  # the organ around a lesion that its contrast is measured against


def bounding_box(mask, margin=1):
    """Slices of the smallest box holding every true voxel, grown by `margin` voxels (one number, or one per
    axis) within the array; None if no voxel is true."""
    margins = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    lower, upper = [], []
    for axis in range(mask.ndim):
        present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if len(present) == 0:
            return None
        lower.append(max(int(present[0]) - int(margins[axis]), 0))
        upper.append(min(int(present[-1]) + int(margins[axis]) + 1, mask.shape[axis]))
    return tuple(slice(a, b) for a, b in zip(lower, upper))


def keep_largest_cluster(labels, value, spacing_mm, gap_mm=0.0, plausible=None):
    """Keep only the largest cluster of `value`'s components (in place; the rest becomes background).

    Components less than `gap_mm` apart form one cluster, weighed by their voxels: an organ the network
    breaks into pieces (a thin pancreas, the two horns of the peripheral zone) then outweighs a single
    larger false blob elsewhere. With gap 0 this is the largest connected component. With `plausible`
    (index centroid -> bool: does a piece there lie where the organ lies?) the largest plausible cluster is
    kept, and the largest one only where none is plausible.
    """
    from scipy import ndimage

    mask = labels == value
    spacing = np.asarray(spacing_mm, dtype=float)
    reach = np.ceil(gap_mm / spacing).astype(int)
    box = bounding_box(mask, margin=reach + 1)
    if box is None:
        return
    crop, mask = labels[box], mask[box]
    joined = mask
    if gap_mm > 0:
        joined = ndimage.distance_transform_edt(~mask, sampling=spacing) <= gap_mm / 2
    clusters, count = ndimage.label(joined, FULL_CONNECTIVITY)
    if count <= 1:
        return
    sizes = np.bincount(clusters[mask], minlength=count + 1)
    sizes[0] = 0
    chosen = int(np.argmax(sizes))
    if plausible is not None:
        # Centroids from the organ's voxels only (ndimage.center_of_mass would sweep the whole box per axis).
        voxels = np.nonzero(mask)
        ids = clusters[voxels]
        centroids = np.stack([np.bincount(ids, weights=axis, minlength=count + 1) for axis in voxels], axis=1)
        centroids = centroids / np.maximum(sizes, 1)[:, None] + np.array([part.start for part in box])
        candidates = [int(c) for c in np.argsort(-sizes, kind="stable") if sizes[c]]
        chosen = next((c for c in candidates if plausible(centroids[c])), chosen)
    crop[mask & (clusters != chosen)] = 0


def organ_around(lesion, organ, spacing):
    """The `organ` voxels 5 to 15 mm from the `lesion`'s edge (masks on one grid of `spacing` mm)."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    return organ & (distance >= CONTRAST_SHELL_MM[0]) & (distance <= CONTRAST_SHELL_MM[1])


def shell_margin(spacing):
    """Voxels per axis that a box around a lesion needs to hold the organ its contrast is measured against."""
    return np.ceil(CONTRAST_SHELL_MM[1] / np.asarray(spacing, dtype=float)).astype(int) + 1


def lesion_contrast(image, lesion, shell, min_organ_voxels=50):
    """The median of `image` inside `lesion` minus its median over `shell`, the organ around it (organ_around):
    HU on CT, negative for a hypo-attenuating lesion. None when the shell has fewer than `min_organ_voxels`."""
    if shell.sum() < min_organ_voxels:
        return None
    return float(np.median(image[lesion]) - np.median(image[shell]))


def elongation(lesion, spacing):
    """How elongated a lesion mask is: the ratio of its longest to its shortest principal axis (spread of its
    voxels in mm, each voxel counted as a box so that a lesion one slice thick is not infinitely flat).
    Lesions are compact (about 1 to 2); vessels, fissures and the organ's rim are long and thin."""
    points = np.argwhere(lesion) * np.asarray(spacing, dtype=float)
    if len(points) < 2:
        return 1.0
    covariance = np.cov(points.T) + np.diag(np.asarray(spacing, dtype=float) ** 2 / 12.0)
    spread = np.sqrt(np.linalg.eigvalsh(covariance))
    return float(spread[-1] / spread[0])


def add_contrast(lesions, labels, tumour, organ, image, spacing):
    """Give each kept lesion of `tumour` (filter_tumours' list, found by its one voxel) its contrast against
    the `organ` around it (lesion_contrast; None where too little organ surrounds it), in `image` units."""
    from scipy import ndimage

    margin = shell_margin(spacing)
    box = bounding_box(labels == tumour, margin)
    if box is None:
        return
    crop, region = labels[box], image[box]
    components, _ = ndimage.label(crop == tumour, FULL_CONNECTIVITY)
    objects = ndimage.find_objects(components)
    for lesion in lesions:
        number = components[tuple(i - part.start for i, part in zip(lesion["index"], box))]
        around = tuple(slice(max(part.start - m, 0), part.stop + m) for part, m in zip(objects[number - 1], margin))
        lesion_mask = components[around] == number
        shell = organ_around(lesion_mask, crop[around] == organ, spacing)
        contrast = lesion_contrast(region[around], lesion_mask, shell)
        lesion["contrast"] = None if contrast is None else round(contrast, 1)


def filter_tumours(labels, tumour, organ, min_voxels, probability=None, min_confidence=0.0, spacing=None,
                   max_elongation=None):
    """Drop tumour components that do not touch the organ, are smaller than `min_voxels`, or (given the tumour
    `probability` on the same grid) whose mean probability is below `min_confidence`, or (given the voxel
    `spacing`) more elongated than `max_elongation` (in place).

    A component dropped for its size, confidence or shape becomes organ (no hole in it); one away from the organ
    becomes background. Returns the kept components: [{"voxels", "index": one voxel of it, with a probability
    "confidence": its mean probability and "peak": its largest, with a spacing "elongation"}].
    """
    from scipy import ndimage

    box = bounding_box(labels == tumour, margin=2)
    if box is None:
        return []
    crop = labels[box]
    components, count = ndimage.label(crop == tumour, FULL_CONNECTIVITY)
    numbers = np.arange(1, count + 1)
    voxels = np.bincount(components.ravel(), minlength=count + 1)[1:]
    touches_organ = ndimage.maximum(ndimage.binary_dilation(crop == organ, FULL_CONNECTIVITY), components, numbers)
    lesions = [{"voxels": int(n)} for n in voxels]
    if probability is not None:
        inside = probability[box].astype(np.float32)
        for lesion, mean, peak in zip(lesions, ndimage.mean(inside, components, numbers),
                                      ndimage.maximum(inside, components, numbers)):
            lesion.update(confidence=round(float(mean), 4), peak=round(float(peak), 4))
    if spacing is not None:
        for number, lesion, part in zip(numbers, lesions, ndimage.find_objects(components)):
            lesion["elongation"] = round(elongation(components[part] == number, spacing), 2)
    starts = [part.start for part in box]
    for lesion, position in zip(lesions, ndimage.maximum_position(components > 0, components, numbers)):
        lesion["index"] = [int(a + b) for a, b in zip(starts, position)]
    becomes = np.zeros(count + 1, np.int16)  # per component: -1 stays tumour, else the value it becomes
    kept = []
    for number, lesion, touches in zip(numbers, lesions, np.atleast_1d(touches_organ)):
        confident = lesion.get("confidence", 1.0) >= min_confidence
        compact = max_elongation is None or lesion.get("elongation", 1.0) <= max_elongation
        if touches and lesion["voxels"] >= min_voxels and confident and compact:
            becomes[number] = -1
            kept.append(lesion)
        else:
            becomes[number] = organ if touches else 0
    outcome = becomes[components]
    changed = (components > 0) & (outcome >= 0)
    crop[changed] = outcome[changed]
    return kept


def min_tumour_voxels(card, voxel_ml):
    """The smallest tumour component post-processing keeps, in voxels of `voxel_ml` mL."""
    return int(np.ceil(card.postprocessing.get("min_tumour_ml", 0.1) / voxel_ml))


def postprocess(labels, card, spacing_mm, keep_largest=True, plausibility=None, tumour_probabilities=None,
                image=None):
    """Apply the card's rules to an (x, y, z) label map with voxel spacing `spacing_mm` (in place).
    `plausibility`: {label value: index centroid -> bool} for the organs whose place is known;
    `tumour_probabilities`: {tumour label value: its probability on this grid}, for the confidence rule (the
    card's `min_tumour_confidence`; `max_tumour_elongation` is the shape rule);
    `image`: the first channel on this grid, for each lesion's contrast.
    Returns {tumour label value: the lesions kept (filter_tumours), with their volume in mL, elongation and,
    with the image, contrast}."""
    settings = card.postprocessing
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    for label in card.trained_labels:
        if label.kind == "organ" and keep_largest and settings.get("keep_largest", True):
            keep_largest_cluster(labels, label.value, spacing_mm, label.component_gap_mm,
                                 (plausibility or {}).get(label.value))
    lesions = {}
    for label in card.trained_labels:
        if label.kind == "tumour":
            organ = card.organ_of(label).value
            lesions[label.value] = filter_tumours(labels, label.value, organ, min_tumour_voxels(card, voxel_ml),
                                                  (tumour_probabilities or {}).get(label.value),
                                                  settings.get("min_tumour_confidence", 0.0), spacing_mm,
                                                  settings.get("max_tumour_elongation"))
            for lesion in lesions[label.value]:
                lesion["volume_ml"] = round(lesion.pop("voxels") * voxel_ml, 3)
            if image is not None:
                add_contrast(lesions[label.value], labels, label.value, organ, image, spacing_mm)
    return lesions
