"""Drawing and painting one lesion: the shape, texture, rim, necrotic centre, deposits and edge blur of a
synthetic tumour (`Training.lesions`) or of a mass beside an organ (`Training.masses`), both built on these.

Arrays are float HU in ITK index order (x, y, z) with a known voxel spacing in mm; only the passed
`numpy.random.Generator` is used, so a seed gives one result. Method, parameters and limits: docs/lesions.md.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import expit

SHAPE_GRID = 24        # smooth fields (deformation, distance, mass effect) are evaluated on <= 24 points an axis
ALPHA_CUTOFF = 0.01    # blending weights below this are dropped, so the changed region stays compact
WATER_HU = 0.0
MODES = ("hypo", "iso", "hyper")
SHAPES = ("ellipsoid", "lobulated", "confluent")
# A sigmoid of scale s has the 10-90 % edge width of a Gaussian blur of sigma s / 0.58.
SIGMOID_PER_GAUSSIAN_SIGMA = 0.58


@dataclass(frozen=True)
class LesionConfig:
    """How lesions are drawn. Ranges are (low, high) and drawn uniformly unless said otherwise."""

    count_probabilities: tuple = (0.55, 0.2, 0.12, 0.08, 0.05)  # P(1 lesion), P(2), ... (multi-focal)
    radius_mm: tuple = (3.0, 40.0)           # volume-equivalent radius, drawn log-uniformly
    # Metastatic seeding: livers with metastases often hold several lesions of 5-20 mm, from one primary,
    # so they share their attenuation mode.
    multifocal_probability: float = 0.35
    multifocal_count: tuple = (3, 10)        # lesions in such an organ, inclusive
    multifocal_radius_mm: tuple = (2.5, 10.0)  # 5-20 mm across, log-uniform
    max_axis_ratio: float = 1.6              # longest / shortest semi-axis at most
    shape_probabilities: tuple = (0.5, 0.3, 0.2)  # ellipsoid, lobulated, confluent
    deformation: tuple = (0.05, 0.25)        # RMS of the elastic displacement, as a fraction of the radius
    lobulation: tuple = (0.2, 0.35)          # ... of a lobulated lesion, whose bumps are a quarter radius wide
    confluent_lobes: tuple = (2, 4)          # lobes of a confluent lesion (the main one included), inclusive
    # hypo-, iso-, hyper-attenuating. A quarter hyper: HCC and hypervascular metastases enhance in the arterial
    # phase, and users segment arterial as well as portal-venous CT (BTCV is portal-venous).
    mode_probabilities: tuple = (0.6, 0.15, 0.25)
    hypo_contrast_hu: tuple = (20.0, 80.0)   # lesion mean this far below the parenchyma
    iso_contrast_hu: tuple = (8.0, 20.0)     # ... this far below or above (either sign): subtle, not invisible
    hyper_contrast_hu: tuple = (20.0, 60.0)  # ... this far above the parenchyma
    noise_std: tuple = (0.7, 1.0)            # fine grain (the scan's own noise grain), x parenchyma std
    heterogeneity_std: tuple = (0.2, 0.8)    # coarse texture, x parenchyma std ...
    heterogeneity_scale_mm: tuple = (2.0, 6.0)  # ... and its correlation length
    rim_probability: float = 0.25
    rim_contrast_hu: tuple = (15.0, 45.0)    # rim mean above the parenchyma (enhancing rim)
    rim_width_mm: tuple = (2.0, 5.0)
    edge_softness_mm: tuple = (0.3, 1.2)     # biological blur of the boundary (sigmoid scale), added to the
                                             # scan's own blur (from its noise grain); at most radius / 3
    necrosis_probability: float = 0.25       # a fluid centre, in lesions of at least ...
    necrosis_min_radius_mm: float = 8.0
    necrosis_fraction: tuple = (0.3, 0.7)    # core radius, as a fraction of the lesion's
    necrosis_hu: tuple = (0.0, 25.0)         # fluid to debris
    # Dense deposits: calcification (mucinous metastases, treated tumours) or lipiodol kept after
    # chemoembolisation, as patches of a smooth random field over a share of the lesion. BTCV has none. Off: at
    # 0.15 the liver stage found more of a real tumour holding them, but doubled the false lesions in healthy
    # livers (docs/models.md, "Dense deposits in the lesions").
    calcification_probability: float = 0.0   # in lesions of at least ...
    calcification_min_radius_mm: float = 6.0
    calcification_share: tuple = (0.03, 0.4)  # of the lesion's voxels
    calcification_hu: tuple = (250.0, 1000.0)
    calcification_scale_mm: tuple = (2.0, 8.0)  # correlation length of the patches
    edge_margin_mm: float = 5.0              # lesion centres at least this deep inside the organ ...
    depth_fraction: float = 0.5              # ... and at least this fraction of the radius deep
    parenchyma_min_hu: float = 10.0          # darker organ voxels are fat or partial volume, not parenchyma
    vessel_threshold_std: float = 2.5        # vessels: organ voxels above parenchyma mean + this many stds
    vessel_margin_mm: float = 4.0            # lesion centres at least this far from vessels ...
    vessel_clearance_fraction: float = 0.5   # ... and at least this fraction of the radius
    mass_effect_probability: float = 0.3
    mass_effect_strength: tuple = (0.05, 0.2)  # outward push at the lesion surface, fraction of the radius
    mass_effect_reach: float = 2.5           # no displacement beyond this many radii from the centre
    mass_effect_edge_mm: float = 6.0         # displacement ramps from zero at the organ edge over this depth
    # Training only: the organ enhanced as another phase or patient shows it (vary_enhancement), in this share of
    # the patches that hold it: one offset for the whole organ (a poorly enhanced or arterial-phase liver is
    # 30-50 HU darker than a portal-venous one) plus a smooth field (uneven perfusion, a darker rim).
    enhancement_probability: float = 0.3
    enhancement_offset_hu: tuple = (-45.0, 15.0)
    enhancement_field_hu: tuple = (0.0, 15.0)  # std of the field ...
    enhancement_field_scale_mm: float = 30.0  # ... and its correlation length
    hu_window: tuple = (-125.0, 275.0)       # BTCV was clipped to this window; None keeps any value
    placement_grid_mm: float = 4.0           # resolution of the placement distance maps


DEFAULT = LesionConfig()  # the liver's preset (Training.lesions.LIVER)


@dataclass
class Lesion:
    """One drawn lesion (for inspection, galleries and tests)."""

    centre: tuple                 # voxel index (x, y, z)
    radius_mm: float              # volume-equivalent radius
    semi_axes_mm: np.ndarray
    rotation: np.ndarray          # columns: the semi-axis directions (in x, y, z mm space)
    mode: str                     # "hypo", "iso" or "hyper"
    contrast_hu: float            # lesion mean minus parenchyma mean (before the water floor)
    deformation: float
    softness_mm: float
    noise: float                  # fine-grain std, x parenchyma std
    heterogeneity: float          # coarse texture std, x parenchyma std
    heterogeneity_scale_mm: float
    shape: str = "ellipsoid"      # one of SHAPES
    lobes: tuple = ()             # confluent: ((offset mm (x, y, z), scale), ...) beside the main lobe
    rim: tuple = None             # (rim mean relative to parenchyma, width mm) or None
    mass_effect: float = 0.0      # outward push at the surface, fraction of the radius (0: none)
    necrosis: tuple = None        # (core radius fraction, core HU) or None
    calcification: tuple = None   # (share of the lesion, HU, patch scale mm, seed of its field) or None
    placement: str = "preferred"  # which placement rule the centre satisfied (see _PLACEMENT_RULES)
    voxels: int = 0               # voxels labelled (after clipping to the organ)


def parenchyma_statistics(image_hu, organ, config=DEFAULT):
    """Parenchyma mean and std (HU), vessel threshold and noise grain, from the organ's voxels.

    The organ mask holds vessels (bright), fat (a fatty pancreas) and partial-volume edges (dark): voxels
    below `parenchyma_min_hu` are left out, then the median and interquartile range give the parenchyma
    without outliers; mean and std are taken over the voxels within 2.5 robust stds of the median.
    The grain is the Gaussian sigma (voxels, per axis) whose filtered white noise has the parenchyma's
    neighbour correlation rho: rho = exp(-1 / (4 sigma^2)).
    """
    # A deterministic, regular subsample of at most ~1 million voxels of the box is plenty.
    stride = max(1, int(np.ceil((organ.size / 1e6) ** (1 / 3))))
    sample = (slice(None, None, stride),) * 3
    values = image_hu[sample][organ[sample]].astype(np.float64)
    if values.size < 10:
        values = image_hu[organ].astype(np.float64)
    tissue = values[values >= config.parenchyma_min_hu]
    values = tissue if tissue.size >= 0.1 * values.size else values
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    robust_std = max((q3 - q1) / 1.349, 1.0)
    core = values[np.abs(values - median) <= 2.5 * robust_std]
    mean, std = float(core.mean()), max(float(core.std()), 1.0)
    grain = [_grain_sigma(image_hu, organ, axis, median, 2.5 * robust_std, std) for axis in range(3)]
    return {"mean": mean, "std": std, "vessel_threshold": mean + config.vessel_threshold_std * std,
            "grain_sigma": grain}


def _grain_sigma(image_hu, organ, axis, median, tolerance, std):
    # Neighbour pairs along `axis`, on every third line across it (enough, and 9x cheaper).
    sample = tuple(slice(None) if a == axis else slice(None, None, 3) for a in range(3))
    image, organ = np.moveaxis(image_hu[sample], axis, 0), np.moveaxis(organ[sample], axis, 0)
    inside = organ & (np.abs(image - median) <= tolerance)
    both = inside[1:] & inside[:-1]
    if np.count_nonzero(both) < 100:
        return 0.6
    differences = (image[1:] - image[:-1])[both].astype(np.float64)
    rho = np.clip(1 - differences.var() / (2 * std ** 2), 0.05, 0.9)
    return float(np.clip(np.sqrt(-1 / (4 * np.log(rho))), 0.3, 2.0))


def check_inputs(image_hu, organ_mask, spacing_mm):
    image_hu = np.asarray(image_hu)
    organ = np.asarray(organ_mask, bool)
    spacing = np.asarray(spacing_mm, float)
    if image_hu.ndim != 3:
        raise ValueError(f"image must be 3-D (x, y, z), got shape {image_hu.shape}")
    if organ.shape != image_hu.shape:
        raise ValueError(f"organ mask shape {organ.shape} differs from the image's {image_hu.shape}")
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be 3 positive values in mm, got {spacing_mm}")
    if not organ.any():
        raise ValueError("organ mask is empty: no place for a lesion")
    return image_hu, organ, spacing


def random_rotation(rng):
    """A uniformly random rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def choice(rng, options, probabilities):
    probabilities = np.asarray(probabilities, float)
    return options[int(rng.choice(len(probabilities), p=probabilities / probabilities.sum()))]


