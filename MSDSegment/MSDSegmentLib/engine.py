"""The engine: input channels in, an integer label map on exactly the first channel's grid out."""

import contextlib
import sys
import threading
import time
import warnings as python_warnings
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import modelcard
from .errors import Cancelled, MSDSegmentError
from .imageio import looks_like_ct, validate_channels
from .boxes import bounding_box, union_box, within
from .inference import autocast, out_of_memory, predict_probabilities, windows_per_batch
from .postprocess import FULL_CONNECTIVITY, keep_largest_cluster, postprocess, touching
from .preprocessing import (from_array, index_bounds, interpolate, interpolation_operators, network_input,
                            physical_corners, resample)

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
    # {label value: {"confidence", "location_distance", "check", "reasons"}}: how far to trust each segment
    quality: dict = field(default_factory=dict)


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


def autocast_computes(precision, device):
    """Whether PyTorch's autocast really computes a convolution in `precision` on `device`. On the CPU this is asked
    of PyTorch itself: versions without fp16 CPU autocast turn it off with a warning and compute in fp32."""
    import torch

    if precision == "fp32":
        return True
    if device.startswith("cuda"):  # every CUDA GPU PyTorch supports has fp16; bf16 needs Ampere (8.0) or later
        if precision == "fp16":
            return True
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # PyTorch before 2.3 has no emulation to leave out
            return bool(torch.cuda.is_bf16_supported())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    one = torch.ones(1, 1, 1, 1, 1)
    with python_warnings.catch_warnings():
        python_warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type="cpu", dtype=dtype):
                return torch.nn.functional.conv3d(one, one).dtype == dtype
        except RuntimeError:
            return False


def usable_precision(precision, device):
    """(the precision the network runs in, a warning or None): `precision` where the device computes in it, else
    fp32, the card's reference, with a warning saying why. Neither a silent fp32 run reported as fp16 nor a torch
    error halfway through."""
    if autocast_computes(precision, device):
        return precision, None
    if device.startswith("cuda"):
        reason = "this GPU has no bf16 arithmetic (it needs an Ampere GPU or later)"
    else:
        import torch
        reason = f"PyTorch {torch.__version__} does not compute in {precision} on the CPU"
    return "fp32", f"{precision} was asked for but {reason}: the network ran in fp32"


_networks = {}  # (weights, sha256, device) -> network: kept between calls (Slicer, batch runs)


def network_for(stage, device):
    key = (stage.weights_path, stage.sha256, device)
    if key not in _networks:
        if len(_networks) >= 6:  # every network of the largest task (abdomen: 4) and then some
            _networks.clear()
        import torch

        # Channels-last 3-D tensors: oneDNN's (and cuDNN's) faster convolution layout, 25-30 % less time in bf16.
        _networks[key] = modelcard.load_stage_network(stage, device).to(memory_format=torch.channels_last_3d)
    return _networks[key]


def task_probabilities(probabilities, stage, card):
    """Network channels -> [background, task label 1, 2, ...]: classes the task does not use are background.
    The labels' channels are the stage's own arrays, not copies; the background is a new array, the unused classes
    added in order (as probabilities[unused].sum(axis=0) adds them, without first gathering them into one array)."""
    used = [stage.classes.index(label.source_class) for label in card.trained_labels]
    unused = [index for index in range(len(stage.classes)) if index not in used]
    background = probabilities[unused[0]].copy()
    for index in unused[1:]:
        background += probabilities[index]
    return [background] + [probabilities[index] for index in used]


def channel_argmax(probabilities, scratch=False):
    """argmax over the first (class) axis, the first class winning ties, as np.argmax(axis=0) but one
    contiguous pass per class (np.argmax across the first axis of a large array is several times slower).
    scratch: the first channel is a temporary that may be overwritten, so it is not copied."""
    winners = np.zeros(np.shape(probabilities[0]), np.uint8)
    best = probabilities[0] if scratch else probabilities[0].copy()
    for index in range(1, len(probabilities)):
        np.copyto(winners, np.uint8(index), where=probabilities[index] > best)
        if index < len(probabilities) - 1:  # the last class is compared with, never against
            np.maximum(best, probabilities[index], out=best)
    return winners


