"""Post-processing of the label map on the input grid: the largest cluster of components per organ,
tumours kept only where they touch their organ, exceed a minimum volume and confidence and are not more
elongated than a lesion is, and each kept tumour lesion described (volume, confidence, elongation, contrast
against the organ around it)."""

import itertools

import numpy as np

from .boxes import bounding_box, intersect, within

# scipy.ndimage is imported where it is used: the engine's loader thread imports it once the networks are loaded,
# while the first network runs, instead of on the command line's start-up path.

FULL_CONNECTIVITY = np.ones((3, 3, 3), bool)
CONTRAST_SHELL_MM = (5.0, 15.0)  # the organ around a lesion that its contrast is measured against


def ball_offsets(spacing_mm, radius_mm):
    """The index offsets whose physical length is at most `radius_mm` on a grid of `spacing_mm`, the length
    computed as scipy's distance_transform_edt computes a distance (float64, axis by axis, then the root), so
    that growing a mask by them gives exactly the voxels its distance map puts within that radius."""
    spacing = np.asarray(spacing_mm, dtype=float)
    reach = np.floor(radius_mm / spacing).astype(int) + 1  # one more: the lengths below decide a tie
    offsets = np.indices(2 * reach + 1).reshape(len(spacing), -1).T - reach
    lengths = np.sqrt(np.add.reduce((offsets * spacing) ** 2, axis=1))
    return offsets[lengths <= radius_mm]


def or_shifted(into, mask, offset):
    """`into |= mask` shifted by `offset` voxels, in place (what is shifted beyond the array is dropped)."""
    target = tuple(slice(max(o, 0), n + min(o, 0)) for o, n in zip(offset, mask.shape))
    source = tuple(slice(max(-o, 0), n + min(-o, 0)) for o, n in zip(offset, mask.shape))
    into[target] |= mask[source]


def within_distance(mask, spacing_mm, radius_mm):
    """The voxels at most `radius_mm` from a true voxel of `mask` (centre to centre, voxels beyond the array
    never counted): `distance_transform_edt(~mask) <= radius_mm`, as one OR of the mask shifted by each offset
    of that ball. The distance map's float64 passes over the whole box cost 0.5-1 s on an organ's box.

    Across the axis it reaches furthest along, the ball is a set of segments [-h, h] along that axis: the mask is
    grown along it once per h, and each segment shifted across it, about a tenth of the shifts of the ball's
    offsets one by one (the same voxels: the axes are shifted independently)."""
    offsets = ball_offsets(spacing_mm, radius_mm)
    along = int(np.argmax(np.abs(offsets).max(axis=0)))
    across = offsets.copy()
    across[:, along] = 0
    shifts, segment_of = np.unique(across, axis=0, return_inverse=True)
    half_lengths = np.zeros(len(shifts), dtype=int)
    np.maximum.at(half_lengths, segment_of.ravel(), np.abs(offsets[:, along]))
    grown, segment, step = np.zeros_like(mask), mask.copy(), np.zeros(len(mask.shape), dtype=int)
    for half_length in range(int(half_lengths.max()) + 1):
        if half_length:
            step[along] = half_length
            or_shifted(segment, mask, step)
            or_shifted(segment, mask, -step)
        for shift in shifts[half_lengths == half_length]:
            or_shifted(grown, segment, shift)
    return grown


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
    clusters, count = ndimage.label(mask, FULL_CONNECTIVITY)
    if count > 1 and gap_mm > 0:  # one piece is one cluster: the grown mask is only needed to join several
        clusters, count = ndimage.label(within_distance(mask, spacing, gap_mm / 2), FULL_CONNECTIVITY)
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


