"""The engine on real CT: geometry in world space, quality on held-back cases, progress, cancel, models."""

import dataclasses
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from images import dice, flipped_copy, in_world, oblique_copy, permuted_copy, synthetic_ct, synthetic_mr
from MSDSegmentLib import modelcard
from MSDSegmentLib.engine import segment
from MSDSegmentLib.errors import Cancelled, InputError, ModelError
from MSDSegmentLib.imageio import read_channels, split_channels
from Training.dataset import read_dataset
from Training.models import find_label

# Fold 0 of Training's fixed split (sorted ids, every 5th): never seen in training of the shipped model.
VALIDATION_CASE = "btcv_00"


def bundled(task):
    cards = modelcard.catalogue()
    if task not in cards or modelcard.missing_weights(cards[task]):
        pytest.skip(f"bundled model for '{task}' not found in {modelcard.MODELS_DIR}")
    return cards[task]


@pytest.fixture(scope="module")
def btcv_case():
    from conftest import BTCV, require
    folder = require(BTCV)
    image = read_channels([os.path.join(folder, "imagesTr", VALIDATION_CASE + ".nii.gz")])[0]
    reference = sitk.ReadImage(os.path.join(folder, "labelsTr", VALIDATION_CASE + ".nii.gz"))
    return image, sitk.GetArrayFromImage(reference).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def liver_on_original(btcv_case):
    bundled("liver")
    return segment([btcv_case[0]], "liver").labels


def assert_same_grid(labels, image):
    assert labels.GetSize() == image.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(labels.GetDirection(), image.GetDirection(), atol=1e-9)


@pytest.mark.parametrize("variant", ["flip_x", "lps", "permuted"])
def test_same_segmentation_in_world_space_whatever_the_axis_order(btcv_case, liver_on_original, variant):
    image = btcv_case[0]
    copies = {"flip_x": lambda: flipped_copy(image, 0),
              "lps": lambda: flipped_copy(flipped_copy(image, 0), 1),
              "permuted": lambda: permuted_copy(image, (2, 0, 1))}
    copy = copies[variant]()
    labels = segment([copy], "liver").labels
    assert_same_grid(labels, copy)
    original = sitk.GetArrayFromImage(liver_on_original).transpose(2, 1, 0)
    assert original.sum() > 0, "the liver model found no liver at all"
    world = in_world(labels, image)
    assert np.mean(world != original) < 1e-3
    assert dice(world == 1, original == 1) > 0.995


def test_oblique_input_gives_the_same_organ_in_world_space(btcv_case, liver_on_original):
    image = btcv_case[0]
    oblique = oblique_copy(image)
    labels = segment([oblique], "liver").labels
    assert_same_grid(labels, oblique)
    original = sitk.GetArrayFromImage(liver_on_original).transpose(2, 1, 0)
    world = in_world(labels, image)
    # Only the resampling of the oblique copy differs; the organ must agree closely.
    assert dice(world == 1, original == 1) > 0.93


@pytest.mark.parametrize("task", ["liver", "spleen", "pancreas", "organs"])
def test_bundled_model_reproduces_its_card_s_validation_dice(task):
    """The engine, run here on the card's own held-back BTCV cases, gives the mean Dice the card reports for each
    of its organs (the same weights and code: only floating-point summation order may differ). Weights trained on
    every case (fold "all") carry their fold weights' figures: on those cases, which they also trained on, they do
    at least as well."""
    from conftest import BTCV, require
    folder = require(BTCV)
    card = bundled(task)
    organs = [label for label in card.trained_labels if label.kind == "organ"]
    btcv_labels = read_dataset(folder)[0]["labels"]
    btcv_values = {label.name: find_label([label.source_class], btcv_labels) for label in organs}
    scores = {label.name: [] for label in organs}
    for case in card.validation["cases"]:
        image = read_channels([os.path.join(folder, "imagesTr", case + ".nii.gz")])[0]
        result = segment([image], task)
        labels = sitk.GetArrayFromImage(result.labels)
        assert result.labels.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(labels)) <= {0} | {label.value for label in card.trained_labels}
        voxel_ml = np.prod(image.GetSpacing()) / 1000
        reference = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", case + ".nii.gz")))
        for label in organs:
            assert result.volumes_ml[label.value] == pytest.approx((labels == label.value).sum() * voxel_ml)
            scores[label.name].append(dice(labels == label.value, reference == btcv_values[label.name]))
    for label in organs:
        reported = card.validation["dice"][label.name]
        if card.training["validation_cases"]:
            assert np.mean(scores[label.name]) == pytest.approx(reported, abs=0.005), scores
        else:
            assert "trained on all" in card.validation["weights"] and \
                np.mean(scores[label.name]) >= reported - 0.005, scores