def foreground_box_on_input(foreground, canonical, target):
    """Index box of the input grid that can contain foreground (everything else is background), from the voxels
    of the stage grid that may be foreground (`foreground`, a mask)."""
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


def kept_on_stage_grid(winners, card, spacing, plausible):
    """The voxels of a task's labels on its last stage's grid (`winners`: 0 background, i the card's i-th trained
    label) that post-processing can keep: each organ's cluster as keep_largest_cluster picks it there (`plausible`:
    {label value: index centroid on this grid -> bool}), and the tumour pieces within two voxels of it. The input
    grid's box is drawn around them, so that pieces post-processing removes (specks of the spleen's channel beside
    the liver, across the abdomen) do not widen what is resampled and post-processed voxel by voxel."""
    from scipy import ndimage

    labels = winners.copy()
    organs = np.zeros(labels.shape, bool)
    for index, label in enumerate(card.trained_labels, start=1):
        if label.kind == "organ":
            keep_largest_cluster(labels, index, spacing, label.component_gap_mm, plausible.get(label.value))
            organs |= labels == index
    tumours = np.isin(labels, [index for index, label in enumerate(card.trained_labels, start=1)
                               if label.kind == "tumour"])
    if not tumours.any():
        return organs
    pieces, _ = ndimage.label(tumours, FULL_CONNECTIVITY)
    voxels = np.nonzero(tumours)
    near = np.unique(pieces[voxels][touching(organs, voxels, reach=2)])
    return organs | np.isin(pieces, near[near > 0])