def _scan_blur_mm(statistics, spacing):
    """The scan's in-plane blur (Gaussian sigma, mm), taken to be the correlation length of its noise grain."""
    return float(np.mean(np.asarray(statistics["grain_sigma"][:2]) * spacing[:2]))


def draw_shape(rng, radius, config):
    """(shape, deformation, lobes) of one lesion."""
    shape = choice(rng, SHAPES, config.shape_probabilities)
    if shape == "lobulated":
        return shape, float(rng.uniform(*config.lobulation)), ()
    lobes = ()
    if shape == "confluent":
        low, high = config.confluent_lobes
        lobes = []
        for _ in range(int(rng.integers(low, high + 1)) - 1):
            direction = rng.standard_normal(3)
            # Lobes bulge out of the main one.
            offset = direction / np.linalg.norm(direction) * radius * rng.uniform(0.6, 1.1)
            lobes.append((offset, float(rng.uniform(0.5, 0.9))))
        lobes = tuple(lobes)
    return shape, float(rng.uniform(*config.deformation)), lobes


def draw_radius(rng, radius_range):
    """A volume-equivalent radius (mm), log-uniform over the range."""
    return float(np.exp(rng.uniform(*np.log(radius_range))))


def draw_semi_axes(rng, radius, config):
    """Axis ratios log-uniform within the allowed ratio, scaled so the volume is that of the sphere of `radius`."""
    half_log = np.log(config.max_axis_ratio) / 2
    ratios = np.exp(rng.uniform(-half_log, half_log, 3))
    return radius * ratios / np.prod(ratios) ** (1 / 3)