def test_progress_reports_stages_and_ends_at_one(tiny_models_dir):
    reports = []
    segment([synthetic_ct()], "spleen", models_dir=tiny_models_dir, progress=lambda f, s: reports.append((f, s)))
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] >= 0
    stages = {s for _, s in reports}
    assert {"Preprocessing", "Running network", "Post-processing"} <= stages


def test_cancel_stops_between_windows(tiny_models_dir):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        segment([synthetic_ct()], "spleen", models_dir=tiny_models_dir, cancel=cancel)


def test_prostate_adc_on_another_grid_is_resampled_onto_t2(tiny_models_dir):
    t2, adc = split_channels(synthetic_mr())
    adc = sitk.Resample(adc, [24, 24, 10], sitk.Transform(), sitk.sitkLinear, (2.0, 3.0, 0.0), (3.0, 3.0, 3.6))
    result = segment([t2, adc], "prostate", models_dir=tiny_models_dir, tta=True)
    assert_same_grid(result.labels, t2)
    assert result.warnings == []


def test_ct_task_warns_about_mr_looking_input_and_flags_every_segment(tiny_models_dir):
    t2 = split_channels(synthetic_mr())[0]
    result = segment([t2], "liver", models_dir=tiny_models_dir)
    assert any("does not look like CT" in warning for warning in result.warnings)
    assert sorted(result.quality) == [1, 2]  # the liver and its tumour, found or not
    assert all(entry["check"] and entry["reasons"][0] == "the input does not look like CT (no voxels below -50 HU)"
               for entry in result.quality.values()), result.quality


def test_mr_task_given_a_ct_flags_every_segment(tiny_models_dir):
    ct = sitk.Cast(synthetic_ct(), sitk.sitkFloat32)
    result = segment([ct, ct], "prostate", models_dir=tiny_models_dir)
    assert any("looks like CT" in warning and "expects MR" in warning for warning in result.warnings)
    assert sorted(result.quality) == [1, 2]
    assert all(entry["check"] and entry["reasons"][0].startswith("the input looks like CT")
               for entry in result.quality.values())
    t2, adc = split_channels(synthetic_mr())
    assert not any(entry["check"] and "looks like CT" in " ".join(entry["reasons"])
                   for entry in segment([t2, adc], "prostate", models_dir=tiny_models_dir).quality.values())


def test_wrong_channel_count_is_refused(tiny_models_dir):
    with pytest.raises(InputError, match="needs 2 channel"):
        segment([synthetic_ct()], "prostate", models_dir=tiny_models_dir)


@pytest.fixture
def models_copy(tiny_models_dir, tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(tiny_models_dir, folder)
    return str(folder)


def test_tampered_weights_are_refused_naming_the_file(models_copy):
    path = os.path.join(models_copy, "abdomen.pt")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ModelError, match=r"sha256 mismatch.*abdomen\.pt"):
        segment([synthetic_ct()], "spleen", models_dir=models_copy)


def test_missing_weights_are_named(models_copy):
    os.remove(os.path.join(models_copy, "abdomen.pt"))
    with pytest.raises(ModelError, match=r"missing.*abdomen\.pt"):
        segment([synthetic_ct()], "liver", models_dir=models_copy)


