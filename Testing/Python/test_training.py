"""Training: a tiny synthetic MSD-layout dataset trained for two steps on the CPU, exported, segmented by
the extension's engine and evaluated (train -> export -> segment), plus unit tests of the loss, label
mapping, plan, sampler and metrics."""

import copy
import csv
import io
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import CenterSpatialCropd, Lambdad, RandAffined

from conftest import REPOSITORY
from MSDSegmentLib import modelcard
from MSDSegmentLib.engine import segment
from MSDSegmentLib.imageio import read_channels
from Training import cli
from Training.cache import foreground_locations, roi_box
from Training.evaluate import label_metrics, reference_mapping, run_evaluation, select_cases
from Training.models import MODELS, LabelMappingError, label_mapping, parse_label_map
from Training.dataset import read_dataset
from Training.plan import choose_ct_window, choose_spacing, fingerprint
from Training.sampling import PatchSampler, batch_stream, context_size, sometimes
from Training.tasks import TASKS
from Training.train import DiceCELoss

# BTCV's label names (dataset.json), 13 organs of which the abdomen model reads three.
BTCV_LABELS = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gallbladder",
               "5": "esophagus", "6": "liver", "7": "stomach", "8": "aorta", "9": "inferior vena cava",
               "10": "portal vein and splenic vein", "11": "pancreas", "12": "right adrenal gland",
               "13": "left adrenal gland"}
SYNTHETIC_LABELS = {"0": "background", "1": "spleen", "3": "left kidney", "6": "liver", "11": "pancreas"}
TINY = ["--patch-size", "16", "16", "16", "--filters", "4", "8", "16"]


# ------------------------------------------------------------------------------------ synthetic dataset

def ellipsoid(shape, centre, radii):
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2 < 1


SMALL_ORGANS = [(6, (15, 22, 12), (8, 9, 7), 130.0), (1, (34, 24, 13), (4, 6, 4), 110.0),
                (11, (25, 29, 11), (7, 3, 2), 90.0), (3, (34, 32, 9), (3, 3, 3), 160.0)]
# A large liver with a bright (hyper-attenuating) tumour labelled 2 ("liver tumour"), for the tumour classes' end-to-end test.
LIVER_WITH_TUMOUR = [(6, (17, 22, 12), (13, 13, 9), 130.0), (2, (14, 20, 12), (5, 5, 3), 200.0)] + SMALL_ORGANS[1:]
LIVER_WITH_TUMOUR_LABELS = dict(SYNTHETIC_LABELS, **{"2": "liver tumour"})


def synthetic_case(seed, shape=(48, 48, 24), spacing=(2.0, 2.0, 5.0), organs=SMALL_ORGANS):
    """A BTCV-like CT (HU clipped to [-125, 275], int16) with liver, spleen, pancreas and a kidney (x, y, z)."""
    rng = np.random.default_rng(seed)
    jitter = lambda: rng.integers(-2, 3, 3)  # noqa: E731
    scale = lambda: rng.uniform(0.9, 1.1)  # noqa: E731
    image = np.full(shape, -1000.0)
    image[ellipsoid(shape, (24, 24, 12), (21, 16, 100))] = 40.0           # body
    image[ellipsoid(shape, (24, 36, 12), (3, 3, 100))] = 700.0            # spine (saturates at 275)
    label = np.zeros(shape, np.uint8)
    for value, centre, radii, hu in organs:
        mask = ellipsoid(shape, np.add(centre, jitter()), np.multiply(radii, scale()))
        image[mask], label[mask] = hu, value
    image = np.clip(image + rng.normal(0, 10, shape), -125, 275).round()
    images = []
    for array in (image.astype(np.int16), label):
        item = sitk.GetImageFromArray(array.transpose(2, 1, 0))
        item.SetSpacing(spacing)
        item.SetOrigin((0.0, 0.0, 0.0))
        item.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))  # L, A, S like BTCV
        images.append(item)
    return images


def write_dataset(folder, cases=5, labels=SYNTHETIC_LABELS, organs=SMALL_ORGANS):
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    training = []
    for index in range(cases):
        name = f"synth_{index:02d}.nii.gz"
        image, label = synthetic_case(index, organs=organs)
        sitk.WriteImage(image, os.path.join(folder, "imagesTr", name))
        sitk.WriteImage(label, os.path.join(folder, "labelsTr", name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "SyntheticAbdomen", "modality": {"0": "CT"}, "labels": labels, "numTraining": cases,
            "training": training, "test": []}
    with open(os.path.join(folder, "dataset.json"), "w") as stream:
        json.dump(meta, stream)
    return folder


def train(data, out, *extra):
    argv = ["train", "--model", "abdomen", "--data", data, "--out", out, *TINY, "--batch-size", "2",
            "--val-every", "1000", "--device", "cpu", "--quiet", *extra]
    assert cli.main(argv) == 0


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("SyntheticAbdomen")))


@pytest.fixture(scope="module")
def trained(synthetic_data, tmp_path_factory):
    """Two training steps on the CPU, exported into a models folder of its own."""
    out = str(tmp_path_factory.mktemp("runs"))
    train(synthetic_data, out, "--steps", "2")
    models = os.path.join(out, "models")
    assert cli.main(["export", "--model", "abdomen", "--out", out, "--models-dir", models]) == 0
    return {"data": synthetic_data, "out": out, "models": models}


@pytest.fixture(scope="module")
def cascade(trained, tmp_path_factory):
    """The fine stage, the pancreas task's stages (those with every organ a class learning the data's left kidney)
    and the liver stage trained for two steps each on the same data, exported after the coarse one in cascade
    order."""
    models = str(tmp_path_factory.mktemp("cascade-models"))
    shutil.copytree(trained["models"], models, dirs_exist_ok=True)
    for model in ("abdomen-fine", "abdomen-neighbours", "pancreas-wide", "pancreas-fine", "liver-fine"):
        neighbours = ["--neighbours"] if model in ("abdomen-neighbours", "pancreas-wide") else []
        argv = ["train", "--model", model, "--data", trained["data"], "--out", trained["out"], *TINY, *neighbours,
                "--steps", "2", "--val-every", "1000", "--device", "cpu", "--quiet"]
        assert cli.main(argv) == 0
        assert cli.main(["export", "--model", model, "--out", trained["out"], "--models-dir", models]) == 0
    return {**trained, "models": models}


# ---------------------------------------------------------------------------- train -> export -> segment

def test_plan_records_the_patch_size_and_filters_given(trained):
    with open(os.path.join(trained["out"], "abdomen", "plan.json")) as stream:
        plan = json.load(stream)
    assert plan["patch_size"] == [16, 16, 16]
    assert plan["network"]["filters"] == [4, 8, 16]
    # coarse rule: 96 mm field of view / (1.25 x 16 voxels) = 4.8, rounded down to 0.5 mm
    assert plan["spacing"] == [4.5, 4.5, 4.5]
    # saturated data (clipped like BTCV): its own window
    assert plan["normalisation"]["window"] == [-125.0, 275.0]
    assert plan["dataset"]["label_mapping"] == {"1": 1, "6": 2, "11": 3}
    with open(os.path.join(trained["out"], "abdomen", "fold0", "split.json")) as stream:
        assert json.load(stream) == {"training": ["synth_01", "synth_02", "synth_03", "synth_04"],
                                     "validation": ["synth_00"]}


def test_a_contradicting_plan_option_is_refused(trained, capsys):
    argv = ["train", "--model", "abdomen", "--data", trained["data"], "--out", trained["out"],
            "--patch-size", "32", "32", "32", "--steps", "1", "--device", "cpu", "--quiet"]
    assert cli.main(argv) == 2
    assert "was made with patch [16, 16, 16]" in capsys.readouterr().err


def test_export_writes_cards_for_every_task_of_the_model(trained):
    cards = modelcard.catalogue(trained["models"])
    assert sorted(cards) == ["liver", "organs", "pancreas", "spleen"]
    liver = cards["liver"]
    assert [(label.name, label.trained) for label in liver.labels] == [("Liver", True), ("Liver tumour", False)]
    assert liver.stages[0].patch_size == [16, 16, 16]
    assert liver.training["steps"] == 2
    assert liver.training["validation_cases"] == ["synth_00"]
    assert not modelcard.missing_weights(liver)


def test_export_records_the_steps_behind_the_weights(trained, tmp_path):
    run_dir = os.path.join(trained["out"], "abdomen", "fold0")
    exports = {"last": ["--checkpoint", os.path.join(run_dir, "last.ckpt")],
               "copied": ["--checkpoint", os.path.join(run_dir, "best_model.pt"), "--steps", "7"],
               "unknown": ["--checkpoint", os.path.join(run_dir, "best_model.pt")]}
    steps = {}
    for name, options in exports.items():
        models = str(tmp_path / name)
        assert cli.main(["export", "--model", "abdomen", "--out", trained["out"], "--models-dir", models, *options]) == 0
        card = modelcard.find_card("spleen", models)
        steps[name] = (card.stages[0].steps, card.training["steps"])
    assert steps == {"last": (2, 2), "copied": (7, 7), "unknown": (None, None)}
    # The checkpoint's own weights were exported (fp16), not the best model's or anything else.
    exported = torch.load(str(tmp_path / "last" / "abdomen.pt"), weights_only=True)
    saved = torch.load(os.path.join(run_dir, "last.ckpt"), weights_only=False)["model"]
    assert all(torch.equal(exported[key], value.half()) for key, value in saved.items())


