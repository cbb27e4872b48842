"""The training loop: CPU, one CUDA GPU (mixed precision) or several GPUs through torchrun (DDP)."""

import csv
import json
import os
import time

import numpy as np
import torch
from monai.losses import GeneralizedDiceLoss

from MSDSegmentLib.atomic import atomic_open, atomic_output
from MSDSegmentLib.errors import MSDSegmentError
from MSDSegmentLib.inference import predict_probabilities, windows_per_batch
from MSDSegmentLib.modelcard import STAGE_SETTINGS, settings_from
from MSDSegmentLib.network import build_network

from .cache import label_count, load_case
from .lesions import TrainingLesions
from .sampling import PatchSampler, batch_stream


class PresentClassesDiceLoss(GeneralizedDiceLoss):
    """Generalised Dice whose class weights (1 / volume^2) are 0 for classes absent from the patch.

    MONAI gives an absent class the largest weight of the patch, so a class missing from most patches
    (a tumour, the pancreas) has every predicted voxel there penalised as heavily as an error on the
    smallest organ present, and the network learns never to predict it. Cross-entropy still penalises
    such false positives, in proportion to their volume.
    """

    def w_func(self, grnd):
        return torch.where(grnd > 0, torch.reciprocal(grnd * grnd), torch.zeros_like(grnd))


class DiceCELoss(torch.nn.Module):
    """Generalised Dice (Sudre et al. 2017) plus cross-entropy.

    merged: the class indices that a partly labelled case labels as one (PZ + TZ for a whole gland), with the
    label value len(classes). In a sample holding that value the loss is the marginal loss (Shi et al.,
    "Marginal loss and exclusion loss for partially supervised multi-organ segmentation", MedIA 2021): the
    merged classes' probabilities are summed into one channel and scored against the union; how the union
    splits between them is left to the fully labelled cases.
    """

    def __init__(self, merged=()):
        super().__init__()
        self.dice = PresentClassesDiceLoss(to_onehot_y=True, softmax=True)
        self.merged_dice = PresentClassesDiceLoss(to_onehot_y=True, softmax=False)
        self.cross_entropy = torch.nn.CrossEntropyLoss()
        self.merged = list(merged)

    def forward(self, logits, labels):
        if not self.merged or not torch.any(labels == logits.shape[1]):
            return self.dice(logits, labels) + self.cross_entropy(logits, labels[:, 0])
        losses = [self.marginal(sample_logits[None], sample_labels[None])
                  if torch.any(sample_labels == logits.shape[1])
                  else self.forward(sample_logits[None], sample_labels[None])
                  for sample_logits, sample_labels in zip(logits, labels)]
        return torch.stack(losses).mean()

    def marginal(self, logits, labels):
        classes = logits.shape[1]
        kept = [c for c in range(classes) if c not in self.merged]
        probabilities = torch.softmax(logits.float(), dim=1)
        merged = torch.cat([probabilities[:, kept], probabilities[:, self.merged].sum(1, keepdim=True)], dim=1)
        # Label value -> channel of `merged`: kept classes keep their order, merged classes and the union go last.
        lookup = torch.full((classes + 1,), len(kept), dtype=torch.long, device=labels.device)
        lookup[kept] = torch.arange(len(kept), device=labels.device)
        target = lookup[labels]
        log_probabilities = torch.log(merged.clamp_min(1e-7))
        return self.merged_dice(merged, target) + torch.nn.functional.nll_loss(log_probabilities, target[:, 0])


