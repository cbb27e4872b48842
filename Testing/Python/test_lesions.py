"""Synthetic lesions (Training/lesions.py): geometry, label and intensity invariants, determinism,
the radius distribution, and a real BTCV liver."""

import dataclasses
import os

import numpy as np
import pytest
from scipy import ndimage, stats

from Training.lesions import (LIVER, MODES, PANCREAS, analyse_organ, apply_to_labels, parenchyma_statistics,
                              synthesise_lesions, synthesise_lesions_detailed)

SPACING = (1.5, 1.5, 2.0)
PARENCHYMA_HU, PARENCHYMA_STD = 120.0, 12.0


def ellipsoid_organ(shape=(72, 64, 48), semi_axes_mm=(48.0, 42.0, 40.0), spacing=SPACING):
    """A boolean ellipsoid centred in the volume."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    q = sum(((g - (n - 1) / 2) * s / a) ** 2 for g, n, s, a in zip(grid, shape, spacing, semi_axes_mm))
    return q < 1


def phantom(shape=(72, 64, 48), spacing=SPACING, seed=0, vessel=False):
    """Soft-tissue background, an organ of noisy parenchyma and optionally a bright tube (a vessel) along z."""
    rng = np.random.default_rng(seed)
    organ = ellipsoid_organ(shape, spacing=spacing)
    image = np.full(shape, 40.0, np.float32) + 8 * rng.standard_normal(shape).astype(np.float32)
    image[organ] = PARENCHYMA_HU + PARENCHYMA_STD * rng.standard_normal(int(organ.sum()))
    vessel_mask = np.zeros(shape, bool)
    if vessel:
        x, y, _ = np.ogrid[:shape[0], :shape[1], :shape[2]]
        vessel_mask = (((x - shape[0] // 2) * spacing[0]) ** 2 + ((y - shape[1] // 2) * spacing[1]) ** 2 < 5.0 ** 2)
        vessel_mask = vessel_mask & organ
        image[vessel_mask] = 220.0
    return image, organ, vessel_mask


@pytest.fixture(scope="module")
def liver_phantom():
    return phantom()


def test_lesions_stay_inside_the_organ(liver_phantom):
    image, organ, _ = liver_phantom
    for seed in range(8):
        for config in (LIVER, PANCREAS):
            _, mask = synthesise_lesions(image, organ, SPACING, np.random.default_rng(seed), config)
            assert mask.dtype == bool and mask.shape == organ.shape
            assert mask.any()
            assert not np.any(mask & ~organ)


def test_lesions_near_the_edge_of_a_small_organ_are_clipped_to_it():
    # A 12 mm organ cannot hold a 20 mm lesion: whatever is drawn is clipped to the organ.
    image, _, _ = phantom()
    organ = ellipsoid_organ(semi_axes_mm=(12.0, 8.0, 8.0))
    config = dataclasses.replace(LIVER, radius_mm=(20.0, 20.0))
    for seed in range(4):
        _, mask = synthesise_lesions(image, organ, SPACING, np.random.default_rng(seed), config)
        assert mask.any() and not np.any(mask & ~organ)


def test_image_changes_only_in_the_organ_near_the_lesions(liver_phantom):
    image, organ, _ = liver_phantom
    config = dataclasses.replace(LIVER, mass_effect_probability=0.5)
    for seed in range(8):
        new, mask, lesions = synthesise_lesions_detailed(image, organ, SPACING, np.random.default_rng(seed), config)
        assert new.shape == image.shape and new.dtype == image.dtype
        changed = new != image
        assert not np.any(changed & ~organ), "a voxel outside the organ changed"
        # Every change lies within the reach of some lesion (its blurred edge, or its mass effect).
        near = np.zeros(organ.shape, bool)
        grid = np.ogrid[tuple(slice(0, n) for n in organ.shape)]
        for lesion in lesions:
            reach = lesion.semi_axes_mm.max() * max(config.mass_effect_reach, 1 + 3 * lesion.deformation) \
                + 5 * lesion.softness_mm
            near |= sum(((g - c) * s) ** 2 for g, c, s in zip(grid, lesion.centre, SPACING)) <= reach ** 2
        assert not np.any(changed & ~near)
        assert np.all(changed[mask]), "every lesion voxel is repainted"
        low, high = LIVER.hu_window
        assert new[changed].min() >= low and new[changed].max() <= high


def test_apply_to_labels_marks_tumour_only_inside_the_organ():
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:12, 2:12, 2:12] = 3      # the organ (e.g. pancreas in a multi-organ model)
    label[14:18, 14:18, 14:18] = 1   # another organ, untouched
    lesion = np.zeros(label.shape, bool)
    lesion[4:8, 4:8, 4:8] = True
    out = apply_to_labels(label, 3, 5, lesion)
    assert out.dtype == label.dtype and label[5, 5, 5] == 3  # the input is not modified
    assert np.all(out[lesion] == 5)
    assert np.all(out[(label == 3) & ~lesion] == 3)
    assert np.array_equal(out[label != 3], label[label != 3])
    outside = lesion.copy()
    outside[15, 15, 15] = True
    with pytest.raises(ValueError, match="outside the organ"):
        apply_to_labels(label, 3, 5, outside)
    with pytest.raises(ValueError, match="shape"):
        apply_to_labels(label, 3, 5, lesion[:-1])


def test_labels_from_a_synthesis_follow_msd_convention(liver_phantom):
    image, organ, _ = liver_phantom
    _, mask = synthesise_lesions(image, organ, SPACING, np.random.default_rng(3), LIVER)
    label = apply_to_labels(organ.astype(np.uint8), 1, 2, mask)
    assert set(np.unique(label)) == {0, 1, 2}
    assert np.array_equal(label == 2, mask)
    assert np.array_equal(label == 1, organ & ~mask)
    assert np.all(label[~organ] == 0)


def test_same_seed_same_result_different_seed_different_result(liver_phantom):
    image, organ, _ = liver_phantom
    first = synthesise_lesions(image, organ, SPACING, np.random.default_rng(42), LIVER)
    again = synthesise_lesions(image, organ, SPACING, np.random.default_rng(42), LIVER)
    other = synthesise_lesions(image, organ, SPACING, np.random.default_rng(43), LIVER)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])
    assert not np.array_equal(first[0], other[0])


def test_the_input_is_not_modified(liver_phantom):
    image, organ, _ = liver_phantom
    before = image.copy()
    synthesise_lesions(image, organ, SPACING, np.random.default_rng(0), LIVER)
    assert np.array_equal(image, before)


def test_lesion_volumes_follow_the_log_uniform_radius_distribution():
    # One unclipped lesion per draw in a big organ; the volume-equivalent radius of the labelled voxels must
    # match the drawn radius, and over many draws be log-uniform on the configured range.
    spacing = (1.5, 1.5, 1.5)
    image, organ, _ = phantom(shape=(64, 64, 64), spacing=spacing)
    organ = ellipsoid_organ((64, 64, 64), (46.0, 46.0, 46.0), spacing)
    low, high = 4.0, 16.0
    config = dataclasses.replace(LIVER, count_probabilities=(1.0,), radius_mm=(low, high),
                                 multifocal_probability=0.0, shape_probabilities=(1.0, 0.0, 0.0),
                                 mass_effect_probability=0.0, depth_fraction=1.4)
    drawn, measured = [], []
    for seed in range(100):
        _, mask, lesions = synthesise_lesions_detailed(image, organ, spacing, np.random.default_rng(seed), config)
        drawn.append(lesions[0].radius_mm)
        measured.append((3 * mask.sum() * np.prod(spacing) / (4 * np.pi)) ** (1 / 3))
    drawn, measured = np.array(drawn), np.array(measured)
    ratio = measured / drawn
    assert abs(np.median(ratio) - 1) < 0.05
    assert np.all(np.abs(ratio - 1) < 0.2)
    position = (np.log(measured) - np.log(low)) / (np.log(high) - np.log(low))
    assert stats.kstest(position, "uniform").pvalue > 0.01
    # ... and not, say, uniform in radius (which has a larger median): the test can tell them apart.
    assert stats.kstest((measured - low) / (high - low), "uniform").pvalue < 0.01


def test_hypo_attenuating_lesions_are_darker_than_the_parenchyma(liver_phantom):
    image, organ, _ = liver_phantom
    parenchyma = parenchyma_statistics(image, organ, LIVER)["mean"]
    assert abs(parenchyma - PARENCHYMA_HU) < 2
    hypo = dataclasses.replace(LIVER, mode_probabilities=(1.0, 0.0, 0.0), mass_effect_probability=0.0,
                               rim_probability=0.0)
    for seed in range(6):
        new, mask = synthesise_lesions(image, organ, SPACING, np.random.default_rng(seed), hypo)
        # Every lesion, not just their union: label the components and check each.
        components, count = ndimage.label(mask)
        for index in range(1, count + 1):
            inside = components == index
            if inside.sum() >= 20:
                assert new[inside].mean() < parenchyma - 10


def test_liver_default_is_mostly_hypo_attenuating(liver_phantom):
    image, organ, _ = liver_phantom
    modes = []
    for seed in range(30):
        _, _, lesions = synthesise_lesions_detailed(image, organ, SPACING, np.random.default_rng(seed), LIVER)
        modes += [lesion.mode for lesion in lesions]
    assert max(MODES, key=modes.count) == "hypo"
    assert modes.count("hyper") / len(modes) > 0.1, "hyper-attenuating (arterial-phase) lesions too"
    assert "iso" in modes


def test_multifocal_lesions_occur_and_are_apart(liver_phantom):
    image, organ, _ = liver_phantom
    counts = []
    for seed in range(20):
        _, _, lesions = synthesise_lesions_detailed(image, organ, SPACING, np.random.default_rng(seed), LIVER)
        counts.append(len(lesions))
        for i, a in enumerate(lesions):
            for b in lesions[i + 1:]:
                if a.placement == b.placement == "preferred":
                    distance = np.linalg.norm((np.array(a.centre) - np.array(b.centre)) * SPACING)
                    assert distance >= a.radius_mm + b.radius_mm - 6.0  # centres on a 4 mm grid, jittered
    assert 1 in counts and max(counts) >= 3


def test_centres_avoid_vessels_and_the_organ_edge():
    image, organ, vessel = phantom(vessel=True)
    # A 5 mm bright tube runs along z through the organ's middle; a random organ voxel is within 15 mm of
    # it about one time in six, so 20 draws that all keep clear of it are no accident.
    config = dataclasses.replace(LIVER, radius_mm=(3.0, 6.0), vessel_margin_mm=20.0, edge_margin_mm=8.0,
                                 count_probabilities=(1.0,))
    analysis = analyse_organ(image, organ, SPACING, config)
    depth = ndimage.distance_transform_edt(organ, sampling=SPACING)
    clearance = ndimage.distance_transform_edt(~vessel, sampling=SPACING)
    for seed in range(20):
        _, _, lesions = synthesise_lesions_detailed(image, organ, SPACING, np.random.default_rng(seed), config,
                                                    analysis)
        lesion = lesions[0]
        assert lesion.placement == "preferred"
        # Placement works on a ~4 mm grid: allow a coarse voxel of slack.
        assert clearance[lesion.centre] >= 20.0 - 5.0
        assert depth[lesion.centre] >= 8.0 - 5.0


def test_a_kept_analysis_gives_the_same_result(liver_phantom):
    image, organ, _ = liver_phantom
    analysis = analyse_organ(image, organ, SPACING, LIVER)
    direct = synthesise_lesions(image, organ, SPACING, np.random.default_rng(7), LIVER)
    reused = synthesise_lesions(image, organ, SPACING, np.random.default_rng(7), LIVER, analysis=analysis)
    assert np.array_equal(direct[0], reused[0]) and np.array_equal(direct[1], reused[1])
    with pytest.raises(ValueError, match="analysis"):
        synthesise_lesions(image, organ, SPACING, np.random.default_rng(7), PANCREAS, analysis=analysis)
    with pytest.raises(ValueError, match="analysis"):
        synthesise_lesions(image, organ, (1.0, 1.0, 1.0), np.random.default_rng(7), LIVER, analysis=analysis)


def test_bad_inputs_are_refused_with_clear_errors(liver_phantom):
    image, organ, _ = liver_phantom
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="empty"):
        synthesise_lesions(image, np.zeros_like(organ), SPACING, rng)
    with pytest.raises(ValueError, match="shape"):
        synthesise_lesions(image, organ[:-1], SPACING, rng)
    with pytest.raises(ValueError, match="3-D"):
        synthesise_lesions(image[0], organ[0], SPACING, rng)
    with pytest.raises(ValueError, match="spacing"):
        synthesise_lesions(image, organ, (1.0, 0.0, 1.0), rng)


def test_a_real_btcv_liver(btcv):
    import SimpleITK as sitk

    from MSDSegmentLib.preprocessing import labels_to_canonical, to_canonical
    from Training.dataset import read_dataset
    from Training.lesion_gallery import organ_label_value

    meta, cases = read_dataset(btcv)
    case = sorted(cases, key=lambda c: c["id"])[0]
    spacing = [4.0, 4.0, 4.0]
    image, reference = to_canonical(sitk.ReadImage(case["image"]), spacing, {"type": "ct", "window": [-125, 275]})
    liver = labels_to_canonical(sitk.ReadImage(case["label"]), reference) == organ_label_value(meta, "liver")
    hypo = dataclasses.replace(LIVER, mode_probabilities=(1.0, 0.0, 0.0), rim_probability=0.0)
    parenchyma = parenchyma_statistics(image, liver, LIVER)["mean"]
    for seed in range(3):
        new, mask, lesions = synthesise_lesions_detailed(image, liver, spacing, np.random.default_rng(seed), hypo)
        assert mask.any() and not np.any(mask & ~liver)
        assert not np.any((new != image) & ~liver)
        assert new[mask].mean() < parenchyma - 10
        assert all(lesion.placement in ("preferred", "margins") for lesion in lesions)


def test_gallery_writes_a_small_png(btcv, tmp_path):
    from PIL import Image

    from Training.lesion_gallery import main

    out = str(tmp_path / "gallery.png")
    main(["--data", btcv, "--organ", "pancreas", "--out", out, "--cases", "1", "--spacing", "4"])
    assert os.path.getsize(out) < 300_000
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 200


def test_training_crops_get_tumour_labels_inside_the_organ_reproducibly():
    from Training.lesions import TrainingLesions
    plan = {"classes": ["background", "spleen", "liver", "liver tumour", "pancreas", "pancreatic tumour"],
            "normalisation": {"type": "ct", "window": [-125.0, 275.0], "mean": 90.0, "std": 60.0},
            "spacing": [4.0, 4.0, 4.0], "lesion_probability": 1.0,
            "synthetic_lesions": {"liver tumour": {"organ": "liver", "preset": "liver"},
                                  "pancreatic tumour": {"organ": "pancreas", "preset": "pancreas"}}}
    x, y, z = np.meshgrid(*[np.arange(48)] * 3, indexing="ij")
    label = np.zeros((48, 48, 48), np.uint8)
    label[((x - 24) / 18.0) ** 2 + ((y - 24) / 16.0) ** 2 + ((z - 24) / 14.0) ** 2 < 1] = 2   # a liver
    image = np.random.default_rng(0).normal((100 - 90) / 60, 0.15, (1, 48, 48, 48)).astype(np.float32)
    results = []
    for _ in range(2):
        crop, crop_label = image.copy(), label.copy()
        TrainingLesions(plan)(crop, crop_label, np.random.default_rng(7))
        results.append((crop, crop_label))
    crop, crop_label = results[0]
    assert np.array_equal(crop, results[1][0]) and np.array_equal(crop_label, results[1][1])
    assert (crop_label == 3).any(), "no liver tumour painted with probability 1"
    assert set(np.unique(crop_label)) <= {0, 2, 3}          # no pancreas here: no pancreatic tumour
    assert np.array_equal(crop_label > 0, label > 0)         # tumours only replace organ voxels
    assert np.array_equal(crop[0][label == 0], image[0][label == 0])
    assert crop[0][crop_label == 3].mean() < crop[0][crop_label == 2].mean()   # hypo-attenuating by default


def test_plans_without_lesion_classes_paint_nothing():
    from Training.lesions import TrainingLesions
    mr_plan = {"classes": ["background", "PZ", "TZ"], "normalisation": {"type": "zscore"}, "spacing": [0.6, 0.6, 3.6]}
    assert not TrainingLesions(mr_plan)      # an MR plan has no CT mean and std, and needs none


def test_lesion_centred_patches_hold_a_tumour_of_the_organ_they_were_painted_into():
    from Training.cache import foreground_locations
    from Training.lesions import TrainingLesions
    from Training.sampling import PatchSampler

    plan = {"classes": ["background", "spleen", "liver", "liver tumour", "pancreas", "pancreatic tumour"],
            "normalisation": {"type": "ct", "window": [-125.0, 275.0], "mean": 90.0, "std": 60.0},
            "spacing": [4.0, 4.0, 4.0], "lesion_probability": 0.0, "lesion_centred_fraction": 1.0,
            "synthetic_lesions": {"liver tumour": {"organ": "liver", "preset": "liver"},
                                  "pancreatic tumour": {"organ": "pancreas", "preset": "pancreas"}}}
    x, y, z = np.meshgrid(*[np.arange(64)] * 3, indexing="ij")
    label = np.zeros((64, 64, 64), np.uint8)
    label[((x - 22) / 18.0) ** 2 + ((y - 30) / 20.0) ** 2 + ((z - 32) / 16.0) ** 2 < 1] = 2   # a liver
    label[((x - 50) / 10.0) ** 2 + ((y - 30) / 5.0) ** 2 + ((z - 32) / 5.0) ** 2 < 1] = 4     # a pancreas
    image = np.random.default_rng(0).normal((100 - 90) / 60, 0.15, (1, 64, 64, 64)).astype(np.float32)
    rng = np.random.default_rng(1)
    case = {"id": "case", "image": image, "label": label, "locations": foreground_locations(label, 6, rng)}
    sampler = PatchSampler([case], [16, 16, 16], 6, [], seed=2, lesions=TrainingLesions(plan))
    tumours = []
    for _ in range(4):
        _, labels = sampler.sample(2)
        for patch in labels[:, 0].numpy():
            present = set(np.unique(patch))
            assert present & {3, 5}, f"a lesion-centred patch without tumour: {present}"
            assert not (3 in present and 5 in present)   # only the chosen organ is painted
            tumours.append(3 if 3 in present else 5)
    assert set(tumours) == {3, 5}                        # either organ is chosen
    assert np.array_equal(case["label"], label)          # the cached case is left as it was


def test_lesion_centred_organs_are_drawn_by_their_weight_among_those_present():
    from Training.lesions import TrainingLesions

    plan = {"classes": ["background", "liver", "liver tumour", "pancreas", "pancreatic tumour"],
            "normalisation": {"type": "ct", "window": [-125.0, 275.0], "mean": 90.0, "std": 60.0},
            "spacing": [2.0, 2.0, 3.0], "lesion_centred_fraction": 0.5,
            "synthetic_lesions": {"liver tumour": {"organ": "liver", "preset": "liver"},
                                  "pancreatic tumour": {"organ": "pancreas", "preset": "pancreas",
                                                        "centred_weight": 3}}}
    lesions, rng = TrainingLesions(plan), np.random.default_rng(0)
    drawn = [lesions.choose_organ([1, 3], rng) for _ in range(4000)]
    share = sum(pair == (3, 4) for pair in drawn) / len(drawn)
    assert abs(share - 0.75) < 0.03, share
    assert {lesions.choose_organ([1], rng) for _ in range(50)} == {(1, 2)}   # an absent organ is never chosen
    assert lesions.choose_organ([5], rng) is None


# ------------------------------------------------------------------------------ variety of real metastases

def lesion_volumes_ml(mask, spacing):
    components, count = ndimage.label(mask)
    return np.bincount(components.ravel())[1:] * np.prod(spacing) / 1000.0


def test_the_liver_default_covers_every_lesion_size_class_with_many_small_ones():
    # Liver-sized organ at 1.5 mm: lesions from under 0.5 mL (under 10 mm across) to over 10 mL, and most
    # of them small (the measurable 0.5-2 mL ones a radiologist follows are common, not rare).
    spacing = (1.5, 1.5, 2.5)
    shape = (110, 100, 70)
    image, _, _ = phantom(shape=shape, spacing=spacing)
    organ = ellipsoid_organ(shape, (78.0, 70.0, 82.0), spacing)
    analysis = analyse_organ(image, organ, spacing, LIVER)
    volumes = np.concatenate([lesion_volumes_ml(synthesise_lesions(image, organ, spacing, np.random.default_rng(seed),
                                                                   LIVER, analysis)[1], spacing)
                              for seed in range(30)])
    classes = np.digitize(volumes, [0.5, 2.0, 10.0])
    counts = np.bincount(classes, minlength=4)
    assert np.all(counts >= 5), f"lesions per size class (<0.5, 0.5-2, 2-10, >=10 mL): {counts}"
    assert counts[:2].sum() > counts[3], "more small lesions (under 2 mL) than large ones"


def test_metastatic_seeding_paints_several_small_lesions_of_one_kind(liver_phantom):
    image, organ, _ = liver_phantom
    seeded = dataclasses.replace(LIVER, multifocal_probability=1.0)
    for seed in range(5):
        _, _, lesions = synthesise_lesions_detailed(image, organ, SPACING, np.random.default_rng(seed), seeded)
        assert 3 <= len(lesions) <= 10
        assert all(2.5 <= lesion.radius_mm <= 10.0 for lesion in lesions)
        assert len({lesion.mode for lesion in lesions}) == 1, "metastases of one primary look alike"


def test_confluent_and_lobulated_shapes():
    shape = (100, 100, 80)
    image, _, _ = phantom(shape=shape)
    organ = ellipsoid_organ(shape, (72.0, 72.0, 78.0))
    plain = dict(count_probabilities=(1.0,), multifocal_probability=0.0, radius_mm=(12.0, 12.0),
                 mass_effect_probability=0.0, depth_fraction=1.5)
    volumes = {}
    for kind, probabilities in (("ellipsoid", (1.0, 0.0, 0.0)), ("lobulated", (0.0, 1.0, 0.0)),
                                ("confluent", (0.0, 0.0, 1.0))):
        config = dataclasses.replace(LIVER, shape_probabilities=probabilities, **plain)
        volumes[kind] = []
        for seed in range(6):
            _, mask, (lesion,) = synthesise_lesions_detailed(image, organ, SPACING, np.random.default_rng(seed), config)
            assert lesion.shape == kind
            volumes[kind].append(mask.sum())
            if kind == "confluent":
                assert 1 <= len(lesion.lobes) <= 3
                assert ndimage.label(mask)[1] <= 2, "lobes overlap the main lesion (one mass, rarely a loose lobe)"
            if kind == "lobulated":
                assert LIVER.lobulation[0] <= lesion.deformation <= LIVER.lobulation[1]
    assert np.mean(volumes["confluent"]) > 1.15 * np.mean(volumes["ellipsoid"]), "lobes add to the main mass"


def test_necrotic_centres_are_fluid_and_stay_tumour(liver_phantom):
    image, organ, _ = liver_phantom
    config = dataclasses.replace(LIVER, count_probabilities=(1.0,), multifocal_probability=0.0, radius_mm=(15.0, 15.0),
                                 mode_probabilities=(1.0, 0.0, 0.0), hypo_contrast_hu=(20.0, 20.0),
                                 necrosis_probability=1.0, necrosis_fraction=(0.6, 0.6), rim_probability=0.0,
                                 mass_effect_probability=0.0, shape_probabilities=(1.0, 0.0, 0.0),
                                 deformation=(0.0, 0.0), depth_fraction=1.5)
    for seed in range(3):
        new, mask, (lesion,) = synthesise_lesions_detailed(image, organ, SPACING, np.random.default_rng(seed), config)
        _, core_hu = lesion.necrosis
        grid = np.indices(mask.shape).transpose(1, 2, 3, 0) - np.array(lesion.centre)
        radial = np.linalg.norm(grid * SPACING, axis=-1)
        core, shell = radial < 0.3 * lesion.radius_mm, (radial > 0.75 * lesion.radius_mm) & mask
        assert mask[core].all(), "the necrotic core is tumour in the label"
        assert abs(new[core].mean() - core_hu) < 8 and new[shell].mean() > new[core].mean() + 30


def test_dense_deposits_are_bright_stay_tumour_and_leave_every_other_draw_unchanged(liver_phantom):
    image, organ, _ = liver_phantom
    plain = dataclasses.replace(LIVER, count_probabilities=(1.0,), multifocal_probability=0.0, radius_mm=(15.0, 15.0))
    dense = dataclasses.replace(plain, calcification_probability=1.0, calcification_share=(0.2, 0.2),
                                calcification_hu=(600.0, 600.0))
    for seed in range(3):
        before, before_mask, (before_lesion,) = synthesise_lesions_detailed(
            image, organ, SPACING, np.random.default_rng(seed), plain)
        after, mask, (lesion,) = synthesise_lesions_detailed(image, organ, SPACING, np.random.default_rng(seed), dense)
        assert before_lesion.calcification is None and lesion.calcification is not None
        assert np.array_equal(mask, before_mask), "the deposits change no other draw: same lesion, same label"
        assert not np.any((np.abs(after - before) > 1e-3) & ~mask), "deposits lie inside the lesion only"
        clipped = after >= LIVER.hu_window[1] - 1e-3  # 600 HU, clipped to the window BTCV was clipped to
        assert not np.any(before[mask] >= LIVER.hu_window[1] - 1e-3)
        assert 0.1 < clipped[mask].mean() < 0.3, "about the drawn share of the lesion is dense"


def grainy_phantom(sigma_voxels, seed=0):
    """The liver phantom with noise of the same std but another grain (correlation length)."""
    rng = np.random.default_rng(seed)
    organ = ellipsoid_organ()
    noise = ndimage.gaussian_filter(rng.standard_normal(organ.shape), sigma_voxels) if sigma_voxels else \
        rng.standard_normal(organ.shape)
    image = (PARENCHYMA_HU + PARENCHYMA_STD * noise / noise.std()).astype(np.float32)
    image[~organ] = 40.0
    return image, organ


def test_lesion_edges_are_as_blurred_as_the_scan():
    # A scan whose noise is smoother (a softer reconstruction kernel, a thicker in-plane resampling) blurs
    # edges more: the lesions painted into it get softer edges too.
    config = dataclasses.replace(LIVER, count_probabilities=(1.0,), multifocal_probability=0.0,
                                 radius_mm=(15.0, 15.0), edge_softness_mm=(0.3, 0.3))
    softness = {}
    for sigma in (0.0, 1.5):
        image, organ = grainy_phantom(sigma)
        softness[sigma] = synthesise_lesions_detailed(image, organ, SPACING, np.random.default_rng(0),
                                                      config)[2][0].softness_mm
    assert softness[1.5] > 1.5 * softness[0.0]


# --------------------------------------------------------------------- lesion statistics (real vs synthetic)

def test_lesion_statistics_measure_contrast_texture_size_and_edge():
    """A sphere of 12 mm radius, 40 HU darker than its organ, blurred by a Gaussian of 1.5 mm: its 10-90 % edge
    is 2.56 sigma = 3.8 mm wide; its own noise equals the organ's."""
    from Training.lesion_statistics import measure_lesions
    spacing = (1.0, 1.0, 1.0)
    shape = (70, 70, 70)
    organ = ellipsoid_organ(shape, (33.0, 33.0, 33.0), spacing)
    distance = np.sqrt(sum((g - 35) ** 2 for g in np.ogrid[:70, :70, :70]))
    lesion = distance < 12.0
    clean = np.where(organ, 120.0, 40.0) - 40.0 * lesion
    noise = 10.0 * np.random.default_rng(0).standard_normal(shape)
    label = np.where(lesion, 2, np.where(organ, 1, 0))
    (sharp,) = measure_lesions(clean + noise, label, spacing, 1, 2)
    assert sharp["volume_ml"] == pytest.approx(4 / 3 * np.pi * 12 ** 3 / 1000, rel=0.05)
    assert sharp["contrast_hu"] == pytest.approx(-40.0, abs=2.0)
    assert sharp["texture"] == pytest.approx(1.0, abs=0.2)
    (row,) = measure_lesions(ndimage.gaussian_filter(clean, 1.5) + noise, label, spacing, 1, 2)
    assert row["edge_mm"] == pytest.approx(2.56 * 1.5, abs=1.0)
    assert -40 < row["contrast_hu"] < -30  # partial volume at the blurred edge takes some contrast
    # An iso-attenuating lesion has no edge to measure.
    (iso,) = measure_lesions(np.where(organ, 120.0, 40.0), label, spacing, 1, 2)
    assert iso["edge_mm"] is None and iso["contrast_hu"] == 0


