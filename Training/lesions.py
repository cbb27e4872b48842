"""Synthetic tumours inside healthy organs, drawn on the fly during training.

BTCV has expert organ labels but no tumours. Following the idea of Hu et al., "Label-Free Liver Tumor
Segmentation" (CVPR 2023), lesions are synthesised inside the healthy organ of each training sample so
that the liver and pancreas models learn a tumour class (MSD convention: 1 organ, 2 tumour).

Everything works on float HU arrays in ITK index order (x, y, z) with a known voxel spacing in mm; the
caller converts a normalised training image to HU and back (CT normalisation is affine, see
`MSDSegmentLib.preprocessing.normalise`). Only the passed `numpy.random.Generator` is used, so a seed
gives one result. Method, parameters and limits: docs/lesions.md.

Per organ:
  pattern    a few lesions of any size (1 to 5, radius log-uniform over the whole range), or, in some
             livers, a metastatic seeding of many small ones (3 to 10 lesions 5-20 mm across that look alike);
Per lesion:
  shape      an ellipsoid (volume-equivalent radius r drawn log-uniformly, random axis ratios and
             orientation) warped by a smooth random displacement field; lobulated (a stronger, finer-grained
             warp) or confluent (2 to 4 overlapping lobes);
  placement  a centre inside the organ, at least a margin from its edge and away from large vessels
             (voxels much brighter than the parenchyma), found on a coarse (~4 mm) grid of distance maps;
  intensity  mostly hypo-attenuating relative to the parenchyma, sometimes iso or hyper; texture of
             smoothed Gaussian noise scaled to the case's parenchyma statistics; optional enhancing rim;
             optional necrotic (fluid) centre in larger lesions; optional dense deposits (calcification,
             lipiodol after chemoembolisation); blended with a sigmoid of the (approximate)
             signed distance to the lesion surface, as blurred as the scan's own resolution (from its noise
             grain) plus a biological margin;
  mass effect  sometimes, the surrounding parenchyma is pushed outwards (zero at the organ edge, so the
             organ label stays valid).
Each lesion is computed on a crop around it, never on the whole volume.
"""

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from MSDSegmentLib.boxes import bounding_box

from .lesion_drawing import (MODES, Lesion, LesionConfig, box_around, check_inputs, choice, coarse_points,
                             draw_calcification, draw_necrosis, draw_radius, draw_rim, draw_semi_axes, draw_shape,
                             draw_softness, draw_texture, ellipsoid_radius, paint_lesion, parenchyma_statistics,
                             random_rotation, smooth_noise, upsample)
from .masses import free_tissue, synthesise_neighbour_mass


# Liver: metastases and HCC from sub-centimetre to large masses; often several (metastases).
LIVER = LesionConfig()
# Pancreas: mostly a single hypo-attenuating adenocarcinoma (PV phase: 20-60 HU below the gland);
# a few hyper-attenuating (neuroendocrine) lesions; a thin organ, so a small edge margin.
PANCREAS = LesionConfig(
    count_probabilities=(0.85, 0.15), radius_mm=(4.0, 30.0), multifocal_probability=0.0,
    shape_probabilities=(0.6, 0.35, 0.05), necrosis_probability=0.1, mode_probabilities=(0.85, 0.1, 0.05),
    enhancement_probability=0.0,  # not yet trained with it
    hypo_contrast_hu=(20.0, 60.0), hyper_contrast_hu=(20.0, 50.0), rim_probability=0.1,
    edge_margin_mm=2.0, depth_fraction=0.3, vessel_margin_mm=3.0, vessel_clearance_fraction=0.3)
PRESETS = {"liver": LIVER, "pancreas": PANCREAS}


def preset_for(entry):
    """The lesion settings of one `synthetic_lesions` entry of a plan: its preset, with the organ's enhancement
    share (`enhancement_probability`) taken from the entry where the entry gives one."""
    config = PRESETS[entry["preset"]]
    if "enhancement_probability" in entry:
        config = dataclasses.replace(config, enhancement_probability=float(entry["enhancement_probability"]))
    return config


