"""One definition each: the stage and post-processing settings (export -> card -> engine), the atomic writer and
the bounding box."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from MSDSegmentLib import modelcard
from MSDSegmentLib.atomic import atomic_open, atomic_output, write_json
from MSDSegmentLib.boxes import bounding_box, intersect, union_box, within
from MSDSegmentLib.errors import InputError
from MSDSegmentLib.modelcard import POSTPROCESSING_SETTINGS, STAGE_SETTINGS
from MSDSegmentLib.network import build_network
from Training import export
from Training.models import MODELS
from Training.plan import load_plan, make_plan, save_json
from Training.tasks import TASKS


# ---------------------------------------------------------------------------------------------- settings

def fingerprint():
    """A fingerprint of two made-up CT cases, enough for make_plan."""
    rng = np.random.default_rng(0)
    case = {"spacing": [0.8, 0.8, 2.5], "extent": [400.0, 400.0, 300.0],
            "intensities": [rng.uniform(-100, 250, 500).tolist()], "min": [-1024.0], "max": [3071.0],
            "fraction_at_min": [0.0], "fraction_at_max": [0.0]}
    return {"case_0": case, "case_1": case}


def exported_cards(model_name, model, folder):
    """Export an untrained network of `model` (as Training/models.py defines it) through the plan, as
    `python -m Training export` does; returns the cards written, as JSON and as the engine loads them."""
    plan = make_plan(model_name, model, fingerprint())
    plan["dataset"] = {"name": "BTCV-Abdomen", "label_mapping": {"1": 1, "6": 2, "11": 3}}
    checkpoint = os.path.join(folder, "weights.pt")
    torch.save(build_network(plan["network"]).state_dict(), checkpoint)
    models_dir = os.path.join(folder, "models")
    _, paths = export.export_model(model_name, plan, {"training": ["a"], "validation": ["b"]}, checkpoint,
                                   models_dir, {}, steps=3)
    cards = modelcard.catalogue(models_dir)
    written = {}
    for path in paths:
        with open(path, encoding="utf-8") as stream:
            written[os.path.basename(path)[:-5]] = json.load(stream)
    return written, cards


@pytest.mark.parametrize("changed", [False, True], ids=["defaults", "every setting set"])
def test_a_card_written_by_export_loads_in_the_engine_with_the_same_settings(tmp_path, changed):
    model = dict(MODELS["abdomen"], patch_size=[16, 16, 16], filters=[4, 8, 8])
    if changed:  # a value unlike every default, for each setting
        model.update(roi={"classes": ["liver"], "margin_mm": [1, 2, 3]}, overlap=0.3, blend_previous=0.2,
                     tumour_blend_previous=0.1)
    written, cards = exported_cards("abdomen", model, str(tmp_path))
    assert sorted(written) == ["liver", "organs", "pancreas", "spleen"]
    stage_fields = {f.name for f in dataclasses.fields(modelcard.Stage)}
    for task, data in written.items():
        stage = data["stages"][0]
        assert set(stage) <= stage_fields, "a stage key the engine does not read (renamed?)"
        assert set(STAGE_SETTINGS) <= set(stage), "every stage setting is written under its own name"
        loaded = cards[task].stages[0]
        for name, setting in STAGE_SETTINGS.items():
            expected = model[name] if changed else setting.default
            assert stage[name] == expected and getattr(loaded, name) == expected, name
        assert set(data["postprocessing"]) == set(POSTPROCESSING_SETTINGS)
        for name, setting in POSTPROCESSING_SETTINGS.items():
            expected = TASKS[task].get(name, setting.default)
            assert data["postprocessing"][name] == expected
            assert cards[task].postprocessing_setting(name) == expected, name


def test_a_card_without_a_setting_gets_the_one_default():
    card = modelcard.find_card("spleen")
    bare = dataclasses.replace(card, postprocessing={})
    for name, setting in POSTPROCESSING_SETTINGS.items():
        assert bare.postprocessing_setting(name) == setting.default
    stage = modelcard.Stage(weights="w.pt", sha256="", network={}, spacing=[1, 1, 1], patch_size=[8, 8, 8],
                            normalisation={}, classes=["background"])
    for name, setting in STAGE_SETTINGS.items():
        assert getattr(stage, name) == setting.default
    stage.roi["after"] = "x"  # a mutable default is a fresh copy, not the schema's
    assert STAGE_SETTINGS["roi"].default == {}


def test_a_plan_written_before_the_settings_were_named_once_still_exports_its_overlap(tmp_path):
    path = str(tmp_path / "plan.json")
    save_json({"model": "abdomen-fine", "inference_overlap": 0.25}, path)
    assert load_plan(path)["overlap"] == 0.25 and "inference_overlap" not in load_plan(path)


# ---------------------------------------------------------------------------------------------- atomic writer

def test_atomic_output_replaces_the_file_only_when_the_block_succeeds(tmp_path):
    path = str(tmp_path / "card.json")
    write_json({"version": 1}, path)
    with pytest.raises(RuntimeError):
        with atomic_open(path) as stream:
            stream.write('{"version": 2, "half')
            raise RuntimeError("disk full")
    with open(path, encoding="utf-8") as stream:
        assert json.load(stream) == {"version": 1}
    assert os.listdir(tmp_path) == ["card.json"], "no temporary file is left behind"
    write_json({"version": 2}, path)
    with open(path, encoding="utf-8") as stream:
        assert stream.read() == '{\n  "version": 2\n}\n'


def test_atomic_output_keeps_the_suffix_and_plain_permissions(tmp_path):
    path = str(tmp_path / "cache.npz")
    with atomic_output(path, ".npz") as temporary:
        assert temporary.endswith(".npz") and os.path.dirname(temporary) == str(tmp_path)
        np.savez_compressed(temporary, image=np.arange(3))
    assert np.load(path)["image"].tolist() == [0, 1, 2]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_atomic_output_refuses_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="Output folder does not exist"):
        with atomic_output(str(tmp_path / "missing" / "labels.nii.gz"), ".nii.gz"):
            pass


def test_plan_json_is_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "plan.json")
    save_json({"spacing": [1, 1, 1]}, path)

    def failing_dump(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", failing_dump)
    with pytest.raises(KeyboardInterrupt):
        save_json({"spacing": [2, 2, 2]}, path)
    monkeypatch.undo()
    assert load_plan(path) == {"spacing": [1, 1, 1]} and os.listdir(tmp_path) == ["plan.json"]


# ---------------------------------------------------------------------------------------------- boxes

def test_bounding_box_matches_the_extent_of_the_voxels_in_any_dimension():
    rng = np.random.default_rng(3)
    for shape in [(9,), (7, 11), (6, 8, 10), (3, 4, 5, 6)]:
        mask = rng.random(shape) > 0.97
        mask[tuple(n // 2 for n in shape)] = True
        points = np.argwhere(mask)
        for margin in (0, 1, 3):
            expected = tuple(slice(max(int(lo) - margin, 0), min(int(hi) + margin + 1, n))
                             for lo, hi, n in zip(points.min(axis=0), points.max(axis=0), shape))
            assert bounding_box(mask, margin) == expected
    assert bounding_box(np.zeros((4, 5, 6), bool)) is None


def test_box_arithmetic():
    a, b = (slice(2, 5), slice(0, 3)), (slice(4, 9), slice(1, 2))
    assert union_box([a, b]) == (slice(2, 9), slice(0, 3))
    assert intersect(a, b) == (slice(4, 5), slice(1, 2))
    outer = union_box([a, b])
    whole = np.zeros((10, 10))
    whole[b] = 1
    assert np.array_equal(whole[outer][within(b, outer)], whole[b])