def draw_rim(rng, config):
    """(rim mean relative to parenchyma, width mm), or None."""
    if rng.random() < config.rim_probability:
        return float(rng.uniform(*config.rim_contrast_hu)), float(rng.uniform(*config.rim_width_mm))
    return None


def draw_necrosis(rng, radius, config):
    """(core radius fraction, core HU) for a large enough lesion, or None."""
    if radius >= config.necrosis_min_radius_mm and rng.random() < config.necrosis_probability:
        return float(rng.uniform(*config.necrosis_fraction)), float(rng.uniform(*config.necrosis_hu))
    return None


def draw_calcification(centre, radius, config):
    """(share, HU, patch scale mm, field seed) for a large enough lesion, or None.

    Drawn from a generator of its own, seeded by the lesion's centre and size, so that the other draws, and
    with them the fixed lesions `evaluate` paints, are those they were before deposits existed."""
    if config.calcification_probability <= 0 or radius < config.calcification_min_radius_mm:
        return None
    rng = np.random.default_rng([*(int(c) for c in centre), int(radius * 1000)])
    if rng.random() >= config.calcification_probability:
        return None
    return (float(rng.uniform(*config.calcification_share)), float(rng.uniform(*config.calcification_hu)),
            float(rng.uniform(*config.calcification_scale_mm)), int(rng.integers(2 ** 31)))


