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


def antialiasing(image, target_spacing):
    """How `antialias` filters `image` for `target_spacing`, per index axis: the blocks of voxels averaged first, the
    Gaussian's sigma (mm) that remains, and whether ITK's recursive Gaussian (every axis smoothed) applies it rather
    than scipy's sampled one.

    Each image axis is smoothed for the target spacing along the physical axis it points to (FWHM of the kernel =
    target spacing); axes not downsampled by more than 1.5x are left sharp. Where the target is at least 4x coarser,
    blocks of f voxels (f up to half the target spacing) are first averaged, and the smaller image gets what remains
    of the Gaussian's variance: nearly the same low-pass filter on a quarter of the voxels (on a real CT the network's
    input moves by 0.2 % of the intensity range on average, 1.4 % at the 99th percentile)."""
    source, target = np.array(image.GetSpacing()), spacing_along_axes(image, target_spacing)
    variance = np.maximum(target ** 2 - source ** 2, 0.0) / 2.355 ** 2
    variance = np.where(target > 1.5 * source, variance, 0.0)
    if not np.any(variance > 0):
        return np.ones(3, dtype=int), np.zeros(3), False
    factors = shrink_factors(image, target_spacing)
    sigma = np.sqrt(np.maximum(variance - (factors ** 2 - 1) / 12.0 * source ** 2, 0.0))  # a box of f voxels
    return factors, sigma, bool(np.all(sigma > 0))


def antialias(image, target_spacing):
    """Gaussian smoothing before downsampling, so the result does not depend on the input's resolution (see
    `antialiasing`)."""
    factors, sigma, recursive = antialiasing(image, target_spacing)
    if np.any(factors > 1):
        # Whole blocks only: the last block repeats the edge voxels rather than losing them.
        remainder = (-np.array(image.GetSize())) % factors
        if np.any(remainder):
            image = sitk.ZeroFluxNeumannPad(image, [0, 0, 0], [int(r) for r in remainder])
        image = sitk.BinShrink(image, [int(f) for f in factors])
    if recursive:
        return sitk.SmoothingRecursiveGaussian(image, sigma=[float(s) for s in sigma])
    if np.any(sigma > 0):  # a fine stage's thick-slice axis needs no smoothing: one pass per axis that does
        return sampled_gaussian(image, sigma)
    return image


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


def covering_bounds(image, reference, spacing):
    """The index range [start, stop) of `image` that resampling onto `reference` reads, with a margin of twice the
    coarsest target spacing (over 4 sigma of the anti-aliasing kernel): a later stage's small region then costs the
    smoothing of that region, not of the whole CT."""
    lower, upper = physical_bounds(reference)
    margin = 2.0 * max(spacing)
    first, last = index_bounds(image, itertools.product(*zip(lower - margin, upper + margin)))
    size = np.array(image.GetSize())
    start = np.clip(np.floor(first).astype(int) - 1, 0, size - 1)
    factors = shrink_factors(image, spacing)
    start -= start % factors  # anti-aliasing averages blocks of voxels: keep the whole image's blocks
    stop = np.clip(np.ceil(last).astype(int) + 2, start + 1, size)
    return start, stop


def covering(image, reference, spacing):
    """The part of `image` in `covering_bounds`."""
    start, stop = covering_bounds(image, reference, spacing)
    if np.all(start == 0) and np.all(stop == image.GetSize()):
        return image
    return image[int(start[0]):int(stop[0]), int(start[1]):int(stop[1]), int(start[2]):int(stop[2])]


