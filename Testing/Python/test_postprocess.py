"""Post-processing rules on hand-made label maps."""

import numpy as np
import pytest

from MSDSegmentLib.modelcard import Label, ModelCard
from MSDSegmentLib.postprocess import (elongation, filter_tumours, keep_largest_cluster, lesion_contrast, organ_around,
                                       postprocess, within_distance)


def card():
    labels = [Label(1, "Liver", [1, 1, 1], "liver"),
              Label(2, "Liver tumour", [2, 2, 2], "liver tumour", kind="tumour", organ="Liver")]
    return ModelCard("liver", "", "", "CT", ["CT"], labels, [], {"keep_largest": True, "min_tumour_ml": 0.008},
                     {}, {}, "")


def test_keep_largest_cluster_without_a_gap_removes_the_smaller_islands():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = 1
    labels[15:17, 15:17, 15:17] = 1
    keep_largest_cluster(labels, 1, (1.0, 1.0, 1.0))
    assert labels.sum() == 8 ** 3
    assert labels[16, 16, 16] == 0


def fragmented_organ_and_a_blob():
    """Three 4x4x4 pieces of an organ 3 voxels apart along x (192 voxels), and one 5x5x5 blob (125) far away."""
    labels = np.zeros((40, 12, 40), np.uint8)
    for start in (2, 9, 16):
        labels[start:start + 4, 4:8, 4:8] = 1
    labels[30:35, 4:9, 30:35] = 1
    return labels


def test_keep_largest_cluster_keeps_nearby_pieces_together_against_a_larger_single_blob():
    labels = fragmented_organ_and_a_blob()
    keep_largest_cluster(labels, 1, (1.0, 1.0, 1.0), gap_mm=5.0)
    assert labels.sum() == 3 * 64 and labels[32, 6, 32] == 0
    labels = fragmented_organ_and_a_blob()
    keep_largest_cluster(labels, 1, (1.0, 1.0, 1.0), gap_mm=0.0)   # each piece alone: the blob wins
    assert labels.sum() == 125 and labels[32, 6, 32] == 1


def test_keep_largest_cluster_measures_the_gap_in_millimetres():
    labels = fragmented_organ_and_a_blob()
    keep_largest_cluster(labels, 1, (3.0, 1.0, 1.0), gap_mm=5.0)   # the pieces are 9 mm apart along x now
    assert labels.sum() == 125


@pytest.mark.parametrize("spacing, radius", [((2.0, 2.0, 3.0), 5.0), ((2.5, 0.8, 0.8), 5.0), ((1.0, 1.0, 1.0), 3.0),
                                             ((1.5, 1.5, 3.0), 4.5), ((2.5, 0.8, 0.8), 10.0)])
def test_within_distance_holds_exactly_the_voxels_the_distance_map_puts_within_the_radius(spacing, radius):
    from scipy import ndimage

    rng = np.random.default_rng(7)
    mask = rng.random((30, 26, 34)) > 0.997  # scattered voxels, some near the edges
    mask[10:14, 8:12, 5:20] = True
    expected = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius
    grown = within_distance(mask, spacing, radius)
    assert grown.dtype == bool and np.array_equal(grown, expected)
    assert grown.sum() > 3 * mask.sum()  # the comparison is not between two empty or unchanged masks


def test_tumours_away_from_the_organ_or_too_small_are_dropped():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:20, 5:20, 5:20] = 1
    labels[8:12, 8:12, 8:12] = 2            # inside the organ, 64 voxels: kept
    labels[19:21, 10:12, 10:12] = 2         # touching the edge, 8 voxels: kept
    labels[25:28, 25:28, 25:28] = 2         # far from the organ: dropped
    labels[14, 14, 14] = 2                  # a single voxel inside the organ: too small, becomes organ
    filter_tumours(labels, 2, 1, min_voxels=8)
    assert labels[8:12, 8:12, 8:12].min() == 2
    assert (labels[19:21, 10:12, 10:12] == 2).all()
    assert (labels[25:28, 25:28, 25:28] == 0).all()
    assert labels[14, 14, 14] == 1


def test_tumours_below_the_minimum_confidence_become_organ_and_the_kept_ones_are_listed():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:25, 5:25, 5:25] = 1
    probability = np.zeros(labels.shape, np.float32)
    labels[7:11, 7:11, 7:11] = 2            # a confident lesion (mean 0.9, peak 0.95)
    probability[7:11, 7:11, 7:11] = 0.9
    probability[8, 8, 8] = 0.95
    labels[15:19, 15:19, 15:19] = 2         # a doubtful one (mean 0.55)
    probability[15:19, 15:19, 15:19] = 0.55
    kept = filter_tumours(labels, 2, 1, min_voxels=8, probability=probability, min_confidence=0.7)
    assert (labels[15:19, 15:19, 15:19] == 1).all() and (labels[7:11, 7:11, 7:11] == 2).all()
    assert len(kept) == 1 and kept[0]["voxels"] == 64
    assert kept[0]["confidence"] == pytest.approx(0.9, abs=0.01) and kept[0]["peak"] == pytest.approx(0.95)
    assert labels[tuple(kept[0]["index"])] == 2  # a voxel of the lesion, on the whole array's grid
    # Without a minimum both are kept and listed.
    labels[15:19, 15:19, 15:19] = 2
    assert len(filter_tumours(labels, 2, 1, min_voxels=8, probability=probability)) == 2


