"""`python -m Training reproduce MODEL`: replay the recorded recipe of a shipped stage into one folder.

A recipe (`Training/recipes/<model>.json`) lists every training run behind the stage's shipped weights, in order:
its flags, fold, data, the plan settings it ran with where they differ from `models.py` today, and what its
weights start from (nothing, an earlier run's best or last weights, or a run of another stage's recipe). The
replay runs the recipes its runs start from and the stages before it in its cascade first, then exports every
replayed stage's shipped run into `<out>/models`, coarse stage first, so the folder holds a working cascade.

Each run trains in `<out>/<run out>/<model>/fold<K>` with `--resume`, and a run whose checkpoint has reached its
last step is skipped: a replay stopped anywhere continues where it stopped. The device is the training's (the CPU,
a GPU); started under `torchrun` every rank replays the recipe together, and rank 0 writes the weights that the
next run starts from and the export.
"""

import os
import shlex

import torch

from MSDSegmentLib.errors import MSDSegmentError

from .dataset import read_dataset
from .export import export_model, save_weights, write_json
from .models import MODELS
from .pipeline import REPOSITORY, prepare, run_training
from .plan import load_json, save_json
from .tasks import TASKS
from .train import Distributed

RECIPES_DIR = os.path.join(REPOSITORY, "Training", "recipes")
WEIGHTS = {"best": "best_model.pt", "last": "last.ckpt"}


def recipe_path(model, recipes_dir=RECIPES_DIR):
    return os.path.join(recipes_dir, f"{model}.json")


def load_recipe(model, recipes_dir=RECIPES_DIR):
    path = recipe_path(model, recipes_dir)
    if not os.path.isfile(path):
        raise MSDSegmentError(f"no recipe for model '{model}' ({path})")
    recipe = load_json(path)
    names = [run["name"] for run in recipe["runs"]]
    if recipe.get("model") != model or not names or len(set(names)) != len(names):
        raise MSDSegmentError(f"{path}: a recipe names its model and runs with distinct names")
    if recipe["ships"]["run"] not in names:
        raise MSDSegmentError(f"{path}: ships run '{recipe['ships']['run']}', which it does not list")
    return recipe


def previous_stage(model):
    """The stage a model's region comes from (its roi's `after`), or None for a first stage."""
    return MODELS[model].get("roi", {}).get("after")


def replay_order(model, recipes_dir=RECIPES_DIR):
    """{model: recipe} of every recipe a replay of `model` needs, each after those it depends on."""
    ordered = {}

    def visit(name, path):
        if name in ordered:
            return
        if name in path:
            raise MSDSegmentError(f"recipes depend on each other in a circle: {' -> '.join(path + [name])}")
        recipe = load_recipe(name, recipes_dir)
        needed = [run["init_from"]["recipe"] for run in recipe["runs"] if run.get("init_from", {}).get("recipe")]
        for other in needed + [previous_stage(name)]:
            if other and other != name:
                visit(other, path + [name])
        ordered[name] = recipe

    visit(model, [])
    return ordered


