"""Export a trained network into the extension: fp16 weights and one model card per task it serves."""

import datetime
import json
import os
import subprocess

import torch

from MSDSegmentLib.modelcard import MODELS_DIR, sha256_of

from .pipeline import REPOSITORY
from .plan import load_json
from .tasks import DATA_CREDITS, TASKS


def code_version():
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPOSITORY, capture_output=True,
                              text=True, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_weights(checkpoint, path):
    """fp16 halves the file; the engine casts back to float32 (the validation figures are measured on
    the exported fp16 weights through the engine, so they include any loss from the cast)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    temporary = path + ".tmp"
    torch.save(state, temporary)
    os.replace(temporary, path)


def stage_entry(plan, weights_name, sha256):
    return {"weights": weights_name, "sha256": sha256, "network": plan["network"], "spacing": plan["spacing"],
            "patch_size": plan["patch_size"], "normalisation": plan["normalisation"], "classes": plan["classes"],
            "mirror_axes": plan["mirror_axes"]}


def card_for(task_id, plan, stage, training, metrics):
    task = TASKS[task_id]
    labels = []
    for label in task["labels"]:
        entry = dict(label)
        entry["trained"] = label["source_class"] in plan["classes"]
        labels.append(entry)
    dataset = plan["dataset"]["name"]
    return {
        "task": task_id, "title": task["title"], "description": task["description"],
        "modality": plan["modality"], "channels": plan["channels"], "labels": labels, "stages": [stage],
        "postprocessing": {"keep_largest": True, "min_tumour_ml": 0.5},
        "training": {**training, "data": DATA_CREDITS.get(dataset, {}).get("source", dataset)},
        "validation": metrics.get(task_id, {"note": "not yet measured"}),
        "licence": "Model weights: Apache-2.0. Training data: " + DATA_CREDITS.get(dataset, {}).get("licence", "see source"),
    }


def write_json(data, path):
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        json.dump(data, stream, indent=2)
        stream.write("\n")
    os.replace(temporary, path)


def export_model(model_name, plan, split, checkpoint, models_dir, metrics, steps=None):
    os.makedirs(models_dir, exist_ok=True)
    weights_name = f"{model_name}.pt"
    weights_path = os.path.join(models_dir, weights_name)
    save_weights(checkpoint, weights_path)
    stage = stage_entry(plan, weights_name, sha256_of(weights_path))
    training = {"model": model_name, "date": datetime.date.today().isoformat(), "code_version": code_version(),
                "training_cases": split["training"], "validation_cases": split["validation"],
                "excluded_cases": plan["dataset"].get("excluded", []), "steps": steps,
                "label_mapping": plan["dataset"]["label_mapping"]}
    written = []
    for task_id, task in TASKS.items():
        if task["model"] == model_name:
            path = os.path.join(models_dir, f"{task_id}.json")
            write_json(card_for(task_id, plan, stage, training, metrics), path)
            written.append(path)
    return weights_path, written


def run_export(args):
    base = os.path.join(args.out, args.model)
    run_dir = os.path.join(base, f"fold{args.fold}")
    plan = load_json(os.path.join(base, "plan.json"))
    split = load_json(os.path.join(run_dir, "split.json"))
    metrics = load_json(args.metrics) if args.metrics else {}
    checkpoint = args.checkpoint or os.path.join(run_dir, "best_model.pt")
    steps = None
    last = os.path.join(run_dir, "last.ckpt")
    if os.path.exists(last):
        state = torch.load(last, map_location="cpu", weights_only=False)
        steps = state["best"]["step"] if not args.checkpoint else state["step"]
    weights, cards = export_model(args.model, plan, split, checkpoint, args.models_dir or MODELS_DIR, metrics, steps)
    print(f"exported {weights} ({os.path.getsize(weights) / 1e6:.1f} MB) and {', '.join(cards)}")