def labels_on_input_grid(probabilities, canonical, target, label_values, cancel=None, kept_values=(), foreground=None):
    """Argmax of linearly resampled probabilities on the input grid, slab by slab (bounded memory).

    Returns the label array over the index box outside which every voxel is background, that box (slices),
    and {value: its probability (float16) over the voxels it labels, zero elsewhere in the box} for each of
    `kept_values` (the tumour statistics read it there); (None, None, {}) when
    nothing is foreground. Arrays on the input grid are in SimpleITK's array order (z, y, x), as the box is:
    what SimpleITK resamples is used as it comes, with no transposed copy.
    Only the foreground classes are resampled: linear interpolation keeps the classes summing to one, so the
    background is one minus their sum (and one outside the canonical grid, where the others are zero).
    `foreground`: the stage grid's voxels that may be foreground (kept_on_stage_grid); by default every voxel
    the argmax labels."""
    if foreground is None:
        foreground = channel_argmax(probabilities) > 0
    box = foreground_box_on_input(foreground, canonical, target)
    if box is None:
        return None, None, {}
    lower, upper = box
    shape = [int(b - a) for a, b in zip(lower, upper)][::-1]
    out = np.zeros(shape, np.uint8)
    kept = {value: np.zeros(shape, np.float16) for value in kept_values}
    images = [from_array(p, canonical, np.float32) for p in probabilities[1:]]
    slab_voxels = int(np.prod(upper[:2] - lower[:2]))
    slab = max(1, CHUNK_BYTES // (4 * (len(images) + 1) * slab_voxels))
    values = np.asarray([0] + list(label_values), np.uint8)
    renumber = not np.array_equal(values, np.arange(len(values)))  # a task's values are mostly 1, 2, ... already
    for z in range(lower[2], upper[2], slab):
        if cancel is not None and cancel():
            raise Cancelled()
        top = min(z + slab, upper[2])
        reference = sitk.Image([int(n) for n in (upper[0] - lower[0], upper[1] - lower[1], top - z)], sitk.sitkUInt8)
        reference.SetSpacing(target.GetSpacing())
        reference.SetDirection(target.GetDirection())
        reference.SetOrigin(target.TransformIndexToPhysicalPoint([int(lower[0]), int(lower[1]), int(z)]))
        slabs = [resample(image, reference, sitk.sitkLinear, 0.0) for image in images]
        resampled = [sitk.GetArrayViewFromImage(image) for image in slabs]
        background = resampled[0] + resampled[1] if len(resampled) > 1 else resampled[0].copy()
        for channel in resampled[2:]:  # the classes' sum, added in the order np.sum(axis=0) adds them
            background += channel
        np.subtract(1.0, background, out=background)
        winners = channel_argmax([background] + resampled, scratch=True)
        out[z - lower[2]:top - lower[2]] = values[winners] if renumber else winners
        for value, probability in kept.items():
            # Only where the value won: all that post-processing reads, and float16 conversion is slow for the
            # tiny probabilities elsewhere (subnormal numbers; 0.6 s over the bench CT's liver box).
            channel = list(label_values).index(value) + 1
            won = winners == channel
            probability[z - lower[2]:top - lower[2]][won] = resampled[channel - 1][won]
    return out, tuple(slice(int(a), int(b)) for a, b in zip(lower[::-1], upper[::-1])), kept


def run_network(stage, image, device, tta, progress, cancel, precision="fp32"):
    """Sliding-window probabilities. The inferer moves the blended output to the computer's memory where the GPU
    cannot hold it (inference.py); what still does not fit on the GPU runs on the CPU, with a message."""
    mirror_axes = stage.mirror_axes if tta else []
    network = network_for(stage, device)
    batch = windows_per_batch(stage.network["filters"], stage.patch_size)
    try:
        return predict_probabilities(network, image, stage.patch_size, device, mirror_axes, stage.overlap,
                                     progress=lambda f: progress(f, "Running network"), cancel=cancel,
                                     sw_batch_size=batch, precision=precision), device
    except Exception as error:
        if device != "cuda" or not out_of_memory(error):
            raise
        import torch
        torch.cuda.empty_cache()
        progress(0.0, "GPU out of memory: running on the CPU instead")
        network = network_for(stage, "cpu")
        return predict_probabilities(network, image, stage.patch_size, "cpu", mirror_axes, stage.overlap,
                                     progress=lambda f: progress(f, "Running network (CPU)"), cancel=cancel,
                                     sw_batch_size=batch, precision="fp32"), "cpu"


def region_of_interest(winners, stage, canonical, roi):
    """Physical corners of the box around the voxels `stage` labelled as one of the ROI classes (`winners`: its
    channel_argmax), plus the ROI margin; None when it labelled none of them. With `cluster_gap_mm` the box holds
    only the largest cluster of those voxels (as post-processing would keep it), not stray blobs elsewhere."""
    wanted = [stage.classes.index(name) for name in roi["classes"] if name in stage.classes]
    found = np.isin(winners, wanted).astype(np.uint8)
    if "cluster_gap_mm" in roi:
        keep_largest_cluster(found, 1, canonical.GetSpacing(), roi["cluster_gap_mm"])
    box = bounding_box(found, margin=0)
    if box is None:
        return None
    lower = canonical.TransformContinuousIndexToPhysicalPoint([s.start - 0.5 for s in box])
    upper = canonical.TransformContinuousIndexToPhysicalPoint([s.stop - 0.5 for s in box])
    margin = np.asarray(roi["margin_mm"], dtype=float)
    return np.asarray(lower) - margin, np.asarray(upper) + margin


def blend_previous(probabilities, stage, canonical, previous, previous_stage, previous_canonical, tumours=()):
    """(1 - w) x this stage's probabilities + w x the previous stage's, w = `stage.blend_previous`.

    The previous stage's channels are matched to this stage's classes by name and resampled linearly onto
    this stage's grid; its other classes, and everything outside its grid, count as background.
    With `stage.tumour_blend_previous` (t), each (organ, tumour) channel pair of `tumours` keeps its total from
    that average but splits it between organ and tumour as the average with weight t does: the stage that sees
    small lesions best can decide the tumour without also deciding the organ's outline.
    """
    matched = np.zeros(probabilities.shape, np.float32)  # filled in place: one array, not one per step
    operators = interpolation_operators(previous_canonical, canonical)
    for index, name in enumerate(stage.classes[1:], start=1):
        if name in previous_stage.classes:
            matched[index] = interpolate(previous[previous_stage.classes.index(name)], operators)
    np.sum(matched[1:], axis=0, out=matched[0])
    np.subtract(1.0, matched[0], out=matched[0])
    split = {}  # the average with weight t, of the channels it splits only
    if stage.tumour_blend_previous is not None:
        weight = stage.tumour_blend_previous
        split = {index: (1.0 - weight) * probabilities[index] + weight * matched[index]
                 for index in sorted({index for pair in tumours for index in pair})}
    blended = probabilities * (1.0 - stage.blend_previous)
    matched *= stage.blend_previous
    blended += matched
    if not split:
        return blended
    for organ, tumour in tumours:
        total, split_total = blended[organ] + blended[tumour], split[organ] + split[tumour]
        share = np.divide(split[tumour], split_total, out=np.zeros_like(split_total), where=split_total > 0)
        blended[tumour] = total * share
        blended[organ] = total - blended[tumour]
    return blended


def tumour_channels(card, stage):
    """(organ channel, tumour channel) of `stage` for each of the card's tumour labels whose organ it also has."""
    pairs = []
    for label in card.labels:
        organ = card.organ_of(label) if label.kind == "tumour" else None
        if organ and label.source_class in stage.classes and organ.source_class in stage.classes:
            pairs.append((stage.classes.index(organ.source_class), stage.classes.index(label.source_class)))
    return pairs


def blas_leaving_a_core():
    """Limits numpy's BLAS to one thread fewer than it has (at least one); returns what restores it."""
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas")
    threads = min((library["num_threads"] for library in blas.info()), default=1)
    return blas.limit(limits=max(1, threads - 1))


class NetworkLoader:
    """Imports PyTorch and MONAI, picks the device and precision and loads a card's networks in a background
    thread: those seconds overlap with reading and preparing the input. result() waits until the networks are
    ready (or the loading failed, and raises what it raised there); the thread then imports SciPy's ndimage for
    post-processing while the first network runs. The thread that creates a loader asks for its result() and
    close()s it."""

    def __init__(self, card, device, precision):
        self.device, self.precision, self.error, self.warnings = None, None, None, []
        self.ready = threading.Event()
        # Importing PyTorch keeps a core busy for a second or more while the caller prepares the input with numpy's
        # BLAS, whose threads, one per core, each wait for the slowest: on two cores the first stage's preparing
        # took 0.6-1.5 s beside the import against 0.3 s with one thread. Until the networks are ready, BLAS leaves
        # the import its core (restored by the caller's thread: never while BLAS runs there).
        self.blas_limit = blas_leaving_a_core() if "torch" not in sys.modules else None
        self.thread = threading.Thread(target=self.load, args=(card, device, precision), name="network-loader",
                                       daemon=True)
        self.thread.start()

    def load(self, card, device, precision):
        try:
            self.device = pick_device(device)
            self.precision, warning = usable_precision(pick_precision(precision, self.device, card), self.device)
            self.warnings += [warning] if warning and precision != "auto" else []  # auto settles quietly
            for stage in card.stages:
                network_for(stage, self.device)
        except BaseException as error:  # re-raised in the caller's thread
            self.error = error
            return
        finally:
            self.ready.set()
        # After the networks, not before them: there, on two cores, its 0.2-0.4 s delayed the first network as
        # much. Where SciPy is missing, post-processing's own import says so.
        with contextlib.suppress(ImportError):
            import scipy.ndimage  # noqa: F401

    def result(self):
        self.ready.wait()
        self.restore_blas()
        if self.error is not None:
            raise self.error
        return self.device, self.precision

    def close(self):
        """Waits for the thread to end (a run that stops early must not leave it importing at exit)."""
        self.restore_blas()
        self.thread.join()

    def restore_blas(self):
        if self.blas_limit is not None:
            self.blas_limit.restore_original_limits()
            self.blas_limit = None


_preloaded = {}  # (task, device, precision, models folder) -> a NetworkLoader started by preload()


def discard_preloads():
    """Wait for and forget preloaded networks no segment() will use (the input could not be read)."""
    while _preloaded:
        _preloaded.popitem()[1].close()


def preload(task, device="auto", precision="auto", models_dir=None):
    """Start loading a task's networks now (PyTorch, MONAI and the weights, in a background thread), for a
    segment() call that follows: the command line calls it before reading the input, which SimpleITK reads
    without holding the GIL. A task that does not exist is left for segment() to report."""
    try:
        card = modelcard.find_card(task, models_dir or modelcard.MODELS_DIR)
    except MSDSegmentError:
        return
    _preloaded[(task, device, precision, models_dir)] = NetworkLoader(card, device, precision)


def warm_up(task, device="auto", precision="auto", models_dir=None):
    """Load a task's networks and run each once on a batch of empty windows, before any input exists: PyTorch's
    first call of a network at a batch shape sets up its kernels, which otherwise the first case waits for. The
    panel's engine process does this while the user is still choosing (worker --standby)."""
    import torch

    card = modelcard.find_card(task, models_dir or modelcard.MODELS_DIR)
    device, precision = NetworkLoader(card, device, precision).result()
    for stage in card.stages:
        windows = torch.zeros(windows_per_batch(stage.network["filters"], stage.patch_size), len(card.channels),
                              *stage.patch_size, device=device)
        with torch.inference_mode(), autocast(device, precision):
            network_for(stage, device)(windows.contiguous(memory_format=torch.channels_last_3d))


def stage_key(card, number):
    """What a stage's result depends on: it and every stage before it (the same in every card that shares them)."""
    return tuple(repr(stage) for stage in card.stages[:number + 1])


class Cascade:
    """Runs cards' stages on one input, each stage once: a combined task's single tasks share their first
    stages (the same weights on the same region), which run for the first task and are reused for the others.

    Each later stage sees the region of interest the previous one found (or, where that found none of the ROI
    classes, the previous stage's own region) and is blended with the previous stage where the card says so.
    `timings`: seconds in preprocessing, the network and waiting for the networks to load."""

    def __init__(self, channels, loader, tta, cancel):
        self.channels, self.loader, self.tta, self.cancel = channels, loader, tta, cancel
        self.device = self.precision = None
        self.done = {}  # stages run so far (a card's stages up to one) -> (probabilities, canonical grid, region)
        self.argmaxes, self.centroids = {}, {}  # what several tasks read of a stage, computed once
        self.timings = {"load": 0.0, "preprocess": 0.0, "network": 0.0}

    def last_stage(self, card, report):
        """The probabilities of the card's last stage and the canonical grid they are on."""
        region, probabilities, canonical = None, None, None
        share = 0.75 / len(card.stages)  # of the progress bar, from 0.05 to 0.8
        for number, stage in enumerate(card.stages):
            key = stage_key(card, number)
            if key not in self.done:
                if number and stage.roi:
                    region = region_of_interest(self.winners(stage_key(card, number - 1)), card.stages[number - 1],
                                                canonical, stage.roi) or region
                previous = (probabilities, canonical)
                probabilities, canonical = self.run_stage(number, stage, card, region, previous,
                                                          0.05 + number * share, share, report)
                self.done[key] = (probabilities, canonical, region)
            probabilities, canonical, region = self.done[key]
        return probabilities, canonical

    def keep_only(self, cards):
        """Forget every stage run so far that is not one of `cards`' stages: a combined task's later parts no
        longer need it, and its probabilities (one array per class) are the largest thing held."""
        needed = {stage_key(card, number) for card in cards for number in range(len(card.stages))}
        for key in [key for key in self.done if key not in needed]:
            del self.done[key]
            self.argmaxes.pop(key, None)
        self.centroids = {entry: point for entry, point in self.centroids.items() if entry[0] in needed}

    def winners(self, key):
        """channel_argmax of the probabilities of the stage run as `key` (stage_key)."""
        if key not in self.argmaxes:
            self.argmaxes[key] = channel_argmax(self.done[key][0])
        return self.argmaxes[key]

    def organ_centroid(self, card, organ):
        """The physical centroid (mm, LPS) of the largest piece of `organ` as the finest of the card's stages
        that segments it found it, or None (no such stage, or nothing found). A stage that has the organ as a
        context class only does not count: its region may hold only the part of the organ beside its own."""
        for number in reversed(range(len(card.stages))):
            stage = card.stages[number]
            key = stage_key(card, number)
            if organ not in stage.classes or organ in stage.context_classes or key not in self.done:
                continue
            if (key, organ) not in self.centroids:
                self.centroids[key, organ] = self.largest_piece_centroid(key, stage.classes.index(organ))
            return self.centroids[key, organ]
        return None

    def largest_piece_centroid(self, key, channel):
        canonical = self.done[key][1]
        found = (self.winners(key) == channel).astype(np.uint8)
        keep_largest_cluster(found, 1, canonical.GetSpacing())
        if not found.any():
            return None
        return np.array(canonical.TransformContinuousIndexToPhysicalPoint(np.argwhere(found).mean(axis=0).tolist()))

    def run_stage(self, number, stage, card, region, previous, start, share, report):
        if self.cancel is not None and self.cancel():
            raise Cancelled()
        report(start, "Preprocessing")
        started = time.perf_counter()
        image, canonical = network_input(self.channels, stage.spacing, stage.normalisation, region)
        self.timings["preprocess"] += time.perf_counter() - started
        started = time.perf_counter()
        if self.device is None:  # later stages keep the device the previous one ended on (a CUDA fallback)
            self.device, self.precision = self.loader.result()
        self.timings["load"] += time.perf_counter() - started
        started = time.perf_counter()

        def stage_progress(fraction, text):
            report(start + share * (0.15 + 0.85 * fraction), text)

        probabilities, device = run_network(stage, image, self.device, self.tta, stage_progress, self.cancel,
                                            self.precision)
        if device != self.device:  # the CPU fallback of a GPU out of memory runs in fp32
            self.device, self.precision = device, "fp32"
        self.timings["network"] += time.perf_counter() - started
        if number and stage.blend_previous:  # not the network's time: segment() counts it in post-processing
            probabilities = blend_previous(probabilities, stage, canonical, previous[0], card.stages[number - 1],
                                           previous[1], tumour_channels(card, stage))
        return probabilities, canonical


def location_distances(cascade, card):
    """{label value: physical point (mm, LPS) -> Mahalanobis distance from where the organ lies}, by the card's
    `location` (the offset learnt from the training labels) from the organ it is placed relative to, as the cascade
    found that organ."""
    distances = {}
    for label in card.trained_labels:
        location = label.location
        anchor = cascade.organ_centroid(card, location["relative_to"]) if location else None
        if anchor is None:
            continue
        inverse = np.linalg.inv(np.asarray(location["covariance_mm2"], dtype=float))
        mean = np.asarray(location["mean_mm"], dtype=float)

        def distance(point, inverse=inverse, mean=mean, anchor=anchor):
            offset = np.asarray(point, dtype=float) - anchor - mean
            return float(np.sqrt(offset @ inverse @ offset))

        distances[label.value] = distance
    return distances


def on_grid(distances, to_physical):
    """location_distances as functions of an index centroid, which `to_physical` takes to a physical point."""
    return {value: (lambda index, distance=distance: distance(to_physical(index)))
            for value, distance in distances.items()}


def input_box_points(target, box):
    """Index (array order z, y, x, in `box`) -> physical point, on the input grid."""
    start = np.array([part.start for part in box], dtype=float)
    return lambda index: target.TransformContinuousIndexToPhysicalPoint(
        (start + np.asarray(index, float))[::-1].tolist())


def stage_points(canonical):
    """Index (x, y, z) -> physical point, on a stage's canonical grid."""
    return lambda index: canonical.TransformContinuousIndexToPhysicalPoint(np.asarray(index, float).tolist())


def plausible_pieces(card, distances):
    """{label value: index centroid -> whether a piece there lies where the organ lies (within the card's
    largest Mahalanobis distance)}, from location_distances put on a grid (on_grid)."""
    limits = {label.value: label.location.get("max_distance") for label in card.trained_labels}
    return {value: (lambda index, distance=distance, limit=limits[value]: distance(index) <= limit)
            for value, distance in distances.items()}


def plausibility(cascade, card, target, box):
    return plausible_pieces(card, on_grid(location_distances(cascade, card), input_box_points(target, box)))


def count_and_centroid(mask):
    """The number of true voxels of `mask` and their mean index (None when there is none), from the count per
    index along each axis rather than from a list of every voxel's index."""
    count = int(np.count_nonzero(mask))
    if not count:
        return 0, None
    sums = [int(np.dot(np.count_nonzero(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)),
                       np.arange(mask.shape[axis]))) for axis in range(mask.ndim)]
    return count, np.array(sums, float) / count