class TumourComponents:
    """The connected components of one tumour label, found once and shared by the rules that need them
    (filter_tumours, add_contrast): `box` (slices of the label map holding every tumour voxel, grown by
    `margin`), `components` (their numbers over the box), `count`, and the tumour voxels themselves, in the
    box's raster order (`voxels`: index arrays into the box; `numbers`: the component of each)."""

    def __init__(self, labels, tumour, margin=2):
        from scipy import ndimage

        self.box = bounding_box(labels == tumour, margin=margin)
        if self.box is None:
            self.count = 0
            return
        self.components, self.count = ndimage.label(labels[self.box] == tumour, FULL_CONNECTIVITY)
        self.voxels = np.nonzero(self.components)
        self.numbers = self.components[self.voxels]
        self.objects = ndimage.find_objects(self.components)

    def number_at(self, index):
        """The component holding the voxel at `index` (of the whole label map)."""
        return int(self.components[tuple(i - part.start for i, part in zip(index, self.box))])

    def mask_over(self, number, region):
        """Component `number` as a mask over `region` (slices of the whole label map holding the component)."""
        mask = np.zeros([part.stop - part.start for part in region], bool)
        inside = intersect(region, self.box)
        mask[within(inside, region)] = self.components[within(inside, self.box)] == number
        return mask


def touching(mask, voxels, reach=1):
    """For each voxel of `voxels` (index arrays), whether a voxel at most `reach` steps away along each axis
    (its 26 neighbours for 1) inside the array is true in `mask`: what `reach` full-connectivity dilations of
    `mask` hold there, looked up at those voxels alone."""
    found = np.zeros(len(voxels[0]), bool)
    for offset in itertools.product(range(-reach, reach + 1), repeat=mask.ndim):
        if not any(offset):
            continue
        neighbours = [axis + step for axis, step in zip(voxels, offset)]
        inside = np.ones(len(found), bool)
        for axis, size in zip(neighbours, mask.shape):
            inside &= (axis >= 0) & (axis < size)
        found[inside] |= mask[tuple(axis[inside] for axis in neighbours)]
    return found


def add_contrast(lesions, labels, tumour, organ, image, spacing, found=None):
    """Give each kept lesion of `tumour` (filter_tumours' list, found by its one voxel) its contrast against
    the `organ` around it (lesion_contrast; None where too little organ surrounds it), in `image` units.
    `found`: the tumour's components (TumourComponents) if already labelled: filtering keeps a component whole
    or drops it, so the kept ones are still those components."""
    found = TumourComponents(labels, tumour) if found is None else found
    margin = shell_margin(spacing)
    for lesion in lesions:
        number = found.number_at(lesion["index"])
        around = tuple(slice(max(b.start + part.start - m, 0), min(b.start + part.stop + m, size))
                       for b, part, m, size in zip(found.box, found.objects[number - 1], margin, labels.shape))
        lesion_mask = found.mask_over(number, around)
        shell = organ_around(lesion_mask, labels[around] == organ, spacing)
        contrast = lesion_contrast(image[around], lesion_mask, shell)
        lesion["contrast"] = None if contrast is None else round(contrast, 1)


