"""MRML side of MSDSegment: volume nodes in, a segmentation node out.

The only module of MSDSegmentLib that imports slicer and vtk (everything else runs without Slicer).
It works on any vtkMRMLScene, so it is tested with slicer-core outside the Slicer application.

Geometry: a volume node stores voxels in (k, j, i) order and an IJK-to-RAS matrix; SimpleITK stores
(x, y, z) = (i, j, k) with an LPS origin and direction. The conversion flips the first two rows of the
matrix (RAS <-> LPS) and keeps the voxels as they are, so oblique and left-handed grids stay exact.
The engine returns labels on exactly the first input's grid; they are imported onto that node's own
IJK-to-RAS matrix, so the segmentation's voxels coincide with the input's.
"""

import json
import logging
import os

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from . import modelcard
from .errors import InputError, describe_error
from .imageio import read_image
from .terminology import entry_string

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"
SMOOTHING_PARAMETER = "Smoothing factor"  # of the binary label map to closed surface conversion
QUALITY_TAG = "MSDSegment.Quality"  # a segment's quality entry (JSON): saved with it in .seg.nrrd
GEOMETRY_TOLERANCE_MM = 1e-3      # a result file must lie on its input's grid to this precision
ADC_NAME_HINTS = ("adc", "apparent diffusion")


# ---------------------------------------------------------------------------------------------
# Geometry and voxels


def ijk_to_ras(volume_node):
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def vtk_matrix(array):
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row][column]))
    return matrix


def check_volume(volume_node, role="input"):
    """One-line errors for nodes that are not a single-component 3-D scalar volume."""
    if volume_node is None:
        raise InputError(f"No {role} volume selected")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"The {role} '{volume_node.GetName()}' is a {volume_node.GetClassName()}, "
                         "not a scalar volume")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"The {role} volume '{volume_node.GetName()}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"The {role} volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} "
                         "components per voxel; a scalar (grey-level) volume is needed")


def channel_role(index):
    return "input" if index == 0 else "second input"


def channel_images(input_nodes):
    """The input volume nodes as the engine's channels, every one in the first node's local frame."""
    return [volume_to_image(node, channel_role(index), input_nodes[0] if index else None)
            for index, node in enumerate(input_nodes)]


def matrix_between_frames(node, reference_node):
    """The 4x4 matrix from `node`'s local frame to `reference_node`'s (their parent transforms folded in).

    A non-linear transform between the two cannot be folded into a voxel grid: a one-line error."""
    source, target = node.GetParentTransformNode(), reference_node.GetParentTransformNode()
    if source is target:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source, target, matrix):
        raise InputError(f"'{node.GetName()}' is under a non-linear transform relative to "
                         f"'{reference_node.GetName()}': harden the transform (Transforms module) first")
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def volume_to_image(volume_node, role="input", reference_node=None):
    """A SimpleITK copy of a volume node, in its local frame or, given `reference_node`, in that node's local
    frame (the linear transform between the two is folded into the geometry: a registered ADC lands on its T2)."""
    check_volume(volume_node, role)
    image_data = volume_node.GetImageData()
    i, j, k = image_data.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(k, j, i)
    image = sitk.GetImageFromArray(voxels.copy())
    matrix = ijk_to_ras(volume_node)
    if reference_node is not None:
        matrix = matrix_between_frames(volume_node, reference_node) @ matrix
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((LPS_FROM_RAS @ (matrix[:3, :3] / spacing)).ravel().tolist())
    image.SetOrigin((LPS_FROM_RAS @ matrix[:3, 3]).tolist())
    return image