def segment_quality(card, probabilities, winners, label_array, box, distances, voxel_ml, lesions=None):
    """How far to trust each segment. confidence: the mean probability of the label over the voxels the network
    gave it (on its own grid); location_distance: Mahalanobis distance of the segment's centroid from where the
    organ lies. A segment is to be checked when its confidence is below the card's calibrated minimum, when it
    lies away from where its organ lies, when an organ's volume is less than half the smallest or more than twice
    the largest in the training labels, or when an organ is not found at all. A tumour's entry also lists its
    lesions (postprocess), largest first. `winners`: channel_argmax(probabilities); `label_array`: the labels over
    `box` (labels_on_input_grid)."""
    minimum = card.quality.get("min_confidence", 0.0)
    quality = {}
    for index, label in enumerate(card.trained_labels, start=1):
        region = winners == index
        confidence = round(float(probabilities[index][region].mean()), 4) if region.any() else None
        found, centroid = count_and_centroid(label_array == label.value) if box is not None else (0, None)
        distance = None
        if found and label.value in distances:
            distance = round(distances[label.value](centroid), 3)
        reasons = []
        if not found and label.kind == "organ":
            reasons.append("not found")
        if found and confidence is not None and confidence < minimum:  # an empty segment shows nothing
            reasons.append(f"low confidence ({confidence:.2f} < {minimum:.2f})")
        if distance is not None and distance > label.location["max_distance"]:
            reasons.append(f"not where the {label.name.lower()} lies (distance {distance:.1f})")
        volume = found * voxel_ml
        if found and label.volume_ml and not 0.5 * label.volume_ml[0] <= volume <= 2 * label.volume_ml[1]:
            reasons.append(f"volume {volume:.0f} mL, outside what training saw ({label.volume_ml[0]:.0f}-"
                           f"{label.volume_ml[1]:.0f} mL)")
        quality[label.value] = {"confidence": confidence, "location_distance": distance, "check": bool(reasons),
                                "reasons": reasons}
        if label.kind == "tumour":
            quality[label.value]["lesions"] = sorted((lesions or {}).get(label.value, []),
                                                     key=lambda lesion: -lesion["volume_ml"])
    return quality