def test_unknown_task_lists_the_catalogue(tiny_models_dir):
    with pytest.raises(ModelError, match="available: liver, spleen, pancreas, abdomen, organs, prostate"):
        segment([synthetic_ct()], "kidney", models_dir=tiny_models_dir)


def test_a_stage_whose_previous_one_found_nothing_sees_that_stage_s_region(tiny_models_dir, monkeypatch):
    """The pancreas task's stages: when the all-organ fine stage finds no pancreas, the pancreas stages segment
    the fine stage's region (the organs), not the whole CT."""
    import MSDSegmentLib.engine as engine
    organs = (np.array([-50.0, -40.0, 50.0]), np.array([50.0, 40.0, 120.0]))
    found = iter([organs, None, None])
    monkeypatch.setattr(engine, "region_of_interest", lambda *args: next(found))
    regions, network_input = [], engine.network_input

    def recording_input(channels, spacing, normalisation, region=None):
        regions.append(region)
        return network_input(channels, spacing, normalisation, region)

    monkeypatch.setattr(engine, "network_input", recording_input)
    result = segment([synthetic_ct()], "pancreas", device="cpu", models_dir=tiny_models_dir)
    assert regions == [None, organs, organs, organs]
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labels)).tolist()) <= {0, 1, 2}


def test_an_organ_is_located_by_the_finest_stage_that_segments_it_not_one_that_knows_it_as_context():
    """The pancreas task places its pancreas relative to the liver. Its wide pancreas stage has the liver as a
    context class, but sees only the part beside the pancreas: the liver's centroid is the fine stage's."""
    import types

    from MSDSegmentLib.engine import Cascade, stage_key
    from MSDSegmentLib.modelcard import Stage
    grid = sitk.Image([20, 20, 10], sitk.sitkUInt8)
    grid.SetSpacing([2.0] * 3)

    def stage(classes, context=()):
        return Stage(weights="", sha256="", network={}, spacing=[2.0] * 3, patch_size=[], normalisation={},
                     classes=classes, context_classes=list(context))

    def probabilities_with(classes, organ, box):
        values = np.zeros((len(classes), 20, 20, 10), np.float32)
        values[0] = 1
        values[(slice(None),) + box] = np.eye(len(classes))[classes.index(organ)][:, None, None, None]
        return values

    fine = stage(["background", "liver", "pancreas"])
    wide = stage(["background", "pancreas", "liver"], context=["liver"])
    card = types.SimpleNamespace(stages=[fine, wide])
    cascade = Cascade([], None, False, None)
    cascade.done[stage_key(card, 0)] = (probabilities_with(fine.classes, "liver", np.s_[0:10, 0:10, 0:10]), grid, None)
    cascade.done[stage_key(card, 1)] = (probabilities_with(wide.classes, "liver", np.s_[8:10, 8:10, 0:10]), grid, None)
    np.testing.assert_allclose(cascade.organ_centroid(card, "liver"), [9.0, 9.0, 9.0])  # voxels 0-9 at 2 mm
    assert cascade.organ_centroid(card, "pancreas") is None  # neither stage found one