def test_resolution_check_counts_voxels_and_contrast_of_small_lesions(btcv, tmp_path):
    """10 mm lesions in a real BTCV liver resampled onto a fine and a coarse grid: the coarse one holds fewer
    voxels of each lesion and keeps no more of its contrast."""
    import json

    from Training.lesion_statistics import resolution_rows
    with open(os.path.join(btcv, "dataset.json")) as stream:
        meta = json.load(stream)
    entry = sorted(meta["training"], key=lambda e: e["image"])[0]
    one = dict(meta, training=[{key: os.path.join(btcv, value) for key, value in entry.items()}])
    with open(tmp_path / "dataset.json", "w") as stream:
        json.dump(one, stream)
    rows = resolution_rows(str(tmp_path), "liver", [[1.5, 1.5, 3.0], [3.0, 3.0, 6.0]], 10.0, rounds=2)
    fine = [row for row in rows if row["spacing"] == (1.5, 1.5, 3.0)]
    coarse = [row for row in rows if row["spacing"] == (3.0, 3.0, 6.0)]
    assert len(fine) == len(coarse) == 2
    for a, b in zip(fine, coarse):
        assert a["voxels"] > 4 * b["voxels"] and a["retained"] > 0.7
        assert a["retained"] >= b["retained"] - 0.05