def dice_per_class(prediction, reference, classes):
    """Dice of each foreground class; NaN where the class is absent from both."""
    scores = []
    for index in range(1, classes):
        p, r = prediction == index, reference == index
        denominator = p.sum() + r.sum()
        scores.append(float(2 * np.logical_and(p, r).sum() / denominator) if denominator else float("nan"))
    return scores


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, want_cuda):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = want_cuda and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # one patch size throughout: cuDNN picks its fastest kernels once
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag):
        """True on every rank when `flag` is true on any (so all ranks stop at the same step)."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())

    def replica_difference(self, network):
        """The largest difference between this rank's weights and rank 0's (0 in a single process): DDP keeps
        the replicas equal, and a resumed run that broke that would train a different network on each rank."""
        if self.world == 1:
            return 0.0
        largest = torch.zeros(1, device=self.device)
        for tensor in network.state_dict().values():
            reference = tensor.detach().clone()
            torch.distributed.broadcast(reference, src=0)
            largest = torch.maximum(largest, (tensor.detach().float() - reference.float()).abs().max().reshape(1))
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        return float(largest.item())

    def close(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()


AUTOCAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def training_precision(requested, device_type):
    """The arithmetic of the forward pass (weights, optimiser and loss scaling stay fp32). auto: fp16 with loss
    scaling on a GPU, fp32 on a CPU; bf16 (autocast, no scaling: bf16 has fp32's range) on either; fp16 needs
    a GPU (PyTorch's CPU fp16 kernels are slow and have no loss scaler)."""
    if requested == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise MSDSegmentError("--precision fp16 trains only on a CUDA GPU; use bf16 or fp32 on a CPU")
    return requested


def learning_rate(base, step, total):
    """Polynomial decay (nnU-Net's schedule), a function of the step so that it resumes exactly."""
    return base * (1 - min(step, total - 1) / total) ** 0.9


def checkpoint_state(step, network, optimizer, scaler, sampler, best, args):
    return {"step": step, "model": network.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "sampler": sampler.state(),
            "torch_rng": torch.get_rng_state(), "best": best, "args": vars(args)}


def save_atomically(state, path):
    with atomic_open(path, "wb") as stream:  # a stream: the archive's name inside stays the same (export.py)
        torch.save(state, stream)


def exported_classes(path):
    """The classes of exported weights, from a model card beside them whose stage names the file; None if none."""
    folder, name = os.path.split(os.path.abspath(path))
    for card_name in sorted(os.listdir(folder)):
        if not card_name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, card_name), encoding="utf-8") as stream:
                card = json.load(stream)
        except (OSError, ValueError):
            continue
        stages = card.get("stages", []) if isinstance(card, dict) else []
        found = [stage.get("classes") for stage in stages if isinstance(stage, dict) and stage.get("weights") == name]
        if found:
            return found[0]
    return None


def by_class(source, own, source_classes, classes):
    """An output tensor of weights with other classes, channel by channel: a class the source had keeps its channel;
    a new class starts as a copy of the background's. So the new classes share the background's probability (the
    engine adds them back to it, and an argmax ties to the background): the network first predicts what the source
    did, and each new class parts from the background as soon as its voxels pull it away. (A new class started far
    below, e.g. a bias 10 lower, did not reach a Dice above 0 in 100 steps at lr 5e-4: Adam moves a weight about
    lr a step.)"""
    out = torch.zeros_like(own)
    for index, name in enumerate(classes):
        out[index] = source[source_classes.index(name if name in source_classes else source_classes[0])].float()
    return out


def initialise_from(network, path, log=print, classes=None):
    """Start from exported weights: the last exported model on a new machine, or a related model (the
    coarse stage for the fine one). Tensors whose shape differs (another number of classes) start fresh, except
    the output channels of classes the source had, when a model card beside the weights names them (`classes`:
    this network's)."""
    own = network.state_dict()
    state = torch.load(path, map_location="cpu", weights_only=True)
    matching = {k: v.float() for k, v in state.items() if k in own and own[k].shape == v.shape}
    source_classes = exported_classes(path) if classes else None
    if source_classes:
        matched = {k: by_class(v, own[k], source_classes, classes) for k, v in state.items()
                   if k in own and k not in matching and v.shape[0] == len(source_classes) and
                   own[k].shape[0] == len(classes) and v.shape[1:] == own[k].shape[1:]}
        matching.update(matched)
        if matched:
            kept = [name for name in classes if name in source_classes]
            log(f"output channels matched by class name ({', '.join(kept)}); new: "
                f"{', '.join(name for name in classes if name not in source_classes)}")
    network.load_state_dict(matching, strict=False)
    fresh = sorted(set(own) - set(matching))
    log(f"initialised from {path}" + (f"; {len(fresh)} tensors start fresh: {', '.join(fresh)}" if fresh else ""))


