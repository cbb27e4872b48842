"""Synthetic masses beside an organ (Training/masses.py): outside the organ and touching it, or pressing into it,
darker than its parenchyma, seeded, and painted into training crops by the plan's `neighbour_masses` with the organ
voxels they cover labelled background."""

import numpy as np
import pytest
from scipy import ndimage

from Training.masses import MASS, free_tissue, synthesise_neighbour_mass

SPACING = (1.5, 1.5, 3.0)
PARENCHYMA_HU = 120.0


def abdomen_phantom(seed=0):
    """Soft tissue (40 HU) around an ellipsoidal liver (120 HU) in the upper-left part of the volume, and air at
    the volume's first rows (a mass may not replace it)."""
    rng = np.random.default_rng(seed)
    shape = (96, 96, 40)
    x, y, z = np.ogrid[:shape[0], :shape[1], :shape[2]]
    liver = ((x - 35) * 1.5 / 40) ** 2 + ((y - 45) * 1.5 / 35) ** 2 + ((z - 20) * 3.0 / 45) ** 2 < 1
    image = np.full(shape, 40.0, np.float32) + 8 * rng.standard_normal(shape).astype(np.float32)
    image[liver] = PARENCHYMA_HU + 10 * rng.standard_normal(int(liver.sum()))
    image[:, :4] = -1000.0
    label = liver.astype(np.uint8)
    return image, label


@pytest.fixture(scope="module")
def masses():
    image, label = abdomen_phantom()
    free = free_tissue(image, label)
    drawn = [synthesise_neighbour_mass(image, label == 1, free, SPACING, np.random.default_rng(seed))
             for seed in range(10)]
    return image, label, free, drawn


def test_free_tissue_is_unlabelled_soft_tissue_and_fat():
    image = np.array([[[-1000.0, -100.0, 40.0, 120.0, 700.0]]])
    label = np.array([[[0, 0, 0, 1, 0]]], np.uint8)
    assert free_tissue(image, label).tolist() == [[[False, True, True, False, False]]]


def test_masses_lie_beside_the_organ_or_press_into_it(masses):
    image, label, free, drawn = masses
    organ = label == 1
    painted = [(out, mass) for out, mass in drawn if mass.any()]
    assert len(painted) >= 8, "most draws should find room beside a liver in open soft tissue"
    pressing = 0
    for out, mass in painted:
        assert not (mass & ~(free | organ)).any()
        assert (ndimage.binary_dilation(mass, iterations=2) & organ).any(), "the mass does not touch the organ"
        assert (mass & free).sum() > (mass & organ).sum(), "a mass lies mostly outside the organ"
        assert np.array_equal(out[~(free | organ)], image[~(free | organ)]), "air and bone never change"
        if (mass & organ).any():
            pressing += 1
        else:
            assert np.array_equal(out[organ], image[organ]), "a mass beside the organ leaves it as it was"
    assert 2 <= pressing <= len(painted) - 2, "about half press into the organ"


def test_masses_are_darker_than_the_parenchyma_and_of_the_drawn_size(masses):
    image, label, _, drawn = masses
    voxel_ml = np.prod(SPACING) / 1000
    largest = (4 / 3) * np.pi * MASS.radius_mm[1] ** 3 * MASS.max_axis_ratio / 1000
    for out, mass in drawn:
        if not mass.any():
            continue
        assert np.median(out[mass]) < PARENCHYMA_HU - 15
        assert 1.0 < mass.sum() * voxel_ml < largest


def test_same_seed_same_mass_and_the_input_is_kept(masses):
    image, label, free, drawn = masses
    copy = image.copy()
    again, mask = synthesise_neighbour_mass(image, label == 1, free, SPACING, np.random.default_rng(0))
    assert np.array_equal(again, drawn[0][0]) and np.array_equal(mask, drawn[0][1])
    assert np.array_equal(image, copy)


