"""Training steps per second under fp32 and bf16 autocast on this CPU, on real patches of a cached plan.

Builds the plan's network and draws batches with the training's own sampler (real BTCV patches, lesions and
augmentation as in training) from a `python -m Training train` cache, then times forward + loss + backward +
optimiser step (the network's share of a training step) for each arithmetic, interleaved in rounds so that a
shared machine's load falls on all of them alike. The sampling is timed apart (the same for all). Prints a
Markdown table, and how far bf16 moves the loss and the gradient's direction from fp32 on the same weights and
batches. Not part of `make test`.

    python bench/bench_training_precision.py runs/neighbours/abdomen-fine --threads 1 --steps 5 --rounds 3 \
        [--init-from weights.pt]
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPOSITORY, os.path.join(REPOSITORY, "MSDSegment")]

from MSDSegmentLib.network import build_network  # noqa: E402
from Training.cache import label_count, load_case  # noqa: E402
from Training.lesions import TrainingLesions  # noqa: E402
from Training.sampling import PatchSampler  # noqa: E402
from Training.train import AUTOCAST_TYPES, DiceCELoss, initialise_from  # noqa: E402

VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16, channels-last": ("bf16", True)}


def step_seconds(network, optimizer, loss_function, batches, precision, channels_last):
    network.train()
    started = time.perf_counter()
    for images, labels in batches:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast("cpu", dtype=AUTOCAST_TYPES.get(precision), enabled=precision != "fp32"):
            logits = network(images)
        loss = loss_function(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / len(batches)


def gradient_agreement(plan, batches, loss_function, initial):
    """Per batch, from the same weights: the bf16 loss against the fp32 one, and the cosine similarity of the two
    gradients (the direction each optimiser step takes)."""
    network = build_network(plan["network"])
    network.load_state_dict(initial)
    rows = []
    for images, labels in batches:
        gradients, losses = {}, {}
        for precision in ("fp32", "bf16"):
            network.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=AUTOCAST_TYPES.get(precision), enabled=precision != "fp32"):
                logits = network(images)
            loss = loss_function(logits.float(), labels)
            loss.backward()
            losses[precision] = float(loss.detach())
            gradients[precision] = [p.grad.flatten().clone() for p in network.parameters()]
        whole = [torch.cat(gradients[precision]) for precision in ("fp32", "bf16")]
        cosine = torch.nn.functional.cosine_similarity(*whole, dim=0)
        worst = min(float(torch.nn.functional.cosine_similarity(a, b, dim=0))
                    for a, b in zip(gradients["fp32"], gradients["bf16"]) if a.numel() > 1)
        rows.append((losses["fp32"], losses["bf16"], float(cosine), worst))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_folder", help="a train --out/<model> folder with plan.json and cache/")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--cases", type=int, default=4, help="cached cases to draw from")
    parser.add_argument("--init-from", help="start every network from these weights (.pt; as train --init-from)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(os.path.join(args.model_folder, "plan.json"), encoding="utf-8") as stream:
        plan = json.load(stream)
    cache = os.path.join(args.model_folder, "cache")
    ids = sorted(name[:-4] for name in os.listdir(cache) if name.endswith(".npz"))[:args.cases]
    cases = [load_case(cache, case_id, label_count(plan)) for case_id in ids]
    sampler = PatchSampler(cases, plan["patch_size"], len(plan["classes"]), plan["mirror_axes"], seed=0,
                           lesions=TrainingLesions(plan))
    started = time.perf_counter()
    batches = [sampler.sample(args.batch_size) for _ in range(args.steps)]
    sampling = (time.perf_counter() - started) / args.steps
    torch.manual_seed(0)
    start = build_network(plan["network"])
    if args.init_from:
        initialise_from(start, args.init_from)
    initial = start.state_dict()
    networks = {}
    for name, (_, channels_last) in VARIANTS.items():
        network = build_network(plan["network"])
        network.load_state_dict(initial)
        if channels_last:
            network = network.to(memory_format=torch.channels_last_3d)
        networks[name] = (network, torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=3e-5))
    loss_function = DiceCELoss()
    for name, (network, optimizer) in networks.items() if args.rounds else ():  # warm-up: oneDNN builds its kernels
        step_seconds(network, optimizer, loss_function, batches[:1], *VARIANTS[name])
    times = {name: [] for name in VARIANTS}  # --rounds 0: only the agreement
    for _ in range(args.rounds):
        for name, (network, optimizer) in networks.items():
            times[name].append(step_seconds(network, optimizer, loss_function, batches, *VARIANTS[name]))
    print(f"{plan['model']}: patch {plan['patch_size']}, {len(plan['classes'])} classes, batch {args.batch_size}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"{args.rounds} rounds of {args.steps} steps; load average {os.getloadavg()}")
    print(f"sampling a batch: {sampling:.2f} s (the same for every arithmetic)")
    print("| arithmetic | network s/step (median of rounds) | rounds | vs fp32 |")
    print("|---|---:|---|---:|")
    reference = float(np.median(times["fp32"])) if args.rounds else float("nan")
    for name, values in times.items() if args.rounds else ():
        median = float(np.median(values))
        print(f"| {name} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {reference / median:.2f} x |")
    print("\nSame weights, same batch: fp32 against bf16 autocast")
    print("| batch | loss fp32 | loss bf16 | gradient cosine similarity, whole | least of any weight tensor |")
    print("|---|---:|---:|---:|---:|")
    for index, (fp32, bf16, cosine, worst) in enumerate(gradient_agreement(plan, batches, loss_function, initial)):
        print(f"| {index} | {fp32:.4f} | {bf16:.4f} | {cosine:.6f} | {worst:.6f} |")


if __name__ == "__main__":
    main()
