"""Export a trained network into the extension: fp16 weights and one model card per task it serves."""

import datetime
import json
import os
import subprocess

import torch

from MSDSegmentLib.errors import MSDSegmentError
from MSDSegmentLib import terminology
from MSDSegmentLib.atomic import atomic_open, write_json
from MSDSegmentLib.modelcard import (MODELS_DIR, POSTPROCESSING_SETTINGS, STAGE_SETTINGS, catalogue, settings_from,
                                    sha256_of)

from .pipeline import REPOSITORY
from .plan import load_json, load_plan
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
    if checkpoint.endswith(".ckpt"):  # a training checkpoint (trusted: this project's own run)
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    # Saved through a stream: given a file name, torch.save names the archive inside after it, and the atomic
    # writer's temporary name would make every export of the same weights differ byte for byte.
    with atomic_open(path, "wb") as stream:
        torch.save(state, stream)


def stage_entry(model_name, plan, weights_name, sha256, steps):
    """The card's entry for a stage: the plan's decisions and every one of its STAGE_SETTINGS, under their names."""
    return {"model": model_name, "weights": weights_name, "sha256": sha256, "network": plan["network"],
            "spacing": plan["spacing"], "patch_size": plan["patch_size"], "normalisation": plan["normalisation"],
            "classes": plan["classes"], "context_classes": plan.get("context_classes", []),
            "mirror_axes": plan["mirror_axes"], "steps": steps, **settings_from(plan, STAGE_SETTINGS)}


def read_card(path):
    if not os.path.exists(path):
        return {"stages": []}
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def cascade(task_id, stage, card):
    """The task's stages with `stage` put in its place: a cascade's other stages are kept from the card
    already there (export the coarse stage first); stages not exported yet are left out, but a stage that
    segments the region found by a missing one cannot be."""
    existing = {entry.get("model"): entry for entry in card["stages"]}
    existing[stage["model"]] = stage
    stages = [existing[name] for name in TASKS[task_id]["models"] if name in existing]
    for previous, entry in zip([None] + stages, stages):
        after = entry["roi"].get("after") if entry.get("roi") else None
        if after and (previous is None or previous["model"] != after):
            raise MSDSegmentError(f"task '{task_id}': stage '{entry['model']}' needs stage '{after}' before it: "
                                  f"export --model {after} first")
    return stages


def task_labels(task_id, plan):
    """The task's labels as the model of `plan` (the card's last stage) outputs them."""
    labels = []
    for label in TASKS[task_id]["labels"]:
        entry = dict(label)
        entry["trained"] = label["source_class"] in plan["classes"]
        if entry["trained"] and label["source_class"] in plan.get("synthetic_lesions", {}) and \
                not set(plan["dataset"]["label_mapping"].values()) & {plan["classes"].index(label["source_class"])}:
            entry["note"] = ("learnt from synthetic lesions only (the training CT have no tumour labels); "
                             "see the README for what that means")
        labels.append(entry)
    return labels


def with_locations(labels, card):
    """Where the organs lie and their volumes (`python -m Training locations`) do not depend on the weights: a
    re-exported card keeps what the card there had learnt."""
    known = {label["name"]: {key: label[key] for key in ("location", "volume_ml") if label.get(key)}
             for label in card.get("labels", [])}
    return [dict(label, **known.get(label["name"], {})) for label in labels]


def recipes_of(stages):
    """Where the recorded recipe of each stage is (`python -m Training reproduce` replays it), by model."""
    paths = {stage["model"]: f"Training/recipes/{stage['model']}.json" for stage in stages}
    return {model: path for model, path in paths.items() if os.path.isfile(os.path.join(REPOSITORY, path))}