def test_engine_segments_with_the_exported_model(trained):
    channels = read_channels([os.path.join(trained["data"], "imagesTr", "synth_00.nii.gz")])
    for task in ("spleen", "liver"):
        result = segment(channels, task, device="cpu", models_dir=trained["models"])
        labels, image = result.labels, channels[0]
        assert labels.GetSize() == image.GetSize()
        assert np.allclose(labels.GetSpacing(), image.GetSpacing())
        assert np.allclose(labels.GetOrigin(), image.GetOrigin())
        assert np.allclose(labels.GetDirection(), image.GetDirection())
        values = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
        assert values <= {0} | {label.value for label in result.card.trained_labels}
        assert set(result.volumes_ml) == {label.value for label in result.card.trained_labels}


def test_fine_stage_export_needs_its_coarse_stage_and_writes_nothing_without_it(cascade, tmp_path, capsys):
    assert cli.main(["export", "--model", "abdomen-fine", "--out", cascade["out"], "--models-dir", str(tmp_path)]) == 2
    assert "export --model abdomen first" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert cli.main(["export", "--model", "abdomen", "--out", cascade["out"], "--models-dir", str(tmp_path)]) == 0
    before = sorted(os.listdir(tmp_path))
    assert cli.main(["export", "--model", "pancreas-fine", "--out", cascade["out"], "--models-dir", str(tmp_path)]) == 2
    assert "export --model pancreas-wide first" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


def test_cascade_cards_have_their_stages_and_the_trained_tumours(cascade):
    spleen = modelcard.find_card("spleen", cascade["models"])
    assert [stage.model for stage in spleen.stages] == ["abdomen", "abdomen-fine"]
    assert spleen.stages[1].roi == {"after": "abdomen", "classes": ["spleen", "liver", "pancreas"],
                                    "margin_mm": [20, 20, 60]}
    assert spleen.training["model"] == "abdomen-fine" and spleen.stages[1].steps == 2
    assert spleen.stages[1].blend_previous == 0.0
    liver = modelcard.find_card("liver", cascade["models"])
    assert [stage.model for stage in liver.stages] == ["abdomen", "abdomen-fine", "liver-fine"]
    assert liver.stages[2].roi == {"after": "abdomen-fine", "classes": ["liver", "liver tumour"],
                                   "margin_mm": [15, 15, 12], "cluster_gap_mm": 10}
    assert [(label.name, label.trained) for label in liver.labels] == [("Liver", True), ("Liver tumour", True)]
    assert liver.training["model"] == "liver-fine" and liver.stages[2].steps == 2
    assert liver.labels[1].note.startswith("learnt from synthetic lesions only") and not liver.labels[0].note
    assert not modelcard.missing_weights(liver)
    # Exporting the coarse stage again keeps the later ones after it ...
    assert cli.main(["export", "--model", "abdomen", "--out", cascade["out"], "--models-dir", cascade["models"]]) == 0
    pancreas = modelcard.find_card("pancreas", cascade["models"])
    assert [stage.model for stage in pancreas.stages] == ["abdomen", "abdomen-neighbours", "pancreas-wide",
                                                          "pancreas-fine"]
    assert pancreas.stages[2].roi["after"] == "abdomen-neighbours" and pancreas.stages[2].roi["cluster_gap_mm"] == 20
    assert pancreas.stages[3].roi["after"] == "pancreas-wide" and pancreas.stages[3].roi["cluster_gap_mm"] == 10
    assert pancreas.stages[2].context_classes == ["spleen", "left kidney", "liver"]
    for number, model in ((2, "pancreas-wide"), (3, "pancreas-fine")):
        assert pancreas.stages[number].blend_previous == MODELS[model]["blend_previous"]
        assert pancreas.stages[number].tumour_blend_previous == MODELS[model]["tumour_blend_previous"]
    assert liver.stages[2].blend_previous == MODELS["liver-fine"]["blend_previous"]
    assert liver.stages[2].tumour_blend_previous == MODELS["liver-fine"]["tumour_blend_previous"]
    # ... and the labels and training record of the last stage.
    assert pancreas.labels[1].trained and pancreas.labels[1].note.startswith("learnt from synthetic lesions only")
    assert pancreas.training["model"] == "pancreas-fine"
    liver = modelcard.find_card("liver", cascade["models"])
    assert [stage.model for stage in liver.stages] == ["abdomen", "abdomen-fine", "liver-fine"]
    assert liver.training["model"] == "liver-fine"


def test_cascade_segments_onto_the_input_grid(cascade):
    channels = read_channels([os.path.join(cascade["data"], "imagesTr", "synth_02.nii.gz")])
    for task in ("pancreas", "liver"):
        result = segment(channels, task, device="cpu", models_dir=cascade["models"])
        assert len(result.card.stages) == len(TASKS[task]["models"])
        assert result.labels.GetSize() == channels[0].GetSize()
        assert np.allclose(result.labels.GetDirection(), channels[0].GetDirection())
        assert set(np.unique(sitk.GetArrayViewFromImage(result.labels)).tolist()) <= {0, 1, 2}
        assert set(result.volumes_ml) == {1, 2}


def test_command_line_segments_with_the_exported_model(trained, tmp_path):
    output = str(tmp_path / "synth_01_spleen.nii.gz")
    environment = dict(os.environ, PYTHONPATH=os.path.join(REPOSITORY, "MSDSegment"))
    completed = subprocess.run(
        [sys.executable, "-m", "MSDSegmentLib", "segment", os.path.join(trained["data"], "imagesTr", "synth_01.nii.gz"),
         "--task", "spleen", "--output", output, "--models-dir", trained["models"], "--device", "cpu", "--quiet"],
        capture_output=True, text=True, env=environment, timeout=300)
    assert completed.returncode == 0, completed.stderr
    labels = sitk.ReadImage(output)
    assert labels.GetSize() == (48, 48, 24)
    assert set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist()) <= {0, 1}
    with open(str(tmp_path / "synth_01_spleen.json")) as stream:
        assert json.load(stream)["task"] == "spleen"


# --------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("stop", [("--time-limit", "1e-9"), ("--stop-at", "1")], ids=["time-limit", "stop-at"])
def test_resumed_training_ends_with_the_same_weights_as_an_uninterrupted_run(trained, tmp_path, stop):
    out = str(tmp_path)
    train(trained["data"], out, "--steps", "2", *stop)  # stops (resumably) after one step
    interrupted = torch.load(os.path.join(out, "abdomen", "fold0", "last.ckpt"), weights_only=False)
    assert interrupted["step"] == 1
    train(trained["data"], out, "--steps", "2", "--resume")
    resumed = torch.load(os.path.join(out, "abdomen", "fold0", "last.ckpt"), weights_only=False)
    uninterrupted = torch.load(os.path.join(trained["out"], "abdomen", "fold0", "last.ckpt"), weights_only=False)
    assert resumed["step"] == uninterrupted["step"] == 2
    for name, weights in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], weights), name


def sampler_cases():
    rng = np.random.default_rng(1)
    cases = []
    for index in range(3):
        label = np.zeros((30, 28, 26), np.uint8)
        label[5:15, 6:16, 4:12] = 1
        label[18:24, 10:20, 14:20] = 2
        image = rng.normal(size=(1,) + label.shape).astype(np.float32) + label
        cases.append({"id": f"case{index}", "image": image, "label": label,
                      "locations": foreground_locations(label, 3, rng)})
    return cases


def test_patch_sampler_state_gives_the_same_next_batches():
    cases = sampler_cases()
    first = PatchSampler(cases, [16, 16, 16], 3, [0], seed=3)
    first.sample(2)
    first.sample(2)
    state = copy.deepcopy(first.state())
    # Several batches, so that every augmentation (affine, elastic, noise, intensity, flip) draws at least once.
    expected = [first.sample(2) for _ in range(4)]
    # A sampler seeded differently continues exactly where the first one stood once given its state
    # (every nested MONAI random state included: restoring only the outer ones diverges here).
    second = PatchSampler(cases, [16, 16, 16], 3, [0], seed=99)
    second.load_state(state)
    for images, labels in expected:
        again_images, again_labels = second.sample(2)
        assert torch.equal(images, again_images)
        assert torch.equal(labels, again_labels)
    assert images.shape == (2, 1, 16, 16, 16) and labels.shape == (2, 1, 16, 16, 16)


def test_a_random_transform_wrapped_by_sometimes_runs_at_its_probability_and_the_other_path_otherwise():
    taken = []
    marker = lambda name: Lambdad("image", lambda image: taken.append(name) or image)  # noqa: E731
    augment = sometimes(marker("transform"), 0.3, marker("otherwise"))
    augment.set_random_state(seed=0)
    for _ in range(1000):
        augment({"image": torch.zeros(1, 2, 2, 2)})
    assert len(taken) == 1000 and 0.25 < taken.count("transform") / 1000 < 0.35


