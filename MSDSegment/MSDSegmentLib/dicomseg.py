"""DICOM Segmentation objects for DICOM series inputs (`--format dicom-seg`), written with highdicom.

The object references every image of the source series, lies on its frame of reference, and carries the model
card's segment names, SNOMED-CT codes and colours: Slicer (QuantitativeReporting), dcmqi and highdicom read it.
It is a BINARY segmentation (one bit per pixel and segment), the type every reader of the standard knows.
highdicom and pydicom are an optional extra (`pip install "msdsegment[cluster]"`), imported only here.
"""

import os

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output
from .errors import InputError, MSDSegmentError
from .imageio import dicom_series_files

SEG_SUFFIX = ".dcm"
MANUFACTURER = "MSDSegment"
SOFTWARE_VERSION = "0.1.0"
POSITION_TOLERANCE_MM = 0.01  # a source slice must lie on the label map's grid
# What the Segmentation IOD takes from each source image, and that a real series may lack (3D-IRCADb's CT
# series have no Frame of Reference UID): without one of them the object cannot be made conformant.
REQUIRED_SOURCE_ATTRIBUTES = {
    "StudyInstanceUID": "Study Instance UID (0020,000D)",
    "SeriesInstanceUID": "Series Instance UID (0020,000E)",
    "SOPInstanceUID": "SOP Instance UID (0008,0018)",
    "SOPClassUID": "SOP Class UID (0008,0016)",
    "FrameOfReferenceUID": "Frame of Reference UID (0020,0052)",
    "ImagePositionPatient": "Image Position (Patient) (0020,0032)",
    "ImageOrientationPatient": "Image Orientation (Patient) (0020,0037)",
    "PixelSpacing": "Pixel Spacing (0028,0030)",
    "Rows": "Rows (0028,0010)",
    "Columns": "Columns (0028,0011)",
}


def is_dicom_seg(path):
    return path.lower().endswith(SEG_SUFFIX)


def import_highdicom():
    try:
        import highdicom
    except ImportError:
        raise MSDSegmentError('--format dicom-seg needs highdicom: pip install "msdsegment[cluster]"') from None
    return highdicom


def source_series(inputs):
    """The headers of the DICOM series a segmentation will reference, checked for what the Segmentation IOD
    requires; a one-line InputError for any other input or for a series that lacks a required attribute."""
    if len(inputs) != 1 or not os.path.isdir(inputs[0]):
        raise InputError(f"DICOM SEG output needs a DICOM series folder as input, which it references: "
                         f"{', '.join(inputs)} is not one (write .nii.gz, .nrrd, .seg.nrrd or .mha instead)")
    import_highdicom()
    import pydicom

    folder = inputs[0]
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in dicom_series_files(folder)]
    missing = [text for name, text in REQUIRED_SOURCE_ATTRIBUTES.items()
               if any(not str(dataset.get(name, "")).strip() for dataset in datasets)]
    if missing:
        raise InputError(f"Cannot write a DICOM SEG for {folder}: its images lack {', '.join(missing)}, which "
                         "the Segmentation IOD requires (write .nii.gz, .nrrd, .seg.nrrd or .mha instead)")
    if any(int(dataset.get("NumberOfFrames", 1) or 1) > 1 for dataset in datasets):
        raise InputError(f"Cannot write a DICOM SEG for {folder}: multi-frame source images are not supported")
    return datasets


def slice_index(labels, dataset):
    """The label map's slice (z index) that a source image is, from its position."""
    index = labels.TransformPhysicalPointToContinuousIndex([float(v) for v in dataset.ImagePositionPatient])
    nearest = int(round(index[2]))
    if (abs(index[0]) > 0.01 or abs(index[1]) > 0.01 or abs(index[2] - nearest) * labels.GetSpacing()[2]
            > POSITION_TOLERANCE_MM or not 0 <= nearest < labels.GetSize()[2]):
        raise InputError(f"DICOM image {dataset.SOPInstanceUID} does not lie on a slice of the series' volume")
    return nearest


def code(entry):
    from pydicom.sr.coding import Code

    scheme, value, meaning = entry
    return Code(value, scheme, meaning)


def segment_descriptions(card, highdicom):
    """One description per trained label, numbered 1, 2, ... in the card's order."""
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes

    algorithm = highdicom.AlgorithmIdentificationSequence(
        name=f"MSDSegment {card.task}", family=codes.cid7162.ArtificialIntelligence,
        version=",".join(stage.sha256[:12] for stage in card.stages))
    descriptions = []
    for number, label in enumerate(card.trained_labels, start=1):
        terms = label.terminology
        description = highdicom.seg.SegmentDescription(
            segment_number=number, segment_label=label.name,
            segmented_property_category=code(terms["category"]), segmented_property_type=code(terms["type"]),
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=[code(terms["region"])] if terms.get("region") else None,
            display_color=highdicom.color.CIELabColor.from_rgb(*label.color))
        if terms.get("modifier"):
            modifier = CodedConcept(*reversed(terms["modifier"][:2]), terms["modifier"][2])
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
    return descriptions


def write_segmentation(path, labels, card, datasets):
    """Write `labels` (a label map on the series' grid, the card's values) as a DICOM SEG at `path`,
    atomically, referencing the source images `datasets` (from source_series)."""
    highdicom = import_highdicom()
    values = [label.value for label in card.trained_labels]
    numbers = np.zeros(256, np.uint8)
    numbers[values] = np.arange(1, len(values) + 1)
    array = numbers[sitk.GetArrayViewFromImage(labels)]  # (z, y, x): one frame per source image
    frames = np.stack([array[slice_index(labels, dataset)] for dataset in datasets])
    source = datasets[0]
    segmentation = highdicom.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(card, highdicom), series_instance_uid=highdicom.UID(),
        series_number=int(source.get("SeriesNumber", 0) or 0) + 1000, sop_instance_uid=highdicom.UID(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=f"MSDSegment {card.task}",
        software_versions=SOFTWARE_VERSION, device_serial_number="1", content_label="MSDSEGMENT",
        content_description=card.title[:64], omit_empty_frames=bool(frames.any()))
    segmentation.SeriesDescription = f"MSDSegment {card.task}"[:64]
    with atomic_output(path, SEG_SUFFIX) as temporary:
        segmentation.save_as(temporary)