def synthesise_lesions(image_hu, organ_mask, spacing_mm, rng, config=LIVER, analysis=None):
    """(new image in HU, boolean lesion mask) with 1 or more lesions inside `organ_mask`.

    image_hu: float array (x, y, z) in HU; organ_mask: boolean array of the same shape; spacing_mm: the
    voxel spacing along x, y, z; rng: numpy.random.Generator (the only source of randomness);
    analysis: optional, `analyse_organ(image_hu, organ_mask, spacing_mm, config)` kept from an earlier call
    on the same image and mask (it depends on nothing else), to skip most of the fixed cost.
    The lesion mask lies inside the organ mask; voxels outside the organ are never changed.
    """
    image, mask, _ = synthesise_lesions_detailed(image_hu, organ_mask, spacing_mm, rng, config, analysis)
    return image, mask


def synthesise_lesions_detailed(image_hu, organ_mask, spacing_mm, rng, config=LIVER, analysis=None):
    """As `synthesise_lesions`, plus the list of `Lesion`s drawn (centres in the image's voxel indices)."""
    image_hu, organ, spacing = check_inputs(image_hu, organ_mask, spacing_mm)
    if analysis is None:
        analysis = analyse_organ(image_hu, organ, spacing, config)
    elif analysis.shape != organ.shape or not np.allclose(analysis.spacing, spacing) or analysis.config != config:
        raise ValueError("the organ analysis was made for another image grid or configuration")
    out = image_hu.astype(image_hu.dtype if np.issubdtype(image_hu.dtype, np.floating) else np.float32, copy=True)
    lesion_mask = np.zeros(organ.shape, bool)
    # Nothing outside the organ changes, so all the work is done on views of its bounding box.
    box, statistics, grid = analysis.box, analysis.statistics, analysis.grid
    image_box, organ_box, mask_box = out[box], organ[box], lesion_mask[box]
    lesions = _draw_lesions(grid, spacing, statistics, rng, config)
    # Mass effect first (it moves the surroundings), then every lesion is painted at its own place.
    for lesion in lesions:
        if lesion.mass_effect > 0:
            _apply_mass_effect(image_box, organ_box, grid, lesion, spacing, config)
    for lesion in lesions:
        paint_lesion(image_box, mask_box, organ_box, lesion, statistics, spacing, rng, config)
        lesion.centre = tuple(int(c + part.start) for c, part in zip(lesion.centre, box))
    return out, lesion_mask, lesions


@dataclass
class OrganAnalysis:
    """What lesion placement needs from one image and organ mask: reusable across draws."""

    shape: tuple
    spacing: np.ndarray
    config: LesionConfig
    box: tuple            # the organ's bounding box
    statistics: dict      # see parenchyma_statistics
    grid: object          # _PlacementGrid over the box


def analyse_organ(image_hu, organ_mask, spacing_mm, config=LIVER):
    """Parenchyma statistics and placement maps of an organ (the fixed cost of `synthesise_lesions`)."""
    image_hu, organ, spacing = check_inputs(image_hu, organ_mask, spacing_mm)
    box = bounding_box(organ, margin=0)
    statistics = parenchyma_statistics(image_hu[box], organ[box], config)
    grid = _PlacementGrid(image_hu[box], organ[box], spacing, statistics, config)
    return OrganAnalysis(organ.shape, spacing, config, box, statistics, grid)


def vary_enhancement(image_hu, organ_mask, spacing_mm, rng, config=LIVER):
    """A copy of the image with the organ enhanced otherwise: its HU shifted by one offset plus a smooth field
    (config.enhancement_*), the edge softened over a voxel. Teaches the network that an unusually enhanced organ,
    or part of one, is still organ, not tumour."""
    out = np.array(image_hu, dtype=np.float32, copy=True)
    box = bounding_box(organ_mask, margin=1)
    if box is None:
        return out
    weight = ndimage.gaussian_filter(organ_mask[box].astype(np.float32), 0.7, truncate=1.5)  # reaches one voxel
    sigma_points = config.enhancement_field_scale_mm / np.asarray(spacing_mm, float)
    field = smooth_noise(rng, weight.shape, sigma_points) * rng.uniform(*config.enhancement_field_hu)
    out[box] += weight * (rng.uniform(*config.enhancement_offset_hu) + field)
    if config.hu_window is not None:
        np.clip(out, *config.hu_window, out=out)
    return out