def test_the_crop_taken_when_not_rotating_is_the_centre_that_an_identity_rotation_took():
    """The sampler cuts a context crop; without a rotation it cuts the patch from its centre, where MONAI's
    RandAffined resampled through an identity grid: the same voxels for every shipped stage's patch size."""
    patches = {tuple(stage.patch_size) for card in modelcard.catalogue(modelcard.MODELS_DIR).values()
               for stage in card.stages}
    assert len(patches) >= 4
    keys = ["image", "label"]
    for patch in patches:
        context = context_size(patch)
        item = {"image": torch.rand(1, *context), "label": torch.randint(0, 3, (1, *context)).float()}
        identity = RandAffined(keys, prob=0.0, rotate_range=[0.26] * 3, spatial_size=list(patch),
                               mode=["bilinear", "nearest"], padding_mode="border")(dict(item))
        centre = CenterSpatialCropd(keys, roi_size=list(patch))(dict(item))
        assert all(torch.equal(torch.as_tensor(identity[key]), torch.as_tensor(centre[key])) for key in keys), patch


def test_batches_drawn_in_worker_processes_come_in_the_same_order_every_time():
    cases = sampler_cases()

    def first_batches(step, count=4):
        stream = batch_stream(PatchSampler(cases, [16, 16, 16], 3, [0]), 2, workers=2, seed=7, step=step)
        batches = [next(stream) for _ in range(count)]
        stream.close()
        return batches

    first, again, resumed = first_batches(0), first_batches(0), first_batches(10)
    for (images, labels), (images_again, labels_again) in zip(first, again):
        assert torch.equal(images, images_again) and torch.equal(labels, labels_again)
    # The workers' streams differ from each other, and a run resumed at another step draws new batches.
    assert not torch.equal(first[0][0], first[1][0])
    assert not any(torch.equal(images, other) for (images, _), (other, _) in zip(first, resumed))
    assert first[0][1].dtype == torch.long and first[0][0].shape == (2, 1, 16, 16, 16)
    assert set(torch.unique(torch.cat([labels for _, labels in first])).tolist()) <= {0, 1, 2}


def test_training_with_worker_processes_runs_and_ends_them(trained, tmp_path):
    train(trained["data"], str(tmp_path), "--steps", "3", "--workers", "2")
    state = torch.load(os.path.join(str(tmp_path), "abdomen", "fold0", "last.ckpt"), weights_only=False)
    assert state["step"] == 3 and state["args"]["workers"] == 2
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("option, value, message", [("--workers", "-1", "a number of worker processes is 0 or more"),
                                                     ("--val-every", "0", "steps between validations is 1 or more")])
def test_train_refuses_a_count_out_of_range_in_one_line(option, value, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "abdomen", option, value])
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


# -------------------------------------------------------------------------------------------------- loss

def test_generalised_dice_loss_matches_sudre_et_al_by_hand():
    # Four voxels, two classes; the network's softmax gives these probabilities (logits = log p).
    reference = [0, 1, 1, 1]
    foreground = [0.2, 0.6, 0.8, 0.9]
    probabilities = torch.tensor([[1 - p for p in foreground], foreground]).reshape(1, 2, 4, 1, 1)
    labels = torch.tensor(reference).reshape(1, 1, 4, 1, 1)
    # Sudre et al. 2017: GDL = 1 - 2 sum_c w_c sum_i r_ci p_ci / sum_c w_c sum_i (r_ci + p_ci), w_c = 1 / (sum_i r_ci)^2
    # background: w = 1/1^2, intersection 0.8, sum 1.5 + 1 = 2.5; foreground: w = 1/3^2, intersection 2.3, sum 2.5 + 3
    numerator = 2 * (1 * 0.8 + 2.3 / 9)             # = 19/9
    denominator = 1 * 2.5 + 5.5 / 9                 # = 28/9
    expected_dice = 1 - numerator / denominator     # = 9/28
    assert expected_dice == pytest.approx(9 / 28)
    loss = DiceCELoss()
    logits = torch.log(probabilities)
    assert float(loss.dice(logits, labels)) == pytest.approx(9 / 28, abs=1e-5)
    cross_entropy = -np.mean(np.log([0.8, 0.6, 0.8, 0.9]))
    assert float(loss(logits, labels)) == pytest.approx(9 / 28 + cross_entropy, abs=1e-5)


def test_a_class_absent_from_the_patch_has_no_weight_in_the_dice_term():
    # The same four voxels with a third class that the reference lacks, predicted a little everywhere:
    # its Dice weight is 0, so the Dice term is the hand-computed one of the two present classes on the
    # probabilities as they are (MONAI's default would give the absent class the largest weight).
    reference = [0, 1, 1, 1]
    foreground, absent = [0.2, 0.6, 0.8, 0.9], [0.05] * 4
    background = [1 - f - a for f, a in zip(foreground, absent)]
    probabilities = torch.tensor([background, foreground, absent]).reshape(1, 3, 4, 1, 1)
    labels = torch.tensor(reference).reshape(1, 1, 4, 1, 1)
    intersection = [background[0], sum(foreground[1:])]
    sums = [sum(background) + 1, sum(foreground) + 3]
    weights = [1.0, 1 / 9]
    expected = 1 - 2 * sum(w * i for w, i in zip(weights, intersection)) / sum(w * t for w, t in zip(weights, sums))
    assert float(DiceCELoss().dice(torch.log(probabilities), labels)) == pytest.approx(expected, abs=1e-5)


def test_generalised_dice_loss_is_zero_for_a_perfect_prediction():
    labels = torch.tensor([0, 1, 2, 2, 0, 1]).reshape(1, 1, 6, 1, 1)
    logits = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 100
    assert float(DiceCELoss().dice(logits, labels)) == pytest.approx(0, abs=1e-5)


def test_a_whole_gland_label_scores_the_sum_of_the_merged_zones_not_their_split():
    """Marginal loss: a voxel labelled "PZ or TZ" (value 3 with classes background, PZ, TZ) is right whatever the
    split between PZ and TZ; a sample without such voxels gets the ordinary loss."""
    loss = DiceCELoss(merged=[1, 2])
    labels = torch.tensor([0, 3, 3, 3]).reshape(1, 1, 4, 1, 1)
    def logits(pz, tz):
        background = [0.8, 0.1, 0.1, 0.1]
        return torch.log(torch.tensor([background, pz, tz])).reshape(1, 3, 4, 1, 1)
    all_pz = loss(logits([0.1, 0.9, 0.9, 0.9], [0.1, 0.0, 0.0, 0.0]), labels)
    split = loss(logits([0.1, 0.3, 0.6, 0.45], [0.1, 0.6, 0.3, 0.45]), labels)
    assert float(all_pz) == pytest.approx(float(split), abs=1e-5)
    # By hand: merged channels [background, PZ + TZ] = [0.8, 0.2], [0.1, 0.9] x3 against [0, 1, 1, 1].
    merged = torch.log(torch.tensor([[0.8, 0.1, 0.1, 0.1], [0.2, 0.9, 0.9, 0.9]])).reshape(1, 2, 4, 1, 1)
    plain = DiceCELoss()
    union = torch.tensor([0, 1, 1, 1]).reshape(1, 1, 4, 1, 1)
    assert float(split) == pytest.approx(float(plain(merged, union)), abs=1e-5)
    # Less gland probability where the gland is: a larger loss.
    assert float(loss(logits([0.1, 0.2, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]), labels)) > float(split) + 0.1
    # In a batch, a fully labelled sample keeps the ordinary loss.
    full = torch.tensor([0, 1, 2, 2]).reshape(1, 1, 4, 1, 1)
    other = logits([0.1, 0.8, 0.1, 0.2], [0.1, 0.1, 0.8, 0.7])
    batch = loss(torch.cat([other, other]), torch.cat([full, labels]))
    assert float(batch) == pytest.approx((float(plain(other, full)) + float(loss(other, labels))) / 2, abs=1e-5)


