"""Reading inputs (NIfTI, NRRD, MHA, DICOM series folders) and writing label maps atomically."""

import os
import re

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output
from .errors import InputError
from .integrity import readable_copy, unparsed_dicom_files
from .terminology import entry_string

LABEL_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
BYTES_PER_INPUT_VOXEL = 16  # float32 copy, the label map, and slack for resampling chunks


def available_memory():
    """Bytes of memory the system says are available (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dicom_series_files(folder):
    """The files of the main DICOM series in a folder, in slice order (the volume SimpleITK reads)."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(folder)
    if not series:
        raise InputError(f"No DICOM series found in folder {folder}")
    listed = [reader.GetGDCMSeriesFileNames(folder, uid) for uid in series]
    unparsed = unparsed_dicom_files(folder, [path for files in listed for path in files])
    if unparsed:  # read without it, the volume would miss a slice
        raise InputError(f"The DICOM series in {folder} is refused: {os.path.basename(unparsed[0])} cannot be "
                         f"read (a damaged file){f' and {len(unparsed) - 1} more' if len(unparsed) > 1 else ''}")
    # Several series in one folder: take the one with the most slices (the main volume).
    return _main_stack(list(max(listed, key=len)))


def _main_stack(files):
    """The files of a series that make one volume: those with the most common slice orientation and size.
    Scanners store reformats and localisers in the same series (a coronal image among axial slices); read
    with the others they would make a volume of the wrong slice spacing."""
    kinds, positions = [], []
    for path in files:
        header = sitk.ImageFileReader()
        header.SetFileName(path)
        try:
            header.ReadImageInformation()
        except RuntimeError:  # listed in the series, yet its header cannot be read again: refuse the series
            raise InputError(f"The DICOM series is refused: {path} cannot be read (a damaged file)") from None
        orientation = header.GetMetaData("0020|0037") if header.HasMetaDataKey("0020|0037") else ""
        kinds.append((tuple(np.round([float(v) for v in orientation.split("\\") if v.strip()], 3)),
                      header.GetSize()[:2]))
        positions.append(float(np.dot(header.GetOrigin(), np.reshape(header.GetDirection(), (3, 3))[:, 2])))
    counts = {kind: kinds.count(kind) for kind in set(kinds)}
    main = max(counts, key=counts.get)
    stack = [(path, position) for path, kind, position in zip(files, kinds, positions) if kind == main]
    _check_no_slice_missing(os.path.dirname(files[0]), [position for _, position in stack])
    return [path for path, _ in stack]


def _check_no_slice_missing(folder, positions):
    """Refuse a stack with a gap over 1.5 times its usual slice spacing: ITK would read it on one spacing, with
    no more than a console warning, and put every slice after the gap in the wrong place. A file that lost its
    DICM marker (no longer DICOM to GDCM) or was deleted leaves such a gap."""
    if len(positions) < 3:
        return
    ordered = np.sort(positions)
    steps = np.diff(ordered)
    usual = float(np.median(steps))
    if usual > 0 and steps.max() > 1.5 * usual:
        gap = int(np.argmax(steps))
        raise InputError(f"The DICOM series in {folder} is refused: a slice is missing between {ordered[gap]:.1f} "
                         f"and {ordered[gap + 1]:.1f} mm (slices {usual:.2f} mm apart; a file damaged or absent)")


def _reader(path):
    if os.path.isdir(path):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(dicom_series_files(path))
        return reader
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    return reader


def _check_fits_in_memory(path, name):
    """Refuse, before loading pixels, a volume that cannot be processed in the memory available (`name`: the
    input `path` was made from, for the message)."""
    if os.path.isdir(path):
        return
    info = sitk.ImageFileReader()
    info.SetFileName(path)
    info.ReadImageInformation()
    voxels = int(np.prod(info.GetSize())) * info.GetNumberOfComponents()
    available = available_memory()
    if available is not None and voxels * BYTES_PER_INPUT_VOXEL > available:
        needed = voxels * BYTES_PER_INPUT_VOXEL / 2**30
        raise InputError(f"Volume too large for memory: {name} has {voxels:,} voxels "
                         f"(needs about {needed:.1f} GiB, {available / 2**30:.1f} GiB available)")


def itk_reason(error):
    """ITK's multi-line exception text reduced to its message, on one line."""
    text = " ".join(str(error).split())
    text = re.sub(r"(itk::|ITK )ERROR: \w+\(0x[0-9a-f]+\): ", "", text)
    text = re.sub(r"^Exception thrown in SimpleITK \w+: \S+:\d+: ", "", text)
    return text[:240]