def image_ijk_to_ras(image):
    """The IJK-to-RAS matrix of a SimpleITK image's grid."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_FROM_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_FROM_RAS @ np.array(image.GetOrigin())
    return matrix


def check_on_grid(image, volume_node):
    """Refuse a label map that is not on the volume's voxel grid (a result for some other input)."""
    dimensions = volume_node.GetImageData().GetDimensions()
    if tuple(image.GetSize()) != tuple(dimensions):
        raise InputError(f"The result has size {tuple(image.GetSize())} but '{volume_node.GetName()}' has "
                         f"{tuple(dimensions)}: it does not belong to this volume")
    corners = np.array([[0, 0, 0, 1], [dimensions[0] - 1, dimensions[1] - 1, dimensions[2] - 1, 1]]).T
    shift = np.abs((image_ijk_to_ras(image) - ijk_to_ras(volume_node)) @ corners).max()
    if shift > GEOMETRY_TOLERANCE_MM:
        raise InputError(f"The result lies {shift:.3g} mm away from '{volume_node.GetName()}': "
                         "it does not belong to this volume")


# ---------------------------------------------------------------------------------------------
# Segmentation nodes


def segmentation_name(input_node, task):
    return f"{input_node.GetName()} {task} segmentation"


def is_default_name(name):
    """Whether a segmentation's name is one this module gave it (a name the user chose is kept)."""
    return any((name or "").endswith(f" {task} segmentation") for task in modelcard.TASKS)


def label_map_image(labels, volume_node):
    """The label voxels as a vtkOrientedImageData on exactly the volume node's grid."""
    voxels = sitk.GetArrayFromImage(labels).astype(np.uint8)  # (k, j, i), as vtkImageData stores them
    image = slicer.vtkOrientedImageData()
    i, j, k = labels.GetSize()
    image.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    scalars = numpy_support.numpy_to_vtk(voxels.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras(volume_node)))
    return image


def new_segment(label, image):
    """A segment for one card label: name, colour, terminology, and its value in the shared label map."""
    segment = slicer.vtkSegment()
    segment.SetName(label.name)
    segment.SetColor(*label.color_float)
    if label.terminology:  # through the tag: vtkSegment.SetTerminology exists only from Slicer 5.10
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry_string(label.terminology))
    segment.AddRepresentation(BINARY_LABELMAP, image)  # every segment shares one layer
    segment.SetLabelValue(int(label.value))
    return segment


def segment_id(label):
    return f"Segment_{label.value}"  # as in the .seg.nrrd files the command line writes


def fill_segmentation(segmentation_node, image, card, quality=None):
    """One segment per trained label of the card; `quality` ({label value: entry}) goes into each segment's tag."""
    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
        for label in card.trained_labels:
            segment = new_segment(label, image)
            if quality and label.value in quality:
                segment.SetTag(QUALITY_TAG, json.dumps(quality[label.value]))
            segmentation.AddSegment(segment, segment_id(label))
    finally:
        segmentation_node.EndModify(was_modifying)


def place_beside(node, reference_node):
    """Put `node` in the subject hierarchy folder (DICOM study) of `reference_node`."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    parent = hierarchy.GetItemParent(reference_item) if reference_item else hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # outside the Slicer application nothing creates items for new nodes
        hierarchy.CreateItem(parent, node)


def checked_label_map(labels, input_node, card):
    """The engine's label map as a vtkOrientedImageData on the input's grid, after checking that it fits the
    input and holds only the card's label values."""
    check_volume(input_node)
    check_on_grid(labels, input_node)
    unknown = sorted(set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
                     - {0} - {label.value for label in card.trained_labels})
    if unknown:
        raise InputError(f"The result holds label values {unknown} that the {card.task} model card does not define")
    return label_map_image(labels, input_node)


def import_labels(labels, input_node, card, output_node=None, quality=None):
    """Turn an engine label map (on the input's grid) into a segmentation node.

    One segment per trained label of the card, named, coloured and coded from it. `output_node`, if
    given, is emptied and refilled (same node ID); otherwise a node named after the input is created.
    Nothing is added to the scene if the label map does not fit the input.
    """
    image = checked_label_map(labels, input_node, card)
    scene = input_node.GetScene()
    created = output_node is None
    if created:
        output_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", segmentation_name(input_node, card.task))
    elif is_default_name(output_node.GetName()):
        output_node.SetName(segmentation_name(input_node, card.task))  # a reused result is named for its task
    try:
        # The transform first: the reference geometry is stored in the segmentation's own frame, so setting it
        # while the segmentation is still outside the input's transform would shift it by that transform.
        output_node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())  # same frame as the input
        output_node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
        fill_segmentation(output_node, image, card, quality)
        if output_node.GetDisplayNode() is None:
            output_node.CreateDefaultDisplayNodes()
        place_beside(output_node, input_node)
    except Exception:
        if created:
            remove_node(output_node)
        raise
    return output_node


