"""Post-processing of the label map on the input grid: largest component per organ, tumours kept
only where they touch their organ and exceed a minimum volume."""

import numpy as np
from scipy import ndimage

FULL_CONNECTIVITY = np.ones((3, 3, 3), bool)


def bounding_box(mask, margin=1):
    coords = np.argwhere(mask)
    if len(coords) == 0:
        return None
    lower = np.maximum(coords.min(axis=0) - margin, 0)
    upper = np.minimum(coords.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lower, upper))


def keep_largest_component(labels, value):
    """Set every component of `value` but the largest to background (in place)."""
    box = bounding_box(labels == value)
    if box is None:
        return
    crop = labels[box]
    components, count = ndimage.label(crop == value, FULL_CONNECTIVITY)
    if count <= 1:
        return
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    crop[(components > 0) & (components != int(np.argmax(sizes)))] = 0


def filter_tumours(labels, tumour, organ, min_voxels):
    """Drop tumour components that do not touch the organ or are smaller than `min_voxels` (in place).

    A speck too small to keep that touches the organ becomes organ (no hole in it); one away from
    the organ becomes background.
    """
    box = bounding_box(labels == tumour, margin=2)
    if box is None:
        return
    crop = labels[box]
    components, count = ndimage.label(crop == tumour, FULL_CONNECTIVITY)
    near_organ = ndimage.binary_dilation(crop == organ, FULL_CONNECTIVITY)
    for index in range(1, count + 1):
        component = components == index
        touches_organ = np.any(near_organ & component)
        if not touches_organ:
            crop[component] = 0
        elif component.sum() < min_voxels:
            crop[component] = organ


def min_tumour_voxels(card, voxel_ml):
    """The smallest tumour component post-processing keeps, in voxels of `voxel_ml` mL."""
    return int(np.ceil(card.postprocessing.get("min_tumour_ml", 0.1) / voxel_ml))


def postprocess(labels, card, voxel_ml, keep_largest=True):
    settings = card.postprocessing
    for label in card.trained_labels:
        if label.kind == "organ" and keep_largest and settings.get("keep_largest", True):
            keep_largest_component(labels, label.value)
    for label in card.trained_labels:
        if label.kind == "tumour":
            organ = next(o.value for o in card.labels if o.name == label.organ)
            filter_tumours(labels, label.value, organ, min_tumour_voxels(card, voxel_ml))
    return labels
