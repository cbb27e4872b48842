"""The abdomen task: the liver, spleen and pancreas tasks in one run, their shared stages run once, their labels
merged into one map with the values its card gives, and voxels two tasks claim settled by the card's rule."""

import json
import os
import shutil

import numpy as np
import pytest

from images import synthetic_ct
from MSDSegmentLib import engine, modelcard
from MSDSegmentLib.engine import segment
from MSDSegmentLib.errors import ModelError
from MSDSegmentLib.preprocessing import to_array

PARTS = {"liver": {1: 1, 2: 2}, "spleen": {1: 3}, "pancreas": {1: 4, 2: 5}}


def expected_union(single, order=("pancreas", "spleen", "liver")):
    """The single tasks' label maps moved to the abdomen values, the first task in `order` keeping a voxel."""
    union = np.zeros_like(next(iter(single.values())))
    for task in order:
        for value, combined in PARTS[task].items():
            union[(single[task] == value) & (union == 0)] = combined
    return union


def test_the_combined_card_takes_names_colours_codes_and_figures_from_the_single_cards():
    cards = modelcard.catalogue()
    abdomen = cards["abdomen"]
    assert [part.card.task for part in abdomen.parts] == ["pancreas", "spleen", "liver"]  # the overlap order
    assert [(label.value, label.name) for label in abdomen.trained_labels] == [
        (1, "Liver"), (2, "Liver tumour"), (3, "Spleen"), (4, "Pancreas"), (5, "Pancreatic tumour")]
    for part in abdomen.parts:
        for single in part.card.trained_labels:
            combined = abdomen.label(part.values[single.value])
            assert (combined.name, combined.color, combined.terminology, combined.kind, combined.organ) == \
                (single.name, single.color, single.terminology, single.kind, single.organ)
            if single.name in part.card.validation.get("dice", {}):
                assert abdomen.validation["dice"][single.name] == part.card.validation["dice"][single.name]
    assert sorted(stage.weights for stage in abdomen.stages) == \
        sorted({stage.weights for part in abdomen.parts for stage in part.card.stages})
    assert abdomen.auto_precisions() == [name for name in ("bf16", "fp16")
                                         if all(name in part.card.auto_precisions() for part in abdomen.parts)]


def test_a_combined_task_is_offered_only_with_all_its_parts_and_a_bad_definition_is_named(tmp_path):
    folder = str(tmp_path / "models")
    shutil.copytree(modelcard.MODELS_DIR, folder, ignore=shutil.ignore_patterns("*.pt"))
    os.remove(os.path.join(folder, "pancreas.json"))
    assert "abdomen" not in modelcard.catalogue(folder)
    shutil.copy(os.path.join(modelcard.MODELS_DIR, "pancreas.json"), folder)
    path = os.path.join(folder, "abdomen.json")
    with open(path, encoding="utf-8") as stream:
        definition = json.load(stream)
    definition["combines"][0]["values"] = {"Liver lobe": 1}
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(definition, stream)
    with pytest.raises(ModelError, match="no trained label 'Liver lobe'"):
        modelcard.catalogue(folder)


def test_voxels_two_tasks_claim_go_to_the_first_task_of_the_overlap_order(tiny_models_dir, monkeypatch):
    """Each task is made to label the same slab: the pancreas keeps it, the spleen keeps what the pancreas
    left, the liver gets the rest; the volumes are those of the merged map."""
    image = synthetic_ct()
    size = image.GetSize()

    def fake_labels(cascade, card, target, keep_largest, report):  # arrays and boxes in (z, y, x) order
        labels = np.zeros(size[::-1], np.uint8)
        reach = {"pancreas": 10, "spleen": 20, "liver": 40}[card.task]
        labels[..., :reach] = 1
        labels[..., :3] = 2 if len(card.trained_labels) > 1 else 1
        return labels, tuple(slice(0, n) for n in size[::-1]), {}

    monkeypatch.setattr(engine, "task_labels", fake_labels)
    result = segment([image], "abdomen", models_dir=tiny_models_dir, device="cpu")
    labels = to_array(result.labels)
    assert (labels[:3] == 5).all() and (labels[3:10] == 4).all()
    assert (labels[10:20] == 3).all() and (labels[20:40] == 1).all() and (labels[40:] == 0).all()
    voxel_ml = np.prod(image.GetSpacing()) / 1000
    assert result.volumes_ml[3] == pytest.approx(10 * size[1] * size[2] * voxel_ml)
    assert result.volumes_ml[2] == 0.0


def test_shared_stages_run_once(tiny_models_dir, monkeypatch):
    calls = []
    original = engine.run_network

    def counting(stage, *args, **kwargs):
        calls.append(stage.weights)
        return original(stage, *args, **kwargs)

    monkeypatch.setattr(engine, "run_network", counting)
    segment([synthetic_ct()], "abdomen", models_dir=tiny_models_dir, device="cpu")
    assert sorted(calls) == ["abdomen-fine.pt", "abdomen-neighbours.pt", "abdomen.pt", "liver-fine.pt",
                             "pancreas-fine.pt", "pancreas-wide.pt"]


def test_each_part_finds_only_the_stages_it_shares_with_the_parts_still_to_run(tiny_models_dir, monkeypatch):
    """The pancreas part runs first (it keeps a voxel two parts claim) and its four stages are forgotten once it is
    done, all but the coarse stage the spleen and liver share; the spleen's fine stage is kept for the liver."""
    held, original = [], engine.task_labels

    def recording(cascade, card, *args):
        held.append((card.task, len(cascade.done)))
        return original(cascade, card, *args)

    monkeypatch.setattr(engine, "task_labels", recording)
    segment([synthetic_ct()], "abdomen", models_dir=tiny_models_dir, device="cpu")
    assert held == [("pancreas", 0), ("spleen", 1), ("liver", 2)]


def test_abdomen_is_the_union_of_the_single_tasks_voxel_for_voxel_on_a_real_ct():
    from conftest import BTCV, require
    from MSDSegmentLib.imageio import read_channels

    folder = require(BTCV)
    cards = modelcard.catalogue()
    if "abdomen" not in cards or modelcard.missing_weights(cards["abdomen"]):
        pytest.skip("bundled abdominal models not found")
    image = read_channels([os.path.join(folder, "imagesTr", "btcv_00.nii.gz")])[0]
    single = {task: to_array(segment([image], task, device="cpu", precision="fp32").labels) for task in PARTS}
    combined = segment([image], "abdomen", device="cpu", precision="fp32")
    assert np.array_equal(to_array(combined.labels), expected_union(single))
    assert all(np.any(single[task] == 1) for task in PARTS), "an organ was not found: the check is void"
    assert combined.labels.GetSize() == image.GetSize()
