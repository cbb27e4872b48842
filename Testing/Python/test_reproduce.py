"""Recipes: each shipped stage's recorded training runs (Training/recipes), checked against the shipped cards, and
one replayed end to end by `python -m Training reproduce`, shortened and tiny, into a folder that it exports."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPOSITORY
from MSDSegmentLib import modelcard
from MSDSegmentLib.engine import segment
from MSDSegmentLib.imageio import read_channels
from Training import cli
from Training.dataset import read_dataset
from Training.reproduce import dataset_view, load_recipe, replay_order, scaled
from Training.tasks import TASKS
from test_training import TINY, write_dataset

SHIPPED = ["abdomen", "abdomen-fine", "abdomen-wide", "abdomen-neighbours", "pancreas-wide", "pancreas-fine",
           "liver-fine", "prostate"]


def shipped_stages():
    return {stage.model: stage for card in modelcard.catalogue().values() for stage in card.stages}


@pytest.mark.parametrize("model", SHIPPED)
def test_every_shipped_stage_has_a_recipe_that_its_card_names(model):
    recipe = load_recipe(model)
    stage = shipped_stages()[model]
    assert recipe["shipped"]["sha256"] == stage.sha256 and recipe["shipped"]["steps"] == stage.steps
    parser = cli.build_parser()
    for run in recipe["runs"]:
        parser.parse_args(["train", "--model", model, "--fold", str(run.get("fold", 0)), *run["flags"]])
        start = run.get("init_from")
        if start:
            source = load_recipe(start.get("recipe", model))
            assert start["run"] in [r["name"] for r in source["runs"]] and start["weights"] in ("best", "last")
        assert run["history"] and run["code_version"]
    assert list(replay_order(model))[-1] == model  # what it starts from, and the stages before it, come first
    cards = [card for card in modelcard.catalogue().values()
             if not card.parts and model in [stage.model for stage in card.stages]]
    assert cards and all(card.training["recipes"][model] == f"Training/recipes/{model}.json" for card in cards)


def test_a_run_s_data_can_leave_cases_out_without_copying_them(tmp_path):
    data = write_dataset(str(tmp_path / "data"))
    recipe, run = {"model": "prostate"}, {"name": "fold0", "data": {"without": ["synth_00", "synth_03"]}}
    view = dataset_view(str(tmp_path / "replay"), recipe, run, data)
    _, cases = read_dataset(view)
    assert [case["id"] for case in cases] == ["synth_01", "synth_02", "synth_04"]
    assert all(case["image"].startswith(data) for case in cases)
    assert dataset_view(str(tmp_path / "replay"), recipe, {"name": "all"}, data) == data


def test_shortening_divides_every_step_count():
    assert scaled(["--steps", "3500", "--val-every", "250", "--stop-at", "2500", "--lr", "5e-4"], 1000) == \
        ["--steps", "3", "--val-every", "1", "--stop-at", "2", "--lr", "5e-4"]


def sha256(path):
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def test_the_pancreas_recipe_replays_shortened_end_to_end_and_exports(tmp_path, capsys):
    """The pancreas stage's recipe with the recipes of the stages before it and of the fine stage it starts from:
    14 runs, each 1/1000 of its steps on a tiny network, into one folder; then the pancreas task segments with what
    it exported. A second replay finds every run done and trains nothing."""
    data = write_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "replay")
    argv = ["reproduce", "pancreas-fine", "--out", out, "--data", data, "--shorten", "1000", "--device", "cpu",
            "--train-flags", " ".join(TINY), "--quiet"]
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "abdomen-fine / fold0-9000: Resumed with --steps 9000" in log
    runs = os.path.join(out, "runs")
    folders = ["runs/abdomen/fold0", "runs/abdomen/foldall", "runs/abdomen-fine/fold0", "runs/abdomen-fine/foldall",
               "runs/abdomen-neighbours/fold0", "runs/abdomen-neighbours/foldall", "runs/pancreas-wide/fold0",
               "runs/tumour/pancreas-wide/fold0", "runs/tumour/pancreas-wide/foldall", "runs/pancreas-fine/fold0",
               "runs/pancreas-fine/foldall"]
    steps = [torch.load(os.path.join(out, folder, "last.ckpt"), weights_only=False)["step"] for folder in folders]
    assert steps == [2, 1, 9, 1, 8, 1, 9, 4, 1, 3, 1]

    def plan(folder):
        with open(os.path.join(out, folder, "plan.json"), encoding="utf-8") as stream:
            return json.load(stream)

    fine, wide, wide_tumour = plan("runs/abdomen-fine"), plan("runs/pancreas-wide"), plan("runs/tumour/pancreas-wide")
    assert fine["lesion_centred_fraction"] == 0.45 and fine["neighbour_masses"] == {}  # the runs' own settings
    assert (wide["lesion_probability"], wide_tumour["lesion_probability"]) == (0.5, 0.8)
    assert wide_tumour["context_classes"] == ["spleen", "left kidney", "liver"]
    assert sorted(os.listdir(os.path.join(out, "weights"))) == [
        "abdomen-fine-fold0-9000-last.pt", "abdomen-fold0-best.pt", "abdomen-neighbours-fold0-best.pt",
        "pancreas-fine-fold0-best.pt", "pancreas-wide-fold0-9000-best.pt", "pancreas-wide-fold0-tumour-best.pt"]
    models = os.path.join(out, "models")
    card = modelcard.find_card("pancreas", models)
    assert [stage.model for stage in card.stages] == TASKS["pancreas"]["models"]
    assert [stage.steps for stage in card.stages] == [1, 1, 1, 1]
    assert card.training["recipes"]["pancreas-fine"] == "Training/recipes/pancreas-fine.json"
    result = segment(read_channels([os.path.join(data, "imagesTr", "synth_00.nii.gz")]), "pancreas", device="cpu",
                     models_dir=models)
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labels)).tolist()) <= {0, 1, 2}

    exported = sha256(os.path.join(models, "pancreas-fine.pt"))
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert log.count(": done (step") == 14 and "initialised from" not in log
    assert sha256(os.path.join(models, "pancreas-fine.pt")) == exported


def test_a_recipe_replays_under_torchrun(tmp_path):
    """Two CPU ranks (gloo) replay a two-run recipe in one process group: rank 0 writes the weights the second run
    starts from and the export, both ranks train both runs."""
    data = write_dataset(str(tmp_path / "data"))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = {"model": "abdomen", "summary": "", "shipped": {}, "fidelity": "",
              "runs": [{"name": "fold0", "fold": 0, "flags": ["--steps", "2", "--val-every", "1"], "history": "first"},
                       {"name": "all", "fold": "all", "flags": ["--steps", "1", "--val-every", "1"],
                        "init_from": {"run": "fold0", "weights": "best"}, "history": "second"}],
              "ships": {"run": "all", "weights": "last"}}
    (recipes / "abdomen.json").write_text(json.dumps(recipe))
    out = str(tmp_path / "replay")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(tmp_path / "torchrun-logs"), "-m", "Training", "reproduce", "abdomen", "--out", out,
               "--data", data, "--recipes", str(recipes), "--device", "cpu",
               "--train-flags", " ".join(TINY + ["--batch-size", "1"]), "--quiet"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([REPOSITORY, os.path.join(REPOSITORY, "MSDSegment")]),
                       OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, env=environment, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 ranks at step 1: largest weight difference from rank 0 0\n" in result.stdout
    assert "initialised from" in result.stdout and "abdomen-fold0-best.pt" in result.stdout
    assert modelcard.find_card("spleen", os.path.join(out, "models")).stages[0].steps == 1