def test_fold_all_trains_on_every_case_and_exports(trained, tmp_path):
    out = str(tmp_path)
    train(trained["data"], out, "--steps", "2", "--fold", "all")
    with open(os.path.join(out, "abdomen", "foldall", "split.json")) as stream:
        split = json.load(stream)
    assert split == {"training": [f"synth_{i:02d}" for i in range(5)], "validation": []}
    models = str(tmp_path / "models")
    assert cli.main(["export", "--model", "abdomen", "--out", out, "--fold", "all", "--models-dir", models]) == 0
    card = modelcard.find_card("spleen", models)
    assert card.training["validation_cases"] == [] and len(card.training["training_cases"]) == 5
    assert card.training["steps"] == 2
    # Its figures are the fold's, and the card says so.
    metrics = str(tmp_path / "metrics.json")
    with open(metrics, "w") as stream:
        json.dump({"spleen": {"dice": {"Spleen": 0.5}, "cases": ["synth_00"]}}, stream)
    assert cli.main(["export", "--model", "abdomen", "--out", out, "--fold", "all", "--models-dir", models,
                     "--metrics", metrics]) == 0
    validation = modelcard.find_card("spleen", models).validation
    assert validation["dice"] == {"Spleen": 0.5} and "trained on all 5 labelled cases" in validation["weights"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--model", "abdomen", "--fold", "some"])


def test_the_whole_gland_case_trains_through_the_merged_loss(prostate_data, tmp_path):
    """prostate_18 (the whole gland labelled PZ upstream) is cached as the merged value, trains, and never
    validates; the other cases keep PZ and TZ."""
    out = str(tmp_path)
    argv = ["train", "--model", "prostate", "--data", prostate_data, "--out", out, "--patch-size", "32", "32", "8",
            "--filters", "4", "8", "16", "--steps", "2", "--val-every", "1000", "--device", "cpu", "--quiet"]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "prostate", "fold0", "split.json")) as stream:
        split = json.load(stream)
    assert "prostate_18" in split["training"] and "prostate_18" not in split["validation"]
    with np.load(os.path.join(out, "prostate", "cache", "prostate_18.npz")) as data:
        assert set(np.unique(data["label"])) == {0, 3} and len(data["locations_3"])
    with np.load(os.path.join(out, "prostate", "cache", "prostate_10.npz")) as data:
        assert set(np.unique(data["label"])) == {0, 1, 2}
    with open(os.path.join(out, "prostate", "plan.json")) as stream:
        dataset = json.load(stream)["dataset"]
    assert dataset["partly_labelled"] == ["prostate_18"] and dataset["excluded"] == []


def test_pseudo_labels_join_the_labelled_cases_as_merged(trained, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    os.makedirs(data / "imagesTs")
    image, _ = synthetic_case(11)
    sitk.WriteImage(image, str(data / "imagesTs" / "synth_11.nii.gz"))
    with open(data / "dataset.json") as stream:
        meta = json.load(stream)
    meta["test"] = ["./imagesTs/synth_11.nii.gz"]
    with open(data / "dataset.json", "w") as stream:
        json.dump(meta, stream)
    out = str(tmp_path / "pseudo")
    # A relative --data (as in the README's command): the new dataset still finds the source's files.
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pseudo-labels", "--task", "spleen", "--data", "data", "--out", out,
                     "--models-dir", trained["models"], "--device", "cpu"]) == 0
    derived, cases = read_dataset(out)
    assert derived["name"] == meta["name"] and derived["labels"] == meta["labels"]
    assert [case["id"] for case in cases] == [f"synth_{i:02d}" for i in range(5)] + ["synth_11"]
    assert [case["merged"] for case in cases] == [False] * 5 + [True]
    expected = segment(read_channels([str(data / "imagesTs" / "synth_11.nii.gz")]), "spleen", device="cpu",
                       models_dir=trained["models"], precision="fp32")
    pseudo = sitk.GetArrayFromImage(sitk.ReadImage(cases[-1]["label"]))
    assert np.array_equal(pseudo, (sitk.GetArrayFromImage(expected.labels) > 0).astype(np.uint8))
    assert "synth_11:" in capsys.readouterr().out
    assert cli.main(["pseudo-labels", "--task", "spleen", "--data", trained["data"], "--out", out]) == 2


# ------------------------------------------------------------------------------------------ label mapping

def task_card(task, model=None):
    """A card for `task` whose last stage is `model` (default: the first of its cascade)."""
    model = model or TASKS[task]["models"][0]
    labels = [modelcard.Label(**{**label, "trained": label["source_class"] in MODELS[model]["classes"]})
              for label in TASKS[task]["labels"]]
    return modelcard.ModelCard(task=task, title="", description="", modality="", channels=[], labels=labels,
                               stages=[], postprocessing={}, training={"model": model}, validation={},
                               licence="")


def test_btcv_names_give_the_abdomen_classes():
    assert label_mapping(MODELS["abdomen"], BTCV_LABELS) == {1: 1, 6: 2, 11: 3}


def test_names_are_matched_whatever_their_case():
    assert label_mapping(MODELS["prostate"], {"0": "background", "1": "PZ", "2": "TZ"}) == {1: 1, 2: 2}
    assert label_mapping(MODELS["prostate"], {"0": "Background", "1": "Peripheral Zone", "2": "transition zone"}) \
        == {1: 1, 2: 2}


def test_explicit_label_map_overrides_names():
    overrides = parse_label_map("1:1,6:2")
    assert overrides == {1: 1, 6: 2}
    assert label_mapping(MODELS["abdomen"], {"0": "background", "1": "a", "6": "b"}, overrides) == {1: 1, 6: 2}


def test_a_missing_class_is_a_clear_error():
    with pytest.raises(LabelMappingError, match="dataset has no label for class 'liver'"):
        label_mapping(MODELS["abdomen"], {"0": "background", "1": "spleen"})  # MSD Task09 cannot train abdomen
    with pytest.raises(LabelMappingError, match="value:class pairs"):
        parse_label_map("1-1")


def test_evaluation_maps_dataset_labels_to_task_values():
    assert reference_mapping(task_card("spleen"), MODELS["abdomen"], {"0": "background", "1": "spleen"}) == {1: 1}
    assert reference_mapping(task_card("spleen"), MODELS["abdomen"], BTCV_LABELS) == {1: 1}
    assert reference_mapping(task_card("liver"), MODELS["abdomen"], BTCV_LABELS) == {6: 1}
    assert reference_mapping(task_card("pancreas"), MODELS["abdomen"], BTCV_LABELS) == {11: 1}
    # MSD Task03: the untrained tumour label counts as liver (the model segments the liver with its lesions)
    assert reference_mapping(task_card("liver"), MODELS["abdomen"],
                             {"0": "background", "1": "liver", "2": "cancer"}) == {1: 1, 2: 1}
    # ... and once the fine stage has the tumour class, it is the tumour
    assert reference_mapping(task_card("liver", "abdomen-fine"), MODELS["abdomen-fine"],
                             {"0": "background", "1": "liver", "2": "cancer"}) == {1: 1, 2: 2}
    assert reference_mapping(task_card("prostate"), MODELS["prostate"],
                             {"0": "background", "1": "PZ", "2": "TZ"}) == {1: 1, 2: 2}
    with pytest.raises(LabelMappingError, match="'pancreas'"):
        reference_mapping(task_card("pancreas"), MODELS["abdomen"], {"0": "background", "1": "liver"})


def test_fold_selection_leaves_out_excluded_cases():
    cases = [{"id": f"prostate_{n:02d}"} for n in (0, 1, 2, 4, 18)]
    chosen = select_cases(cases, MODELS["prostate"]["exclude"])
    assert [case["id"] for case in chosen] == ["prostate_00", "prostate_01", "prostate_02", "prostate_04"]
    assert [case["id"] for case in select_cases(cases, ["prostate_18"], fold=1)] == ["prostate_01"]
    assert [case["id"] for case in select_cases(cases, ["prostate_18"], ["prostate_02", "prostate_18"])] \
        == ["prostate_02"]


# ------------------------------------------------------------------------------------------------- plan

def prints(spacings, extents=None):
    extents = extents or [[300.0, 300.0, 200.0]] * len(spacings)
    return {f"case{i}": {"spacing": s, "extent": e} for i, (s, e) in enumerate(zip(spacings, extents))}


def test_median_spacing_for_near_isotropic_data():
    fingerprint = prints([[1.0, 1.0, 1.5], [1.2, 1.2, 2.0], [0.8, 0.8, 1.8]])
    assert choose_spacing(fingerprint, "median", [128, 128, 128]) == [1.0, 1.0, 1.8]


def test_anisotropic_data_takes_the_tenth_percentile_of_the_thick_axis():
    # median [0.65, 0.65, 3.6]: 3.6 > 3 x 0.65, so z becomes the 10th percentile of (3, 3.6, 4) = 3.12
    fingerprint = prints([[0.6, 0.6, 3.0], [0.7, 0.7, 3.6], [0.65, 0.65, 4.0]])
    assert choose_spacing(fingerprint, "median", [128, 128, 16]) == [0.65, 0.65, 3.12]


def test_coarse_spacing_fits_most_of_the_field_of_view_in_one_patch():
    spacings = [[0.8, 0.8, 2.5], [1.0, 1.0, 5.0], [0.7, 0.7, 3.0]]
    extents = [[400.0, 400.0, 300.0], [350.0, 350.0, 200.0], [300.0, 300.0, 250.0]]
    # median field of view 350 mm / (1.25 x 64) = 4.375 -> 4.0 mm (rounded down to 0.5)
    assert choose_spacing(prints(spacings, extents), "coarse", [64, 64, 64]) == [4.0, 4.0, 4.0]
    # never finer than the coarsest data: 60 / 80 = 0.75 -> 0.5, but the data is at most 1.0 mm in-plane
    small = [[60.0, 60.0, 60.0]] * 3
    assert choose_spacing(prints(spacings, small), "coarse", [64, 64, 64]) == [1.0, 1.0, 1.0]