def modality_mismatch(card, channel):
    """Why the input does not look like the card's modality, or None: CT in HU has air and fat below -50, MR
    intensities are not negative."""
    if card.modality == "CT" and not looks_like_ct(channel):
        return "the input does not look like CT (no voxels below -50 HU)"
    if card.modality == "MR" and looks_like_ct(channel):
        return "the input looks like CT, not MR (voxels below -50)"
    return None


def flag_every_segment(quality, reason):
    """Mark every segment to be checked, `reason` first: a network given another modality than it learnt can
    return confident, plausible-looking segments (an MR's spleen at 240 mL), so no segment of it is to be trusted."""
    for entry in quality.values():
        entry["reasons"].insert(0, reason)
        entry["check"] = True


def task_labels(cascade, card, target, keep_largest, report):
    """A single task's labels on the input grid (its own values), post-processed: the label array over the index
    box outside which it is all background (array order z, y, x), that box (None, with no array, if it is empty)
    and each label's quality (segment_quality)."""
    probabilities, canonical = cascade.last_stage(card, report)
    report(0.8, "Resampling to the input grid")
    probabilities = task_probabilities(probabilities, card.stages[-1], card)
    winners = channel_argmax(probabilities)
    distances = location_distances(cascade, card)
    foreground = winners > 0
    if keep_largest and card.postprocessing_setting("keep_largest"):
        foreground = kept_on_stage_grid(winners, card, canonical.GetSpacing(),
                                        plausible_pieces(card, on_grid(distances, stage_points(canonical))))
    tumours = [label.value for label in card.trained_labels if label.kind == "tumour"]
    label_array, box, tumour_probabilities = labels_on_input_grid(
        probabilities, canonical, target, [label.value for label in card.trained_labels], cascade.cancel, tumours,
        foreground)
    report(0.9, "Post-processing")
    distances = on_grid(distances, input_box_points(target, box)) if box is not None else {}
    lesions = {}
    if box is not None:  # every label lies in the box: post-processing only removes or relabels voxels
        image = sitk.GetArrayViewFromImage(target)[box] if tumours else None
        lesions = postprocess(label_array, card, target.GetSpacing()[::-1], keep_largest,
                              plausible_pieces(card, distances), tumour_probabilities, image)
        for lesion in (lesion for found in lesions.values() for lesion in found):  # an index (x, y, z) of the input
            lesion["index"] = [int(part.start + i) for part, i in zip(box, lesion["index"])][::-1]
    voxel_ml = float(np.prod(target.GetSpacing())) / 1000.0
    return label_array, box, segment_quality(card, probabilities, winners, label_array, box, distances, voxel_ml,
                                             lesions)