def physical_axes(image):
    """For an image whose index axes run along the physical axes, in any order and either sense: the physical axis
    and the sign of each index axis. None for an oblique image."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    rounded = np.rint(direction)
    if not np.allclose(direction, rounded, atol=1e-6) or not np.all(np.abs(rounded).sum(axis=0) == 1) \
            or not np.all(np.abs(rounded).sum(axis=1) == 1):
        return None
    axes = np.abs(rounded).argmax(axis=0)
    return axes, rounded[axes, np.arange(3)]


def block_average_matrix(size, factor):
    """BinShrink along a line of `size` voxels as a matrix: blocks of `factor` voxels averaged, the last block
    repeating the edge voxel (ZeroFluxNeumannPad)."""
    blocks = -(-size // factor)
    padded = np.arange(blocks * factor)
    matrix = np.zeros((blocks, size))
    np.add.at(matrix, (padded // factor, np.minimum(padded, size - 1)), 1.0 / factor)
    return matrix


def smoothing_matrix(size, sigma_mm, spacing_mm, recursive):
    """The anti-aliasing Gaussian along a line of `size` voxels as a matrix: its response to each voxel's impulse,
    through the same filter `antialias` runs (ITK's recursive Gaussian or scipy's sampled one)."""
    impulses = np.eye(size)
    if sigma_mm <= 0:
        return impulses
    if recursive:
        image = sitk.GetImageFromArray(impulses)  # row r: an impulse at x = r
        image.SetSpacing([float(spacing_mm), 1.0])
        responses = sitk.RecursiveGaussian(image, float(sigma_mm), False,
                                           sitk.RecursiveGaussianImageFilter.ZeroOrder, 0)
        return sitk.GetArrayFromImage(responses).T
    from scipy import ndimage
    return ndimage.gaussian_filter1d(impulses, sigma_mm / spacing_mm, axis=0, mode="nearest", truncate=4.0)


def linear_interpolation_matrix(positions, size):
    """ITK's linear interpolation at continuous indices `positions` of a line of `size` voxels as a matrix (within
    half a voxel outside the line, the edge voxel), and which positions lie inside (the rest take the default)."""
    inside = (positions >= -0.5) & (positions < size - 0.5)
    clamped = np.clip(positions, 0, size - 1)
    below = np.floor(clamped).astype(int)
    weight = clamped - below
    rows = np.arange(len(positions))
    matrix = np.zeros((len(positions), size))
    np.add.at(matrix, (rows, below), 1.0 - weight)
    np.add.at(matrix, (rows, np.minimum(below + 1, size - 1)), weight)
    matrix[~inside] = 0.0
    return matrix, inside


def grid_points(reference):
    """Per axis, the physical coordinates (mm) of the voxel centres of an identity-direction grid."""
    origin, step, count = reference.GetOrigin(), reference.GetSpacing(), reference.GetSize()
    return [origin[axis] + step[axis] * np.arange(count[axis]) for axis in range(3)]


def axis_operators(image, reference, filtering, start, stop, axes, signs):
    """Per index axis of `image`'s part [start, stop): the matrix that anti-aliases that axis as `filtering` says
    (`antialiasing`'s result) and interpolates it at `reference`'s points along the physical axis it runs along
    (float32), and which of those points lie inside."""
    factors, sigma, recursive = filtering
    source = np.array(image.GetSpacing())
    points = grid_points(reference)
    # Positions are measured from the first block's centre: the origin of the image BinShrink returns.
    first_block = np.array(image.TransformContinuousIndexToPhysicalPoint(
        [float(a + (f - 1) / 2.0) for a, f in zip(start, factors)]))
    operators = []
    for index_axis in range(3):
        axis, factor, size = axes[index_axis], int(factors[index_axis]), int(stop[index_axis] - start[index_axis])
        blocks = block_average_matrix(size, factor)
        smoothing = smoothing_matrix(len(blocks), sigma[index_axis], source[index_axis] * factor, recursive)
        positions = (points[axis] - first_block[axis]) * (signs[index_axis] / (source[index_axis] * factor))
        interpolation, inside = linear_interpolation_matrix(positions, len(blocks))
        operators.append(((interpolation @ smoothing @ blocks).astype(np.float32), inside))
    return operators


def separable_resample(image, reference, spacing, default, slab=16):
    """What `antialias` then `resample` (linear) give for an image whose axes run along the physical axes, one
    axis at a time: each line's smoothing and interpolation is one small matrix (`axis_operators`). The slices go
    through the two in-plane matrices a slab at a time, so the CT is never copied whole (on a 512 x 512 x 200 CT
    to 4 mm: 0.16 s against 0.47 s for the filters). Returns the (x, y, z) array on `reference`, or None where
    `to_canonical` runs the filters instead: oblique axes, an image too small for ITK's recursive Gaussian (4 voxels
    an axis), or nothing to smooth (plain interpolation, which ITK does as fast as a matrix would)."""
    physical = physical_axes(image)
    start, stop = covering_bounds(image, reference, spacing)
    filtering = antialiasing(image, spacing)
    factors, sigma, _ = filtering
    if physical is None or np.any(-(-(stop - start) // factors) < 4) or not np.any(sigma > 0):
        return None
    axes, signs = physical
    (along_x, inside_x), (along_y, inside_y), (along_z, inside_z) = axis_operators(
        image, reference, filtering, start, stop, axes, signs)
    voxels = sitk.GetArrayViewFromImage(image)[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]]  # (z, y, x)
    in_plane = np.empty((len(voxels), len(along_y), len(along_x)), dtype=np.float32)
    across_x = np.ascontiguousarray(along_x.T)
    for first in range(0, len(voxels), slab):
        part = voxels[first:first + slab].astype(np.float32) @ across_x
        np.matmul(along_y, part, out=in_plane[first:first + slab])
    resampled = np.tensordot(along_z, in_plane, axes=(1, 0))  # its axes: the physical axes of z, y, x
    resampled = np.ascontiguousarray(resampled.transpose(np.argsort([axes[2], axes[1], axes[0]])))
    for index_axis, inside in enumerate((inside_x, inside_y, inside_z)):
        outside = [slice(None)] * 3
        outside[axes[index_axis]] = ~inside
        resampled[tuple(outside)] = default
    return resampled


def interpolation_operators(source, target):
    """ITK's linear interpolation from the canonical grid `source` onto the canonical grid `target` (both with the
    identity direction, as `canonical_reference` makes them), per axis: a matrix over the source voxels it reads,
    and their range. Outside the source grid the result is 0."""
    operators = []
    for axis, points in enumerate(grid_points(target)):
        positions = (points - source.GetOrigin()[axis]) / source.GetSpacing()[axis]
        matrix = linear_interpolation_matrix(positions, source.GetSize()[axis])[0]
        read = np.flatnonzero(matrix.any(axis=0))
        first, last = (int(read[0]), int(read[-1]) + 1) if len(read) else (0, 0)
        operators.append((matrix[:, first:last].astype(np.float32), slice(first, last)))
    return operators


def interpolate(array, operators):
    """An (x, y, z) array on the source grid of `interpolation_operators` on its target grid, one axis at a time."""
    (along_x, read_x), (along_y, read_y), (along_z, read_z) = operators
    result = np.tensordot(along_x, array[read_x, read_y, read_z], axes=(1, 0))
    result = np.matmul(along_y, result)
    return result @ along_z.T


def to_canonical(image, spacing, normalisation, reference=None):
    """Resample one channel onto the canonical grid; returns (float32 array, reference image)."""
    reference = canonical_reference(image, spacing) if reference is None else reference
    default = background_value(normalisation)
    resampled = separable_resample(image, reference, spacing, default)
    if resampled is None:
        image = antialias(sitk.Cast(covering(image, reference, spacing), sitk.sitkFloat32), spacing)
        resampled = to_array(resample(image, reference, sitk.sitkLinear, default, sitk.sitkFloat32))
    return resampled, reference


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