def remove_node(node):
    """Remove a node with its display nodes and subject hierarchy item (RemoveNode alone leaves them)."""
    scene = node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(node) if hierarchy else 0
    if item:
        hierarchy.RemoveItem(item, False, False)  # keep the data node for now, no children to remove
    display_nodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    scene.RemoveNode(node)
    for display_node in display_nodes:
        if display_node is not None and display_node.GetScene() is scene:
            scene.RemoveNode(display_node)


def import_label_file(path, input_node, task, output_node=None, models_dir=None):
    """Import a label map file written by the command line for `input_node` (the background-process path)."""
    card = modelcard.find_card(task, models_dir or modelcard.MODELS_DIR)
    return import_labels(read_image(path), input_node, card, output_node, quality_of_labels(path, card))


def quality_of_labels(path, card):
    """{label value: quality entry} from the command line's summary beside a label file ({} if none)."""
    try:
        with open(os.path.splitext(path)[0] + ".json", encoding="utf-8") as stream:
            by_name = json.load(stream).get("quality", {})
    except (OSError, ValueError):
        return {}
    return {label.value: by_name[label.name] for label in card.trained_labels if label.name in by_name}


def segment(input_nodes, task, output_node=None, *, device="auto", tta=False, keep_largest=True,
            progress=None, cancel=None, models_dir=None, precision="auto"):
    """Segment volume node(s) in this process and return the segmentation node.

    input_nodes: one node or a list (prostate: T2 then ADC). The scene is only touched once the engine
    has finished, so an error or a cancel (errors.Cancelled) leaves it as it was.
    """
    from .engine import segment as run_engine  # torch is loaded only when a segmentation is asked for

    nodes = list(input_nodes) if isinstance(input_nodes, (list, tuple)) else [input_nodes]
    channels = channel_images(nodes)
    result = run_engine(channels, task, device=device, tta=tta, keep_largest=keep_largest, progress=progress,
                        cancel=cancel, models_dir=models_dir, precision=precision)
    for warning in result.warnings:
        logging.warning(warning)
    return import_labels(result.labels, nodes[0], result.card, output_node, result.quality)


def segment_many(inputs, task, *, progress=None, cancel=None, on_error=None, **options):
    """Segment each input (a volume node, or [T2, ADC] for the prostate) on its own, in this process.

    Returns the segmentation nodes in input order, None where an input failed or was not reached. A bad input
    fails alone: on_error(index, error) gets its one-line reason (default: a logged warning) and the others go
    on, whatever it raised. cancel() stops the whole batch; the results already finished stay, the unfinished one
    leaves nothing.
    progress(fraction of the batch, text naming the volume)."""
    from .errors import Cancelled

    results = [None] * len(inputs)
    for index, item in enumerate(inputs):
        first = item[0] if isinstance(item, (list, tuple)) else item  # the volume the result is named after
        label = f"{first.GetName() if first is not None else 'no volume'} ({index + 1} of {len(inputs)})"

        def report(fraction, text, index=index, label=label):
            if progress is not None:
                progress((index + fraction) / len(inputs), f"{label}: {text}")

        try:
            results[index] = segment(item, task, progress=report, cancel=cancel, **options)
        except Cancelled:
            break
        except Exception as error:  # whatever it raised (torch's RuntimeError, a MemoryError), it fails alone
            (on_error or (lambda i, e: logging.warning(f"MSDSegment: {label}: {describe_error(e)}")))(index, error)
    return results


