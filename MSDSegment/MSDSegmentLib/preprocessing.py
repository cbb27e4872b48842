"""Geometry and intensity preprocessing shared by the engine and `Training/`.

Every image is resampled, in physical space, onto a *canonical grid*: axis-aligned with the
patient's L, P, S axes (ITK's identity direction), at the model's spacing, covering the image's
whole physical extent. The network therefore sees the same anatomy orientation whatever the
file's axis order, flips or oblique direction cosines. Arrays are kept in ITK index order (x, y, z).
"""

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import SimpleITK as sitk


def physical_corners(image, lower, upper):
    """The 8 physical points (LPS, mm) at the corners of the continuous-index box [lower, upper] of `image`."""
    return np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
                     for corner in itertools.product(*zip(lower, upper))])


def index_bounds(image, points):
    """Lowest and highest continuous index, on `image`'s grid, of physical points (a box's corners: the
    index range of `image` that box covers)."""
    indices = np.array([image.TransformPhysicalPointToContinuousIndex([float(c) for c in point])
                        for point in points])
    return indices.min(axis=0), indices.max(axis=0)


def physical_bounds(image):
    """Lower and upper physical corners (LPS, mm) of the region the image's voxels cover."""
    corners = physical_corners(image, [-0.5] * 3, [n - 0.5 for n in image.GetSize()[:3]])
    return corners.min(axis=0), corners.max(axis=0)


def canonical_reference(image, spacing, region=None):
    """An empty axis-aligned image at `spacing` covering `image` (the grid the network sees), or only the
    part of it inside `region` (physical lower and upper corners)."""
    lower, upper = physical_bounds(image)
    if region is not None:
        lower, upper = np.maximum(lower, region[0]), np.minimum(upper, region[1])
    spacing = np.asarray(spacing, dtype=float)
    size = np.maximum(np.ceil((upper - lower) / spacing - 1e-6).astype(int), 1)
    reference = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin([float(o) for o in lower + spacing / 2])
    reference.SetDirection(np.eye(3).ravel().tolist())
    return reference


def spacing_along_axes(image, target_spacing):
    """The target spacing along each of the image's index axes (the physical axis each one points to)."""
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    return direction.T @ np.asarray(target_spacing, dtype=float)


def shrink_factors(image, target_spacing):
    """Per index axis, how many voxels anti-aliasing averages into one first: up to half the target spacing."""
    ratio = spacing_along_axes(image, target_spacing) / (2.0 * np.array(image.GetSpacing()))
    return np.maximum(np.floor(ratio), 1).astype(int)


def antialias(image, target_spacing):
    """Gaussian smoothing before downsampling, so the result does not depend on the input's resolution.

    Each image axis is smoothed for the target spacing along the physical axis it points to
    (FWHM of the kernel = target spacing); axes not downsampled by more than 1.5x are left sharp.
    Where the target is at least 4x coarser, blocks of f voxels (f up to half the target spacing) are first
    averaged, and the smaller image gets what remains of the Gaussian's variance: nearly the same low-pass
    filter on a quarter of the voxels (the whole-CT first stage, 0.8 -> 4 mm: 3.0 -> 0.8 s; on a real CT the
    network's input moves by 0.2 % of the intensity range on average, 1.4 % at the 99th percentile).
    """
    source, target = np.array(image.GetSpacing()), spacing_along_axes(image, target_spacing)
    variance = np.maximum(target ** 2 - source ** 2, 0.0) / 2.355 ** 2
    variance = np.where(target > 1.5 * source, variance, 0.0)
    if not np.any(variance > 0):
        return image
    factors = shrink_factors(image, target_spacing)
    if np.any(factors > 1):
        # Whole blocks only: the last block repeats the edge voxels rather than losing them.
        remainder = (-np.array(image.GetSize())) % factors
        if np.any(remainder):
            image = sitk.ZeroFluxNeumannPad(image, [0, 0, 0], [int(r) for r in remainder])
        image = sitk.BinShrink(image, [int(f) for f in factors])
        variance = np.maximum(variance - (factors ** 2 - 1) / 12.0 * source ** 2, 0.0)  # a box of f voxels
    sigma = np.sqrt(variance)
    if np.all(sigma > 0):
        return sitk.SmoothingRecursiveGaussian(image, sigma=[float(s) for s in sigma])
    # A fine stage's thick-slice axis needs no smoothing: one pass per axis that does.
    return sampled_gaussian(image, sigma)