def scaled(flags, shorten):
    """The run's flags with every step count divided by `shorten` (at least 1): a short replay of the same runs."""
    out = list(flags)
    for index, flag in enumerate(out[:-1]):
        if flag in ("--steps", "--stop-at", "--val-every"):
            out[index + 1] = str(max(1, int(out[index + 1]) // shorten))
    return out


def run_folder(out, recipe, run):
    return os.path.join(out, run.get("out", "runs"), recipe["model"], f"fold{run.get('fold', 0)}")


def last_step(run_dir):
    path = os.path.join(run_dir, "last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)["step"] if os.path.exists(path) else 0


def dataset_view(out, recipe, run, data):
    """The run's data: the dataset folder, or a view of it without the cases the run left out (a dataset.json of
    its own whose entries point at the original files; nothing is copied)."""
    folder = os.path.abspath(data or os.path.join(REPOSITORY, MODELS[recipe["model"]]["default_data"]))
    leave_out = run.get("data", {}).get("without", [])
    if not leave_out:
        return folder
    meta, cases = read_dataset(folder)
    view = os.path.join(out, "data", f"{recipe['model']}-{run['name']}")
    os.makedirs(view, exist_ok=True)
    meta = dict(meta, training=[{"image": case["image"], "label": case["label"]} for case in cases
                                if case["id"] not in leave_out])
    meta["numTraining"] = len(meta["training"])
    write_json(meta, os.path.join(view, "dataset.json"))  # atomic: under torchrun every rank writes the same
    return view


def start_weights(out, recipes, recipe, run):
    """The fp16 weights file (as export writes it, which is what the recorded runs started from) of the run this
    run starts from, or None."""
    start = run.get("init_from")
    if not start:
        return None
    source = recipes[start.get("recipe", recipe["model"])]
    source_run = next(r for r in source["runs"] if r["name"] == start["run"])
    path = os.path.join(out, "weights", f"{source['model']}-{source_run['name']}-{start['weights']}.pt")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_weights(os.path.join(run_folder(out, source, source_run), WEIGHTS[start["weights"]]), path)
    return path


def train_arguments(out, recipes, recipe, run, options, init_from):
    from .cli import build_parser

    argv = ["train", "--model", recipe["model"], "--out", os.path.join(out, run.get("out", "runs")),
            "--fold", str(run.get("fold", 0)), "--data", dataset_view(out, recipe, run, options.data),
            *scaled(run["flags"], options.shorten), *shlex.split(options.train_flags or ""),
            "--device", options.device, "--resume"]
    if init_from:
        argv += ["--init-from", init_from]
    if options.quiet:
        argv.append("--quiet")
    return build_parser().parse_args(argv)


def with_plan_settings(args, run):
    """Plan and cache for the run, with the settings it ran with where they differ from today's models.py (a
    recorded run's plan was edited between its resumptions): written into the plan that the run then reads."""
    if not run.get("plan"):
        return
    prepare(args)
    path = os.path.join(args.out, args.model, "plan.json")
    plan = load_json(path)
    if any(plan.get(key) != value for key, value in run["plan"].items()):
        plan.update(run["plan"])
        save_json(plan, path)


def replay_run(out, recipes, recipe, run, options, dist, log=print):
    run_dir = run_folder(out, recipe, run)
    target = scaled(run["flags"], options.shorten)
    steps = {flag: int(value) for flag, value in zip(target, target[1:]) if flag in ("--steps", "--stop-at")}
    if last_step(run_dir) >= (steps.get("--stop-at") or steps["--steps"]):
        log(f"{recipe['model']} / {run['name']}: done (step {last_step(run_dir)})")
        return
    log(f"{recipe['model']} / {run['name']}: {run.get('history', '')}")
    init_from = start_weights(out, recipes, recipe, run) if dist.main else None
    dist.barrier()
    if not dist.main and run.get("init_from"):
        init_from = start_weights(out, recipes, recipe, run)  # written by rank 0: only its path is taken
    args = train_arguments(out, recipes, recipe, run, options, init_from)
    if dist.main:
        with_plan_settings(args, run)
    dist.barrier()
    run_training(args, dist)


def export_replay(out, recipes, options, log=print):
    """Every replayed stage's shipped run into <out>/models, in the order of the cascades (coarse first)."""
    models_dir = os.path.join(out, "models")
    order = [model for task in TASKS.values() for model in task["models"]]
    for model in sorted(recipes, key=order.index):
        recipe = recipes[model]
        run = next(r for r in recipe["runs"] if r["name"] == recipe["ships"]["run"])
        run_dir = run_folder(out, recipe, run)
        plan = load_json(os.path.join(os.path.dirname(run_dir), "plan.json"))
        split = load_json(os.path.join(run_dir, "split.json"))
        checkpoint = os.path.join(run_dir, WEIGHTS[recipe["ships"]["weights"]])
        steps = torch.load(os.path.join(run_dir, "last.ckpt"), map_location="cpu", weights_only=False)
        steps = steps["step"] if recipe["ships"]["weights"] == "last" else steps["best"]["step"]
        weights, cards = export_model(model, plan, split, checkpoint, models_dir, {}, steps)
        log(f"exported {weights} and {', '.join(cards)}")
    return models_dir


def run_reproduce(options, log=print):
    if options.dry_run:
        return describe(options, log)
    recipes_dir = options.recipes or RECIPES_DIR
    recipes = replay_order(options.model, recipes_dir)
    out = os.path.abspath(options.out)
    dist = Distributed(want_cuda=options.device != "cpu")
    quiet = (lambda text: None) if not dist.main else log
    try:
        for recipe in recipes.values():
            for run in recipe["runs"]:
                replay_run(out, recipes, recipe, run, options, dist, quiet)
        models_dir = export_replay(out, recipes, options, quiet) if dist.main else None
        dist.barrier()
    finally:
        dist.close()
    if dist.main:
        log(f"replayed {', '.join(recipes)} into {out}; the cascade is in {models_dir}")
    return models_dir


def recipe_summary(model, recipes_dir=RECIPES_DIR):
    """One line per run of a recipe: what `reproduce` would replay (for --dry-run)."""
    recipe = load_recipe(model, recipes_dir)
    lines = []
    for index, run in enumerate(recipe["runs"]):
        start = run.get("init_from")
        folder = run_folder("", recipe, run)
        earlier = [r["name"] for r in recipe["runs"][:index] if run_folder("", recipe, r) == folder]
        source = f"from {start.get('recipe', model)} / {start['run']} ({start['weights']})" if start else "from scratch"
        origin = f"continues {earlier[-1]} (resumed on this run's schedule)" if earlier else source
        lines.append(f"{model} / {run['name']}: fold {run.get('fold', 0)}, {' '.join(run['flags'])}, {origin}")
    return lines


def describe(options, log=print):
    for model in replay_order(options.model, options.recipes or RECIPES_DIR):
        for line in recipe_summary(model, options.recipes or RECIPES_DIR):
            log(line)

