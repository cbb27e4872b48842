"""Neighbour classes: the abdominal stages trained with each neighbouring organ the data labels as a class of its
own (`train --neighbours`). Plan, cache, training, export and engine carry them as ordinary classes; the tasks
still output only their own labels, and the cards say which classes are context."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from MSDSegmentLib import modelcard
from MSDSegmentLib.engine import segment
from MSDSegmentLib.imageio import read_channels
from Training import cli
from Training.cache import load_case
from Training.models import ABDOMINAL_ORGANS, MODELS, LabelMappingError, label_mapping, with_neighbours
from Training.tasks import TASKS
from test_training import BTCV_LABELS, TINY, write_dataset

OWN = {"abdomen": ["spleen", "liver", "pancreas"], "abdomen-fine": ["spleen", "liver", "pancreas"],
       "pancreas-fine": ["pancreas"]}


def test_every_btcv_organ_a_model_does_not_segment_becomes_a_context_class():
    for model, own in OWN.items():
        extended = with_neighbours(model, MODELS[model], BTCV_LABELS)
        context = [organ for organ in ABDOMINAL_ORGANS if organ not in own]
        assert extended["context_classes"] == context
        assert extended["classes"] == MODELS[model]["classes"] + context
        # Every BTCV organ is read into a class of its own: 13 organs, 13 distinct classes.
        mapping = label_mapping(extended, BTCV_LABELS, optional=tuple(MODELS[model].get("synthetic_lesions", {})))
        assert sorted(mapping) == list(range(1, 14)) and len(set(mapping.values())) == 13
    assert MODELS["abdomen"]["classes"] == ["background", "spleen", "liver", "pancreas"]  # the shipped model's


def test_only_the_neighbours_a_dataset_labels_are_learnt_and_none_is_an_error():
    labels = {"0": "background", "1": "spleen", "3": "Left Kidney", "6": "liver", "11": "pancreas"}
    assert with_neighbours("abdomen", MODELS["abdomen"], labels)["context_classes"] == ["left kidney"]
    with pytest.raises(LabelMappingError, match="no neighbour class that the dataset labels"):
        with_neighbours("abdomen", MODELS["abdomen"],
                        {"0": "background", "1": "spleen", "6": "liver", "11": "pancreas"})
    with pytest.raises(LabelMappingError, match="model 'prostate' has no neighbour class"):
        with_neighbours("prostate", MODELS["prostate"], {"0": "background", "1": "PZ", "2": "TZ"})


@pytest.fixture(scope="module")
def neighbour_cascade(tmp_path_factory):
    """The pancreas task's stages trained two steps each with --neighbours on a synthetic dataset that labels
    a left kidney beside its spleen, liver and pancreas, exported in cascade order."""
    data = write_dataset(str(tmp_path_factory.mktemp("data")))
    out, models = str(tmp_path_factory.mktemp("runs")), str(tmp_path_factory.mktemp("models"))
    for model in TASKS["pancreas"]["models"]:
        argv = ["train", "--model", model, "--neighbours", "--data", data, "--out", out, *TINY, "--steps", "2",
                "--val-every", "1", "--device", "cpu", "--quiet"]
        assert cli.main(argv) == 0
        assert cli.main(["export", "--model", model, "--out", out, "--models-dir", models]) == 0
    return {"data": data, "out": out, "models": models}


def test_plan_and_cache_carry_the_context_classes(neighbour_cascade):
    with open(os.path.join(neighbour_cascade["out"], "pancreas-fine", "plan.json"), encoding="utf-8") as stream:
        plan = json.load(stream)
    # The pancreas stage learns every other organ of the data as context: the spleen, left kidney and liver.
    assert plan["classes"] == ["background", "pancreas", "pancreatic tumour", "spleen", "left kidney", "liver"]
    assert plan["context_classes"] == ["spleen", "left kidney", "liver"]
    assert plan["network"]["out_channels"] == 6
    assert plan["dataset"]["label_mapping"] == {"11": 1, "1": 3, "3": 4, "6": 5}
    cache = os.path.join(neighbour_cascade["out"], "abdomen", "cache")
    case = load_case(cache, "synth_00", 5)  # background, spleen, liver, pancreas, left kidney
    reference = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(neighbour_cascade["data"], "labelsTr",
                                                                   "synth_00.nii.gz")))
    assert (reference == 3).any() and (case["label"] == 4).any() and len(case["locations"][4])  # the kidney
    with open(os.path.join(neighbour_cascade["out"], "abdomen", "fold0", "val_log.csv"), encoding="utf-8") as stream:
        assert "dice_left kidney" in stream.readline()  # validated like every class


def test_cards_name_the_context_classes_and_tasks_output_only_their_labels(neighbour_cascade):
    cards = modelcard.catalogue(neighbour_cascade["models"])
    pancreas = cards["pancreas"]
    assert [stage.model for stage in pancreas.stages] == TASKS["pancreas"]["models"]
    assert [stage.context_classes for stage in pancreas.stages] == [["left kidney"], ["left kidney"],
                                                                    ["spleen", "left kidney", "liver"],
                                                                    ["spleen", "left kidney", "liver"]]
    assert all(stage.classes[-len(stage.context_classes):] == stage.context_classes for stage in pancreas.stages)
    assert [label.name for label in pancreas.labels] == ["Pancreas", "Pancreatic tumour"]
    channels = read_channels([os.path.join(neighbour_cascade["data"], "imagesTr", "synth_00.nii.gz")])
    for task in ("pancreas", "spleen"):
        result = segment(channels, task, device="cpu", models_dir=neighbour_cascade["models"])
        values = set(np.unique(sitk.GetArrayViewFromImage(result.labels)).tolist())
        assert values <= {0} | {label.value for label in result.card.trained_labels}
        assert set(result.volumes_ml) == {label.value for label in result.card.trained_labels}


def test_a_stage_with_context_classes_follows_one_without(neighbour_cascade, tmp_path):
    """The cascade matches classes by name: a fine stage with neighbours runs after a coarse stage without them
    (the shipped one), and a card without `context_classes` (every card before them) still loads."""
    out = neighbour_cascade["out"]
    plain = str(tmp_path / "plain")
    argv = ["train", "--model", "abdomen", "--data", neighbour_cascade["data"], "--out", plain, *TINY, "--steps", "1",
            "--val-every", "1000", "--device", "cpu", "--quiet"]
    assert cli.main(argv) == 0
    models = str(tmp_path / "models")
    assert cli.main(["export", "--model", "abdomen", "--out", plain, "--models-dir", models]) == 0
    for model in TASKS["pancreas"]["models"][1:]:
        assert cli.main(["export", "--model", model, "--out", out, "--models-dir", models]) == 0
    card_path = os.path.join(models, "pancreas.json")
    with open(card_path, encoding="utf-8") as stream:
        card = json.load(stream)
    del card["stages"][0]["context_classes"]
    with open(card_path, "w", encoding="utf-8") as stream:
        json.dump(card, stream)
    pancreas = modelcard.find_card("pancreas", models)
    assert [stage.context_classes for stage in pancreas.stages][:2] == [[], ["left kidney"]]
    channels = read_channels([os.path.join(neighbour_cascade["data"], "imagesTr", "synth_00.nii.gz")])
    result = segment(channels, "pancreas", device="cpu", models_dir=models)
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labels)).tolist()) <= {0, 1, 2}


def test_neighbours_on_a_plan_made_without_them_is_refused(neighbour_cascade, tmp_path, capsys):
    plain = str(tmp_path)
    common = ["--model", "abdomen", "--data", neighbour_cascade["data"], "--out", plain, *TINY, "--device", "cpu",
              "--quiet", "--val-every", "1000"]
    assert cli.main(["train", *common, "--steps", "0"]) == 0
    assert cli.main(["train", *common, "--steps", "1", "--neighbours"]) == 2
    assert "context classes []" in capsys.readouterr().err


def test_init_from_exported_weights_keeps_the_output_channels_of_the_classes_they_had(tmp_path):
    """A stage with more classes (neighbours, tumours) started from exported weights predicts at first what they
    predicted: the card beside the weights names their classes, whose channels are kept; new classes start as the
    background (an argmax ties to it)."""
    import torch

    from MSDSegmentLib.network import build_network
    from Training.train import initialise_from

    config = {"in_channels": 1, "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
              "filters": [4, 8, 16]}
    source_classes = ["background", "spleen", "liver", "pancreas"]
    classes = ["background", "spleen", "liver", "liver tumour", "pancreas", "left kidney"]
    torch.manual_seed(0)
    source = build_network(dict(config, out_channels=4))
    torch.save({k: v.half() for k, v in source.state_dict().items()}, str(tmp_path / "abdomen.pt"))
    source.load_state_dict({k: v.half().float() for k, v in source.state_dict().items()})  # as exported
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected_logits = source.eval()(image)
        expected = expected_logits.argmax(1)

    bare = build_network(dict(config, out_channels=6))
    initialise_from(bare, str(tmp_path / "abdomen.pt"), classes=classes)  # no card: the output layer starts fresh
    card = {"stages": [{"weights": "abdomen.pt", "classes": source_classes}]}
    (tmp_path / "spleen.json").write_text(json.dumps(card))
    messages = []
    network = build_network(dict(config, out_channels=6))
    initialise_from(network, str(tmp_path / "abdomen.pt"), messages.append, classes)
    assert "new: liver tumour, left kidney" in messages[0]
    weight = network.state_dict()["output_block.conv.conv.weight"]
    assert torch.equal(weight[4], source.state_dict()["output_block.conv.conv.weight"][3])
    assert torch.equal(weight[3], weight[0]) and torch.equal(weight[5], weight[0])  # new classes: the background's
    with torch.no_grad():
        logits = network.eval()(image)
        # The source's classes give its logits; each new class gives the background's (equal up to the rounding of
        # the convolution's vectorised channels, so their argmax against the background is a tie, not compared).
        assert torch.allclose(logits[:, [0, 1, 2, 4]], expected_logits, atol=1e-4)
        assert torch.allclose(logits[:, [3, 5]], logits[:, [0, 0]], atol=1e-4)
        assert not torch.equal(bare.eval()(image).argmax(1), torch.tensor([0, 1, 2, 4])[expected])
