"""Patch sampling with foreground oversampling, and augmentation; its whole random state can be saved
and restored so that a resumed run draws exactly the batches an uninterrupted one would."""

import numpy as np
import torch
from scipy import ndimage
from monai.data import set_track_meta
from monai.transforms import (CenterSpatialCropd, Compose, Identityd, OneOf, Rand3DElasticd, RandAdjustContrastd,
                              RandAffined, RandFlipd, RandGaussianNoised, Randomizable, RandScaleIntensityd,
                              RandShiftIntensityd)

set_track_meta(False)  # plain tensors: faster, and nothing downstream needs MONAI's metadata

CONTEXT = 1.25  # crop this much more than the patch so rotations do not pull in padding


def context_size(patch_size):
    """The crop drawn for a patch, before augmentation cuts the patch from it."""
    return [int(round(p * CONTEXT)) for p in patch_size]


def sometimes(transform, probability, otherwise):
    """`transform` (made with prob=1) with `probability`, else `otherwise`. MONAI's RandAffined and Rand3DElasticd
    resample through an identity grid when their draw says no, and the elastic one draws its whole offset field
    first: at prob 0.1 it cost 62 ms a fine-stage crop, against 28 ms for drawing the crop (one core)."""
    return OneOf([transform, otherwise], weights=[probability, 1.0 - probability])


def build_augmentation(patch_size, mirror_axes):
    keys = ["image", "label"]
    transforms = [
        # Either path cuts the context crop to the patch: the identity grid RandAffined used when not rotating
        # took the centre, as the crop does (the context adds an even number of voxels on every axis).
        sometimes(RandAffined(keys, prob=1.0, rotate_range=[0.26] * 3, scale_range=[0.15] * 3,
                              spatial_size=patch_size, mode=["bilinear", "nearest"], padding_mode="border"),
                  0.25, CenterSpatialCropd(keys, roi_size=patch_size)),
        sometimes(Rand3DElasticd(keys, prob=1.0, sigma_range=(5, 7), magnitude_range=(10, 40),
                                 spatial_size=patch_size, mode=["bilinear", "nearest"], padding_mode="border"),
                  0.1, Identityd(keys)),
        RandGaussianNoised("image", prob=0.15, std=0.1),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandShiftIntensityd("image", offsets=0.1, prob=0.15),
        RandAdjustContrastd("image", prob=0.15, gamma=(0.7, 1.5)),
    ]
    transforms += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in mirror_axes]
    return Compose(transforms)


def random_states(transform):
    """Every numpy RandomState an augmentation pipeline draws from, in a fixed order.

    MONAI's dictionary transforms keep their own state and so do the array transforms inside them
    (RandAffined -> RandAffine -> RandAffineGrid, RandGaussianNoised -> RandGaussianNoise, ...): all of
    them must be saved for a resumed run to draw the same augmentations.
    """
    found, seen = [], set()

    def visit(node):
        if isinstance(node, Randomizable) and id(node) not in seen:
            seen.add(id(node))
            if id(node.R) not in seen:
                seen.add(id(node.R))
                found.append(node.R)
        children = node.transforms if isinstance(node, Compose) else vars(node).values()
        for child in children:
            if isinstance(child, (Randomizable, Compose)):
                visit(child)

    visit(transform)
    return found


def crop(image, label, centre, size):
    """(image (C, *size), label (1, *size)) centred on `centre`, padded with each channel's minimum."""
    out_image = np.empty((image.shape[0], *size), np.float32)
    out_image[:] = image.reshape(image.shape[0], -1).min(axis=1)[:, None, None, None]
    out_label = np.zeros(size, np.uint8)
    source, target = [], []
    for c, n, s in zip(centre, label.shape, size):
        start = int(c) - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    out_image[(slice(None), *target)] = image[(slice(None), *source)]
    out_label[tuple(target)] = label[tuple(source)]
    return out_image, out_label[None]