def test_fine_spacing_is_the_median_but_no_finer_than_its_floor():
    spacings = [[0.7, 0.7, 2.5], [0.8, 0.8, 3.0], [1.5, 1.5, 5.0]]
    assert choose_spacing(prints(spacings), "fine", [80, 80, 48], min_spacing=2.0) == [2.0, 2.0, 3.0]
    assert choose_spacing(prints(spacings), "fine", [80, 80, 48], min_spacing=0.5) == [0.8, 0.8, 3.0]


def test_fine_stage_cache_is_cropped_to_its_organs_plus_the_margin():
    plan = {"classes": ["background", "spleen", "liver"], "spacing": [2.0, 2.0, 4.0],
            "roi": {"classes": ["spleen", "liver"], "margin_mm": [4, 4, 8]}}
    label = np.zeros((40, 40, 30), np.uint8)
    label[10:15, 12:20, 10:12] = 1
    label[20:25, 15:18, 14:16] = 2
    label[30:35, 30:35, 25:28] = 3                  # a class that is not in the region of interest
    assert roi_box(label, plan) == (slice(8, 27), slice(10, 22), slice(8, 18))


def test_fingerprint_samples_the_labelled_voxels(synthetic_data):
    _, cases = read_dataset(synthetic_data)
    first, second = fingerprint(cases[:2]), fingerprint(cases[:2])
    assert first == second
    intensities = np.concatenate(first["synth_00"]["intensities"])
    assert 60 < intensities.min() and intensities.max() < 200  # organs (90 to 160 HU + noise), never air or bone
    assert first["synth_00"]["spacing"] == [2.0, 2.0, 5.0] and first["synth_00"]["extent"] == [96.0, 96.0, 120.0]


def test_saturated_ct_keeps_its_own_window():
    fingerprint = {f"c{i}": {"min": [-125.0], "max": [275.0], "fraction_at_min": [0.3], "fraction_at_max": [0.01],
                             "intensities": [list(np.linspace(-100, 250, 50))]} for i in range(3)}
    assert choose_ct_window(fingerprint) == [-125.0, 275.0]


def test_unclipped_ct_uses_foreground_percentiles():
    values = np.arange(-200.0, 801.0)  # 1001 foreground samples
    fingerprint = {f"c{i}": {"min": [-1024.0], "max": [3000.0], "fraction_at_min": [0.2], "fraction_at_max": [1e-6],
                             "intensities": [list(values)]} for i in range(2)}
    low, high = choose_ct_window(fingerprint)
    assert low == pytest.approx(-200 + 0.005 * 1000) and high == pytest.approx(-200 + 0.995 * 1000)


# ----------------------------------------------------------------------------------------------- metrics

def test_metrics_of_a_perfect_prediction():
    mask = np.zeros((20, 20, 12), bool)
    mask[5:15, 4:14, 3:9] = True
    metrics = label_metrics(mask, mask.copy(), (0.8, 0.8, 2.5))
    assert metrics["dice"] == 1.0
    assert metrics["hd95_mm"] == 0.0
    assert metrics["volume_error_ml"] == 0.0 and metrics["volume_error_percent"] == 0.0
    assert metrics["reference_ml"] == pytest.approx(600 * 0.8 * 0.8 * 2.5 / 1000)


def test_metrics_of_a_slab_shifted_by_one_slice():
    # A slab two slices thick, one slice too high: half overlaps; every surface voxel is 0 or one slice away.
    reference = np.zeros((20, 20, 10), bool)
    reference[2:18, 2:18, 4:6] = True
    prediction = np.roll(reference, 1, axis=2)
    metrics = label_metrics(prediction, reference, (1.0, 1.0, 3.0))
    assert metrics["dice"] == pytest.approx(0.5)
    assert metrics["hd95_mm"] == pytest.approx(3.0)
    assert metrics["volume_error_percent"] == 0.0


def test_metrics_of_an_over_segmentation_by_one_slice():
    reference = np.zeros((16, 16, 16), bool)
    reference[3:13, 3:13, 3:13] = True
    prediction = reference.copy()
    prediction[3:13, 3:13, 13] = True  # 100 more voxels on top: 1100 vs 1000
    metrics = label_metrics(prediction, reference, (1.0, 1.0, 2.0))
    assert metrics["dice"] == pytest.approx(2000 / 2100)
    assert metrics["hd95_mm"] == pytest.approx(2.0)
    assert metrics["volume_error_percent"] == pytest.approx(10.0)
    assert metrics["volume_error_ml"] == pytest.approx(100 * 2.0 / 1000)


def test_metrics_of_missed_and_absent_organs():
    empty, organ = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    organ[2:5, 2:5, 2:5] = True
    missed = label_metrics(empty, organ, (1.0, 1.0, 1.0))
    assert missed["dice"] == 0.0 and math.isinf(missed["hd95_mm"]) and missed["volume_error_percent"] == -100.0
    absent = label_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert math.isnan(absent["dice"]) and math.isnan(absent["hd95_mm"]) and math.isnan(absent["volume_error_percent"])


# ---------------------------------------------------------------------------------------------- evaluate

def test_evaluate_measures_the_exported_model_and_feeds_export(trained, tmp_path):
    table, metrics_json = str(tmp_path / "spleen.csv"), str(tmp_path / "metrics.json")
    with open(metrics_json, "w") as stream:
        json.dump({"prostate": {"dice": {"Peripheral zone": 0.7}}}, stream)
    args = cli.build_parser().parse_args(
        ["evaluate", "--task", "spleen", "--data", trained["data"], "--models-dir", trained["models"], "--fold", "0",
         "--csv", table, "--metrics-json", metrics_json, "--device", "cpu"])
    entry = run_evaluation(args)
    assert entry["cases"] == ["synth_00"]
    assert {"dice", "hd95_mm", "volume_error_percent", "data", "cases"} <= set(entry)
    assert set(entry["dice"]) == {"Spleen"} and 0.0 <= entry["dice"]["Spleen"] <= 1.0
    assert "fold 0" in entry["data"] and "SyntheticAbdomen" in entry["data"]
    with open(table) as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["case"], row["label"]) for row in rows] == [("synth_00", "Spleen"), ("mean", "Spleen")]
    assert float(rows[0]["reference_ml"]) > 0
    with open(metrics_json) as stream:
        written = json.load(stream)
    assert set(written) == {"prostate", "spleen"} and written["spleen"]["dice"] == entry["dice"]

    # export --metrics puts the measured figures into the card, where the module shows them
    models = str(tmp_path / "models")
    assert cli.main(["export", "--model", "abdomen", "--out", trained["out"], "--models-dir", models,
                     "--metrics", metrics_json]) == 0
    card = modelcard.find_card("spleen", models)
    assert card.validation["dice"] == entry["dice"]
    assert f"Spleen {entry['dice']['Spleen']:.2f}" in card.summary()


def test_precision_measures_the_precisions_asked_and_fp32_always(trained, tmp_path):
    """fp16 through a CPU's autocast takes minutes per CT for a wide network: `--precisions bf16` measures fp32 (the
    reference) and bf16 only, and auto then never picks fp16 for that task."""
    models = str(tmp_path / "models")
    shutil.copytree(trained["models"], models)
    assert cli.main(["precision", "--task", "spleen", "--data", trained["data"], "--models-dir", models, "--fold", "0",
                     "--precisions", "bf16"]) == 0
    card = modelcard.find_card("spleen", models)
    assert set(card.precision) & {"fp32", "bf16", "fp16"} == {"fp32", "bf16"}
    assert "fp16" not in card.auto_precisions()


def test_evaluate_command_line_and_its_errors(trained, capsys):
    common = ["--data", trained["data"], "--models-dir", trained["models"], "--device", "cpu"]
    assert cli.main(["evaluate", "--task", "liver", "--cases", "synth_03", *common]) == 0
    captured = capsys.readouterr()
    assert "synth_03" in captured.out and "not scored: Liver tumour" in captured.out  # untrained label
    assert "1 case(s) were used to train this model" in captured.err
    assert cli.main(["evaluate", "--task", "liver", "--cases", "nobody", *common]) == 2
    assert "Case(s) not in dataset.json: nobody" in capsys.readouterr().err
    assert cli.main(["evaluate", "--task", "prostate", *common]) == 2
    assert "No model for task 'prostate'" in capsys.readouterr().err


def test_evaluate_refuses_a_dataset_without_the_task_s_organ(trained, tmp_path, capsys):
    data = write_dataset(str(tmp_path / "NoPancreas"), cases=1, labels={"0": "background", "1": "spleen"})
    assert cli.main(["evaluate", "--task", "pancreas", "--data", data, "--models-dir", trained["models"]]) == 2
    error = capsys.readouterr().err.strip()
    assert "dataset has no label for class 'pancreas'" in error and "\n" not in error


