"""`python -m Training dicom-masks`: cases stored as a DICOM series with one DICOM mask per structure -> an
MSD-layout dataset (imagesTr/, labelsTr/, dataset.json) that `evaluate` reads. A mask is either a DICOM series of
its own (3D-IRCADb's layout: PATIENT_DICOM/ and MASKS_DICOM/<structure>/, either folder possibly zipped) or a
DICOM Segmentation object (a SEG .dcm file, whose frames are placed on the CT by their slice positions).

Each case is read at its full resolution and HU range: unlike the BTCV copies, nothing is clipped or resampled.
Structures map to labels through name patterns given in order; a voxel in several structures gets the label
of the last pattern that matches (so `livertumor*` given after `liver` keeps the tumours inside the liver).
"""

import fnmatch
import os
import shutil
import tempfile
import zipfile

import numpy as np
import SimpleITK as sitk

from MSDSegmentLib.errors import InputError
from MSDSegmentLib.atomic import atomic_output, write_json
from MSDSegmentLib.imageio import read_image

GEOMETRY_TOLERANCE = 1e-3  # mm: a mask must lie on its CT's grid


def parse_structures(pairs):
    """["liver=liver", "livertumor*=liver tumour"] -> [(pattern, label name)], in the order given."""
    structures = []
    for pair in pairs:
        pattern, _, name = pair.partition("=")
        if not pattern.strip() or not name.strip():
            raise InputError(f"--structure wants PATTERN=LABEL NAME, got {pair!r}")
        structures.append((pattern.strip().lower(), name.strip()))
    return structures


def label_values(structures):
    """Label name -> value, 1, 2, ... in the order the names first appear."""
    values = {}
    for _, name in structures:
        values.setdefault(name, len(values) + 1)
    return values


def folder_or_zip(case_folder, name, scratch):
    """The folder `name` of a case, or the folder extracted from `name`.zip into `scratch`."""
    folder = os.path.join(case_folder, name)
    if os.path.isdir(folder):
        return folder
    archive = folder + ".zip"
    if not os.path.isfile(archive):
        raise InputError(f"{case_folder} has neither {name}/ nor {name}.zip")
    with zipfile.ZipFile(archive) as stream:
        stream.extractall(scratch)
    extracted = os.path.join(scratch, name)
    if not os.path.isdir(extracted):
        raise InputError(f"{archive} does not hold a folder {name}/")
    return extracted


def same_grid(image, reference):
    corners = [[0, 0, 0], [n - 1 for n in reference.GetSize()]]
    return image.GetSize() == reference.GetSize() and all(
        np.allclose(image.TransformIndexToPhysicalPoint(c), reference.TransformIndexToPhysicalPoint(c),
                    atol=GEOMETRY_TOLERANCE) for c in corners)


def is_segmentation_object(path):
    """A DICOM Segmentation (SEG) file: the DICM preamble and modality SEG."""
    if not os.path.isfile(path):
        return False
    import pydicom
    try:
        return pydicom.dcmread(path, stop_before_pixels=True).get("Modality") == "SEG"
    except (pydicom.errors.InvalidDicomError, OSError):
        return False


def segmentation_mask(path, image):
    """A DICOM SEG's segments, united, as a boolean (z, y, x) array on `image`'s grid. Its frames must lie on
    the CT's slices (the same rows, columns and in-plane geometry); each is placed by its position."""
    import pydicom
    seg = pydicom.dcmread(path)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    mask = np.zeros(sitk.GetArrayViewFromImage(image).shape, bool)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        index = np.asarray(image.TransformPhysicalPointToContinuousIndex(position))
        z = int(round(index[2]))
        off_grid = np.abs(index - np.round(index)).max() > 0.05 or np.abs(index[:2]).max() > 0.05
        if (seg.Rows, seg.Columns) != mask.shape[1:] or off_grid or not 0 <= z < mask.shape[0]:
            raise InputError(f"The segmentation {os.path.basename(path)} has a frame off its CT's slices "
                             f"(at {position} mm)")
        mask[z] |= frame > 0
    return mask


def structure_masks(masks_folder):
    """Structure name -> its mask's path: sub-folders (mask series) and DICOM SEG files (named without .dcm)."""
    masks = {}
    for entry in sorted(os.listdir(masks_folder)):
        path = os.path.join(masks_folder, entry)
        if os.path.isdir(path):
            masks[entry] = path
        elif is_segmentation_object(path):
            masks[os.path.splitext(entry)[0]] = path
    return masks


def read_mask(path, image):
    if os.path.isfile(path):
        return segmentation_mask(path, image)
    mask = read_image(path)
    if not same_grid(mask, image):
        raise InputError(f"The mask {path} is not on its CT's grid")
    return sitk.GetArrayViewFromImage(mask) > 0


def case_labels(image, masks_folder, structures, values):
    """The label map of one case on its CT's grid, and the masks no pattern matched."""
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    masks = structure_masks(masks_folder)
    unmatched = [name for name in masks if not any(fnmatch.fnmatch(name.lower(), p) for p, _ in structures)]
    for pattern, label in structures:
        for name, path in masks.items():
            if fnmatch.fnmatch(name.lower(), pattern):
                labels[read_mask(path, image)] = values[label]
    return labels, unmatched


def convert_case(case_folder, case_id, out, structures, values, image_name="PATIENT_DICOM",
                 masks_name="MASKS_DICOM"):
    """Write imagesTr/<id>.nii.gz and labelsTr/<id>.nii.gz for one case; returns the mask folders left out."""
    scratch = tempfile.mkdtemp(prefix="msdsegment-dicom-")
    try:
        image = read_image(folder_or_zip(case_folder, image_name, scratch))
        labels, unmatched = case_labels(image, folder_or_zip(case_folder, masks_name, scratch), structures, values)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    for folder, item in (("imagesTr", image), ("labelsTr", label_image)):
        path = os.path.join(out, folder, f"{case_id}.nii.gz")
        with atomic_output(path, ".nii.gz") as temporary:
            sitk.WriteImage(item, temporary, useCompression=True)
    return unmatched


def run_conversion(args, log=print):
    structures = parse_structures(args.structure)
    values = label_values(structures)
    ids = args.ids.split(",") if args.ids else [os.path.basename(os.path.normpath(c)) for c in args.cases]
    if len(ids) != len(args.cases) or len(set(ids)) != len(ids):
        raise InputError("--ids must give one distinct id per case folder")
    for folder in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    training = []
    for case_folder, case_id in zip(args.cases, ids):
        unmatched = convert_case(case_folder, case_id, args.out, structures, values, args.image_folder,
                                 args.masks_folder)
        log(f"{case_id}: converted" + (f"; masks left out: {', '.join(unmatched)}" if unmatched else ""))
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {"name": args.name, "description": args.description or "", "licence": args.licence or "",
            "modality": {"0": "CT"}, "labels": {"0": "background", **{str(v): n for n, v in values.items()}},
            "numTraining": len(training), "training": training, "test": []}
    write_json(meta, os.path.join(args.out, "dataset.json"))
    log(f"wrote {len(training)} case(s) and dataset.json into {args.out}")