def sequence_of(volume_node):
    """(browser, sequence) of the sequence browser that plays `volume_node` as a proxy node, or (None, None)."""
    scene = volume_node.GetScene()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(index, "vtkMRMLSequenceBrowserNode")
        sequence = browser.GetSequenceNode(volume_node)
        if sequence is not None:
            return browser, sequence
    return None, None


def frame_segmentation(labels, frame_node, card, quality=None):
    """A segmentation node outside any scene (a sequence's frame) holding the labels on the frame's grid."""
    image = checked_label_map(labels, frame_node, card)
    node = slicer.vtkMRMLSegmentationNode()
    node.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(image))
    fill_segmentation(node, image, card, quality)
    return node


def segment_sequence(volume_node, task, *, progress=None, cancel=None, **options):
    """Segment every frame of the sequence that `volume_node` shows, and record the results as a segmentation
    sequence played by the same browser. Returns the segmentation node that shows the current frame.

    Nothing is added to the scene until every frame is done: a bad frame or a cancel leaves it as it was."""
    from .engine import segment as run_engine

    _, sequence = sequence_and_browser(volume_node)
    frames = sequence.GetNumberOfDataNodes()
    segmentations = []
    for index in range(frames):
        frame = sequence.GetNthDataNode(index)

        def report(fraction, text, index=index):
            if progress is not None:
                progress((index + fraction) / frames, f"frame {index + 1} of {frames}: {text}")

        result = run_engine([volume_to_image(frame, f"frame {index + 1}")], task, progress=report, cancel=cancel,
                            **options)
        for warning in result.warnings:
            logging.warning(f"MSDSegment: frame {index + 1}: {warning}")
        segmentations.append(frame_segmentation(result.labels, frame, result.card, result.quality))
    return record_sequence(volume_node, task, segmentations)


def sequence_and_browser(volume_node):
    """(browser, sequence) that play `volume_node`; a one-line error if it is no frame of a sequence."""
    check_volume(volume_node)
    browser, sequence = sequence_of(volume_node)
    if sequence is None:
        raise InputError(f"'{volume_node.GetName()}' is not a frame of a sequence (no sequence browser plays it)")
    return browser, sequence


def record_sequence(volume_node, task, segmentations):
    """Add the frames' segmentations as a segmentation sequence played by the volume's browser, beside the
    volume sequence (same index values); returns the segmentation node that shows the current frame."""
    browser, sequence = sequence_and_browser(volume_node)
    results = slicer.vtkMRMLSequenceNode()
    results.SetIndexName(sequence.GetIndexName())
    results.SetIndexUnit(sequence.GetIndexUnit())
    results.SetIndexType(sequence.GetIndexType())
    for index, segmentation in enumerate(segmentations):
        results.SetDataNodeAtValue(segmentation, sequence.GetNthIndexValue(index))
    results.SetName(f"{segmentation_name(volume_node, task)} sequence")
    scene = volume_node.GetScene()
    scene.AddNode(results)
    slicer.modules.sequences.logic().AddSynchronizedNode(results, None, browser)
    browser.SetSaveChanges(results, True)  # edits in the Segment Editor are kept in the frame they were made in
    proxy = browser.GetProxyNode(results)
    proxy.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    if proxy.GetDisplayNode() is None:
        proxy.CreateDefaultDisplayNodes()
    place_beside(proxy, volume_node)
    return proxy


def is_sequence_output(segmentation_node):
    """Whether a segmentation node shows a frame of a segmentation sequence (its content follows the browser)."""
    return segmentation_node is not None and sequence_of(segmentation_node)[1] is not None