def test_evaluate_with_synthetic_lesions_scores_the_tumour_lesion_by_lesion(cascade, tmp_path, capsys):
    metrics_json = str(tmp_path / "metrics.json")
    common = ["--data", cascade["data"], "--models-dir", cascade["models"], "--device", "cpu",
              "--metrics-json", metrics_json, "--cases", "synth_00,synth_02"]
    assert cli.main(["evaluate", "--task", "liver", *common]) == 0
    lesions_csv = str(tmp_path / "lesions.csv")
    assert cli.main(["evaluate", "--task", "liver", "--synthetic-lesions", "5", "--lesions-csv", lesions_csv,
                     *common]) == 0
    out = capsys.readouterr().out
    assert "Liver tumour" in out and "synthetic lesions, sensitivity" in out
    assert "Liver tumour, lesions kept from a confidence of: 0.0:" in out
    with open(lesions_csv) as stream:
        records = list(csv.DictReader(stream))
    assert sum(r["kind"] == "reference" for r in records) >= 2
    assert all(0 <= float(r["confidence"]) <= 1 and r["case"] in ("synth_00", "synth_02") for r in records)
    with open(metrics_json) as stream:
        liver = json.load(stream)["liver"]
    assert set(liver["dice"]) == {"Liver"}                      # clean cases: no tumour to score ...
    assert liver["false_positive_lesions_per_volume"]["Liver tumour"] >= 0   # ... but false lesions to count
    assert "liver tumour: no tumour in these organs" in liver["data"]
    painted = liver["synthetic_lesions"]
    assert set(painted["dice"]) == {"Liver", "Liver tumour"}
    by_size = painted["lesions_by_size"]["Liver tumour"]
    assert sum(size["lesions"] for size in by_size.values()) >= 2   # at least one per case, of any size
    assert painted["lesions"]["Liver tumour"] <= sum(size["lesions"] for size in by_size.values())
    assert 0 <= painted["lesion_sensitivity"]["Liver tumour"] <= 1
    assert "synthetic liver tumours painted in (seed 5, 1 round(s)" in painted["data"]
    # The same seed paints the same lesions: the same figures again (and the clean ones are kept).
    assert cli.main(["evaluate", "--task", "liver", "--synthetic-lesions", "5", *common]) == 0
    with open(metrics_json) as stream:
        again = json.load(stream)["liver"]
    assert again["synthetic_lesions"]["dice"] == painted["dice"] and again["dice"] == liver["dice"]
    # Another dataset's figures go beside them under their own key; the main ones and the lesions' stay.
    assert cli.main(["evaluate", "--task", "liver", "--metrics-key", "elsewhere", *common]) == 0
    with open(metrics_json) as stream:
        beside = json.load(stream)["liver"]
    assert beside["elsewhere"]["dice"] == liver["dice"] and beside["dice"] == liver["dice"]
    assert beside["synthetic_lesions"]["dice"] == painted["dice"]
    assert cli.main(["evaluate", "--task", "liver", *common]) == 0    # the main figures again: both kept
    with open(metrics_json) as stream:
        assert set(json.load(stream)["liver"]) >= {"elsewhere", "synthetic_lesions"}
    # Two rounds: each case twice, with other lesions the second time.
    assert cli.main(["evaluate", "--task", "liver", "--synthetic-lesions", "5", "--lesion-rounds", "2", *common]) == 0
    assert "synth_02/1" in capsys.readouterr().out
    # A task without a synthetic tumour class is refused in one line.
    assert cli.main(["evaluate", "--task", "spleen", "--synthetic-lesions", "5", *common]) == 2
    assert "no tumour class learnt from synthetic lesions" in capsys.readouterr().err


def test_evaluate_with_synthetic_masses_reports_how_much_became_organ(cascade, tmp_path, capsys):
    csv_path = str(tmp_path / "masses.csv")
    common = ["--data", cascade["data"], "--models-dir", cascade["models"], "--device", "cpu", "--cases", "synth_00"]
    assert cli.main(["evaluate", "--task", "liver", "--synthetic-masses", "3", "--lesion-rounds", "2",
                     "--csv", csv_path, *common]) == 0
    assert "Liver: synthetic masses beside it" in capsys.readouterr().out
    with open(csv_path) as stream:
        rows = [row for row in csv.DictReader(stream) if row["label"] == "Liver"]
    assert [row["case"] for row in rows] == ["synth_00/0", "synth_00/1", "mean"]
    for row in rows:
        mass, organ, tumour = (float(row[key]) for key in ("mass_ml", "mass_as_organ_ml", "mass_as_tumour_ml"))
        assert mass > 0 and 0 <= organ + tumour <= mass
    assert rows[0]["mass_ml"] != rows[1]["mass_ml"]                  # another mass each round
    # Tasks whose model learnt no masses, or both kinds of painting at once, are refused in one line.
    assert cli.main(["evaluate", "--task", "spleen", "--synthetic-masses", "3", *common]) == 2
    assert "no organ whose model learnt masses beside it" in capsys.readouterr().err
    assert cli.main(["evaluate", "--task", "liver", "--synthetic-masses", "3", "--synthetic-lesions", "3",
                     *common]) == 2
    assert "not both" in capsys.readouterr().err


def test_lesion_wise_counts():
    from Training.evaluate import lesion_metrics
    reference = np.zeros((20, 20, 20), bool)
    reference[2:5, 2:5, 2:5] = reference[10:13, 10:13, 10:13] = reference[16:18, 2:4, 2:4] = True
    prediction = np.zeros_like(reference)
    prediction[3:6, 3:6, 3:6] = True                            # hits the first lesion
    prediction[15:17, 15:17, 15:17] = True                      # a false positive
    assert lesion_metrics(prediction, reference) == {"lesions": 3, "detected_lesions": 1, "false_positive_lesions": 1}
    # Lesions below the smallest tumour post-processing keeps (the 8-voxel one here) are not counted.
    assert lesion_metrics(prediction, reference, min_voxels=10) == \
        {"lesions": 2, "detected_lesions": 1, "false_positive_lesions": 1}


def test_lesion_records_and_the_confidence_sweep():
    """Reference lesions of 1.0 and 0.3 mL (1 mm voxels): the first found by a lesion of confidence 0.9, the
    second missed; a false lesion of confidence 0.6. Dropping lesions below 0.7 removes the false one only."""
    from Training.evaluate import confidence_sweep, lesion_records
    reference = np.zeros((40, 40, 40), bool)
    prediction = np.zeros_like(reference)
    reference[0:10, 0:10, 0:10] = True
    prediction[2:8, 2:8, 2:8] = True
    reference[20:30, 20:30, 20:23] = True
    prediction[30:35, 0:5, 0:5] = True
    lesions = [{"index": [4, 4, 4], "confidence": 0.9, "peak": 0.97, "contrast": -35.0, "elongation": 1.1},
               {"index": [31, 1, 1], "confidence": 0.6, "peak": 0.8, "contrast": 4.0, "elongation": 3.0}]
    records = lesion_records(prediction, reference, lesions, voxel_ml=0.001)
    assert [(r["kind"], r["detected"], r["confidence"]) for r in records] == \
        [("reference", True, 0.9), ("reference", False, 0.0), ("false", True, 0.6)]
    assert records[0]["contrast"] == -35.0 and math.isnan(records[1]["contrast"]) and records[2]["contrast"] == 4.0
    assert records[0]["elongation"] == 1.1 and records[2]["elongation"] == 3.0
    assert records[0]["volume_ml"] == pytest.approx(1.0) and records[2]["volume_ml"] == pytest.approx(0.125)
    sweep = dict((minimum, (found, total, false)) for minimum, found, total, false in
                 confidence_sweep(records, volumes=2, statistic="confidence"))
    assert sweep[0.0] == (1, 1, 0.5) and sweep[0.7] == (1, 1, 0.0) and sweep[0.9] == (1, 1, 0.0)
    assert confidence_sweep(records, 2, "peak")[-1][1:] == (1, 1, 0.0)   # peak 0.97 >= 0.9; 0.8 < 0.9


def test_lesions_are_counted_by_size():
    """At 1 mm voxels (0.001 mL): reference lesions of 0.3, 1.0, 5.8 and 27 mL, the 1.0 and 27 mL ones hit, and
    false positives of 0.008 and 3.4 mL: each counted in its size class."""
    from Training.evaluate import LESION_SIZES_ML, lesion_metrics
    reference = np.zeros((70, 70, 70), bool)
    prediction = np.zeros_like(reference)
    reference[0:10, 0:10, 0:3] = True       # 0.3 mL, missed
    reference[20:30, 0:10, 0:10] = True     # 1.0 mL, found
    prediction[22:24, 2:4, 2:4] = True
    reference[40:58, 0:18, 0:18] = True     # 5.8 mL, missed
    reference[0:30, 30:60, 30:60] = True    # 27 mL, found
    prediction[10:12, 40:42, 40:42] = True
    prediction[60:62, 60:62, 60:62] = True  # 0.008 mL, false
    prediction[40:55, 40:55, 50:65] = True  # 3.4 mL, false
    by_size = lesion_metrics(prediction, reference, voxel_ml=0.001)["by_size"]
    assert list(by_size) == [name for name, _, _ in LESION_SIZES_ML]
    assert by_size == {"under 0.5 mL": {"lesions": 1, "detected": 0, "false_positives": 1},
                       "0.5-2 mL": {"lesions": 1, "detected": 1, "false_positives": 0},
                       "2-10 mL": {"lesions": 1, "detected": 0, "false_positives": 1},
                       "10 mL and over": {"lesions": 1, "detected": 1, "false_positives": 0}}


