"""The engine: input channels in, an integer label map on exactly the first channel's grid out."""

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import modelcard
from .errors import Cancelled, MSDSegmentError
from .imageio import looks_like_ct, validate_channels
from .inference import predict_probabilities
from .postprocess import bounding_box, keep_largest_cluster, postprocess
from .preprocessing import from_array, index_bounds, network_input, physical_corners, resample

CHUNK_BYTES = 256 * 2**20  # probabilities are brought back to the input grid a slab at a time
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # x86 CPU flags of native bf16 arithmetic


@dataclass
class SegmentationResult:
    labels: sitk.Image
    card: modelcard.ModelCard
    volumes_ml: dict
    timings: dict = field(default_factory=dict)
    device: str = "cpu"
    warnings: list = field(default_factory=list)
    precision: str = "fp32"


def pick_device(device):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise MSDSegmentError("CUDA was asked for but no CUDA GPU is available (use --device cpu or auto)")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_flags():
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16_cpu():
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), from its flags; elsewhere from PyTorch's
    own CPU probes. Without it bf16 is emulated, slower than fp32."""
    if NATIVE_BF16_FLAGS & cpu_flags():
        return True
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def pick_precision(precision, device, card):
    """The precision a run uses. `auto`: fp16 on a CUDA GPU, bf16 on a CPU with native bf16, fp32 otherwise,
    and fp32 wherever the card does not show that reduced precision to keep the task's validation Dice."""
    if precision not in PRECISIONS:
        raise MSDSegmentError(f"Unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if precision != "auto":
        return precision
    candidate = "fp16" if device == "cuda" else "bf16" if native_bf16_cpu() else "fp32"
    return candidate if candidate in card.auto_precisions() else "fp32"


_networks = {}  # (weights, sha256, device) -> network: kept between calls (Slicer, batch runs)


def network_for(stage, device):
    key = (stage.weights_path, stage.sha256, device)
    if key not in _networks:
        if len(_networks) >= 4:
            _networks.clear()
        _networks[key] = modelcard.load_stage_network(stage, device)
    return _networks[key]


def task_probabilities(probabilities, stage, card):
    """Network channels -> (background, task label 1, 2, ...): classes the task does not use are background."""
    used = [stage.classes.index(label.source_class) for label in card.trained_labels]
    unused = [index for index in range(len(stage.classes)) if index not in used]
    return np.stack([probabilities[unused].sum(axis=0)] + [probabilities[index] for index in used])


def foreground_box_on_input(probabilities, canonical, target):
    """Index box of the input grid that can contain foreground (everything else is background)."""
    foreground = probabilities.argmax(axis=0) > 0
    box = bounding_box(foreground, margin=2)
    if box is None:
        return None
    corners = physical_corners(canonical, [s.start - 0.5 for s in box], [s.stop - 0.5 for s in box])
    first, last = index_bounds(target, corners)
    size = np.array(target.GetSize())
    lower = np.clip(np.floor(first).astype(int), 0, size)
    upper = np.clip(np.ceil(last).astype(int) + 1, 0, size)
    if np.any(upper <= lower):
        return None
    return lower, upper


def labels_on_input_grid(probabilities, canonical, target, label_values, cancel=None):
    """Argmax of linearly resampled probabilities on the input grid, slab by slab (bounded memory)."""
    out = np.zeros(target.GetSize(), np.uint8)
    box = foreground_box_on_input(probabilities, canonical, target)
    if box is None:
        return out
    lower, upper = box
    images = [from_array(p.astype(np.float32), canonical) for p in probabilities]
    slab_voxels = int(np.prod(upper[:2] - lower[:2]))
    slab = max(1, CHUNK_BYTES // (4 * len(images) * slab_voxels))
    values = np.asarray([0] + list(label_values), np.uint8)
    for z in range(lower[2], upper[2], slab):
        if cancel is not None and cancel():
            raise Cancelled()
        top = min(z + slab, upper[2])
        reference = sitk.Image([int(n) for n in (upper[0] - lower[0], upper[1] - lower[1], top - z)], sitk.sitkUInt8)
        reference.SetSpacing(target.GetSpacing())
        reference.SetDirection(target.GetDirection())
        reference.SetOrigin(target.TransformIndexToPhysicalPoint([int(lower[0]), int(lower[1]), int(z)]))
        # Outside the canonical grid the background probability is 1 and the others 0.
        resampled = [sitk.GetArrayFromImage(resample(image, reference, sitk.sitkLinear, 1.0 if i == 0 else 0.0))
                     for i, image in enumerate(images)]
        winners = np.argmax(np.stack(resampled), axis=0).transpose(2, 1, 0)
        out[lower[0]:upper[0], lower[1]:upper[1], z:top] = values[winners]
    return out


def run_network(stage, image, device, tta, progress, cancel, precision="fp32"):
    """Sliding-window probabilities; a CUDA out-of-memory error falls back to the CPU with a message."""
    mirror_axes = stage.mirror_axes if tta else []
    network = network_for(stage, device)
    try:
        return predict_probabilities(network, image, stage.patch_size, device, mirror_axes, stage.overlap,
                                     progress=lambda f: progress(f, "Running network"), cancel=cancel,
                                     precision=precision), device
    except Exception as error:
        if device != "cuda" or "out of memory" not in str(error).lower():
            raise
        import torch
        torch.cuda.empty_cache()
        progress(0.0, "GPU out of memory: running on the CPU instead")
        network = network_for(stage, "cpu")
        return predict_probabilities(network, image, stage.patch_size, "cpu", mirror_axes, stage.overlap,
                                     progress=lambda f: progress(f, "Running network (CPU)"), cancel=cancel,
                                     precision="fp32"), "cpu"


def region_of_interest(probabilities, stage, canonical, roi):
    """Physical corners of the box around the voxels `stage` labelled as one of the ROI classes, plus the
    ROI margin; None when it labelled none of them. With `cluster_gap_mm` the box holds only the largest
    cluster of those voxels (as post-processing would keep it), not stray blobs elsewhere."""
    wanted = [stage.classes.index(name) for name in roi["classes"] if name in stage.classes]
    found = np.isin(probabilities.argmax(axis=0), wanted).astype(np.uint8)
    if "cluster_gap_mm" in roi:
        keep_largest_cluster(found, 1, canonical.GetSpacing(), roi["cluster_gap_mm"])
    box = bounding_box(found, margin=0)
    if box is None:
        return None
    lower = canonical.TransformContinuousIndexToPhysicalPoint([s.start - 0.5 for s in box])
    upper = canonical.TransformContinuousIndexToPhysicalPoint([s.stop - 0.5 for s in box])
    margin = np.asarray(roi["margin_mm"], dtype=float)
    return np.asarray(lower) - margin, np.asarray(upper) + margin


def blend_previous(probabilities, stage, canonical, previous, previous_stage, previous_canonical):
    """(1 - w) x this stage's probabilities + w x the previous stage's, w = `stage.blend_previous`.

    The previous stage's channels are matched to this stage's classes by name and resampled linearly onto
    this stage's grid; its other classes, and everything outside its grid, count as background.
    """
    weight = stage.blend_previous
    matched = []
    for name in stage.classes[1:]:
        channel = np.zeros(probabilities.shape[1:], np.float32)
        if name in previous_stage.classes:
            image = from_array(previous[previous_stage.classes.index(name)].astype(np.float32), previous_canonical)
            channel = sitk.GetArrayFromImage(resample(image, canonical)).transpose(2, 1, 0)
        matched.append(channel)
    matched = np.stack([1.0 - np.sum(matched, axis=0)] + matched)
    return (1.0 - weight) * probabilities + weight * matched


def run_stages(channels, card, device, tta, report, cancel, precision="fp32"):
    """Run the card's stages in turn, each later one on the region of interest the previous one found (or,
    where that found none of the ROI classes, on the previous stage's own region), blended with the previous
    stage where the card says so. Returns the last stage's probabilities, the canonical grid they are on, the
    device used and timings."""
    timings = {"preprocess": 0.0, "network": 0.0}
    region, probabilities, canonical = None, None, None
    share = 0.75 / len(card.stages)  # of the progress bar, from 0.05 to 0.8
    for number, stage in enumerate(card.stages):
        start = 0.05 + number * share
        if number and stage.roi:
            region = region_of_interest(probabilities, card.stages[number - 1], canonical, stage.roi) or region
        if cancel is not None and cancel():
            raise Cancelled()
        report(start, "Preprocessing")
        started = time.perf_counter()
        previous, previous_canonical = probabilities, canonical
        image, canonical = network_input(channels, stage.spacing, stage.normalisation, region)
        timings["preprocess"] += time.perf_counter() - started
        started = time.perf_counter()

        def stage_progress(fraction, text, start=start):
            report(start + share * (0.15 + 0.85 * fraction), text)

        probabilities, device = run_network(stage, image, device, tta, stage_progress, cancel, precision)
        if number and stage.blend_previous:
            probabilities = blend_previous(probabilities, stage, canonical, previous, card.stages[number - 1],
                                           previous_canonical)
        timings["network"] += time.perf_counter() - started
    return probabilities, canonical, device, timings


def segment(channels, task, *, device="auto", tta=False, keep_largest=True, progress=None, cancel=None,
            models_dir=None, precision="auto"):
    """Segment `channels` (SimpleITK 3-D images; the first defines the output grid) with a task's model.

    precision: auto, fp32, bf16 or fp16 for the network (see pick_precision); the result records the one used."""
    timings, warnings = {}, []

    def report(fraction, stage_text):
        if progress is not None:
            progress(float(fraction), stage_text)

    started = time.perf_counter()
    card = modelcard.find_card(task, models_dir or modelcard.MODELS_DIR)
    validate_channels(channels, card.channels)
    if card.modality == "CT" and not looks_like_ct(channels[0]):
        warnings.append(f"The input does not look like CT (no voxels below -50 HU) but task '{task}' expects CT")
    device = pick_device(device)
    precision = pick_precision(precision, device, card)
    report(0.0, "Loading model")
    for stage in card.stages:
        network_for(stage, device)
    timings["load"] = time.perf_counter() - started

    probabilities, canonical, device, stage_timings = run_stages(channels, card, device, tta, report, cancel,
                                                                 precision)
    timings.update(stage_timings)

    report(0.8, "Resampling to the input grid")
    started = time.perf_counter()
    probabilities = task_probabilities(probabilities, card.stages[-1], card)
    target = channels[0]
    label_array = labels_on_input_grid(probabilities, canonical, target,
                                       [label.value for label in card.trained_labels], cancel)
    report(0.9, "Post-processing")
    voxel_ml = float(np.prod(target.GetSpacing())) / 1000.0
    postprocess(label_array, card, target.GetSpacing(), keep_largest)
    labels = from_array(label_array, target)
    timings["postprocess"] = time.perf_counter() - started

    counts = np.bincount(label_array.ravel(), minlength=256)
    volumes = {label.value: float(counts[label.value] * voxel_ml) for label in card.trained_labels}
    report(1.0, "Done")
    return SegmentationResult(labels, card, volumes, timings, device, warnings, precision)
