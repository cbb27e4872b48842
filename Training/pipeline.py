"""Plan -> cache -> train, each step reused when already done."""

import os

from MSDSegmentLib.errors import MSDSegmentError

from .cache import build_cache
from .dataset import fold_split, read_dataset
from .models import MODELS, label_mapping, parse_label_map, with_neighbours
from .plan import fingerprint, load_plan, make_plan, save_json
from .train import Distributed, train

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dataset_folder(args, model):
    return os.path.abspath(args.data or os.path.join(REPOSITORY, model["default_data"]))


def model_config(args):
    """The model's configuration with the patch size and filters given on the command line, if any."""
    model = dict(MODELS[args.model])
    if getattr(args, "patch_size", None):
        model["patch_size"] = list(args.patch_size)
    if getattr(args, "filters", None):
        model["filters"] = list(args.filters)
    return model


def check_plan_matches(plan, args, plan_path):
    """An existing plan wins (a resumed run needs no options repeated); options that contradict it are refused."""
    filters = plan["network"]["filters"]
    if (getattr(args, "patch_size", None) and list(args.patch_size) != plan["patch_size"]) or \
            (getattr(args, "filters", None) and list(args.filters)[:len(filters)] != filters) or \
            (getattr(args, "neighbours", False) and not plan.get("context_classes")):
        raise MSDSegmentError(f"{plan_path} was made with patch {plan['patch_size']}, filters {filters} and context "
                              f"classes {plan.get('context_classes', [])}: use another --out (or delete that plan "
                              "and its cache) to plan with other ones")


def prepare(args, log=print):
    """Plan and cache for a model and dataset; returns (plan, cache folder, fully labelled case ids, partly
    labelled case ids). Partly labelled cases (the model's `merged_cases`, or dataset entries marked "merged")
    label the union of the model's `merged_classes`: they train, never validate."""
    model = model_config(args)
    data = dataset_folder(args, model)
    meta, cases = read_dataset(data)
    if getattr(args, "neighbours", False):
        model = with_neighbours(args.model, model, meta["labels"])
    for case in cases:
        case["merged"] = bool(model.get("merged_classes")) and (case["merged"] or
                                                                 case["id"] in model.get("merged_cases", []))
    cases = [case for case in cases if case["id"] not in model["exclude"] or case["merged"]]
    partly_labelled = [case["id"] for case in cases if case["merged"]]
    # Classes painted in by lesion synthesis may be absent from the dataset (BTCV has no tumours).
    mapping = label_mapping(model, meta["labels"], parse_label_map(args.label_map),
                            optional=tuple(model.get("synthetic_lesions", {})))
    base = os.path.join(args.out, args.model)
    os.makedirs(base, exist_ok=True)
    plan_path = os.path.join(base, "plan.json")
    if os.path.exists(plan_path):
        plan = load_plan(plan_path)
        check_plan_matches(plan, args, plan_path)
    else:
        log(f"fingerprinting {len(cases)} cases of {data}")
        plan = make_plan(args.model, model, fingerprint(cases))
        plan["dataset"] = {"name": meta.get("name", os.path.basename(data)), "folder": data,
                           "label_mapping": {str(k): v for k, v in mapping.items()},
                           "excluded": [c for c in model["exclude"] if c not in partly_labelled],
                           "partly_labelled": partly_labelled}
        save_json(plan, plan_path)
    log(f"plan: spacing {plan['spacing']} mm, patch {plan['patch_size']}, normalisation {plan['normalisation']}")
    cache = os.path.join(base, "cache")
    build_cache(cases, plan, mapping, cache, log)
    return plan, cache, [case["id"] for case in cases if not case["merged"]], partly_labelled


def run_training(args, dist=None):
    """`dist`: a process group that outlives this run (a replayed recipe's); by default one of its own."""
    owned = dist is None
    dist = dist or Distributed(want_cuda=args.device != "cpu")
    try:
        # Under torchrun rank 0 plans and caches first; the other ranks then find both done and read them.
        if not dist.main:
            dist.barrier()
        plan, cache, case_ids, partly_labelled = prepare(args, log=print if dist.main else (lambda text: None))
        if dist.main:
            dist.barrier()
        training_ids, validation_ids = fold_split(case_ids, args.fold)
        training_ids += partly_labelled
        run_dir = os.path.join(args.out, args.model, f"fold{args.fold}")
        os.makedirs(run_dir, exist_ok=True)
        if dist.main:
            save_json({"training": training_ids, "validation": validation_ids}, os.path.join(run_dir, "split.json"))
        best = train(plan, cache, training_ids, validation_ids, run_dir, args, dist=dist)
        # Every rank finishes before any tears gloo down: a rank that destroyed the group while its peer was still
        # saving or reporting once aborted the peer at exit (SIGABRT, 1 CI run in 3 here). Not after an error: the
        # peer may never come, and torchrun stops it.
        dist.barrier()
    finally:
        if owned:
            dist.close()
    if dist.main:
        print(f"best validation Dice {best['dice']} at step {best['step']}")