def combined_labels(cascade, card, target, keep_largest, report):
    """A combined task's labels (as task_labels gives them): each single task's labels, exactly as that task gives
    them, moved to the combined card's values; a voxel two tasks label goes to the task listed first (the card's
    overlap order)."""
    parts, quality = [], {}
    for index, part in enumerate(card.parts):
        def part_report(fraction, text, index=index):
            report((index + fraction) / len(card.parts), f"{part.card.title.split(':')[0]}: {text}")

        label_array, box, part_quality = task_labels(cascade, part.card, target, keep_largest, part_report)
        cascade.keep_only([later.card for later in card.parts[index + 1:]])
        quality.update({part.values[value]: entry for value, entry in part_quality.items()})
        if box is not None:
            parts.append((part, label_array, box))
    if not parts:
        return None, None, quality
    whole = union_box([box for _, _, box in parts])
    combined = np.zeros([part.stop - part.start for part in whole], np.uint8)
    for part, label_array, box in parts:
        values = np.zeros(256, np.uint8)
        for value, combined_value in part.values.items():
            values[value] = combined_value
        region = combined[within(box, whole)]
        unclaimed = region == 0
        region[unclaimed] = values[label_array[unclaimed]]
    return combined, whole, quality


def label_image(label_array, box, target):
    """The label map on `target`'s grid: `label_array` pasted at `box`, background elsewhere."""
    whole = np.zeros(target.GetSize()[::-1], np.uint8)
    if box is not None:
        whole[box] = label_array
    image = sitk.GetImageFromArray(whole)
    image.CopyInformation(target)
    return image