def test_every_tumour_found_in_a_healthy_organ_is_a_false_lesion_counted_by_size():
    from MSDSegmentLib.modelcard import Label
    from Training.evaluate import healthy_row
    tumour = Label(2, "Liver tumour", [0, 255, 0], "liver tumour", kind="tumour", organ="Liver")
    predicted = np.zeros((40, 40, 40), bool)
    predicted[0:10, 0:10, 0:10] = True      # 1.0 mL at 1 mm voxels
    predicted[20:35, 20:35, 20:35] = True   # 3.4 mL
    row = healthy_row("btcv_00", tumour, predicted, min_voxels=10, voxel_ml=0.001)
    assert math.isnan(row["dice"]) and row["predicted_ml"] == pytest.approx(4.375)
    assert row["lesions"] == 0 and row["false_positive_lesions"] == 2
    assert row["by_size"]["0.5-2 mL"]["false_positives"] == 1 and row["by_size"]["2-10 mL"]["false_positives"] == 1


# ---------------------------------------------------------------------------------------- tumour classes

def test_a_briefly_trained_cascade_outputs_organ_and_tumour(tmp_path):
    """End to end for the tumour classes: a synthetic dataset with a labelled liver tumour, the fine stage
    trained (with synthetic lesions painted in too) for a few hundred tiny steps, exported after the coarse
    stage; the liver task then outputs 0, 1 and 2 on a held-back case, its tumour on the tumour."""
    data = write_dataset(str(tmp_path / "data"), organs=LIVER_WITH_TUMOUR, labels=LIVER_WITH_TUMOUR_LABELS)
    out, models = str(tmp_path / "runs"), str(tmp_path / "models")
    common = ["--data", data, "--out", out, "--val-every", "1000", "--device", "cpu", "--quiet"]
    assert cli.main(["train", "--model", "abdomen", *common, *TINY, "--steps", "2"]) == 0
    assert cli.main(["train", "--model", "abdomen-fine", *common, "--patch-size", "24", "24", "16",
                     "--filters", "8", "16", "32", "--batch-size", "4", "--lr", "3e-3", "--steps", "400"]) == 0
    for model in ("abdomen", "abdomen-fine"):
        assert cli.main(["export", "--model", model, "--out", out, "--models-dir", models]) == 0
    result = segment(read_channels([os.path.join(data, "imagesTr", "synth_00.nii.gz")]), "liver", device="cpu",
                     models_dir=models)
    prediction = sitk.GetArrayFromImage(result.labels)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(data, "labelsTr", "synth_00.nii.gz")))
    assert set(np.unique(prediction).tolist()) == {0, 1, 2}
    tumour = prediction == 2
    assert 2 * (tumour & (reference == 2)).sum() / (tumour.sum() + (reference == 2).sum()) > 0.3


def torchrun(data, out, *extra):
    """Two ranks on the CPU (gloo over the loopback interface), as `torchrun --nproc_per_node=2` on GPUs."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", out + "-torchrun-logs", "-m", "Training", "train", "--model", "abdomen", "--data", data,
               "--out", out, *TINY, "--batch-size", "1", "--val-every", "1000", "--device", "cpu", "--quiet", *extra]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([REPOSITORY, os.path.join(REPOSITORY, "MSDSegment")]),
                       OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, env=environment, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_two_ranks_train_identical_weights_and_a_resumed_run_continues(synthetic_data, tmp_path):
    """The multi-GPU path (DDP) with two CPU ranks: rank 0 plans and caches while the other waits, both train,
    their weights end identical, and a run stopped by its time limit resumes from its step."""
    out = str(tmp_path)
    log = torchrun(synthetic_data, out, "--steps", "3", "--time-limit", "1e-9")
    checkpoint = os.path.join(out, "abdomen", "fold0", "last.ckpt")
    assert torch.load(checkpoint, weights_only=False)["step"] == 1
    assert "2 ranks at step 1: largest weight difference from rank 0 0\n" in log
    log = torchrun(synthetic_data, out, "--steps", "3", "--resume")
    assert "resumed from step 1" in log
    assert "2 ranks at step 3: largest weight difference from rank 0 0\n" in log
    assert torch.load(checkpoint, weights_only=False)["step"] == 3
    with open(os.path.join(out, "abdomen", "plan.json"), encoding="utf-8") as stream:
        assert json.load(stream)["patch_size"] == [16, 16, 16]


def write_dicom_series(volume, folder, spacing=(0.8, 0.8, 1.6), origin=(-100.0, -120.0, 40.0)):
    """A DICOM series, one file per slice, of an (x, y, z) int16 array (as a scanner or 3D-IRCADb stores it)."""
    os.makedirs(folder, exist_ok=True)
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # files without an extension, as 3D-IRCADb names them
    series = "1.2.826.0.1.3680043.2.1125." + str(abs(hash(folder)) % 10**12)
    for index in range(image.GetDepth()):
        item = image[:, :, index]
        for tag, value in (("0008|0060", "CT"), ("0020|000e", series), ("0020|0013", str(index + 1)),
                           ("0020|0032", "\\".join(f"{c:.4f}" for c in image.TransformIndexToPhysicalPoint((0, 0, index)))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", f"{spacing[2]:.4f}"),
                           ("0008|0018", f"{series}.{index + 1}")):
            item.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"image_{index}"))
        writer.Execute(item)


def test_dicom_masks_become_an_msd_dataset_that_evaluate_reads(tmp_path):
    """A small DICOM CT with DICOM masks per structure (one case with a folder of masks, one with them zipped):
    the CT comes back with its grid and HU untouched, the masks as labels (a tumour inside the liver wins where
    it is given later), unmatched masks are reported, and dataset.json names the labels."""
    rng = np.random.default_rng(0)
    cases = {}
    for case_id, zipped in (("case_a", False), ("case_b", True)):
        ct = rng.integers(-1024, 1500, (24, 20, 8)).astype(np.int16)
        liver = np.zeros(ct.shape, np.int16)
        liver[2:14, 3:12, 1:6] = 255
        tumour = np.zeros(ct.shape, np.int16)
        tumour[5:8, 5:8, 2:4] = 255
        bone = np.zeros(ct.shape, np.int16)
        bone[20:23, 2:5, :] = 255
        folder = tmp_path / case_id
        write_dicom_series(ct, str(folder / "PATIENT_DICOM"))
        for name, mask in (("liver", liver), ("livertumor1", tumour), ("bone", bone)):
            write_dicom_series(mask, str(folder / "MASKS_DICOM" / name))
        if zipped:
            shutil.make_archive(str(folder / "MASKS_DICOM"), "zip", str(folder), "MASKS_DICOM")
            shutil.rmtree(folder / "MASKS_DICOM")
        cases[case_id] = (ct, liver, tumour)
    out = tmp_path / "dataset"
    argv = ["dicom-masks", str(tmp_path / "case_a"), str(tmp_path / "case_b"), "--out", str(out),
            "--structure", "liver=liver", "--structure", "livertumor*=liver tumour", "--name", "test"]
    assert cli.main(argv) == 0
    meta, read = read_dataset(str(out))
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "liver tumour"}
    assert [case["id"] for case in read] == ["case_a", "case_b"]
    for case in read:
        ct, liver, tumour = cases[case["id"]]
        image, labels = sitk.ReadImage(case["image"]), sitk.ReadImage(case["label"])
        assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), ct)
        np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.8, 1.6), atol=1e-4)
        np.testing.assert_allclose(image.GetOrigin(), (-100.0, -120.0, 40.0), atol=1e-3)
        expected = np.where(tumour > 0, 2, np.where(liver > 0, 1, 0))
        assert np.array_equal(sitk.GetArrayFromImage(labels).transpose(2, 1, 0), expected)
        assert labels.GetOrigin() == image.GetOrigin() and labels.GetSpacing() == image.GetSpacing()
    assert cli.main(["dicom-masks", str(tmp_path / "case_a"), "--out", str(out), "--structure", "liver"]) == 2


def write_segmentation_object(mask, path, spacing=(0.8, 0.8, 1.6), origin=(-100.0, -120.0, 40.0)):
    """A DICOM SEG (BINARY, one segment) of an (x, y, z) mask: frames only where the mask is, each placed by
    its ImagePositionPatient (as a SEG from Slicer or a clinical workstation stores it)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    slices = [z for z in range(mask.shape[2]) if mask[:, :, z].any()]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg = Dataset()
    seg.file_meta = meta
    seg.SOPClassUID, seg.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    seg.Modality, seg.SegmentationType = "SEG", "BINARY"
    seg.Rows, seg.Columns, seg.NumberOfFrames = mask.shape[1], mask.shape[0], len(slices)
    seg.SamplesPerPixel, seg.PhotometricInterpretation = 1, "MONOCHROME2"
    seg.BitsAllocated, seg.BitsStored, seg.HighBit, seg.PixelRepresentation = 1, 1, 0, 0
    frames = []
    for z in slices:
        group, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [origin[0], origin[1], origin[2] + z * spacing[2]]
        group.PlanePositionSequence = Sequence([plane])
        frames.append(group)
    seg.PerFrameFunctionalGroupsSequence = Sequence(frames)
    seg.PixelData = pack_bits(np.stack([mask[:, :, z].T for z in slices]).astype(np.uint8))
    pydicom.dcmwrite(path, seg, enforce_file_format=True)