class PanelChoice:
    """What a click on the panel's Segment button runs, from the panel's parameters (the parameter node), never
    from what its widgets show. Each `..._unavailable` is "" or the reason the panel shows for it."""

    def __init__(self, task, card, input_node=None, adc_node=None, all_frames=False, output_node=None):
        self.needs_adc = card is not None and len(card.channels) > 1
        self.in_sequence = input_node is not None and sequence_of(input_node)[1] is not None
        self.all_frames = bool(all_frames) and self.in_sequence and not self.needs_adc
        self.batch_unavailable = (
            f"The {task} task takes a T2 volume with its ADC: segment other cases one at a time"
            if self.needs_adc else "Every frame of the sequence is segmented" if self.all_frames else "")
        self.surfaces_unavailable = (
            "3-D surfaces are not built for a segmentation sequence (they would show one frame only): use the "
            "Segment Editor's Show 3D on the frame shown"
            if self.all_frames or is_sequence_output(output_node) else "")
        if card is None or modelcard.missing_weights(card):
            self.missing = f"The model for '{task}' is not installed"
        elif input_node is None:
            self.missing = "Select an input volume"
        elif self.needs_adc and adc_node is None:
            self.missing = "Select the ADC volume"
        else:
            self.missing = ""


# ---------------------------------------------------------------------------------------------
# Background-process helpers and results


def write_inputs(input_nodes, folder):
    """Write the input volume(s) for the command line; returns the file paths, in channel order."""
    paths = []
    for index, image in enumerate(channel_images(list(input_nodes))):
        path = os.path.join(folder, f"input{index}.nrrd")
        sitk.WriteImage(image, path, useCompression=False)
        paths.append(path)
    return paths


def item_nodes(item):
    """An input of a batch as its list of volume nodes (a volume, or [T2, ADC])."""
    return list(item) if isinstance(item, (list, tuple)) else [item]


class VolumeBatch:
    """Volumes (each a node, or [T2, ADC]) for the background runner: each result is imported as it comes, into
    the output node given for it (output_nodes: for the first volumes) or a new one, so a cancel or a later
    failure keeps it."""

    def __init__(self, items, task, output_nodes=None, models_dir=None):
        self.items = [item_nodes(item) for item in items]
        self.task = task
        outputs = list(output_nodes or [])  # the first ones given, the rest new
        self.output_nodes = outputs + [None] * (len(self.items) - len(outputs))
        self.models_dir = models_dir
        self.names = [nodes[0].GetName() if nodes[0] is not None else "no volume" for nodes in self.items]

    def prepare(self, index, folder):
        return write_inputs(self.items[index], folder)

    def collect(self, index, label_path):
        input_node, output_node = self.items[index][0], self.output_nodes[index]
        if input_node.GetScene() is None:
            raise InputError("The input volume was removed from the scene while the model ran")
        if output_node is not None and output_node.GetScene() is None:
            output_node = None  # deleted while the model ran: make a new one
        return import_label_file(label_path, input_node, self.task, output_node, self.models_dir)

    def complete(self, outcome):
        """Count only the segmentations still in the scene; show the last one."""
        outcome.results = [node if node is not None and node.GetScene() is not None else None
                           for node in outcome.results]
        outcome.output = outcome.done[-1] if outcome.done else None


class FrameBatch:
    """Every frame of the sequence a volume node shows, for the background runner. The segmentation sequence is
    recorded at the end and only if every frame was segmented: a failed frame or a cancel adds nothing."""

    def __init__(self, volume_node, task, models_dir=None):
        _, self.sequence = sequence_and_browser(volume_node)
        self.volume_node = volume_node
        self.task = task
        self.card = modelcard.find_card(task, models_dir or modelcard.MODELS_DIR)
        frames = self.sequence.GetNumberOfDataNodes()
        self.names = [f"frame {index + 1}" for index in range(frames)]

    def prepare(self, index, folder):
        return write_inputs([self.sequence.GetNthDataNode(index)], folder)

    def collect(self, index, label_path):
        return frame_segmentation(read_image(label_path), self.sequence.GetNthDataNode(index), self.card,
                                  quality_of_labels(label_path, self.card))

    def complete(self, outcome):
        if outcome.cancelled or outcome.errors or self.volume_node.GetScene() is None:
            outcome.results = [None] * len(outcome.results)
            outcome.notes.append("The segmentation sequence needs every frame: nothing was added.")
            return
        outcome.output = record_sequence(self.volume_node, self.task, outcome.results)