def apply_to_labels(label, organ_class, tumour_class, lesion_mask):
    """A copy of `label` with `tumour_class` where the lesion mask is; the rest of the organ keeps
    `organ_class` and every other voxel is untouched. The lesion must lie inside the organ."""
    lesion_mask = np.asarray(lesion_mask, bool)
    if lesion_mask.shape != label.shape:
        raise ValueError(f"lesion mask shape {lesion_mask.shape} differs from the label's {label.shape}")
    organ = label == organ_class
    if np.any(lesion_mask & ~organ):
        raise ValueError(f"lesion mask reaches outside the organ (class {organ_class})")
    out = label.copy()
    out[lesion_mask] = tumour_class
    return out


class _PlacementGrid:
    """Organ depth and vessel clearance (mm) on a coarse grid over the organ's bounding box."""

    def __init__(self, image_hu, organ, spacing, statistics, config):
        step = np.maximum(1, np.round(config.placement_grid_mm / spacing)).astype(int)
        self.step = np.minimum(step, organ.shape)
        self.coarse_spacing = self.step * spacing
        self.shape = np.array(organ.shape)
        organ_fraction = _block_mean(organ, self.step)
        brightness = _block_mean(image_hu, self.step)
        self.organ = organ_fraction >= 0.5
        if not self.organ.any():  # an organ thinner than a coarse voxel
            self.organ = organ_fraction > 0
        # Large vessels: coarse voxels (block means, so noise does not count) far brighter than parenchyma.
        vessels = self.organ & (brightness > statistics["vessel_threshold"])
        padded = np.pad(self.organ, 1)
        self.depth = ndimage.distance_transform_edt(padded, sampling=self.coarse_spacing)[1:-1, 1:-1, 1:-1]
        if vessels.any():
            self.clearance = ndimage.distance_transform_edt(~vessels, sampling=self.coarse_spacing)
        else:
            self.clearance = np.full(self.organ.shape, np.inf)
        self.candidates = np.argwhere(self.organ)
        self.candidate_depth = self.depth[self.organ]
        self.candidate_clearance = self.clearance[self.organ]
        self.candidate_mm = (self.candidates * self.step + (self.step - 1) / 2.0) * spacing

    def to_fine(self, coarse_index, rng):
        """A voxel index inside the coarse voxel (jittered, so lesions are not aligned to the grid)."""
        return np.minimum(coarse_index * self.step + rng.integers(0, self.step), self.shape - 1)

    def depth_at(self, fine_points):
        """Organ depth (mm) interpolated at fine voxel indices (N, 3)."""
        coarse = (fine_points - (self.step - 1) / 2.0) / self.step
        return ndimage.map_coordinates(self.depth, coarse.T, order=1, mode="nearest")


