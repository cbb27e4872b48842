"""Post-processing rules on hand-made label maps."""

import numpy as np

from MSDSegmentLib.modelcard import Label, ModelCard
from MSDSegmentLib.postprocess import filter_tumours, keep_largest_cluster, postprocess


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


def test_postprocess_applies_the_card_rules_with_the_voxel_volume():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:20, 5:20, 5:20] = 1
    labels[25:28, 25:28, 25:28] = 1          # second liver island: removed
    labels[8:10, 8:10, 8:10] = 2             # 8 voxels of 1 mL: above the 0.008 mL minimum, kept
    postprocess(labels, card(), spacing_mm=(10.0, 10.0, 10.0))
    assert labels[26, 26, 26] == 0
    assert (labels[8:10, 8:10, 8:10] == 2).all()
