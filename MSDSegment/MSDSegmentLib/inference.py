"""Network inference on the canonical grid: MONAI's Gaussian-weighted sliding window, optional
mirroring test-time augmentation, progress reports and cancellation between windows.

GPU memory: MONAI's adaptive sliding-window inferer (SlidingWindowInfererAdapt) blends the windows on the GPU
while they fit, and when the output buffer does not, on the GPU in slabs, then in the computer's memory, with the
network still on the GPU. It also remembers the image size that failed, so that the next image as large starts
on the CPU buffer. What still does not fit (the network on one window) raises the out-of-memory error: the
engine then runs the stage on the CPU (engine.run_network)."""

import contextlib
import itertools
import math

import numpy as np

from .errors import Cancelled
from .network import import_monai


def window_count(shape, patch_size, overlap):
    """Number of windows MONAI's sliding window visits (to report progress as a fraction)."""
    count = 1
    for size, patch in zip(shape, patch_size):
        interval = max(int(patch * (1 - overlap)), 1)
        count *= 1 if size <= patch else math.ceil((size - patch) / interval) + 1
    return count


def mirror_sets(mirror_axes):
    """Every combination of flips over the axes the model was trained to be symmetric in."""
    axes = list(mirror_axes)
    return [list(c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def out_of_memory(error):
    """Whether `error` is PyTorch's out-of-memory error (by its type: its text differs between versions)."""
    import torch

    kinds = tuple(kind for kind in (getattr(torch, "OutOfMemoryError", None),
                                    getattr(torch.cuda, "OutOfMemoryError", None)) if kind is not None)
    return isinstance(error, kinds)


DEFAULT_WINDOWS_PER_BATCH = 2  # windows through the network at once
# One batch's activations at most as large as 2 windows of the fine stage (8 feature maps at full resolution on
# 80 x 80 x 48 voxels): a wider network or a larger patch takes fewer windows at once. On two CPU cores (bf16) 2
# windows took no longer than 4, and the pancreas task, whose peak is its all-organ fine stage's network, peaked at
# 1.30-1.35 GB of process memory against 1.48-1.50 GB with 4 (the wide fine stage, 16 maps, in fp32: 1.68 GB with 4
# windows, 1.38 GB with 2).
WINDOW_FEATURE_BUDGET = DEFAULT_WINDOWS_PER_BATCH * 8 * 80 * 80 * 48


def windows_per_batch(filters, patch_size):
    """How many windows go through a network with these feature maps per level and this patch at once."""
    per_window = int(filters[0]) * int(np.prod(patch_size))
    return max(1, min(DEFAULT_WINDOWS_PER_BATCH, WINDOW_FEATURE_BUDGET // per_window))


_inferers = {}  # (patch size, overlap, windows per batch) -> the adaptive inferer, which learns which sizes fit


def inferer_for(patch_size, overlap, sw_batch_size):
    import_monai()
    from monai.inferers import SlidingWindowInfererAdapt

    key = (tuple(patch_size), float(overlap), int(sw_batch_size))
    if key not in _inferers:
        _inferers[key] = SlidingWindowInfererAdapt(list(patch_size), sw_batch_size, overlap, mode="gaussian",
                                                   padding_mode="replicate")
    return _inferers[key]


def autocast(device, precision):
    """The context the network runs in: autocast to bf16 or fp16, or nothing for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def predict_probabilities(network, image, patch_size, device="cpu", mirror_axes=(), overlap=0.5,
                          progress=None, cancel=None, sw_batch_size=DEFAULT_WINDOWS_PER_BATCH, precision="fp32"):
    """Softmax probabilities (classes, X, Y, Z) as float32 numpy for a (channels, X, Y, Z) array.

    precision: "fp32", or "bf16" / "fp16" for the network's layers (autocast); the windows are blended and
    the softmax taken in fp32 either way. The input stays on `device`, and so do the blended outputs."""
    import torch

    inferer = inferer_for(patch_size, overlap, sw_batch_size)
    flips = mirror_sets(mirror_axes)
    total = window_count(image.shape[1:], patch_size, overlap) * len(flips)
    done = [0]

    def predictor(windows):
        if cancel is not None and cancel():
            raise Cancelled()
        with autocast(device, precision):
            logits = network(windows.contiguous(memory_format=torch.channels_last_3d))
        done[0] += windows.shape[0]
        if progress is not None:
            progress(min(done[0] / total, 1.0))
        return logits.float()  # blended in fp32: a bf16 sum of overlapping windows would lose precision

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    summed = None
    # Each map below holds every class on the whole region (16 classes for the wide fine stage): the logits are
    # dropped once the softmax is taken, and the sum and mean are taken in place, so that no more than two such maps
    # are alive at once. The values are the same as those of the out-of-place operations.
    with torch.inference_mode():
        for flip in flips:
            dims = [axis + 2 for axis in flip]
            source = torch.flip(tensor, dims) if dims else tensor
            logits = inferer(source, predictor)  # on the CPU where the GPU could not hold the blended output
            probabilities = torch.softmax(logits.float(), dim=1)
            del logits
            probabilities = torch.flip(probabilities, dims) if dims else probabilities
            if summed is not None and summed.device != probabilities.device:
                summed = summed.cpu()
                probabilities = probabilities.cpu()
            summed = probabilities if summed is None else summed.add_(probabilities)
            del probabilities
        if len(flips) > 1:
            summed.div_(len(flips))
    return summed[0].cpu().numpy()