def test_postprocess_applies_the_card_s_minimum_lesion_confidence_and_lists_the_lesions_in_millilitres():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:25, 5:25, 5:25] = 1
    labels[7:9, 7:9, 7:9] = labels[15:17, 15:17, 15:17] = 2       # 8 voxels of 1 mL each
    probability = np.zeros(labels.shape, np.float32)
    probability[7:9, 7:9, 7:9], probability[15:17, 15:17, 15:17] = 0.8, 0.5
    strict = card()
    strict.postprocessing["min_tumour_confidence"] = 0.6
    lesions = postprocess(labels, strict, (10.0, 10.0, 10.0), tumour_probabilities={2: probability})
    assert (labels[15:17, 15:17, 15:17] == 1).all() and (labels[7:9, 7:9, 7:9] == 2).all()
    assert [lesion["volume_ml"] for lesion in lesions[2]] == [8.0]
    # Without probabilities (or without the setting) no lesion is dropped for its confidence.
    labels[15:17, 15:17, 15:17] = 2
    assert len(postprocess(labels, strict, (10.0, 10.0, 10.0))[2]) == 2


def test_postprocess_drops_lesions_whose_peak_probability_is_below_the_card_s_minimum():
    """Two lesions of the same mean probability (0.6): the one with a confident core (0.9) is kept, the diffuse one
    (0.65 at most) becomes organ."""
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:25, 5:25, 5:25] = 1
    labels[7:9, 7:9, 7:9] = labels[15:17, 15:17, 15:17] = 2
    probability = np.zeros(labels.shape, np.float32)
    probability[7:9, 7:9, 7:9], probability[15:17, 15:17, 15:17] = 0.5571, 0.5929
    probability[7, 7, 7], probability[15, 15, 15] = 0.9, 0.65
    strict = card()
    strict.postprocessing["min_tumour_peak"] = 0.7
    lesions = postprocess(labels, strict, (10.0, 10.0, 10.0), tumour_probabilities={2: probability})
    assert (labels[15:17, 15:17, 15:17] == 1).all() and (labels[7:9, 7:9, 7:9] == 2).all()
    assert [(lesion["confidence"], lesion["peak"]) for lesion in lesions[2]] == [(0.6, 0.9)]


def test_each_lesion_s_contrast_is_measured_against_the_organ_around_it():
    """A liver at 100 HU, darker (80 HU) at its edge as in a poorly enhanced scan, holding a lesion of 60 HU
    deep inside and one of 85 HU at the dark edge: against the organ around each, -40 and +5 HU (2 mm voxels)."""
    labels = np.zeros((60, 60, 40), np.uint8)
    labels[5:55, 5:55, 5:35] = 1
    image = np.full(labels.shape, -100.0, np.float32)
    image[labels == 1] = 100.0
    edge = np.zeros(labels.shape, bool)
    edge[5:55, 5:55, 5:35] = True
    edge[12:48, 12:48, 12:28] = False
    image[edge] = 80.0
    labels[26:32, 26:32, 17:23] = 2
    image[26:32, 26:32, 17:23] = 60.0
    labels[5:9, 28:32, 18:22] = 2
    image[5:9, 28:32, 18:22] = 85.0
    lesions = postprocess(labels, card(), (2.0, 2.0, 2.0), image=image)[2]
    contrasts = {"edge" if lesion["index"][0] < 10 else "deep": lesion["contrast"] for lesion in lesions}
    assert contrasts == {"deep": -40.0, "edge": pytest.approx(5.0, abs=1.0)}
    assert all(lesion["elongation"] < 1.5 for lesion in lesions)  # both are cubes
    # With no organ around a lesion there is nothing to measure it against.
    no_organ = organ_around(labels == 2, np.zeros(labels.shape, bool), (2.0, 2.0, 2.0))
    assert lesion_contrast(image, labels == 2, no_organ) is None


def test_elongation_tells_a_compact_lesion_from_a_vessel_like_one():
    z, y, x = np.ogrid[:40, :40, :40]
    ball = (x - 20) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 < 64
    tube = np.zeros(ball.shape, bool)
    tube[5:35, 18:21, 18:21] = True
    assert elongation(ball, (1.0, 1.0, 1.0)) == pytest.approx(1.0, abs=0.05)
    assert elongation(tube, (1.0, 1.0, 1.0)) > 8
    # A small lesion in one 5 mm slice is not flat: each voxel counts as a box of the slice's thickness.
    disc = np.zeros((20, 20, 3), bool)
    disc[5:13, 5:13, 1] = True
    assert elongation(disc, (0.8, 0.8, 5.0)) < 1.5