def card_for(task_id, plan, stages, labels, training, metrics):
    task = TASKS[task_id]
    dataset = plan["dataset"]["name"]
    return {
        "task": task_id, "title": task["title"], "description": task["description"],
        "modality": plan["modality"], "channels": plan["channels"], "labels": labels, "stages": stages,
        "postprocessing": settings_from(task, POSTPROCESSING_SETTINGS),
        "training": {**training, "data": DATA_CREDITS.get(dataset, {}).get("source", dataset),
                     "recipes": recipes_of(stages)},
        "validation": metrics.get(task_id, {"note": "not yet measured"}),
        "licence": "Model weights: Apache-2.0. Training data: " + DATA_CREDITS.get(dataset, {}).get("licence", "see source"),
    }


def figures_of_held_back_weights(metrics, cases):
    """Weights trained on every case (fold "all") have no held-back case of their own: their cards carry the
    figures of the same recipe's fold weights, measured before on the cases those did not train on, and say so."""
    note = (f"measured with the same recipe's fold weights, which did not train on these cases; the weights that "
            f"ship then trained on all {cases} labelled cases, these included")
    return {task: dict(entry, weights=note) for task, entry in metrics.items()}


def export_model(model_name, plan, split, checkpoint, models_dir, metrics, steps=None):
    os.makedirs(models_dir, exist_ok=True)
    weights_name = f"{model_name}.pt"
    weights_path = os.path.join(models_dir, weights_name)
    stage = stage_entry(model_name, plan, weights_name, None, steps)
    training = {"model": model_name, "date": datetime.date.today().isoformat(), "code_version": code_version(),
                "training_cases": split["training"], "validation_cases": split["validation"],
                "excluded_cases": plan["dataset"].get("excluded", []), "steps": steps,
                "label_mapping": plan["dataset"]["label_mapping"]}
    if not split["validation"]:
        metrics = figures_of_held_back_weights(metrics, len(split["training"]))
    cards = {}
    for task_id, task in TASKS.items():
        if model_name in task["models"]:
            path = os.path.join(models_dir, f"{task_id}.json")
            existing = read_card(path)
            stages = cascade(task_id, stage, existing)
            if stages[-1] is stage:
                labels, last_training = task_labels(task_id, plan), training
            else:  # the labels and training record are the last stage's: re-exporting a coarse stage keeps them
                labels, last_training = existing["labels"], existing["training"]
            cards[path] = card_for(task_id, plan, stages, with_locations(labels, existing), last_training, metrics)
            # The quality flag's calibration is kept (`python -m Training quality` renews it); the precision
            # measurement is not: it belongs to the weights (`python -m Training precision` measures new ones).
            if existing.get("quality"):
                cards[path]["quality"] = existing["quality"]
    # Every card is checked before anything is written.
    save_weights(checkpoint, weights_path)
    stage["sha256"] = sha256_of(weights_path)  # the stage entry every card shares
    for path, card in cards.items():
        write_json(card, path)
    return weights_path, list(cards)


def steps_behind(checkpoint, run_dir):
    """Training steps behind the exported weights: the best step of the run's last checkpoint by default,
    a full checkpoint's own step, or None for other weights (a copied best_model.pt: give --steps)."""
    path = checkpoint or os.path.join(run_dir, "last.ckpt")
    if not path.endswith(".ckpt") or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["step"] if checkpoint else state["best"]["step"]


def run_export(args):
    base = os.path.join(args.out, args.model)
    run_dir = os.path.join(base, f"fold{args.fold}")
    plan = load_plan(os.path.join(base, "plan.json"))
    split = load_json(os.path.join(run_dir, "split.json"))
    metrics = load_json(args.metrics) if args.metrics else {}
    checkpoint = args.checkpoint or os.path.join(run_dir, "best_model.pt")
    steps = args.steps if args.steps is not None else steps_behind(args.checkpoint, run_dir)
    models_dir = args.models_dir or MODELS_DIR
    weights, cards = export_model(args.model, plan, split, checkpoint, models_dir, metrics, steps)
    print(f"exported {weights} ({os.path.getsize(weights) / 1e6:.1f} MB) and {', '.join(cards)}")
    if os.path.abspath(models_dir) == os.path.abspath(MODELS_DIR):  # the shipped terminology follows the cards
        terminology.write_context_file(catalogue(MODELS_DIR))
        print(f"updated {terminology.TERMINOLOGY_FILE}")