class PatchSampler:
    def __init__(self, cases, patch_size, classes, mirror_axes, seed=0, foreground_fraction=0.5, lesions=None):
        self.cases = cases
        self.patch_size = list(patch_size)
        self.classes = classes
        self.foreground_fraction = foreground_fraction
        self.lesions = lesions  # optional Training.lesions.TrainingLesions, drawn from self.rng
        self.rng = np.random.default_rng(seed)
        self.augment = build_augmentation(self.patch_size, mirror_axes)
        self.augment.set_random_state(seed=seed)

    def reseed(self, seed):
        """A fresh stream (torchrun ranks other than 0 after a resume: only rank 0's state is saved)."""
        self.rng = np.random.default_rng(seed)
        self.augment.set_random_state(seed=seed)

    def state(self):
        return {"rng": self.rng.bit_generator.state,
                "random_states": [random.get_state() for random in random_states(self.augment)]}

    def load_state(self, state):
        self.rng.bit_generator.state = state["rng"]
        for random, saved in zip(random_states(self.augment), state["random_states"]):
            random.set_state(saved)

    @staticmethod
    def _present_classes(case):
        return [index for index, coords in case["locations"].items() if len(coords)]

    def _centre(self, case):
        present = self._present_classes(case)
        if present and self.rng.random() < self.foreground_fraction:
            # Classes are drawn uniformly so a small organ (pancreas) is seen as often as a large one.
            coords = case["locations"][present[self.rng.integers(len(present))]]
            return coords[self.rng.integers(len(coords))].astype(int)
        return np.array([self.rng.integers(n) for n in case["label"].shape])

    def _lesion_centred(self, case):
        """A crop centred on a synthetic lesion painted into a copy of the whole case: painted into a crop,
        a lesion (a few mL in an organ of 1-2 L) often lies at the patch edge or outside it. The lesion is
        drawn uniformly among those painted, not by voxel, so that small ones are centred as often as large."""
        chosen = self.lesions.choose_organ(self._present_classes(case), self.rng)
        if chosen is None:
            return None
        organ, tumour = chosen
        image, label = case["image"].copy(), case["label"].copy()
        self.lesions(image, label, self.rng, probability=1.0, organs=[organ])
        components, count = ndimage.label(label == tumour)
        if not count:
            return None
        lesion = np.argwhere(components == self.rng.integers(1, count + 1))
        return crop(image, label, lesion[self.rng.integers(len(lesion))], context_size(self.patch_size))

    def _draw(self, case):
        if self.lesions and self.rng.random() < self.lesions.centred_fraction:
            drawn = self._lesion_centred(case)
            if drawn is not None:
                return drawn
        image, label = crop(case["image"], case["label"], self._centre(case), context_size(self.patch_size))
        if self.lesions:
            self.lesions.vary_enhancement(image, label[0], self.rng)
            self.lesions.paint_masses(image, label[0], self.rng)
            self.lesions(image, label[0], self.rng)
        return image, label

    def draw(self, batch_size):
        """Crops with some context around the patch, lesions painted in, not yet augmented: (image, label)
        tensors, both (batch, C, *context size)."""
        crops = [self._draw(self.cases[self.rng.integers(len(self.cases))]) for _ in range(batch_size)]
        return (torch.from_numpy(np.stack([image for image, _ in crops])),
                torch.from_numpy(np.stack([label for _, label in crops])))

    def augment_batch(self, images, labels, device=None):
        """Each crop augmented (its own affine, elastic and intensity draws) and cut to the patch, on `device`:
        MONAI's transforms run where their input is. The augmentations draw from their own random states, not from
        the crops' generator."""
        out_images, out_labels = [], []
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        for image, label in zip(images, labels):
            item = self.augment({"image": image, "label": label})
            out_images.append(torch.as_tensor(item["image"]))
            out_labels.append(torch.as_tensor(item["label"]).round().long())
        return torch.stack(out_images), torch.stack(out_labels)

    def sample(self, batch_size, device=None):
        return self.augment_batch(*self.draw(batch_size), device)


def stream_seed(seed, rank, worker, step):
    """The seed of one worker's stream of batches: a function of the run's seed, the torchrun rank, the worker and
    the step the stream starts at, so that a resumed run draws new batches rather than replaying the first ones."""
    return int(np.random.SeedSequence([seed, rank, worker, step]).generate_state(1)[0])


class WorkerBatches(torch.utils.data.IterableDataset):
    """Endless augmented batches from one copy of the sampler in each DataLoader worker, each copy reseeded with its
    own stream_seed. The DataLoader takes them from its workers in turn, so for a given seed and worker count the
    batches come in the same order every time."""

    def __init__(self, sampler, batch_size, seed, rank, step):
        super().__init__()
        self.sampler, self.batch_size = sampler, batch_size
        self.seed, self.rank, self.step = seed, rank, step

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        self.sampler.reseed(stream_seed(self.seed, self.rank, worker.id if worker else 0, self.step))
        while True:
            yield self.sampler.sample(self.batch_size)


def batch_stream(sampler, batch_size, workers, seed=0, rank=0, step=0, device=None):
    """Augmented batches on `device`, endlessly.

    workers=0: drawn in this process from the sampler, whose saved state resumes them exactly, and augmented on
    `device`. workers>0: drawn and augmented on the CPU by that many processes, seeded by stream_seed (a resumed run
    draws other batches than an uninterrupted one would); this process only moves them to `device`. Measured on an
    H200 with 16 cores (wide fine stage, batches of 4): the network step takes 23 ms; augmenting on the GPU took
    120 ms a batch in the training process alone and 260 ms with workers drawing beside it, which bounded two runs
    side by side to 0.36 s a step, while 14 workers drew a batch every 29 ms (Training/README.md, "On GPUs")."""
    if not workers:
        while True:
            yield sampler.sample(batch_size, device)
    loader = torch.utils.data.DataLoader(WorkerBatches(sampler, batch_size, seed, rank, step), batch_size=None,
                                         num_workers=workers, prefetch_factor=4)
    for images, labels in loader:
        yield images.to(device or "cpu"), labels.to(device or "cpu")