def sampled_gaussian(image, sigma_mm):
    """`image` smoothed along each index axis whose sigma (mm) is positive by the sampled Gaussian (scipy's
    gaussian_filter1d, truncated at 4 sigma, edges extended); at least one axis is left as it is.

    Why not ITK's recursive Gaussian, as for the whole-CT stage: at the fine stages' sigma of about one voxel the two
    kernels differ by at most 0.0012 of a weight, but the recursive one has negative lobes and a spread 3 % narrower
    than asked, and on two cores it took three times as long. scipy releases the GIL, so slabs along an axis left
    sharp (independent lines: the same voxels however many slabs) are smoothed in as many threads as ITK's filters
    use."""
    from scipy import ndimage

    array = sitk.GetArrayFromImage(image)  # (z, y, x): index axis a is array axis 2 - a
    spacing = np.array(image.GetSpacing())
    passes = [(2 - int(axis), float(sigma_mm[axis] / spacing[axis])) for axis in np.flatnonzero(sigma_mm > 0)]
    smoothed_axes = {axis for axis, _ in passes}
    across = next(axis for axis in range(3) if axis not in smoothed_axes)
    threads = max(1, min(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), array.shape[across]))
    bounds = np.linspace(0, array.shape[across], threads + 1).astype(int)

    def smooth(part):
        slab = tuple(slice(bounds[part], bounds[part + 1]) if axis == across else slice(None) for axis in range(3))
        values = array[slab]
        for axis, sigma in passes:
            values = ndimage.gaussian_filter1d(values, sigma, axis=axis, mode="nearest", truncate=4.0)
        array[slab] = values

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(smooth, range(threads)))
    smoothed = sitk.GetImageFromArray(array)
    smoothed.CopyInformation(image)
    return smoothed


def resample(image, reference, interpolator=sitk.sitkLinear, default=0.0, output_type=None):
    """Resample `image` onto `reference`'s grid through physical space."""
    output_type = image.GetPixelID() if output_type is None else output_type
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, float(default), output_type)


def to_array(image):
    """Voxel array in ITK index order (x, y, z)."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def from_array(array, reference, dtype=None):
    """An image with `reference`'s geometry from an (x, y, z) array (cast to `dtype` in the same copy)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=dtype))
    image.CopyInformation(reference)
    return image


def background_value(normalisation):
    """Intensity assumed outside the scanned field: air for CT, zero signal for MR."""
    return normalisation["window"][0] if normalisation["type"] == "ct" else 0.0


def covering(image, reference, spacing):
    """The part of `image` that resampling onto `reference` reads, with a margin of twice the coarsest target
    spacing (over 4 sigma of the anti-aliasing kernel): a later stage's small region then costs the
    smoothing of that region, not of the whole CT."""
    lower, upper = physical_bounds(reference)
    margin = 2.0 * max(spacing)
    first, last = index_bounds(image, itertools.product(*zip(lower - margin, upper + margin)))
    size = np.array(image.GetSize())
    start = np.clip(np.floor(first).astype(int) - 1, 0, size - 1)
    factors = shrink_factors(image, spacing)
    start -= start % factors  # anti-aliasing averages blocks of voxels: keep the whole image's blocks
    stop = np.clip(np.ceil(last).astype(int) + 2, start + 1, size)
    if np.all(start == 0) and np.all(stop == size):
        return image
    return image[int(start[0]):int(stop[0]), int(start[1]):int(stop[1]), int(start[2]):int(stop[2])]


def to_canonical(image, spacing, normalisation, reference=None):
    """Resample one channel onto the canonical grid; returns (float32 array, reference image)."""
    reference = canonical_reference(image, spacing) if reference is None else reference
    image = antialias(sitk.Cast(covering(image, reference, spacing), sitk.sitkFloat32), spacing)
    resampled = resample(image, reference, sitk.sitkLinear, background_value(normalisation), sitk.sitkFloat32)
    return to_array(resampled), reference


def network_input(channels, spacing, normalisation, region=None):
    """The network's input: every channel on the canonical grid of the first (within `region`, physical
    corners, if given), normalised, stacked (C, X, Y, Z), and that grid. Used by the engine and by
    Training's cache, so both see the same."""
    first = channels[0]
    arrays, reference = [], canonical_reference(first, spacing, region)
    for channel in channels:
        if channel is not first:
            # Multi-channel MR: bring ADC onto the T2 grid in physical space first.
            channel = resample(channel, first, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        array, reference = to_canonical(channel, spacing, normalisation, reference)
        arrays.append(normalise(array, normalisation))
    return np.stack(arrays), reference


def labels_to_canonical(label_image, reference):
    return to_array(resample(label_image, reference, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def normalise(array, normalisation):
    """Intensity normalisation as stored in the plan.

    ct: clip to the CT window the model was trained with (BTCV was already clipped to it), then
        subtract the training foreground mean and divide by its standard deviation (nnU-Net).
    zscore: per-volume, per-channel z-score over the voxels with signal (MR has arbitrary units).
    """
    array = array.astype(np.float32, copy=False)
    if normalisation["type"] == "ct":
        low, high = normalisation["window"]
        return (np.clip(array, low, high) - normalisation["mean"]) / normalisation["std"]
    if normalisation["type"] == "zscore":
        signal = array[array > 0] if np.count_nonzero(array > 0) > 100 else array
        return (array - signal.mean()) / max(float(signal.std()), 1e-6)
    raise ValueError(f"unknown normalisation {normalisation['type']}")
