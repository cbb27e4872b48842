"""Synthetic masses beside an organ or pressing into it, background in the label.

A kidney, adrenal or bowel tumour can press against the liver. BTCV holds no such mass, and the networks learnt
that tissue at the liver's place is liver or liver tumour: on a real CT with a 669 mL mass under the liver, outside
it (3D-IRCADb patient 7), every liver stage labelled most of the mass liver. Painted during training into the
tissue around the organ, touching it, these masses teach that a mass whose boundary is the organ's edge is not organ
(what they changed, measured: docs/models.md, "A mass beside the liver").
Half of them press into the organ and replace it where they lie (the caller labels those voxels background): a
large renal or adrenal tumour indents the liver, and the liver then wraps partly round it.

A mass is drawn like a large lesion (`Training.lesion_drawing`: shape, texture, rim, necrotic centre, edge blur)
with its attenuation set against the organ's parenchyma, and painted only into `free` voxels (unlabelled soft tissue
and fat), so that a mass beside the organ takes the organ's outline where it meets it; a pressing one also into the
organ.
"""

import numpy as np
from scipy import ndimage

from .lesion_drawing import (Lesion, LesionConfig, check_inputs, draw_necrosis, draw_radius, draw_rim, draw_semi_axes,
                             draw_shape, draw_softness, draw_texture, paint_lesion, parenchyma_statistics,
                             random_rotation)

# Masses 30-110 mm across (14-700 mL), hypo-attenuating against the liver, as renal, adrenal and bowel tumours and
# nodal masses mostly are against an enhanced liver (IRCADb patient 7's: 85 HU below). Not iso: tissue like the
# organ's that touches it cannot be told from it.
MASS = LesionConfig(radius_mm=(15.0, 55.0), max_axis_ratio=1.8, shape_probabilities=(0.4, 0.4, 0.2),
                    mode_probabilities=(1.0, 0.0, 0.0), hypo_contrast_hu=(25.0, 110.0),
                    heterogeneity_std=(0.3, 1.2), heterogeneity_scale_mm=(3.0, 10.0),
                    rim_probability=0.2, necrosis_probability=0.4, necrosis_min_radius_mm=15.0)
FREE_HU = (-115.0, 200.0)    # tissue a mass may replace: fat and soft tissue, not air, lung or bone (BTCV clips
                             # at -125)
INDENT_PROBABILITY = 0.5     # masses that press into the organ, replacing it where they lie
CONTACT_DEPTH = (0.5, 0.9)   # the centre of a mass beside the organ lies this many radii outside its surface ...
INDENT_DEPTH = (0.05, 0.5)   # ... of a pressing one, this many
ATTEMPTS = 20                # surface points tried for a centre in free tissue
NORMAL_SMOOTHING_MM = 3.0    # the surface normal is that of the organ mask smoothed this much


def free_tissue(image_hu, label):
    """Voxels a mass may replace: unlabelled (label 0) fat and soft tissue."""
    return (label == 0) & (image_hu > FREE_HU[0]) & (image_hu < FREE_HU[1])


def synthesise_neighbour_mass(image_hu, organ_mask, free_mask, spacing_mm, rng, config=MASS):
    """(new image in HU, mass mask): one mass centred in `free_mask`, outside the organ, its attenuation set against
    the organ's parenchyma. It lies in `free_mask` and touches the organ, or (INDENT_PROBABILITY) presses into it
    and covers organ voxels too, which are then no longer organ. No other voxel changes. Where no surface point has
    free tissue beyond it, the image comes back unchanged with an empty mask."""
    image_hu, organ, spacing = check_inputs(image_hu, organ_mask, spacing_mm)
    free = np.asarray(free_mask, bool)
    if free.shape != organ.shape:
        raise ValueError(f"free mask shape {free.shape} differs from the organ's {organ.shape}")
    out = image_hu.astype(np.float32, copy=True)
    mass = np.zeros(organ.shape, bool)
    radius = draw_radius(rng, config.radius_mm)
    indent = rng.random() < INDENT_PROBABILITY
    depth_mm = radius * rng.uniform(*(INDENT_DEPTH if indent else CONTACT_DEPTH))
    centre = _centre_outside(organ, free, spacing, depth_mm, rng)
    if centre is None:
        return out, mass
    statistics = parenchyma_statistics(image_hu, organ, config)
    paint_lesion(out, mass, free | organ if indent else free,
                  _draw_mass(centre, radius, statistics, spacing, rng, config), statistics, spacing, rng, config)
    return out, mass


def _centre_outside(organ, free, spacing, depth_mm, rng):
    """A voxel in free tissue `depth_mm` outside a random point of the organ surface, along the surface's outward
    normal; None if none of ATTEMPTS points has one."""
    # The crop's faces are not surface: the organ goes on beyond them.
    surface = np.argwhere(organ & ~ndimage.binary_erosion(organ, border_value=1))
    if not len(surface):
        return None
    inward = np.gradient(ndimage.gaussian_filter(organ.astype(np.float32), NORMAL_SMOOTHING_MM / spacing))
    for point in surface[rng.integers(len(surface), size=ATTEMPTS)]:
        normal = -np.array([g[tuple(point)] for g in inward]) / spacing  # per mm
        length = np.linalg.norm(normal)
        if length < 1e-6:
            continue
        centre = np.round(point + normal / length * depth_mm / spacing).astype(int)
        if np.all(centre >= 0) and np.all(centre < organ.shape) and free[tuple(centre)]:
            return centre
    return None


def _draw_mass(centre, radius, statistics, spacing, rng, config):
    semi_axes = draw_semi_axes(rng, radius, config)
    shape, deformation, lobes = draw_shape(rng, radius, config)
    rim = draw_rim(rng, config)
    necrosis = draw_necrosis(rng, radius, config)
    softness = draw_softness(rng, radius, statistics, spacing, config)
    rotation = random_rotation(rng)
    contrast = -float(rng.uniform(*config.hypo_contrast_hu))
    return Lesion(centre=tuple(int(c) for c in centre), radius_mm=radius, semi_axes_mm=semi_axes, rotation=rotation,
                  mode="hypo", contrast_hu=contrast, deformation=deformation, softness_mm=softness, shape=shape,
                  lobes=lobes, **draw_texture(rng, config), rim=rim, necrosis=necrosis, placement="outside")
