"""Index boxes of arrays (tuples of slices, one per axis): the one helper for every box the engine and Training
draw around voxels."""

import numpy as np


def bounding_box(mask, margin=1):
    """Slices of the smallest box holding every true voxel of `mask`, grown by `margin` voxels (one number, or
    one per axis) within the array; None if no voxel is true. Two passes over the mask: one along the last axis,
    whose result gives the other axes, and one for the last axis."""
    margins = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    across_last = np.any(mask, axis=-1)
    present = [np.flatnonzero(np.any(across_last, axis=tuple(a for a in range(mask.ndim - 1) if a != axis)))
               for axis in range(mask.ndim - 1)]
    present.append(np.flatnonzero(np.any(mask, axis=tuple(range(mask.ndim - 1)))))
    if len(present[-1]) == 0:
        return None
    return tuple(slice(max(int(p[0]) - int(m), 0), min(int(p[-1]) + int(m) + 1, n))
                 for p, m, n in zip(present, margins, mask.shape))


def union_box(boxes):
    """The smallest box holding every one of `boxes`."""
    return tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes))
                 for axis in range(len(boxes[0])))


def intersect(box, other):
    """The part of `box` inside `other` (empty slices where they do not meet)."""
    return tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box, other))


def within(box, outer):
    """`box` (inside `outer`) as slices of the array that covers `outer`."""
    return tuple(slice(part.start - o.start, part.stop - o.start) for part, o in zip(box, outer))