def test_no_room_beside_the_organ_leaves_the_image_unchanged():
    image, label = abdomen_phantom()
    out, mass = synthesise_neighbour_mass(image, label == 1, np.zeros(label.shape, bool), SPACING,
                                          np.random.default_rng(0))
    assert not mass.any() and np.array_equal(out, image)


def test_bad_inputs_are_refused_with_clear_errors():
    image, label = abdomen_phantom()
    with pytest.raises(ValueError, match="free mask shape"):
        synthesise_neighbour_mass(image, label == 1, np.zeros((3, 3, 3), bool), SPACING, np.random.default_rng(0))
    with pytest.raises(ValueError, match="organ mask is empty"):
        synthesise_neighbour_mass(image, label == 5, label == 0, SPACING, np.random.default_rng(0))


def test_training_crops_get_masses_beside_the_liver_and_the_liver_they_cover_becomes_background():
    from Training.lesions import TrainingLesions
    plan = {"classes": ["background", "liver", "liver tumour"], "spacing": list(SPACING),
            "normalisation": {"type": "ct", "window": [-125.0, 275.0], "mean": 90.0, "std": 60.0},
            "neighbour_masses": {"liver": 1.0}}
    image_hu, label = abdomen_phantom()
    image = ((np.clip(image_hu, -125, 275) - 90.0) / 60.0)[None].astype(np.float32)
    masses = TrainingLesions(plan)
    assert masses, "a plan with neighbour masses paints something"
    changed = 0
    for seed in range(4):
        crop, crop_label = image.copy(), label.copy()
        masses.paint_masses(crop, crop_label, np.random.default_rng(seed))
        relabelled = crop_label != label
        assert set(np.unique(label[relabelled])) <= {1} and not crop_label[relabelled].any()
        # The liver kept changes only at the blurred edge of a mass that pressed into it.
        liver_changed = (crop_label == 1) & (crop[0] != image[0])
        assert relabelled.any() or not liver_changed.any()
        near_mass = ndimage.binary_dilation((crop_label == 0) & (crop[0] != image[0]), iterations=6)
        assert not (liver_changed & ~near_mass).any()
        changed += bool((crop != image).any())
    assert changed >= 3


# Recorded with these seeds before the drawing helpers moved from Training/lesions.py to Training/lesion_drawing.py:
# (seed, mass voxels, sum of the image with the mass, liver lesion voxels, its image's sum, pancreas-preset ones).
SEEDED_FIGURES = [(0, 17682, 986794.2, 22, 1901892.4, 53, 1900418.2),
                  (1, 12103, 1695682.1, 8592, 1718700.5, 340, 1884340.6),
                  (2, 6400, 1862631.2, 1368, 1847304.4, 3288, 1789601.9)]


@pytest.mark.parametrize("figures", SEEDED_FIGURES, ids=lambda figures: f"seed {figures[0]}")
def test_masses_and_lesions_draw_what_they_drew_for_the_same_seed(figures):
    from Training.lesions import PANCREAS, synthesise_lesions

    seed = figures[0]
    image, label = abdomen_phantom()
    painted, mass = synthesise_neighbour_mass(image, label == 1, free_tissue(image, label), SPACING,
                                              np.random.default_rng(seed))
    liver, liver_lesions = synthesise_lesions(image, label == 1, SPACING, np.random.default_rng(seed))
    pancreas, pancreas_lesions = synthesise_lesions(image, label == 1, SPACING, np.random.default_rng(seed), PANCREAS)
    measured = (seed, int(mass.sum()), float(painted.astype(np.float64).sum()), int(liver_lesions.sum()),
                float(liver.astype(np.float64).sum()), int(pancreas_lesions.sum()),
                float(pancreas.astype(np.float64).sum()))
    assert measured == pytest.approx(figures, abs=0.2)


def test_masses_and_lesions_share_one_drawing_module_without_an_import_circle():
    import subprocess
    import sys

    code = ("import sys, Training.masses; print('Training.lesions' in sys.modules); "
            "import Training.lesions as l, Training.lesion_drawing as d; "
            "print(Training.masses.paint_lesion is d.paint_lesion is l.paint_lesion)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]