def test_region_of_interest_is_the_previous_stage_s_organs_plus_the_margin():
    from MSDSegmentLib.engine import channel_argmax, region_of_interest
    from MSDSegmentLib.modelcard import Stage
    canonical = sitk.Image([20, 20, 10], sitk.sitkUInt8)
    canonical.SetSpacing([4.0, 4.0, 4.0])
    stage = Stage(weights="", sha256="", network={}, spacing=[4.0] * 3, patch_size=[], normalisation={},
                  classes=["background", "spleen", "liver"])
    probabilities = np.zeros((3, 20, 20, 10), np.float32)
    probabilities[0] = 1
    roi = {"classes": ["liver", "pancreas"], "margin_mm": [10, 10, 20]}
    nothing = region_of_interest(channel_argmax(probabilities), stage, canonical, roi)
    assert nothing is None  # nothing found: the whole image
    probabilities[:, 5:8, 6:9, 2:4] = np.array([0, 0, 1])[:, None, None, None]
    lower, upper = region_of_interest(channel_argmax(probabilities), stage, canonical, roi)
    # voxels 5..7 cover 18..30 mm (centres at 4 mm x index), then the margin
    assert np.allclose(lower, [8, 12, -14]) and np.allclose(upper, [40, 44, 34])
    # A larger blob far away widens the box, unless the box is drawn around the largest cluster of pieces:
    # two 18-voxel pieces one voxel (4 mm) apart outweigh a single 27-voxel blob 28 mm away.
    probabilities[:, 5:8, 10:13, 2:4] = np.array([0, 0, 1])[:, None, None, None]
    probabilities[:, 14:17, 14:17, 6:9] = np.array([0, 0, 1])[:, None, None, None]
    lower, upper = region_of_interest(channel_argmax(probabilities), stage, canonical, roi)
    assert np.allclose(lower, [8, 12, -14]) and np.allclose(upper, [76, 76, 54])
    lower, upper = region_of_interest(channel_argmax(probabilities), stage, canonical,
                                      dict(roi, cluster_gap_mm=10))
    assert np.allclose(lower, [8, 12, -14]) and np.allclose(upper, [40, 60, 34])


def stage_and_input_grids(stage_size, stage_spacing, input_size, input_spacing, input_origin):
    """A stage's canonical grid (origin 0) and an input CT's grid, empty images of those geometries."""
    canonical = sitk.Image(stage_size, sitk.sitkUInt8)
    canonical.SetSpacing(stage_spacing)
    target = sitk.Image(input_size, sitk.sitkInt16)
    target.SetSpacing(input_spacing)
    target.SetOrigin(input_origin)
    return canonical, target


def test_tumour_probability_on_the_input_grid_is_kept_where_the_tumour_won():
    """labels_on_input_grid keeps a tumour's probability (float16) on every voxel it labels, as the whole channel
    resampled onto the input grid has it there, and zero elsewhere: what the lesion statistics read."""
    from MSDSegmentLib.engine import labels_on_input_grid
    from MSDSegmentLib.preprocessing import from_array, resample
    canonical, target = stage_and_input_grids([24, 24, 12], [2.0, 2.0, 3.0], [40, 40, 30], [1.1, 1.3, 1.25],
                                              [2.0, -1.0, 1.5])
    grid = np.indices(canonical.GetSize(), np.float32)
    organ = np.exp(-((grid[0] - 10) ** 2 + (grid[1] - 12) ** 2 + 4 * (grid[2] - 6) ** 2) / 40.0)
    tumour = 0.9 * np.exp(-((grid[0] - 12) ** 2 + (grid[1] - 11) ** 2 + 4 * (grid[2] - 6) ** 2) / 6.0)
    tumour = np.minimum(tumour, organ)
    organ -= tumour
    tumour[tumour < 1e-3] *= 1e-3  # the tiny probabilities float16 holds only as subnormal numbers
    probabilities = np.stack([1.0 - organ - tumour, organ, tumour]).astype(np.float32)
    labels, box, kept = labels_on_input_grid(probabilities, canonical, target, [1, 2], kept_values=[2])
    assert (labels == 2).sum() > 20 and (labels == 1).sum() > (labels == 2).sum()
    reference = sitk.Image([part.stop - part.start for part in box][::-1], sitk.sitkUInt8)
    reference.CopyInformation(target[box[2], box[1], box[0]])
    whole = sitk.GetArrayFromImage(resample(from_array(tumour, canonical, np.float32), reference))
    won = labels == 2
    assert kept[2].dtype == np.float16
    assert np.array_equal(kept[2][won], whole[won].astype(np.float16))
    assert not kept[2][~won].any()