def test_dicom_segmentation_objects_are_read_as_masks(tmp_path):
    """Masks stored as DICOM SEG files beside the CT series (--masks-folder .): each frame lands on the CT
    slice at its position; a SEG off the CT's slices is refused in one line."""
    rng = np.random.default_rng(1)
    ct = rng.integers(-1024, 1500, (24, 20, 8)).astype(np.int16)
    liver = np.zeros(ct.shape, bool)
    liver[2:14, 3:12, 1:6] = True
    tumour = np.zeros(ct.shape, bool)
    tumour[5:8, 5:9, 3:5] = True
    case = tmp_path / "0697"
    write_dicom_series(ct, str(case / "31_EQP_Ax5.00mm"))
    write_segmentation_object(liver, str(case / "31_EQP_ManualROI_Liver.dcm"))
    write_segmentation_object(tumour, str(case / "31_EQP_ManualROI_Tumor.dcm"))
    out = tmp_path / "dataset"
    argv = ["dicom-masks", str(case), "--image-folder", "31_EQP_Ax5.00mm", "--masks-folder", ".", "--out", str(out),
            "--structure", "*liver=liver", "--structure", "*tumor=liver tumour"]
    assert cli.main(argv) == 0
    _, (read,) = read_dataset(str(out))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(read["label"])).transpose(2, 1, 0)
    assert np.array_equal(labels, np.where(tumour, 2, np.where(liver, 1, 0)))
    write_segmentation_object(tumour, str(case / "31_EQP_ManualROI_Tumor.dcm"), origin=(-100.0, -120.0, 40.8))
    assert cli.main(argv) == 2


def test_a_reformatted_image_in_a_ct_series_is_left_out(tmp_path):
    """Scanners store a coronal reformat in the same series as the axial slices: read with them it would give
    the volume a wrong slice spacing, so the engine reads only the slices of the main orientation."""
    from MSDSegmentLib.imageio import read_image
    folder = tmp_path / "series"
    ct = np.random.default_rng(2).integers(-1000, 1000, (16, 16, 6)).astype(np.int16)
    write_dicom_series(ct, str(folder))
    reformat = sitk.GetImageFromArray(np.zeros((1, 16, 16), np.int16))
    series = sitk.ReadImage(str(folder / "image_0")).GetMetaData("0020|000e")
    for tag, value in (("0008|0060", "CT"), ("0020|000e", series), ("0020|0013", "99"),
                       ("0020|0032", "-100\\-10\\60"), ("0020|0037", "1\\0\\0\\0\\0\\-1")):
        reformat.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(folder / "image_reformat"))
    writer.Execute(reformat)
    image = read_image(str(folder))
    assert image.GetSize() == (16, 16, 6)
    np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.8, 1.6), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), ct)


def test_locations_are_learnt_from_the_training_labels_into_the_card(trained, tmp_path):
    models = str(tmp_path / "models")
    shutil.copytree(trained["models"], models)
    assert cli.main(["locations", "--task", "pancreas", "--data", trained["data"], "--models-dir", models]) == 0
    card = modelcard.find_card("pancreas", models)
    location = card.trained_labels[0].location
    assert location["relative_to"] == "liver" and location["cases"] == 5
    # The synthetic pancreas lies 10 voxels (20 mm) right of the liver's centre in x and 7 voxels (14 mm) in y.
    np.testing.assert_allclose(location["mean_mm"][:2], [20.0, -14.0], atol=4.0)
    assert location["max_distance"] >= 4.0
    image = read_channels([os.path.join(trained["data"], "imagesTr", "synth_00.nii.gz")])
    assert segment(image, "pancreas", models_dir=models, device="cpu").labels.GetSize() == image[0].GetSize()
    assert cli.main(["locations", "--task", "pancreas", "--data", trained["data"], "--models-dir", models,
                     "--relative-to", "kidney"]) == 2
    assert cli.main(["export", "--model", "abdomen", "--out", trained["out"], "--models-dir", models]) == 0
    assert modelcard.find_card("pancreas", models).trained_labels[0].location == location  # kept on re-export


def test_bf16_trains_on_the_cpu_and_fp16_is_refused_there(synthetic_data, tmp_path, capsys):
    """--precision bf16: the forward pass under CPU autocast (weights and optimiser stay fp32); fp16 needs a GPU."""
    out = str(tmp_path)
    train(synthetic_data, out, "--steps", "2", "--precision", "bf16")
    assert "training in mixed precision: bf16 autocast on cpu" in capsys.readouterr().out
    state = torch.load(os.path.join(out, "abdomen", "fold0", "last.ckpt"), weights_only=False)
    assert state["step"] == 2 and all(value.dtype == torch.float32 for value in state["model"].values()
                                      if value.is_floating_point())
    argv = ["train", "--model", "abdomen", "--data", synthetic_data, "--out", out, "--steps", "3", "--resume",
            "--precision", "fp16", "--device", "cpu", "--quiet"]
    assert cli.main(argv) == 2
    assert "--precision fp16 trains only on a CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ training on a lent GPU


def test_a_cache_packed_for_a_gpu_machine_trains_there_side_by_side_by_a_budget(synthetic_data, tmp_path):
    """scripts/device_training.py: pack a plan and cache, unpack it, train two stages side by side so that both end
    their schedules by a budget, and collect the weights in pieces that join to what export keeps."""
    sys.path.insert(0, os.path.join(REPOSITORY, "scripts"))
    import device_training
    built, moved = str(tmp_path / "built"), str(tmp_path / "moved")
    runs = []
    for model in ("abdomen", "abdomen-fine"):
        train_flags = ["--data", synthetic_data, *TINY, "--device", "cpu", "--quiet"]
        assert cli.main(["train", "--model", model, "--out", built, "--steps", "0", *train_flags]) == 0
        packed = str(tmp_path / f"{model}.xz")
        device_training.main(["pack", os.path.join(built, model), packed])
        device_training.main(["unpack", packed, os.path.join(moved, model)])
        runs.append(f"{model}:{moved}")
        # The GPU machine has no SimpleITK: unpacking there again, with SimpleITK made unimportable, gives the same.
        blocker = tmp_path / "blocker"
        blocker.mkdir(exist_ok=True)
        (blocker / "SimpleITK.py").write_text("raise ImportError('no SimpleITK here')\n")
        subprocess.run([sys.executable, os.path.join(REPOSITORY, "scripts", "device_training.py"), "unpack", packed,
                        str(tmp_path / "without" / model)], env={**os.environ, "PYTHONPATH": str(blocker)}, check=True)
        for case in sorted(os.listdir(os.path.join(moved, model, "cache"))):
            with np.load(os.path.join(moved, model, "cache", case)) as first, \
                    np.load(os.path.join(tmp_path, "without", model, "cache", case)) as second:
                assert all(np.array_equal(first[key], second[key]) for key in first.files)
        for case in sorted(os.listdir(os.path.join(built, model, "cache"))):
            with np.load(os.path.join(built, model, "cache", case)) as before, \
                    np.load(os.path.join(moved, model, "cache", case)) as after:
                assert sorted(before.files) == sorted(after.files)
                assert all(np.array_equal(before[key], after[key]) for key in before.files if key != "image")
                # Half a 7-bit step of the 400 HU window, in the normalised units (plus fp16's rounding).
                step = 400 / 127 / 2 / json.load(open(os.path.join(built, model, "plan.json")))["normalisation"]["std"]
                assert np.abs(before["image"].astype(np.float32) - after["image"]).max() <= step * 1.01 + 1e-2

    started = time.time()
    device_training.main(["pair", *runs, "--budget", "60", "--reserve", "30", "--calibration-steps", "20",
                          "--logs", str(tmp_path / "logs"), "--", "--data", synthetic_data, "--device", "cpu",
                          "--quiet", "--batch-size", "1"])
    assert time.time() - started < 60 + 15 + 10  # stopped by then at the latest
    for model in ("abdomen", "abdomen-fine"):
        state = torch.load(os.path.join(moved, model, "fold0", "last.ckpt"), weights_only=False)
        assert state["step"] == state["args"]["steps"] >= 10  # the whole schedule, not stopped part-way
        device_training.main(["collect", os.path.join(moved, model, "fold0"), model, str(tmp_path / "back")])
        pieces = sorted(name for name in os.listdir(tmp_path / "back") if name.startswith(f"{model}_best.pt."))
        joined = b"".join(open(tmp_path / "back" / name, "rb").read() for name in pieces)
        weights = torch.load(io.BytesIO(joined), weights_only=True)
        best = torch.load(os.path.join(moved, model, "fold0", "best_model.pt"), weights_only=True)
        assert all(torch.equal(weights[key], best[key].half()) for key in best)