def draw_softness(rng, radius, statistics, spacing, config):
    """Edge sigmoid scale (mm): a biological blur added to the scan's own, at most radius / 3."""
    scan_blur = SIGMOID_PER_GAUSSIAN_SIGMA * _scan_blur_mm(statistics, spacing)
    return float(min(np.hypot(rng.uniform(*config.edge_softness_mm), scan_blur), radius / 3))


def draw_texture(rng, config):
    """Fine grain, coarse heterogeneity and its scale: the `Lesion` fields of that name."""
    return {"noise": float(rng.uniform(*config.noise_std)),
            "heterogeneity": float(rng.uniform(*config.heterogeneity_std)),
            "heterogeneity_scale_mm": float(rng.uniform(*config.heterogeneity_scale_mm))}


def box_around(centre, half_extent_mm, spacing, shape):
    half = np.ceil(half_extent_mm / spacing).astype(int)
    lower = np.maximum(np.asarray(centre) - half, 0)
    upper = np.minimum(np.asarray(centre) + half + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lower, upper))


def coarse_points(box, centre, spacing):
    """Positions (mm, relative to the centre) of at most SHAPE_GRID evenly spread points an axis over `box`,
    as three broadcastable axes, plus the grid's shape."""
    axes = []
    for axis, (part, c, s) in enumerate(zip(box, centre, spacing)):
        count = min(part.stop - part.start, SHAPE_GRID)
        values = (np.linspace(part.start, part.stop - 1, count) - c) * s
        shape = [1, 1, 1]
        shape[axis] = count
        axes.append(values.reshape(shape))
    return axes, tuple(a.size for a in axes)


def upsample(field, shape):
    """Separable linear interpolation of a smooth field from evenly spread points (first and last on the
    box's first and last voxels) to every voxel of `shape`."""
    for axis, size in enumerate(shape):
        count = field.shape[axis]
        if count == size:
            continue
        position = np.linspace(0, count - 1, size, dtype=np.float32)
        below = np.minimum(position.astype(int), max(count - 2, 0))
        above = np.minimum(below + 1, count - 1)
        weight = (position - below).reshape([size if a == axis else 1 for a in range(3)])
        low = np.take(field, below, axis)
        field = low + (np.take(field, above, axis) - low) * weight
    return field


