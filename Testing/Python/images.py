"""Test images: synthetic CT/MR volumes and geometric variants of real ones (same anatomy, other grids)."""

import os

import numpy as np
import SimpleITK as sitk


def synthetic_ct(size=(64, 56, 24), spacing=(3.0, 3.0, 5.0), seed=0):
    """A CT-like volume in HU: air around a soft-tissue body with a brighter organ-like blob."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in size], indexing="ij")
    array = np.full(size, -1000.0)
    array[(x / 0.8) ** 2 + (y / 0.7) ** 2 < 1] = 40.0
    array[((x - 0.3) / 0.25) ** 2 + (y / 0.2) ** 2 + (z / 0.5) ** 2 < 1] = 120.0
    array += rng.normal(0, 10, size)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-100.0, -80.0, 30.0))
    return image


def synthetic_mr(size=(48, 48, 12), spacing=(1.5, 1.5, 3.0), channels=2, seed=0):
    """A 4-D MSD-style MR (last axis = channel) with a bright gland in the middle."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in size], indexing="ij")
    gland = (x / 0.4) ** 2 + (y / 0.35) ** 2 + (z / 0.6) ** 2 < 1
    volumes = [np.where(gland, 300.0 + 100 * c, 100.0) + rng.normal(0, 5, size) for c in range(channels)]
    image = sitk.JoinSeries([sitk.GetImageFromArray(v.transpose(2, 1, 0).astype(np.float32)) for v in volumes])
    image.SetSpacing(tuple(spacing) + (1.0,))
    return image


def array_xyz(image):
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def flipped_copy(image, axis):
    """The same voxels in the opposite storage order along `axis`, geometry adjusted (same world content)."""
    array = np.flip(array_xyz(image), axis)
    copy = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    copy.SetSpacing(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    last = [0, 0, 0]
    last[axis] = image.GetSize()[axis] - 1
    copy.SetOrigin(image.TransformIndexToPhysicalPoint(last))
    direction[:, axis] *= -1
    copy.SetDirection(direction.ravel().tolist())
    return copy


def permuted_copy(image, order):
    """The same voxels with the index axes reordered (e.g. (2, 0, 1)), geometry adjusted."""
    array = array_xyz(image).transpose(order)
    copy = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    copy.SetSpacing([image.GetSpacing()[i] for i in order])
    copy.SetOrigin(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    copy.SetDirection(direction[:, list(order)].ravel().tolist())
    return copy


def oblique_copy(image, degrees=(0.0, 12.0, 20.0)):
    """The same anatomy resampled onto an oblique grid (rotated direction cosines) covering it."""
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*np.deg2rad(degrees))
    rotation = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    size = image.GetSize()
    spacing = np.array(image.GetSpacing())
    reference = sitk.Image(size, image.GetPixelID())
    reference.SetSpacing(spacing.tolist())
    direction = rotation @ np.array(image.GetDirection()).reshape(3, 3)
    reference.SetDirection(direction.ravel().tolist())
    reference.SetOrigin((centre - direction @ ((np.array(size) - 1) / 2 * spacing)).tolist())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0)


def in_world(labels, reference):
    """A label map brought onto another grid through physical space (nearest neighbour)."""
    return array_xyz(sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def dice(a, b):
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2 * np.logical_and(a, b).sum() / total


def write_dicom_series(image, folder, suffix=".dcm"):
    """One DICOM file per slice, as a scanner writes a CT series."""
    os.makedirs(folder)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")  # whatever the file names
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetSize()[2]):
        slice_ = image[:, :, z]
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))))
        slice_.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")
        slice_.SetMetaData("0020|0013", str(z))
        slice_.SetMetaData("0008|0060", "CT")
        writer.SetFileName(os.path.join(folder, f"slice{z:03d}{suffix}"))
        writer.Execute(slice_)