def test_the_input_grid_box_leaves_out_pieces_post_processing_removes():
    """The box resampled onto the input grid is drawn around what post-processing can keep (the organ's largest
    piece and the tumour on it), not around a speck of the organ's channel across the abdomen or a tumour away
    from the organ: the labels come out the same, from a smaller box."""
    from MSDSegmentLib.engine import channel_argmax, kept_on_stage_grid, label_image, labels_on_input_grid
    from MSDSegmentLib.postprocess import postprocess
    card = bundled("liver")
    canonical, target = stage_and_input_grids([60, 50, 30], [1.5, 1.5, 3.0], [100, 90, 40], [0.9, 0.8, 2.5],
                                              [1.0, -2.0, 1.5])
    grid = np.indices(canonical.GetSize(), np.float32)

    def blob(centre, size):
        return np.exp(-sum(((axis - c) / size) ** 2 for axis, c in zip(grid, centre)))

    organ = np.maximum(blob((14, 20, 15), 8.0), 0.9 * blob((52, 42, 24), 2.0))  # the speck: far away
    tumour = 0.8 * np.maximum(blob((20, 24, 15), 5.0), blob((50, 8, 6), 2.0))  # one on the organ, one away
    organ, tumour = organ * (1 - tumour), tumour
    probabilities = np.stack([np.clip(1.0 - organ - tumour, 0, 1), organ, tumour]).astype(np.float32)
    winners = channel_argmax(probabilities)
    kept = kept_on_stage_grid(winners, card, canonical.GetSpacing(), {})
    assert (winners[50:55, 40:45, 22:27] == 1).any() and (winners[48:53, 6:11, 4:9] == 2).any()
    assert not kept[45:, 35:, 18:].any() and not kept[45:, :14, :12].any() and kept[14, 20, 15]
    results = []
    for foreground in (None, kept):
        labels, box, _ = labels_on_input_grid(probabilities, canonical, target, [1, 2], foreground=foreground)
        postprocess(labels, card, target.GetSpacing()[::-1])
        results.append((sitk.GetArrayFromImage(label_image(labels, box, target)), labels.size))
    (everything, whole_size), (cleaned, cleaned_size) = results
    assert (everything == 1).sum() > 1000 and (everything == 2).sum() > 20
    assert np.array_equal(everything, cleaned) and cleaned_size < 0.5 * whole_size