def _block_mean(array, step):
    """Mean over blocks of `step` voxels; a last, partial block counts its missing voxels as zero.
    (A sum of strided views: one pass over the data, no copy of it.)"""
    total = np.zeros([-(-n // s) for n, s in zip(array.shape, step)], np.float32)
    for offset in itertools.product(*(range(s) for s in step)):
        part = array[tuple(slice(o, None, s) for o, s in zip(offset, step))]
        total[:part.shape[0], :part.shape[1], :part.shape[2]] += part
    return total / np.prod(step)


# Placement rules, from preferred to last resort: (depth ≥, clearance ≥, keep lesions apart)
_PLACEMENT_RULES = ("preferred", "margins", "edge margin", "anywhere")


def _thresholds(rule, radius, config):
    if rule == "preferred":
        return (max(config.edge_margin_mm, config.depth_fraction * radius),
                max(config.vessel_margin_mm, config.vessel_clearance_fraction * radius), True)
    if rule == "margins":
        return config.edge_margin_mm, config.vessel_margin_mm, True
    if rule == "edge margin":
        return config.edge_margin_mm, 0.0, False
    return 0.0, 0.0, False


def _choose_centre(grid, radius, placed, rng, config):
    """A coarse candidate for a lesion of `radius` mm, relaxing the rules until one exists."""
    for rule in _PLACEMENT_RULES:
        min_depth, min_clearance, apart = _thresholds(rule, radius, config)
        eligible = (grid.candidate_depth >= min_depth) & (grid.candidate_clearance >= min_clearance)
        if apart:
            for centre_mm, other_radius in placed:
                distance = np.linalg.norm(grid.candidate_mm - centre_mm, axis=1)
                eligible &= distance >= radius + other_radius
        indices = np.flatnonzero(eligible)
        if indices.size:
            return grid.candidates[indices[rng.integers(indices.size)]], rule
    raise AssertionError("the last placement rule accepts every organ voxel")


def _draw_pattern(rng, config):
    """(lesion count, radius range, shared attenuation mode or None) for one organ."""
    if rng.random() < config.multifocal_probability:
        low, high = config.multifocal_count
        shared_mode = choice(rng, MODES, config.mode_probabilities)
        return int(rng.integers(low, high + 1)), config.multifocal_radius_mm, shared_mode
    count = 1 + choice(rng, range(len(config.count_probabilities)), config.count_probabilities)
    return count, config.radius_mm, None


def _draw_lesions(grid, spacing, statistics, rng, config):
    count, radius_range, shared_mode = _draw_pattern(rng, config)
    lesions, placed = [], []
    for _ in range(count):
        radius = draw_radius(rng, radius_range)
        semi_axes = draw_semi_axes(rng, radius, config)
        rotation = random_rotation(rng)
        shape, deformation, lobes = draw_shape(rng, radius, config)
        coarse, rule = _choose_centre(grid, radius, placed, rng, config)
        centre = grid.to_fine(coarse, rng)
        placed.append((centre * spacing, radius))
        mode = shared_mode or choice(rng, MODES, config.mode_probabilities)
        sign = {"hypo": -1.0, "iso": rng.choice([-1.0, 1.0]), "hyper": 1.0}[mode]
        contrast = sign * rng.uniform(*getattr(config, f"{mode}_contrast_hu"))
        rim = draw_rim(rng, config)
        mass_effect = 0.0
        if rng.random() < config.mass_effect_probability:
            mass_effect = float(rng.uniform(*config.mass_effect_strength))
        necrosis = draw_necrosis(rng, radius, config)
        softness = draw_softness(rng, radius, statistics, spacing, config)
        lesions.append(Lesion(
            centre=tuple(int(c) for c in centre), radius_mm=radius, semi_axes_mm=semi_axes, rotation=rotation,
            mode=mode, contrast_hu=float(contrast), deformation=deformation, softness_mm=softness, shape=shape,
            lobes=lobes, **draw_texture(rng, config), rim=rim, mass_effect=mass_effect, necrosis=necrosis,
            calcification=draw_calcification(centre, radius, config), placement=rule))
    return lesions


def _apply_mass_effect(out, organ, grid, lesion, spacing, config):
    """Push the organ's tissue around the lesion outwards: out(x) = in(x - u(x)).

    u = s (x - c) inside the lesion (uniform expansion) and s (x - c) / q^3 outside, i.e. a surface push
    of s times the radius decaying as 1 / distance^2 (an expanding ball in an incompressible medium),
    tapered to zero at `mass_effect_reach` radii and ramped from zero at the organ edge so that the organ
    outline, hence its label, does not move.
    """
    reach = config.mass_effect_reach
    box = box_around(lesion.centre, lesion.semi_axes_mm.max() * reach, spacing, out.shape)
    shape = tuple(s.stop - s.start for s in box)
    axes, grid_shape = coarse_points(box, lesion.centre, spacing)
    points = np.stack(np.broadcast_arrays(*axes), axis=-1)
    q = np.maximum(ellipsoid_radius(points, lesion), 1e-6)
    decay = np.where(q <= 1, 1.0, q ** -3.0)
    taper = np.clip(1 - ((q - 1) / (reach - 1)) ** 2, 0, 1) ** 2
    taper[q <= 1] = 1.0
    index_points = points / spacing + np.asarray(lesion.centre)
    depth = grid.depth_at(index_points.reshape(-1, 3)).reshape(grid_shape)
    edge = np.clip((depth - grid.coarse_spacing.max()) / config.mass_effect_edge_mm, 0, 1)
    edge = edge * edge * (3 - 2 * edge)  # smoothstep
    displacement = points * (lesion.mass_effect * decay * taper * edge)[..., None] / spacing  # in voxels
    displacement = np.stack([upsample(displacement[..., k].astype(np.float32), shape) for k in range(3)])
    moved = organ[box] & (np.abs(displacement).max(axis=0) > 0.05)
    if not moved.any():
        return
    source = out[box].copy()
    index = np.nonzero(moved)
    coordinates = np.stack([index[k] - displacement[k][index] for k in range(3)])
    out[box][index] = ndimage.map_coordinates(source, coordinates, order=1, mode="nearest")


class TrainingLesions:
    """Paints synthetic tumours into training crops, for the plan's classes that the data lacks.

    Works on the normalised crop (channels, X, Y, Z) and its label (X, Y, Z) in place; CT normalisation
    is affine, so the crop is taken back to HU for synthesis and normalised again.
    """

    MIN_ORGAN_VOXELS = 50  # too little organ in the crop to hold a lesion

    def __init__(self, plan):
        classes = plan["classes"]
        self.spacing = plan["spacing"]
        self.probability = plan.get("lesion_probability", 0.0)
        self.centred_fraction = plan.get("lesion_centred_fraction", 0.0)  # see PatchSampler._lesion_centred
        self.entries = [(classes.index(entry["organ"]), classes.index(tumour), preset_for(entry))
                        for tumour, entry in plan.get("synthetic_lesions", {}).items()]
        # How often each organ is chosen for a lesion-centred patch, relative to the others (default 1).
        self.centred_weights = [float(entry.get("centred_weight", 1.0))
                                for entry in plan.get("synthetic_lesions", {}).values()]
        # Masses beside an organ or pressing into it (Training.masses): {organ name: probability per patch holding it}.
        self.masses = [(classes.index(organ), float(probability))
                       for organ, probability in plan.get("neighbour_masses", {}).items()]
        if self.entries or self.masses:  # painted in HU: only CT plans have them
            self.mean, self.std = plan["normalisation"]["mean"], plan["normalisation"]["std"]

    def __bool__(self):
        return (bool(self.entries) and (self.probability > 0 or self.centred_fraction > 0)) or bool(self.masses)

    @property
    def classes(self):
        """(organ class, tumour class) pairs."""
        return [(organ, tumour) for organ, tumour, _ in self.entries]

    def choose_organ(self, present_organs, rng):
        """One (organ class, tumour class) pair whose organ is in `present_organs`, drawn by centred weight;
        None if there is none."""
        pairs = [(pair, weight) for pair, weight in zip(self.classes, self.centred_weights)
                 if pair[0] in present_organs and weight > 0]
        if not pairs:
            return None
        weights = np.array([weight for _, weight in pairs])
        return pairs[rng.choice(len(pairs), p=weights / weights.sum())][0]

    def _write_back(self, image, hu, new_hu):
        """Normalise the voxels `new_hu` changed into image[0]; only those: the HU round trip is not exact in
        float32."""
        changed = new_hu != hu
        image[0][changed] = (new_hu[changed] - self.mean) / self.std

    def vary_enhancement(self, image, label, rng):
        """Change each organ's enhancement (vary_enhancement) with its preset's probability, in place."""
        for organ_class, _, config in self.entries:
            organ = label == organ_class
            if organ.sum() < self.MIN_ORGAN_VOXELS or rng.random() >= config.enhancement_probability:
                continue
            hu = image[0] * self.std + self.mean
            self._write_back(image, hu, vary_enhancement(hu, organ, self.spacing, rng, config))

    def paint_masses(self, image, label, rng):
        """Paint a mass beside each organ of `neighbour_masses` with its probability, in place; the organ voxels a
        mass covers become background."""
        for organ_class, probability in self.masses:
            organ = label == organ_class
            if organ.sum() < self.MIN_ORGAN_VOXELS or rng.random() >= probability:
                continue
            hu = image[0] * self.std + self.mean
            painted, mass = synthesise_neighbour_mass(hu, organ, free_tissue(hu, label), self.spacing, rng)
            self._write_back(image, hu, painted)
            label[mass] = 0

    def __call__(self, image, label, rng, probability=None, organs=None):
        """Paint lesions into each organ (or only those in `organs`) with the plan's probability."""
        probability = self.probability if probability is None else probability
        for organ_class, tumour_class, config in self.entries:
            if organs is not None and organ_class not in organs:
                continue
            organ = label == organ_class
            if organ.sum() < self.MIN_ORGAN_VOXELS or rng.random() >= probability:
                continue
            hu = image[0] * self.std + self.mean
            painted, lesion = synthesise_lesions(hu, organ, self.spacing, rng, config)
            self._write_back(image, hu, painted)
            label[...] = apply_to_labels(label, organ_class, tumour_class, lesion)