def filter_tumours(labels, tumour, organ, min_voxels, probability=None, min_confidence=0.0, spacing=None,
                   max_elongation=None, found=None, min_peak=0.0):
    """Drop tumour components that do not touch the organ, are smaller than `min_voxels`, or (given the tumour
    `probability` on the same grid) whose mean probability is below `min_confidence` or largest below `min_peak`,
    or (given the voxel `spacing`) more elongated than `max_elongation` (in place).

    A component dropped for its size, confidence or shape becomes organ (no hole in it); one away from the organ
    becomes background. Returns the kept components: [{"voxels", "index": one voxel of it (its first in raster
    order), with a probability "confidence": its mean probability and "peak": its largest, with a spacing
    "elongation"}]. `found`: the tumour's components (TumourComponents), if already labelled.
    Each statistic is taken over the tumour voxels alone, not over every voxel of their box.
    """
    found = TumourComponents(labels, tumour) if found is None else found
    if not found.count:
        return []
    count, numbers, voxels = found.count, found.numbers, found.voxels
    crop = labels[found.box]
    voxel_counts = np.bincount(numbers, minlength=count + 1)
    touches_organ = np.bincount(numbers[touching(crop == organ, voxels)], minlength=count + 1) > 0
    lesions = [{"voxels": int(n)} for n in voxel_counts[1:]]
    if probability is not None:
        inside = probability[found.box][voxels].astype(np.float32)
        means = np.bincount(numbers, weights=inside, minlength=count + 1) / np.maximum(voxel_counts, 1)
        peaks = np.full(count + 1, -np.inf, np.float32)
        np.maximum.at(peaks, numbers, inside)
        for lesion, mean, peak in zip(lesions, means[1:], peaks[1:]):
            lesion.update(confidence=round(float(mean), 4), peak=round(float(peak), 4))
    if spacing is not None:
        for number, (lesion, part) in enumerate(zip(lesions, found.objects), start=1):
            lesion["elongation"] = round(elongation(found.components[part] == number, spacing), 2)
    first = np.full(count + 1, len(numbers), np.int64)  # each component's first voxel in raster order
    np.minimum.at(first, numbers, np.arange(len(numbers)))
    starts = [part.start for part in found.box]
    for lesion, position in zip(lesions, first[1:]):
        lesion["index"] = [int(a + axis[position]) for a, axis in zip(starts, voxels)]
    becomes = np.zeros(count + 1, np.int16)  # per component: -1 stays tumour, else the value it becomes
    kept = []
    for number, lesion in enumerate(lesions, start=1):
        touches = touches_organ[number]
        confident = lesion.get("confidence", 1.0) >= min_confidence and lesion.get("peak", 1.0) >= min_peak
        compact = max_elongation is None or lesion.get("elongation", 1.0) <= max_elongation
        if touches and lesion["voxels"] >= min_voxels and confident and compact:
            becomes[number] = -1
            kept.append(lesion)
        else:
            becomes[number] = organ if touches else 0
    outcome = becomes[numbers]
    changed = outcome >= 0
    crop[tuple(axis[changed] for axis in voxels)] = outcome[changed]
    return kept


def min_tumour_voxels(card, voxel_ml):
    """The smallest tumour component post-processing keeps, in voxels of `voxel_ml` mL."""
    return int(np.ceil(card.postprocessing_setting("min_tumour_ml") / voxel_ml))


def postprocess(labels, card, spacing_mm, keep_largest=True, plausibility=None, tumour_probabilities=None,
                image=None):
    """Apply the card's rules to a label map with voxel spacing `spacing_mm` along its axes (in place; the
    engine's are in SimpleITK's array order, z, y, x, with the spacing reversed to match).
    `plausibility`: {label value: index centroid -> bool} for the organs whose place is known;
    `tumour_probabilities`: {tumour label value: its probability on this grid}, for the confidence rule (the
    card's `min_tumour_confidence` and `min_tumour_peak`; `max_tumour_elongation` is the shape rule);
    `image`: the first channel on this grid, for each lesion's contrast.
    Returns {tumour label value: the lesions kept (filter_tumours), with their volume in mL, elongation and,
    with the image, contrast}."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    for label in card.trained_labels:
        if label.kind == "organ" and keep_largest and card.postprocessing_setting("keep_largest"):
            keep_largest_cluster(labels, label.value, spacing_mm, label.component_gap_mm,
                                 (plausibility or {}).get(label.value))
    lesions = {}
    for label in card.trained_labels:
        if label.kind == "tumour":
            organ = card.organ_of(label).value
            found = TumourComponents(labels, label.value)
            lesions[label.value] = filter_tumours(labels, label.value, organ, min_tumour_voxels(card, voxel_ml),
                                                  (tumour_probabilities or {}).get(label.value),
                                                  card.postprocessing_setting("min_tumour_confidence"), spacing_mm,
                                                  card.postprocessing_setting("max_tumour_elongation"), found,
                                                  min_peak=card.postprocessing_setting("min_tumour_peak"))
            for lesion in lesions[label.value]:
                lesion["volume_ml"] = round(lesion.pop("voxels") * voxel_ml, 3)
            if image is not None:
                add_contrast(lesions[label.value], labels, label.value, organ, image, spacing_mm, found)
    return lesions