def test_postprocess_turns_lesions_more_elongated_than_the_card_allows_into_organ():
    """A vessel-like tumour (30 x 3 x 3 voxels) and a compact one (6 x 6 x 6) in a liver: with the card's maximum
    elongation of 3 the first becomes liver, and the kept one is listed with its elongation."""
    labels = np.zeros((50, 30, 30), np.uint8)
    labels[5:45, 5:25, 5:25] = 1
    labels[10:40, 8:11, 8:11] = 2
    labels[20:26, 16:22, 16:22] = 2
    shaped = card()
    shaped.postprocessing["max_tumour_elongation"] = 3.0
    lesions = postprocess(labels, shaped, (1.0, 1.0, 1.0))[2]
    assert (labels[10:40, 8:11, 8:11] == 1).all() and (labels[20:26, 16:22, 16:22] == 2).all()
    assert len(lesions) == 1 and lesions[0]["elongation"] == pytest.approx(1.0, abs=0.05)
    # The rule is the card's: without it both stay tumour.
    labels[10:40, 8:11, 8:11] = 2
    assert len(postprocess(labels, card(), (1.0, 1.0, 1.0))[2]) == 2


def test_postprocess_applies_the_card_rules_with_the_voxel_volume():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:20, 5:20, 5:20] = 1
    labels[25:28, 25:28, 25:28] = 1          # second liver island: removed
    labels[8:10, 8:10, 8:10] = 2             # 8 voxels of 1 mL: above the 0.008 mL minimum, kept
    postprocess(labels, card(), spacing_mm=(10.0, 10.0, 10.0))
    assert labels[26, 26, 26] == 0
    assert (labels[8:10, 8:10, 8:10] == 2).all()


def test_the_piece_where_the_organ_lies_is_kept_against_a_larger_decoy_far_from_it():
    """A spleen where the shipped card says it lies (beside the liver) and a larger false 'spleen' 200 mm
    below it: the largest-piece rule keeps the decoy, the card's location keeps the spleen."""
    import types

    import SimpleITK as sitk

    from MSDSegmentLib import engine, modelcard

    card = modelcard.find_card("spleen")
    location = card.trained_labels[0].location
    assert location["relative_to"] == "liver" and location["cases"] >= 15
    target = sitk.Image([200, 200, 160], sitk.sitkUInt8)
    target.SetSpacing((2.0, 2.0, 2.5))
    target.SetOrigin((-200.0, -200.0, -300.0))
    liver_mm = np.array([-60.0, -20.0, 0.0])
    labels = np.zeros(target.GetSize(), np.uint8)

    def blob(centre_mm, radius_mm):
        index = np.round(target.TransformPhysicalPointToContinuousIndex(centre_mm.tolist())).astype(int)
        reach = np.ceil(radius_mm / np.array(target.GetSpacing())).astype(int)
        x, y, z = np.ogrid[tuple(slice(i - r, i + r + 1) for i, r in zip(index, reach))]
        inside = ((x - index[0]) * 2.0) ** 2 + ((y - index[1]) * 2.0) ** 2 + ((z - index[2]) * 2.5) ** 2 <= radius_mm ** 2
        labels[tuple(slice(i - r, i + r + 1) for i, r in zip(index, reach))][inside] = 1

    spleen_mm = liver_mm + np.asarray(location["mean_mm"])
    blob(spleen_mm, 25.0)
    blob(spleen_mm + np.array([-40.0, -20.0, -200.0]), 32.0)  # larger, in the lower abdomen
    box = tuple(slice(0, n) for n in labels.shape)
    cascade = types.SimpleNamespace(organ_centroid=lambda card_, organ: liver_mm if organ == "liver" else None)
    old, new = labels.copy(), labels.copy()
    postprocess(old, card, target.GetSpacing())
    postprocess(new, card, target.GetSpacing(), plausibility=engine.plausibility(cascade, card, target, box))
    spleen_index = np.round(target.TransformPhysicalPointToContinuousIndex(spleen_mm.tolist())).astype(int)
    assert old[tuple(spleen_index)] == 0 and old.sum() > 0  # the decoy won by size
    assert new[tuple(spleen_index)] == 1 and new.sum() < old.sum()  # the spleen won by place
    nowhere = types.SimpleNamespace(organ_centroid=lambda card_, organ: None)  # no liver found: the old rule
    fallback = labels.copy()
    postprocess(fallback, card, target.GetSpacing(), plausibility=engine.plausibility(nowhere, card, target, box))
    assert np.array_equal(fallback, old)