def test_vary_enhancement_shifts_the_organ_smoothly_and_nothing_far_from_it(liver_phantom):
    from Training.lesions import vary_enhancement
    image, organ, _ = liver_phantom
    offsets = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        varied = vary_enhancement(image, organ, SPACING, rng, LIVER)
        change = varied - image
        far = ~ndimage.binary_dilation(organ, np.ones((3, 3, 3), bool))
        assert np.abs(change[far]).max() == 0, "only the organ and its edge change"
        inside = ndimage.binary_erosion(organ, iterations=2)
        offsets.append(float(np.median(change[inside])))
        # Smooth: neighbouring voxels inside differ by far less than the field's range.
        assert np.abs(np.diff(change, axis=0)[inside[1:] & inside[:-1]]).max() < 5
        assert image is not varied and varied.max() <= LIVER.hu_window[1]
    low, high = LIVER.enhancement_offset_hu
    assert min(offsets) < -20 and max(offsets) > 0 and low - 20 < min(offsets) and max(offsets) < high + 20


def test_training_patches_vary_the_liver_enhancement_but_validation_cases_do_not():
    from Training.lesions import TrainingLesions
    plan = {"classes": ["background", "liver", "liver tumour"], "spacing": list(SPACING),
            "synthetic_lesions": {"liver tumour": {"organ": "liver", "preset": "liver"}},
            "lesion_probability": 0.0, "normalisation": {"mean": 100.0, "std": 50.0}}
    lesions = TrainingLesions(plan)
    image, organ, _ = phantom(seed=3)
    normalised = ((image - 100.0) / 50.0)[None]
    label = organ.astype(np.uint8)
    changed = 0
    for seed in range(20):
        varied = normalised.copy()
        lesions.vary_enhancement(varied, label, np.random.default_rng(seed))
        changed += not np.allclose(varied, normalised)
    assert 2 <= changed <= 12      # about 30 % of patches
    unchanged = normalised.copy()  # painting lesions alone (what validation cases get) keeps the parenchyma
    lesions(unchanged, label.copy(), np.random.default_rng(0), probability=0.0)
    assert np.array_equal(unchanged, normalised)


def test_a_plan_entry_sets_its_organs_enhancement_share():
    from Training.lesions import TrainingLesions
    image, organ, _ = phantom(seed=3)
    normalised, label = ((image - 100.0) / 50.0)[None], organ.astype(np.uint8)

    def patches_varied(entry):
        plan = {"classes": ["background", "pancreas", "pancreatic tumour"], "spacing": list(SPACING),
                "synthetic_lesions": {"pancreatic tumour": entry}, "lesion_probability": 0.0,
                "normalisation": {"mean": 100.0, "std": 50.0}}
        lesions, changed = TrainingLesions(plan), 0
        for seed in range(20):
            varied = normalised.copy()
            lesions.vary_enhancement(varied, label, np.random.default_rng(seed))
            changed += not np.array_equal(varied, normalised)
        return changed

    assert PANCREAS.enhancement_probability == 0.0
    assert patches_varied({"organ": "pancreas", "preset": "pancreas"}) == 0          # the preset's share
    assert patches_varied({"organ": "pancreas", "preset": "pancreas", "enhancement_probability": 1.0}) == 20