def test_a_stage_blends_in_the_previous_stage_s_probabilities_for_its_own_classes():
    """The pancreas stage (1 mm grid, classes background/pancreas/tumour) averaged with the fine stage
    (2 mm grid, a larger box, more classes): matched by class name, through physical space."""
    from MSDSegmentLib.engine import blend_previous
    from MSDSegmentLib.modelcard import Stage

    def grid(size, spacing, origin):
        image = sitk.Image(size, sitk.sitkUInt8)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        return image

    def stage(classes, blend=0.0):
        return Stage(weights="", sha256="", network={}, spacing=[], patch_size=[], normalisation={},
                     classes=classes, blend_previous=blend)

    fine_grid = grid([20, 20, 10], [2.0] * 3, [0.0] * 3)
    grid_here = grid([20, 20, 10], [1.0] * 3, [10.0, 10.0, 4.0])
    fine = stage(["background", "spleen", "pancreas", "pancreatic tumour"])
    here = stage(["background", "pancreas", "pancreatic tumour"], blend=0.25)
    previous = np.zeros((4, 20, 20, 10), np.float32)
    previous[1] = 1                                        # spleen everywhere ...
    previous[:, 5:10, 5:10, 2:5] = np.array([0, 0, 1, 0])[:, None, None, None]  # ... but pancreas at 10-18 mm
    probabilities = np.zeros((3, 20, 20, 10), np.float32)
    probabilities[2] = 1                                   # this stage: tumour everywhere
    blended = blend_previous(probabilities, here, grid_here, previous, fine, fine_grid)
    np.testing.assert_allclose(blended.sum(axis=0), 1, atol=1e-6)
    # 10-18 mm: pancreas before; here index 0-8 (x, y) and 0-4 (z, from 4 mm); spleen counts as background.
    np.testing.assert_allclose(blended[:, 2, 2, 2], [0, 0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(blended[:, 15, 15, 8], [0.25, 0, 0.75], atol=1e-6)


def test_a_stage_can_decide_the_tumour_share_of_its_organ_alone():
    """tumour_blend_previous 0: the organ's total (organ + tumour) is still averaged with the previous stage, but
    how it splits into organ and tumour is this stage's; the channels still sum to one, and the pairs come from
    the card's labels (a tumour and the organ it belongs to)."""
    from MSDSegmentLib.engine import blend_previous, tumour_channels
    from MSDSegmentLib.modelcard import Label, ModelCard, Stage

    grid = sitk.Image([6, 6, 4], sitk.sitkUInt8)
    classes = ["background", "liver", "liver tumour"]
    previous_stage = Stage(weights="", sha256="", network={}, spacing=[], patch_size=[], normalisation={},
                           classes=["background", "spleen", "liver", "liver tumour"])
    here = Stage(weights="", sha256="", network={}, spacing=[], patch_size=[], normalisation={}, classes=classes,
                 blend_previous=0.5, tumour_blend_previous=0.0)
    card = ModelCard(task="liver", title="", description="", modality="CT", channels=["CT"], stages=[here],
                     postprocessing={}, training={}, validation={}, licence="",
                     labels=[Label(value=1, name="liver", color=[0, 0, 0], source_class="liver"),
                             Label(value=2, name="liver tumour", color=[0, 0, 0], source_class="liver tumour",
                                   kind="tumour", organ="liver")])
    pairs = tumour_channels(card, here)
    assert pairs == [(1, 2)] and tumour_channels(card, previous_stage) == [(2, 3)]

    previous = np.zeros((4, 6, 6, 4), np.float32)
    previous[2] = 1                                  # the previous stage: liver everywhere, no tumour
    probabilities = np.zeros((3, 6, 6, 4), np.float32)
    probabilities[:, :3] = np.array([0.0, 0.2, 0.8])[:, None, None, None]  # this stage: mostly tumour ...
    probabilities[:, 3:] = np.array([1.0, 0.0, 0.0])[:, None, None, None]  # ... and background beside it
    blended = blend_previous(probabilities, here, grid, previous, previous_stage, grid, pairs)
    np.testing.assert_allclose(blended.sum(axis=0), 1, atol=1e-6)
    np.testing.assert_allclose(blended[:, 1, 1, 1], [0.0, 0.2, 0.8], atol=1e-6)  # its split, total 1
    # Where this stage sees no organ, the previous stage's split decides (all liver): the total is 0.5.
    np.testing.assert_allclose(blended[:, 4, 4, 1], [0.5, 0.5, 0.0], atol=1e-6)
    # Without the tumour weight the tumour is averaged like the rest: 0.4.
    linear = blend_previous(probabilities, dataclasses.replace(here, tumour_blend_previous=None), grid, previous,
                            previous_stage, grid, pairs)
    np.testing.assert_allclose(linear[:, 1, 1, 1], [0.0, 0.6, 0.4], atol=1e-6)


def test_a_region_is_preprocessed_as_if_the_whole_image_had_been():
    """Only the part of the CT under a region is smoothed (speed); the result equals smoothing it all."""
    from MSDSegmentLib import preprocessing
    image = synthetic_ct(size=(120, 110, 40), spacing=(0.8, 0.8, 2.5))
    normalisation = {"type": "ct", "window": [-125.0, 275.0], "mean": 90.0, "std": 60.0}
    lower, upper = preprocessing.physical_bounds(image)
    region = (lower + 0.3 * (upper - lower), lower + 0.7 * (upper - lower))
    spacing = [2.0, 2.0, 3.0]
    cropped, reference = preprocessing.network_input([image], spacing, normalisation, region)
    smoothed = preprocessing.antialias(sitk.Cast(image, sitk.sitkFloat32), spacing)
    whole = preprocessing.normalise(preprocessing.to_array(preprocessing.resample(
        smoothed, reference, sitk.sitkLinear, -125.0, sitk.sitkFloat32)), normalisation)
    assert cropped.shape[1:] == whole.shape and cropped.shape[1] < image.GetSize()[0] * 0.8 / spacing[0] / 2
    np.testing.assert_allclose(cropped[0], whole, atol=1e-4)