def read_image(path):
    """The image at `path` (a file or a DICOM series folder), once it is known to be whole (integrity.py)."""
    if not os.path.exists(path):
        raise InputError(f"Input not found: {path}")
    try:
        with readable_copy(path) as readable:
            try:
                _check_fits_in_memory(readable, path)
                return _reader(readable).Execute()
            except RuntimeError as error:  # ITK names the file it read: the user's, not a temporary copy
                raise RuntimeError(str(error).replace(readable, path)) from None
    except RuntimeError as error:
        raise InputError(f"Cannot read image {path}: {itk_reason(error)}") from None


def split_channels(image):
    """A 3-D image, a vector image or a 4-D image whose last axis is the channel (MSD layout) -> 3-D channels."""
    if image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1:
        return [image]
    if image.GetDimension() == 3:
        return [sitk.VectorIndexSelectionCast(image, c) for c in range(image.GetNumberOfComponentsPerPixel())]
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        return [sitk.Extract(image, size[:3] + [0], [0, 0, 0, c]) for c in range(size[3])]
    raise InputError(f"Expected a 3-D volume, got a {image.GetDimension()}-D image")


def read_channels(paths):
    """All channels of the given files, in order (one 4-D file, or one 3-D file per channel)."""
    channels = []
    for path in paths:
        image = read_image(path)
        if image.GetDimension() == 2:
            raise InputError(f"Expected a 3-D volume, got a 2-D image: {path}")
        channels.extend(split_channels(image))
    return channels


def validate_channels(channels, expected, source="input"):
    """One-line errors for the inputs the engine cannot segment."""
    if len(channels) != len(expected):
        raise InputError(f"The model needs {len(expected)} channel(s) ({', '.join(expected)}); "
                         f"{source} has {len(channels)}")
    for name, channel in zip(expected, channels):
        if channel.GetDimension() != 3:
            raise InputError(f"Expected a 3-D volume for {name}, got a {channel.GetDimension()}-D image")
        if min(channel.GetSize()) < 2:
            raise InputError(f"Expected a 3-D volume for {name}, got a single slice (size {channel.GetSize()})")
        values = sitk.GetArrayViewFromImage(channel)
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):  # integers are always finite
            raise InputError(f"The {name} volume contains NaN or infinite voxels")
        if values.min() == values.max():
            raise InputError(f"The {name} volume is constant (every voxel is {values.min()}): nothing to segment")


def looks_like_ct(channel):
    """CT in HU has air and fat below -50; MR intensities are non-negative."""
    values = sitk.GetArrayViewFromImage(channel)
    sample = values.ravel()[:: max(values.size // 200000, 1)]
    return float(np.percentile(sample, 1)) < -50


def label_suffix(path):
    lower = path.lower()
    for suffix in LABEL_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise InputError(f"Unsupported output format: {path} (use .nii.gz, .nii, .nrrd, .seg.nrrd or .mha)")


def _segment_metadata(image, card, present=None):
    """Slicer .seg.nrrd segment fields, so Slicer loads names, colours and terminology. `present`: the label
    values the map holds, where the caller knows them (the engine's volumes), instead of a pass over every voxel."""
    present = set(np.unique(sitk.GetArrayViewFromImage(image)).tolist()) if present is None else set(present)
    for index, label in enumerate(card.trained_labels):
        prefix = f"Segment{index}_"
        image.SetMetaData(prefix + "ID", f"Segment_{label.value}")
        image.SetMetaData(prefix + "Name", label.name)
        image.SetMetaData(prefix + "Color", " ".join(f"{c:.4f}" for c in label.color_float))
        image.SetMetaData(prefix + "LabelValue", str(label.value))
        image.SetMetaData(prefix + "Layer", "0")
        image.SetMetaData(prefix + "Tags", f"TerminologyEntry:{entry_string(label.terminology)}|"
                          + ("" if label.value in present else "Empty:true|"))
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")


def write_labels(path, image, card=None, present=None):
    """Write a label map (with Slicer segment metadata for .seg.nrrd) atomically; `present`: the label values
    it holds, if known."""
    suffix = label_suffix(path)
    if suffix == ".seg.nrrd" and card is not None:
        image = sitk.Image(image)
        _segment_metadata(image, card, present)
    with atomic_output(path, suffix) as temporary:
        sitk.WriteImage(image, temporary, useCompression=True)