def segment(channels, task, *, device="auto", tta=False, keep_largest=True, progress=None, cancel=None,
            models_dir=None, precision="auto"):
    """Segment `channels` (SimpleITK 3-D images; the first defines the output grid) with a task's model.

    precision: auto, fp32, bf16 or fp16 for the network (see pick_precision); the result records the one used."""
    warnings = []

    def report(fraction, stage_text):
        if progress is not None:
            progress(float(fraction), stage_text)

    started = time.perf_counter()
    loader = _preloaded.pop((task, device, precision, models_dir), None)
    try:
        card = modelcard.find_card(task, models_dir or modelcard.MODELS_DIR)
        validate_channels(channels, card.channels)
        mismatch = modality_mismatch(card, channels[0])
        if mismatch:
            warnings.append(f"{mismatch[0].upper()}{mismatch[1:]}: task '{task}' expects {card.modality}")
        report(0.0, "Loading model")
        loader = loader or NetworkLoader(card, device, precision)
        cascade = Cascade(channels, loader, tta, cancel)
        checks = time.perf_counter() - started

        started = time.perf_counter()
        target = channels[0]
        labelling = combined_labels if card.parts else task_labels
        label_array, box, quality = labelling(cascade, card, target, keep_largest, report)
    finally:  # a run that stops early (an error, a cancel) must not leave the loader importing at exit
        if loader is not None:
            loader.close()
    warnings += loader.warnings
    if mismatch:
        flag_every_segment(quality, mismatch)
    timings = dict(cascade.timings)
    timings["load"] += checks
    timings["postprocess"] = time.perf_counter() - started - sum(cascade.timings.values())
    voxel_ml = float(np.prod(target.GetSpacing())) / 1000.0
    # One comparison per label: np.bincount would first copy every voxel of the box to a 64-bit integer.
    counted = label_array if box is not None else np.zeros(0, np.uint8)
    volumes = {label.value: float(np.count_nonzero(counted == label.value) * voxel_ml) for label in card.trained_labels}
    labels = label_image(label_array, box, target)
    report(1.0, "Done")
    return SegmentationResult(labels, card, volumes, timings, cascade.device, warnings, cascade.precision,
                              dict(sorted(quality.items())))