def smooth_noise(rng, shape, sigma_points):
    """Unit-std smooth random field: Gaussian-filtered white noise (sigma in grid points, per axis)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_points, mode="reflect")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _point_spacing(box, grid_shape, spacing):
    """mm between neighbouring points of `coarse_points` along each axis."""
    extent = np.array([part.stop - part.start - 1 for part in box], float) * spacing
    return np.where(np.array(grid_shape) > 1, extent / np.maximum(np.array(grid_shape) - 1, 1), spacing)


def ellipsoid_radius(points, lesion):
    """q(x): 1 on the ellipsoid surface, < 1 inside (points in mm relative to the centre, last axis xyz)."""
    local = points @ lesion.rotation
    return np.sqrt(np.sum((local / lesion.semi_axes_mm) ** 2, axis=-1))


def _signed_distance(lesion, box, spacing, rng):
    """Approximate signed distance (mm, negative inside) to the deformed lesion surface, over `box`."""
    axes, grid_shape = coarse_points(box, lesion.centre, spacing)
    points = np.stack(np.broadcast_arrays(*axes), axis=-1)
    # Elastic deformation: the ellipsoid is evaluated at displaced positions (a smooth random field).
    # Correlation length of half the radius gives a few broad lobulations; a lobulated lesion's bumps are finer.
    correlation = (0.25 if lesion.shape == "lobulated" else 0.5) * lesion.radius_mm
    sigma = correlation / _point_spacing(box, grid_shape, spacing)
    displacement = np.stack([smooth_noise(rng, grid_shape, sigma) for _ in range(3)], axis=-1)
    points = points + displacement * lesion.deformation * lesion.radius_mm
    # (q - 1) * radius is the exact distance for a sphere and close to it for mild ellipsoids; a confluent
    # lesion is the union of its lobes (the smallest distance).
    distance = (ellipsoid_radius(points, lesion) - 1.0) * lesion.radius_mm
    for offset, scale in lesion.lobes:
        lobe = (ellipsoid_radius(points - offset, lesion) / scale - 1.0) * lesion.radius_mm * scale
        distance = np.minimum(distance, lobe)
    return upsample(distance.astype(np.float32), tuple(s.stop - s.start for s in box))


def _extent_mm(lesion):
    """How far from its centre a lesion's surface can reach (before deformation)."""
    longest = lesion.semi_axes_mm.max()
    return max([longest] + [np.linalg.norm(offset) + scale * longest for offset, scale in lesion.lobes])


def paint_lesion(out, lesion_mask, organ, lesion, statistics, spacing, rng, config):
    reach = _extent_mm(lesion) + 3 * lesion.deformation * lesion.radius_mm + 5 * lesion.softness_mm
    box = box_around(lesion.centre, reach, spacing, out.shape)
    shape = tuple(s.stop - s.start for s in box)
    distance = _signed_distance(lesion, box, spacing, rng)
    organ_box = organ[box]
    alpha = expit(-distance / lesion.softness_mm).astype(np.float32)
    alpha[alpha < ALPHA_CUTOFF] = 0.0
    alpha *= organ_box
    inside = (distance < 0) & organ_box
    lesion.voxels = int(inside.sum())
    lesion_mask[box] |= inside

    # Texture: fine grain like the scan's noise plus coarse heterogeneity, scaled to the parenchyma's std.
    fine = smooth_noise(rng, shape, statistics["grain_sigma"])
    coarse = smooth_noise(rng, shape, lesion.heterogeneity_scale_mm / 2 / spacing)
    parenchyma, std = statistics["mean"], statistics["std"]
    mean = parenchyma + lesion.contrast_hu
    if lesion.mode == "hypo":
        mean = max(mean, min(WATER_HU, parenchyma))  # solid or cystic lesions are not darker than water
    value = mean + std * (lesion.noise * fine + lesion.heterogeneity * coarse)
    if lesion.rim is not None:
        rim_contrast, width = lesion.rim
        # A band just inside the blurred surface, so that it stays visible.
        band = np.exp(-0.5 * ((distance + lesion.softness_mm + width / 2) / (width / 2)) ** 2)
        value = value + band * (parenchyma + rim_contrast - mean)
    if lesion.necrosis is not None:
        # A fluid core, blurred like the lesion's edge; only the scan's grain remains inside it.
        fraction, core_hu = lesion.necrosis
        core = expit(-(distance + (1 - fraction) * lesion.radius_mm) / lesion.softness_mm)
        value = value * (1 - core) + (core_hu + std * lesion.noise * fine) * core
    if lesion.calcification is not None and inside.any():
        value = _add_deposits(value, inside, lesion.calcification, spacing)

    region = alpha > 0
    view = out[box]
    blended = view[region] * (1 - alpha[region]) + value[region] * alpha[region]
    if config.hu_window is not None:
        blended = np.clip(blended, *config.hu_window)
    view[region] = blended


def _add_deposits(value, inside, calcification, spacing):
    """Dense patches over `share` of the lesion's voxels, where a smooth random field is highest (their edge: a
    sigmoid over a tenth of the field's std)."""
    share, dense_hu, scale_mm, seed = calcification
    field = smooth_noise(np.random.default_rng(seed), value.shape, scale_mm / 2 / np.asarray(spacing, float))
    threshold = np.quantile(field[inside], 1 - share)
    dense = expit((field - threshold) / 0.1) * inside
    return value * (1 - dense) + dense_hu * dense