def with_validation_lesions(cases, plan):
    """Validation cases with synthetic tumours painted in, the same every run (a fixed seed per case), so
    that the tumour classes have a validation score; cases without lesion classes are returned as they are."""
    lesions = TrainingLesions(plan)
    if not lesions:
        return cases
    for index, case in enumerate(cases):
        lesions(case["image"], case["label"], np.random.default_rng(1000 + index), probability=1.0)
    return cases


def validate(network, cases, plan, device):
    network.eval()
    scores = []
    overlap = settings_from(plan, STAGE_SETTINGS)["overlap"]
    # As many windows at once as the engine takes for this network: a wide stage's fewer keep memory down.
    batch = windows_per_batch(plan["network"]["filters"], plan["patch_size"])
    for case in cases:
        probabilities = predict_probabilities(network, case["image"], plan["patch_size"], device, overlap=overlap,
                                              sw_batch_size=batch)
        scores.append(dice_per_class(probabilities.argmax(0), case["label"], len(plan["classes"])))
    network.train()
    return np.nanmean(np.array(scores), axis=0).tolist()


def append_csv(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_curves(run_dir, classes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_log, val_log = os.path.join(run_dir, "train_log.csv"), os.path.join(run_dir, "val_log.csv")
    if not (os.path.exists(train_log) and os.path.exists(val_log)):
        return
    train = np.genfromtxt(train_log, delimiter=",", names=True)
    with open(val_log, newline="") as stream:  # csv, not genfromtxt: class names have spaces
        rows = list(csv.DictReader(stream))
    val = {key: np.array([float(row[key]) for row in rows]) for key in rows[0]}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(np.atleast_1d(train["step"]), np.atleast_1d(train["loss"]))
    left.set(xlabel="step", ylabel="training loss (GDL + CE)", title="Loss")
    for name in classes[1:]:
        right.plot(val["step"], val[f"dice_{name}"], marker="o", label=name)
    right.set(xlabel="step", ylabel="validation Dice", ylim=(0, 1), title="Validation Dice (canonical grid)")
    right.legend()
    figure.tight_layout()
    with atomic_output(os.path.join(run_dir, "curves.png"), ".png") as temporary:
        figure.savefig(temporary, dpi=90)
    plt.close(figure)


def train(plan, cache_dir, training_ids, validation_ids, run_dir, args, log=print, dist=None):
    """Train until `args.steps` (or `args.time_limit` minutes), validating every `args.val_every` steps.
    `dist`: the process group (torchrun's ranks; a single process by default); closing it is the caller's."""
    dist = dist or Distributed(want_cuda=args.device != "cpu")
    torch.manual_seed(args.seed + dist.rank)
    classes = len(plan["classes"])
    train_cases = [load_case(cache_dir, case_id, label_count(plan)) for case_id in training_ids]
    val_cases = [load_case(cache_dir, case_id, classes) for case_id in validation_ids] if dist.main else []
    val_cases = with_validation_lesions(val_cases, plan)

    network = build_network(plan["network"]).to(dist.device)
    if args.init_from:
        initialise_from(network, args.init_from, log, plan["classes"])
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=3e-5)
    precision = training_precision(getattr(args, "precision", "auto"), dist.device.type)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if precision != "fp32":
        log(f"training in mixed precision: {precision} autocast on {dist.device.type}")
    sampler = PatchSampler(train_cases, plan["patch_size"], classes, plan["mirror_axes"], seed=args.seed + dist.rank,
                           lesions=TrainingLesions(plan))
    loss_function = DiceCELoss([plan["classes"].index(name) for name in plan.get("merged_classes", [])])
    step, best = 0, {"score": -1.0, "step": 0, "dice": []}

    last_path = os.path.join(run_dir, "last.ckpt")
    if args.resume and os.path.exists(last_path):
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        sampler.load_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        step, best = state["step"], state["best"]
        if dist.rank > 0:
            sampler.reseed(args.seed + 1000 * dist.rank + step)
        log(f"resumed from step {step} (best mean Dice {best['score']:.3f} at step {best['step']})")

    model = network
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(network, device_ids=[dist.device] if dist.device.type == "cuda" else None)

    started = time.time()
    progress = None
    if dist.main and not args.quiet:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=step, unit="step", mininterval=10)
    model.train()
    workers = getattr(args, "workers", 0)
    if workers and step and dist.main:
        log(f"sampling in {workers} worker processes: from step {step} the crops are new draws, not the ones an "
            "uninterrupted run would have taken")
    batches = batch_stream(sampler, args.batch_size, workers, args.seed, dist.rank, step, dist.device)
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, step, args.steps)
        images, labels = next(batches)
        with torch.autocast(dist.device.type, dtype=AUTOCAST_TYPES.get(precision), enabled=precision != "fp32"):
            logits = model(images)
        loss = loss_function(logits.float(), labels)  # the loss in fp32 whatever the forward pass's arithmetic
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()
        step += 1
        if progress:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
        out_of_time = dist.any(bool(args.time_limit) and (time.time() - started) / 60 > args.time_limit)
        if dist.main and step % 10 == 0:
            append_csv(os.path.join(run_dir, "train_log.csv"),
                       {"step": step, "loss": float(loss.item()), "lr": optimizer.param_groups[0]["lr"],
                        "seconds": round(time.time() - started, 1)})
        # --stop-at ends a run part-way through its schedule (the learning rate still follows --steps).
        stopping = out_of_time or step == args.stop_at
        at_checkpoint = step % args.val_every == 0 or step == args.steps or stopping
        if dist.main and at_checkpoint and not validation_ids:
            # Trained on every case (fold "all"): nothing to choose by, the latest weights are the ones kept.
            best = {"score": float("nan"), "step": step, "dice": []}
            save_atomically(network.state_dict(), os.path.join(run_dir, "best_model.pt"))
            save_atomically(checkpoint_state(step, network, optimizer, scaler, sampler, best, args), last_path)
        elif dist.main and at_checkpoint:
            dice = validate(network, val_cases, plan, dist.device)
            # The run is judged by the classes tasks output: context classes are there to help them. A class absent
            # from every validation case does not count.
            score = float(np.nanmean([d for n, d in zip(plan["classes"][1:], dice)
                                      if n not in plan.get("context_classes", [])]))
            row = {"step": step, **{f"dice_{n}": d for n, d in zip(plan["classes"][1:], dice)}, "mean": score}
            append_csv(os.path.join(run_dir, "val_log.csv"), row)
            log(f"step {step}: validation Dice " + ", ".join(f"{n} {d:.3f}" for n, d in zip(plan["classes"][1:], dice)))
            if score > best["score"]:
                best = {"score": score, "step": step, "dice": dice}
                save_atomically(network.state_dict(), os.path.join(run_dir, "best_model.pt"))
            save_atomically(checkpoint_state(step, network, optimizer, scaler, sampler, best, args), last_path)
            plot_curves(run_dir, plan["classes"])
        dist.barrier()
        if stopping:
            log(f"{'time limit reached' if out_of_time else 'stopped'} at step {step}; resume with --resume")
            break
    batches.close()  # ends the worker processes now, not when the generator is collected
    if progress:
        progress.close()
    if dist.world > 1:
        difference = dist.replica_difference(network)
        log(f"{dist.world} ranks at step {step}: largest weight difference from rank 0 {difference:g}")
    return best