def segment_volumes_ml(segmentation_node):
    """(segment name, RGB colour 0-1, volume in mL) for every segment, in segment order."""
    segmentation = segmentation_node.GetSegmentation()
    rows = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id_ = segmentation.GetNthSegmentID(index)
        mask = slicer.vtkOrientedImageData()
        segmentation_node.GetBinaryLabelmapRepresentation(segment_id_, mask)
        count = 0
        scalars = mask.GetPointData().GetScalars()
        if scalars is not None:
            count = int(np.count_nonzero(numpy_support.vtk_to_numpy(scalars)))
        to_world = vtk.vtkMatrix4x4()
        mask.GetImageToWorldMatrix(to_world)
        voxel_mm3 = abs(np.linalg.det(np.array([[to_world.GetElement(r, c) for c in range(3)] for r in range(3)])))
        segment = segmentation.GetNthSegment(index)
        rows.append((segment.GetName(), tuple(segment.GetColor()), count * voxel_mm3 / 1000.0))
    return rows


def quality_from_tags(segmentation_node):
    """{segment name: quality entry} for the segments that carry one (see the engine's segment_quality)."""
    segmentation = segmentation_node.GetSegmentation()
    found = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = vtk.reference("")
        if segment.GetTag(QUALITY_TAG, value):
            found[segment.GetName()] = json.loads(str(value))
    return found


def quality_text(entry):
    """What the panel's table says of a segment: 'check this segment: why', or its confidence."""
    if not entry:
        return ""
    if entry.get("check"):
        return "check this segment: " + "; ".join(entry.get("reasons", []))
    confidence = entry.get("confidence")
    text = f"confidence {confidence:.2f}" if confidence is not None else ""
    lesions = entry.get("lesions")
    if lesions:
        count = f"{len(lesions)} lesion" + ("s" if len(lesions) > 1 else "")
        text += ("; " if text else "") + f"{count}, largest {lesions[0]['volume_ml']:.1f} mL"
        if lesions[0].get("contrast") is not None:  # tumours are CT classes: the contrast is in HU
            text += f" ({lesions[0]['contrast']:+.0f} HU)"
    return text


def default_input_volume(scene):
    """The first scalar volume that is not a label map (a label map is never a sensible input), or None."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return None


def show_surfaces(segmentation_node, show, smoothing=0.5):
    """Build the 3-D surfaces with this smoothing factor (0-1), or drop them: building them takes seconds on
    a large volume, so it is the user's choice and not done after every run."""
    segmentation_node.GetSegmentation().SetConversionParameter(SMOOTHING_PARAMETER, f"{float(smoothing):g}")
    segmentation_node.RemoveClosedSurfaceRepresentation()  # rebuilt below with the smoothing asked for
    if show:
        segmentation_node.CreateClosedSurfaceRepresentation()


def update_surface_smoothing(segmentation_node, smoothing):
    """Rebuild the 3-D surfaces with this smoothing factor if they are shown and were built with another one;
    returns whether they were rebuilt. A segmentation without surfaces gets none (they are the user's choice)."""
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.ContainsRepresentation(CLOSED_SURFACE):
        return False
    if segmentation.GetConversionParameter(SMOOTHING_PARAMETER) == f"{float(smoothing):g}":
        return False
    show_surfaces(segmentation_node, True, smoothing)
    return True


def guess_adc_volume(scene, t2_node=None):
    """The scalar volume whose name says ADC, preferring one in the same study as the T2 volume."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)

    def study_of(node):
        item = hierarchy.GetItemByDataNode(node) if hierarchy else 0
        return hierarchy.GetItemParent(item) if item else None

    candidates = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if node is t2_node or node.IsA("vtkMRMLLabelMapVolumeNode"):
            continue
        if any(hint in (node.GetName() or "").lower() for hint in ADC_NAME_HINTS):
            candidates.append(node)
    if t2_node is not None and candidates:
        same_study = [node for node in candidates if study_of(node) == study_of(t2_node)]
        candidates = same_study or candidates
    return candidates[0] if candidates else None

