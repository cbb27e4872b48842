"""Tests of the MRML logic on a real scene, shared by pytest (slicer-core) and MSDSegmentTest (Slicer).

Each `test_*` function takes a `Context`: the scene, how to load a file through Slicer's volume
reader, a model folder, a scratch folder and the real data files. They import slicer only when run,
so this file can be listed without Slicer. A test that cannot run (missing data set) raises
unittest.SkipTest, which pytest and unittest both report as a skip. pytest runs them from
Testing/Python/test_slicer_logic.py, Slicer from MSDSegmentModuleTest.py beside this file.
"""

import hashlib
import os
import sys
import unittest
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

CROP_SIZE = (128, 128, 40)        # CT sub-volume used where a model runs (seconds on a CPU)
PROSTATE_CROP = (96, 96)


@dataclass
class Context:
    scene: object                 # vtkMRMLScene
    load_volume: object           # (path, node name) -> vtkMRMLScalarVolumeNode through Slicer's reader
    new_scene: object             # () -> an empty scene with the module node classes registered
    models_dir: str
    folder: str                   # scratch folder, removed by the caller
    ct_path: str = ""             # a real CT (BTCV), or "" when absent
    ct_labels_path: str = ""      # its reference labels (BTCV values: spleen = 1), or ""
    prostate_path: str = ""       # a real 4-D T2+ADC MR (MSD Task05), or "" when absent
    python: str = sys.executable  # the Python that runs `-m MSDSegmentLib` (PythonSlicer in Slicer)
    # Outside Slicer: a command that runs the engine as its child, as the CTK launcher PythonSlicer runs
    # python-real (the child inherits the launcher's standard input). In Slicer `python` is that launcher.
    launcher: tuple = ()
    cache: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Helpers


def need(path, what):
    if not path or not os.path.exists(path):
        raise unittest.SkipTest(f"{what} not available ({path or 'no path given'})")
    return path


def write_phantom_ct(path, size=(96, 80, 40), spacing=(1.5, 1.5, 3.0)):
    """A CT-like volume in HU (air, a soft-tissue body, a brighter organ) where no real CT is at hand."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in size], indexing="ij")
    voxels = np.full(size, -1000.0)
    voxels[(x / 0.85) ** 2 + (y / 0.7) ** 2 < 1] = 40.0
    voxels[((x + 0.35) / 0.3) ** 2 + ((y - 0.1) / 0.3) ** 2 + (z / 0.6) ** 2 < 1] = 160.0
    voxels += np.random.default_rng(0).normal(0.0, 8.0, size)
    image = sitk.GetImageFromArray(voxels.transpose(2, 1, 0).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-72.0, -60.0, -60.0))
    sitk.WriteImage(image, path)
    return path


def cropped_ct(ctx):
    """A central crop of the real CT, written once per context."""
    if "ct_crop" not in ctx.cache:
        image = sitk.ReadImage(need(ctx.ct_path, "real CT"))
        size = np.array(image.GetSize())
        crop = np.minimum(CROP_SIZE, size)
        start = (size - crop) // 2
        path = os.path.join(ctx.folder, "ct_crop.nrrd")
        sitk.WriteImage(image[tuple(slice(int(a), int(a + n)) for a, n in zip(start, crop))], path)
        ctx.cache["ct_crop"] = path
    return ctx.cache["ct_crop"]


def ct_around_spleen(ctx, margin_mm=60.0):
    """The real CT cropped to its reference spleen plus a margin (context a trained model needs to find it)."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(need(ctx.ct_labels_path, "reference labels of the CT")))
    image = sitk.ReadImage(need(ctx.ct_path, "real CT"))
    k, j, i = np.nonzero(labels == 1)
    margin = np.ceil(margin_mm / np.array(image.GetSpacing())).astype(int)
    lower = np.maximum(np.array([i.min(), j.min(), k.min()]) - margin, 0)
    upper = np.minimum(np.array([i.max(), j.max(), k.max()]) + margin + 1, image.GetSize())
    path = os.path.join(ctx.folder, "ct_spleen.nrrd")
    sitk.WriteImage(image[tuple(slice(int(a), int(b)) for a, b in zip(lower, upper))], path)
    return path


def reoriented(image, order, flips):
    """The same world content stored with the index axes permuted (`order`) and reversed (`flips`)."""
    order = list(order)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).transpose(order)
    for axis in flips:
        array = np.flip(array, axis)
    copy = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    copy.SetSpacing([image.GetSpacing()[axis] for axis in order])
    direction = np.array(image.GetDirection()).reshape(3, 3)[:, order]
    corner = [0, 0, 0]
    for axis in flips:
        corner[order[axis]] = image.GetSize()[order[axis]] - 1
        direction[:, axis] *= -1
    copy.SetDirection(direction.ravel().tolist())
    copy.SetOrigin(image.TransformIndexToPhysicalPoint(corner))
    return copy


def oblique(image, degrees=(8.0, 0.0, 15.0)):
    """The same anatomy resampled onto a grid rotated about its centre."""
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*np.deg2rad(degrees))
    direction = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
    size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    grid = sitk.Image([int(n) for n in size], image.GetPixelID())
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin((centre - direction @ ((size - 1) / 2 * spacing)).tolist())
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0)


def put_in_study(scene, node):
    """Patient > study > node in the subject hierarchy, as the DICOM module loads series."""
    hierarchy = scene.GetSubjectHierarchyNode()
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "Study")
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, study)
    else:
        hierarchy.CreateItem(study, node)
    return study


def node_ids(scene):
    nodes = scene.GetNodes()
    return sorted(nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems()))


def volume_state(node):
    """What must not change in an input node: name, geometry, voxels, transform."""
    from MSDSegmentLib import mrml

    voxels = sitk.GetArrayFromImage(mrml.volume_to_image(node))
    return (node.GetName(), mrml.ijk_to_ras(node).tobytes(), hashlib.sha256(voxels.tobytes()).hexdigest(),
            node.GetTransformNodeID())


def segmentation_state(node):
    from MSDSegmentLib import mrml

    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return node.GetID(), node.GetName(), ids, mrml.segment_volumes_ml(node)


def reference_grid(matrix, size):
    """An empty vtkOrientedImageData with a volume's IJK-to-RAS matrix and size."""
    import slicer

    from MSDSegmentLib import mrml

    grid = slicer.vtkOrientedImageData()
    grid.SetExtent(0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1)
    grid.SetImageToWorldMatrix(mrml.vtk_matrix(matrix))
    return grid


def mask_on_grid(segmentation_node, segment_id, matrix, size):
    """One segment's voxels (k, j, i) on a given grid, through world coordinates (nearest neighbour)."""
    import slicer

    mask = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, mask)
    return resampled_voxels(mask, matrix, size) > 0


def resampled_voxels(image, matrix, size):
    """A vtkOrientedImageData's voxels (k, j, i) on a grid, through world coordinates (nearest neighbour)."""
    import slicer
    from vtk.util import numpy_support

    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference_grid(matrix, size), resampled, False, False):
        raise AssertionError("could not resample onto the reference grid")
    out = np.zeros((size[2], size[1], size[0]), np.uint8)
    extent = np.array(resampled.GetExtent()).reshape(3, 2)
    if resampled.GetPointData().GetScalars() is None or np.any(extent[:, 1] < extent[:, 0]):
        return out
    voxels = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(
        *(extent[::-1, 1] - extent[::-1, 0] + 1))
    lower = np.maximum(extent[:, 0], 0)
    upper = np.minimum(extent[:, 1] + 1, size)
    if np.any(upper <= lower):
        return out
    source = tuple(slice(int(lo - e), int(up - e)) for lo, up, e in zip(lower[::-1], upper[::-1], extent[::-1, 0]))
    out[tuple(slice(int(lo), int(up)) for lo, up in zip(lower[::-1], upper[::-1]))] = voxels[source]
    return out


def world_centroid(segmentation_node, segment_id):
    """RAS centroid of a segment computed from its own label map grid (no reference grid involved)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    mask = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, mask)
    extent = mask.GetExtent()
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    voxels = numpy_support.vtk_to_numpy(mask.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    k, j, i = np.nonzero(voxels)
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    matrix = vtk.vtkMatrix4x4()
    mask.GetImageToWorldMatrix(matrix)
    to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return (to_world @ ijk)[:3].mean(axis=1)


def expected_centroid(labels, value):
    """RAS centroid of one label value of a SimpleITK label map (from its LPS geometry)."""
    from MSDSegmentLib import mrml

    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(labels) == value)
    ijk = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    return (mrml.image_ijk_to_ras(labels) @ ijk)[:3].mean(axis=1)


def threshold_labels(image, card):
    """A label map on the image's grid: one box-shaped region per trained label (no model needed)."""
    voxels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    depth = voxels.shape[0]
    for index, label in enumerate(card.trained_labels):
        bright = sitk.GetArrayViewFromImage(image) > 100 + 50 * index
        slab = slice(depth * index // (len(card.trained_labels) + 1), depth * (index + 2) // (len(card.trained_labels) + 1))
        voxels[slab][bright[slab]] = label.value
    labels = sitk.GetImageFromArray(voxels)
    labels.CopyInformation(image)
    return labels


def terminology_of(segment):
    """A segment's terminology entry string, read through its tag as on every Slicer version."""
    import slicer
    import vtk

    value = vtk.reference("")
    segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value)
    return str(value)


def card(ctx, task):
    from MSDSegmentLib import modelcard

    return modelcard.find_card(task, ctx.models_dir)


def segment(ctx, nodes, task, **options):
    from MSDSegmentLib import mrml

    return mrml.segment(nodes, task, device="cpu", models_dir=ctx.models_dir, **options)


def assert_one_line_error(error):
    message = str(error)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"


# ---------------------------------------------------------------------------------------------
# Tests


def test_segment_named_coloured_coded_from_card(ctx):
    """A model run gives one segment per trained label, named, coloured and coded from the card,
    on the input's geometry, in the input's study, and the input is left as it was."""
    import slicer

    ct = ctx.load_volume(cropped_ct(ctx), "CT")
    study = put_in_study(ctx.scene, ct)
    before = volume_state(ct)
    spleen = card(ctx, "spleen")

    node = segment(ctx, ct, "spleen")

    assert node.GetName() == "CT spleen segmentation"
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] \
        == [label.name for label in spleen.trained_labels]
    parser = slicer.vtkSlicerTerminologiesModuleLogic()
    for label in spleen.trained_labels:
        segment_ = segmentation.GetSegment(f"Segment_{label.value}")
        assert segment_.GetLabelValue() == label.value
        assert np.allclose(segment_.GetColor(), label.color_float)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert parser.DeserializeTerminologyEntry(terminology_of(segment_), entry)
        for part, code in (("Category", label.terminology["category"]), ("Type", label.terminology["type"])):
            coded = getattr(entry, f"Get{part}Object")()
            assert [coded.GetCodingSchemeDesignator(), coded.GetCodeValue(), coded.GetCodeMeaning()] == code
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is ct
    expected_geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(
        reference_grid(*geometry_of(ct)))
    assert node.GetSegmentation().GetConversionParameter("Reference image geometry") == expected_geometry
    hierarchy = ctx.scene.GetSubjectHierarchyNode()
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    assert volume_state(ct) == before


def test_every_code_is_in_the_shipped_terminology(ctx):
    """Every segment entry names the extension's own context, and that context (the shipped .term.json,
    as Slicer loads it at start-up) holds each category and type, so no entry reads as invalid."""
    import slicer

    from MSDSegmentLib import modelcard, terminology

    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(terminology.TERMINOLOGY_FILE) == terminology.CONTEXT_NAME
    for card_ in modelcard.catalogue(ctx.models_dir).values():
        for label in card_.trained_labels:
            entry = slicer.vtkSlicerTerminologyEntry()
            assert logic.DeserializeTerminologyEntry(terminology.entry_string(label.terminology), entry)
            assert entry.GetTerminologyContextName() == terminology.CONTEXT_NAME
            category = entry.GetCategoryObject()
            types = []
            for index in range(logic.GetNumberOfTypesInTerminologyCategory(terminology.CONTEXT_NAME, category)):
                found = slicer.vtkSlicerTerminologyType()
                assert logic.GetNthTypeInTerminologyCategory(terminology.CONTEXT_NAME, category, index, found)
                types.append([found.GetCodingSchemeDesignator(), found.GetCodeValue(), found.GetCodeMeaning()])
            assert label.terminology["type"] in types, f"{card_.task} {label.name}: type not in the context"


def geometry_of(volume_node):
    from MSDSegmentLib import mrml

    return mrml.ijk_to_ras(volume_node), volume_node.GetImageData().GetDimensions()


def test_untrained_labels_get_no_segment(ctx):
    """Only the card's trained labels become segments (a label a card lists as not trained yet gets none)."""
    from MSDSegmentLib import mrml

    liver = card(ctx, "liver")
    ct = ctx.load_volume(need(ctx.ct_path, "real CT"), "CT")
    node = mrml.import_labels(threshold_labels(mrml.volume_to_image(ct), liver), ct, liver)
    names = [node.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(node.GetSegmentation().GetNumberOfSegments())]
    assert names == [label.name for label in liver.trained_labels]
    assert not {label.name for label in liver.labels if not label.trained} & set(names)


def test_import_is_voxel_exact_and_in_world_place(ctx):
    """The segmentation holds exactly the engine's voxels, at the same RAS positions, on the full real CT."""
    from MSDSegmentLib import mrml

    spleen = card(ctx, "spleen")
    ct = ctx.load_volume(need(ctx.ct_path, "real CT"), "CT")
    labels = threshold_labels(mrml.volume_to_image(ct), spleen)
    node = mrml.import_labels(labels, ct, spleen)
    matrix, size = geometry_of(ct)
    for label in spleen.trained_labels:
        expected = sitk.GetArrayViewFromImage(labels) == label.value
        assert expected.any()
        assert np.array_equal(mask_on_grid(node, f"Segment_{label.value}", matrix, size), expected)
        assert np.allclose(world_centroid(node, f"Segment_{label.value}"), expected_centroid(labels, label.value),
                           atol=1e-3)
    volumes = dict((name, ml) for name, _, ml in mrml.segment_volumes_ml(node))
    voxel_ml = np.prod(labels.GetSpacing()) / 1000.0
    for label in spleen.trained_labels:
        count = int(np.count_nonzero(sitk.GetArrayViewFromImage(labels) == label.value))
        assert abs(volumes[label.name] - count * voxel_ml) < 1e-6 * max(1.0, count * voxel_ml)


def saved_and_restored(ctx, node, name):
    """The segmentation saved as .seg.nrrd and read back into a new scene."""
    path = os.path.join(ctx.folder, name)
    storage = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    assert storage.WriteData(node)
    scene = ctx.new_scene()
    restored = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(path)
    assert reader.ReadData(restored)
    return restored


def test_seg_nrrd_round_trip_in_fresh_scene(ctx):
    """Saved as .seg.nrrd and read into a new scene: same voxels, same world place, same names and codes."""
    from MSDSegmentLib import mrml

    liver = card(ctx, "liver")
    ct = ctx.load_volume(need(ctx.ct_path, "real CT"), "CT")
    node = mrml.import_labels(threshold_labels(mrml.volume_to_image(ct), liver), ct, liver)
    matrix, size = geometry_of(ct)
    saved = {}
    for index in range(node.GetSegmentation().GetNumberOfSegments()):
        segment_id = node.GetSegmentation().GetNthSegmentID(index)
        segment_ = node.GetSegmentation().GetSegment(segment_id)
        saved[segment_id] = (segment_.GetName(), segment_.GetColor(), terminology_of(segment_),
                             mask_on_grid(node, segment_id, matrix, size), world_centroid(node, segment_id))
    reloaded = saved_and_restored(ctx, node, "CT liver segmentation.seg.nrrd")
    segmentation = reloaded.GetSegmentation()
    assert sorted(segmentation.GetSegmentIDs()) == sorted(saved)
    for segment_id, (name, color, terminology, mask, centroid) in saved.items():
        segment_ = segmentation.GetSegment(segment_id)
        assert (segment_.GetName(), terminology_of(segment_)) == (name, terminology)
        assert np.allclose(segment_.GetColor(), color, atol=1e-4)
        assert np.array_equal(mask_on_grid(reloaded, segment_id, matrix, size), mask)
        assert np.allclose(world_centroid(reloaded, segment_id), centroid, atol=1e-3)
    assert segmentation.GetConversionParameter("Reference image geometry") == \
        node.GetSegmentation().GetConversionParameter("Reference image geometry")


def ct_with_spleen(ctx):
    """A CT crop holding the spleen where reference labels say where it is, else the central crop."""
    return ct_around_spleen(ctx) if ctx.ct_labels_path else cropped_ct(ctx)


def reoriented_variants(ctx):
    """Files of the CT crop stored as RAS-ordered (first two axes reversed) and axis-permuted."""
    image = sitk.ReadImage(ct_with_spleen(ctx))
    paths = {}
    for name, variant in (("RAS-ordered", reoriented(image, (0, 1, 2), (0, 1))),
                          ("permuted", reoriented(image, (2, 0, 1), (1,)))):
        paths[name] = os.path.join(ctx.folder, f"ct_{name}.nrrd")
        sitk.WriteImage(variant, paths[name])
    return paths


def oblique_variant(ctx, source):
    path = os.path.join(ctx.folder, "ct_oblique.nrrd")
    sitk.WriteImage(oblique(sitk.ReadImage(source)), path)
    return path


def dice_within(a, b, region):
    a, b = a & region, b & region
    return 2 * np.sum(a & b) / max(1, np.sum(a) + np.sum(b))


def test_reoriented_inputs_give_the_same_voxels(ctx):
    """The same CT stored in RAS order or with permuted axes gives the same segmentation in world
    coordinates, voxel for voxel (any model: the network sees the same canonical grid)."""
    base = ctx.load_volume(ct_with_spleen(ctx), "CT")
    matrix, size = geometry_of(base)
    expected = mask_on_grid(segment(ctx, base, "spleen"), "Segment_1", matrix, size)
    if not expected.any():
        if not ctx.ct_labels_path:  # a synthetic phantom: a trained model may rightly find no spleen
            raise unittest.SkipTest("the model found no spleen in this CT: nothing to compare")
        raise AssertionError("the model found no spleen voxel in a crop around the spleen")
    for name, path in reoriented_variants(ctx).items():
        node = ctx.load_volume(path, name)
        result = segment(ctx, node, "spleen")
        assert np.allclose(geometry_of(node)[0], labelmap_geometry(result)), f"{name}: not on the input's grid"
        agreement = np.mean(mask_on_grid(result, "Segment_1", matrix, size) == expected)
        assert agreement > 0.999, f"{name}: {100 * (1 - agreement):.3f}% of voxels differ"


def test_oblique_input_result_lands_in_world_place(ctx):
    """Labels found on an oblique copy of the CT lie where the same anatomy lies in the original."""
    from MSDSegmentLib import mrml

    spleen = card(ctx, "spleen")
    base = ctx.load_volume(cropped_ct(ctx), "CT")
    node = ctx.load_volume(oblique_variant(ctx, cropped_ct(ctx)), "oblique")
    direction = mrml.ijk_to_ras(node)[:3, :3] / np.linalg.norm(mrml.ijk_to_ras(node)[:3, :3], axis=0)
    assert not np.allclose(np.abs(direction), np.eye(3), atol=0.05), "the copy is not oblique"
    matrix, size = geometry_of(base)
    bright = {}
    for volume in (base, node):
        labels = mrml.import_labels(threshold_labels(mrml.volume_to_image(volume), spleen), volume, spleen)
        bright[volume.GetName()] = mask_on_grid(labels, "Segment_1", matrix, size)
    overlap = dice_within(bright["CT"], bright["oblique"], field_of_view(node, matrix, size))
    assert overlap > 0.85, f"Dice {overlap:.3f} between the original and the oblique copy"
    result = segment(ctx, node, "spleen")
    assert np.allclose(labelmap_geometry(result), mrml.ijk_to_ras(node)), "not on the oblique input's grid"


def test_oblique_input_with_trained_model(ctx):
    """A trained model finds the same spleen in the CT and in its oblique copy (world coordinates)."""
    if not card(ctx, "spleen").validation.get("dice"):
        raise unittest.SkipTest("needs a trained spleen model (its card has no validation Dice)")
    source = ct_around_spleen(ctx)
    base = ctx.load_volume(source, "CT")
    node = ctx.load_volume(oblique_variant(ctx, source), "oblique")
    matrix, size = geometry_of(base)
    masks = [mask_on_grid(segment(ctx, volume, "spleen"), "Segment_1", matrix, size) for volume in (base, node)]
    overlap = dice_within(*masks, field_of_view(node, matrix, size))
    assert overlap > 0.8, f"Dice {overlap:.3f} between the spleens of the original and the oblique copy"


def labelmap_geometry(segmentation_node, segment_id="Segment_1"):
    """The image-to-world matrix of a segment's label map."""
    import slicer
    import vtk

    mask = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, mask)
    matrix = vtk.vtkMatrix4x4()
    mask.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def field_of_view(volume_node, matrix, size):
    """Voxels of a grid inside another volume's field of view (less a two-voxel margin)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    from MSDSegmentLib import mrml

    inside = slicer.vtkOrientedImageData()
    dims = volume_node.GetImageData().GetDimensions()
    inside.SetExtent(2, dims[0] - 3, 2, dims[1] - 3, 2, dims[2] - 3)
    inside.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(inside.GetPointData().GetScalars())[:] = 1
    inside.SetImageToWorldMatrix(mrml.vtk_matrix(mrml.ijk_to_ras(volume_node)))
    return resampled_voxels(inside, matrix, size) > 0


def test_replace_keeps_node_id(ctx):
    """Replacing a chosen segmentation refills that node: same ID, same name, old segments gone."""
    from MSDSegmentLib import mrml

    spleen = card(ctx, "spleen")
    ct = ctx.load_volume(need(ctx.ct_path, "real CT"), "CT")
    target = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My segmentation")
    target.GetSegmentation().AddEmptySegment("old", "Old segment")
    node_id = target.GetID()
    result = mrml.import_labels(threshold_labels(mrml.volume_to_image(ct), spleen), ct, spleen, target)
    assert result is target and result.GetID() == node_id and result.GetName() == "My segmentation"
    assert list(result.GetSegmentation().GetSegmentIDs()) == [f"Segment_{l.value}" for l in spleen.trained_labels]
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_segment_with_model_replaces_output(ctx):
    """The model path also replaces: the chosen node keeps its ID and gets the card's segments."""
    ct = ctx.load_volume(cropped_ct(ctx), "CT")
    first = segment(ctx, ct, "spleen")
    second = segment(ctx, ct, "liver", output_node=first)
    assert second.GetID() == first.GetID()
    assert second.GetName() == "CT liver segmentation", "a reused result keeps the old task's name"
    assert [second.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(second.GetSegmentation().GetNumberOfSegments())] \
        == [label.name for label in card(ctx, "liver").trained_labels]


def constant_volume(ctx, name):
    """A volume node the engine refuses (every voxel the same)."""
    import vtk

    node = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(30, 30, 20)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image.GetPointData().GetScalars().Fill(40)
    node.SetAndObserveImageData(image)
    return node


def segmentation_nodes(scene):
    return [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]


def test_a_batch_with_a_bad_volume_in_the_middle(ctx):
    """Each volume of a batch is segmented on its own: the bad one fails with its one-line reason and adds
    nothing, the others complete, and the results come back in input order."""
    from MSDSegmentLib import mrml

    first = ctx.load_volume(cropped_ct(ctx), "CT 1")
    bad = constant_volume(ctx, "blank")
    last = ctx.load_volume(cropped_ct(ctx), "CT 3")
    errors, reports = {}, []
    results = mrml.segment_many([first, bad, last], "spleen", device="cpu", models_dir=ctx.models_dir,
                                on_error=lambda index, error: errors.setdefault(index, error),
                                progress=lambda fraction, text: reports.append((fraction, text)))
    assert results[1] is None and list(errors) == [1]
    assert_one_line_error(errors[1])
    assert [node.GetName() for node in results if node] == ["CT 1 spleen segmentation", "CT 3 spleen segmentation"]
    assert segmentation_nodes(ctx.scene) == [results[0], results[2]]
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(text.startswith("CT 3 (3 of 3): ") for _, text in reports)


def test_a_runtime_error_in_this_process_stays_with_its_volume(ctx):
    """The script path (segmentMany in Slicer's process): a plain RuntimeError from the engine on the middle
    volume fails that volume alone with its one-line reason."""
    from MSDSegmentLib import engine, mrml
    from MSDSegmentLib.errors import describe_error

    volumes = [ctx.load_volume(cropped_ct(ctx), f"CT {index}") for index in range(1, 4)]
    real_segment, calls, errors = engine.segment, [], {}

    def segment_failing_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_segment(*args, **kwargs)

    engine.segment = segment_failing_on_the_second  # mrml looks it up at each call
    try:
        results = mrml.segment_many(volumes, "spleen", device="cpu", models_dir=ctx.models_dir,
                                    on_error=lambda index, error: errors.setdefault(index, error))
    finally:
        engine.segment = real_segment
    assert results[1] is None and segmentation_nodes(ctx.scene) == [results[0], results[2]]
    assert list(errors) == [1] and isinstance(errors[1], RuntimeError)
    assert describe_error(errors[1]) == \
        "Unexpected error: RuntimeError: CUDA error: an illegal memory access was encountered"


def test_cancel_stops_a_batch_and_keeps_what_finished(ctx):
    from MSDSegmentLib import mrml

    volumes = [ctx.load_volume(cropped_ct(ctx), f"CT {index}") for index in range(3)]
    finished = []
    results = mrml.segment_many(volumes, "spleen", device="cpu", models_dir=ctx.models_dir,
                                progress=lambda fraction, text: finished.append(fraction),
                                cancel=lambda: bool(finished) and finished[-1] > 0.4)
    assert results[0] is not None and results[1:] == [None, None]
    assert segmentation_nodes(ctx.scene) == [results[0]]


def sequence_of_ct_frames(ctx, frames):
    """A sequence of `frames` volumes (the real CT crop, each frame shifted by a few voxels) with its browser;
    returns the proxy volume node that shows the current frame."""
    image = sitk.ReadImage(cropped_ct(ctx))
    sequence = ctx.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "CT sequence")
    for index in range(frames):
        if frames > 2 and index == 1 and ctx.cache.get("bad frame"):
            node = constant_volume(ctx, "blank frame")
        else:
            path = os.path.join(ctx.folder, f"frame{index}.nrrd")
            moved = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(image), 3 * index, axis=2))
            moved.CopyInformation(image)
            sitk.WriteImage(moved, path)
            node = ctx.load_volume(path, f"frame {index}")
        sequence.SetDataNodeAtValue(node, str(index))
        ctx.scene.RemoveNode(node)
    browser = ctx.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "CT browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    import slicer
    slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(browser)
    return browser.GetProxyNode(sequence), sequence, browser


def test_every_frame_of_a_sequence_is_segmented_into_a_segmentation_sequence(ctx):
    """The frames are segmented one by one, as each would be alone, into a segmentation sequence that the same
    browser plays beside the volume; the segmentation shown follows the frame shown."""
    from MSDSegmentLib import mrml

    proxy, sequence, browser = sequence_of_ct_frames(ctx, 3)
    shown = mrml.segment_sequence(proxy, "spleen", device="cpu", models_dir=ctx.models_dir)
    results = browser.GetSequenceNode(shown)
    assert results is not None and results.GetNumberOfDataNodes() == 3
    assert [results.GetNthIndexValue(i) for i in range(3)] == ["0", "1", "2"]
    spleen = card(ctx, "spleen")
    found = []
    for index in range(3):
        frame = sequence.GetNthDataNode(index)
        alone = segment_frame_alone(ctx, frame)
        found.append(int(alone.sum()))
        result = results.GetNthDataNode(index)
        assert [result.GetSegmentation().GetNthSegment(i).GetName()
                for i in range(result.GetSegmentation().GetNumberOfSegments())] == [l.name for l in spleen.trained_labels]
        matrix, size = geometry_of(frame)
        assert np.array_equal(mask_on_grid(result, "Segment_1", matrix, size), alone)
    assert len(set(found)) > 1, f"the frames' labels do not differ ({found} voxels): the check is void"
    browser.SetSelectedItemNumber(2)
    matrix, size = geometry_of(sequence.GetNthDataNode(2))
    assert np.array_equal(mask_on_grid(shown, "Segment_1", matrix, size), segment_frame_alone(ctx, sequence.GetNthDataNode(2)))


def segment_frame_alone(ctx, frame):
    from MSDSegmentLib.engine import segment as run_engine
    from MSDSegmentLib import mrml

    labels = run_engine([mrml.volume_to_image(frame)], "spleen", device="cpu", models_dir=ctx.models_dir).labels
    return sitk.GetArrayFromImage(labels) == 1


def test_a_bad_frame_leaves_the_scene_as_it_was(ctx):
    from MSDSegmentLib import errors, mrml

    ctx.cache["bad frame"] = True
    proxy, _, _ = sequence_of_ct_frames(ctx, 3)
    ids = node_ids(ctx.scene)
    try:
        mrml.segment_sequence(proxy, "spleen", device="cpu", models_dir=ctx.models_dir)
    except errors.InputError as error:
        assert_one_line_error(error)
    else:
        raise AssertionError("a constant frame was segmented")
    assert node_ids(ctx.scene) == ids
    single = ctx.load_volume(cropped_ct(ctx), "not in a sequence")
    try:
        mrml.segment_sequence(single, "spleen", device="cpu", models_dir=ctx.models_dir)
    except errors.InputError as error:
        assert "not a frame of a sequence" in str(error)
    else:
        raise AssertionError("a volume outside any sequence was accepted")


def test_the_panel_choice_comes_from_its_parameters(ctx):
    """What the panel's Segment button runs follows its parameters: every frame only for an input in a sequence
    and a one-channel task; a two-channel task (prostate) takes no extra volumes and says why; a sequence gets no
    3-D surfaces and says why; what is missing is named."""
    from MSDSegmentLib import mrml

    prostate, spleen = card(ctx, "prostate"), card(ctx, "spleen")
    ct = ctx.load_volume(cropped_ct(ctx), "CT")
    alone = mrml.PanelChoice("spleen", spleen, ct, all_frames=True)
    assert not (alone.in_sequence or alone.all_frames or alone.batch_unavailable or alone.surfaces_unavailable)
    assert alone.missing == ""
    two_channels = mrml.PanelChoice("prostate", prostate, ct)
    assert two_channels.needs_adc and "takes a T2 volume with its ADC" in two_channels.batch_unavailable
    assert two_channels.missing == "Select the ADC volume" and not mrml.PanelChoice("prostate", prostate, ct, ct).missing
    proxy, _, _ = sequence_of_ct_frames(ctx, 2)
    frames = mrml.PanelChoice("spleen", spleen, proxy, all_frames=True)
    assert frames.all_frames and frames.batch_unavailable and "segmentation sequence" in frames.surfaces_unavailable
    one_frame = mrml.PanelChoice("spleen", spleen, proxy, all_frames=False)
    assert one_frame.in_sequence and not (one_frame.all_frames or one_frame.surfaces_unavailable)
    assert not mrml.PanelChoice("prostate", prostate, proxy, ct, all_frames=True).all_frames
    assert mrml.PanelChoice("spleen", spleen).missing == "Select an input volume"
    assert mrml.PanelChoice("spleen", None, ct).missing == "The model for 'spleen' is not installed"


def test_default_input_is_never_a_label_map(ctx):
    """The panel's default input is the first scalar volume that is not a label map."""
    from MSDSegmentLib import mrml

    labels = ctx.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert mrml.default_input_volume(ctx.scene) is None
    ct = ctx.load_volume(cropped_ct(ctx), "CT")
    assert labels.IsA("vtkMRMLScalarVolumeNode") and mrml.default_input_volume(ctx.scene) is ct


def test_surfaces_follow_the_show_3d_choice(ctx):
    """Surfaces are built with the chosen smoothing when asked for, and removed when not."""
    from MSDSegmentLib import mrml

    spleen = card(ctx, "spleen")
    ct = ctx.load_volume(cropped_ct(ctx), "CT")
    node = mrml.import_labels(threshold_labels(mrml.volume_to_image(ct), spleen), ct, spleen)
    segmentation = node.GetSegmentation()
    assert not segmentation.ContainsRepresentation("Closed surface"), "surfaces built without being asked for"
    mrml.show_surfaces(node, True, 0.3)
    assert segmentation.ContainsRepresentation("Closed surface")
    assert segmentation.GetConversionParameter(mrml.SMOOTHING_PARAMETER) == "0.3"
    surface = segmentation.GetSegment("Segment_1").GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 0
    mrml.show_surfaces(node, False)
    assert not segmentation.ContainsRepresentation("Closed surface")
    assert segmentation.ContainsRepresentation(mrml.BINARY_LABELMAP)


def surface_points(node):
    from vtk.util import numpy_support

    surface = node.GetSegmentation().GetSegment("Segment_1").GetRepresentation("Closed surface")
    return numpy_support.vtk_to_numpy(surface.GetPoints().GetData()).copy()


def test_the_smoothing_slider_rebuilds_shown_surfaces_only(ctx):
    """A new smoothing rebuilds the surfaces shown (the slider's job) and builds none where none are shown; a
    scene restored from a file has surfaces only if they were saved with it."""
    from MSDSegmentLib import mrml

    spleen = card(ctx, "spleen")
    ct = ctx.load_volume(cropped_ct(ctx), "CT")
    node = mrml.import_labels(threshold_labels(mrml.volume_to_image(ct), spleen), ct, spleen)
    assert not mrml.update_surface_smoothing(node, 0.8)
    assert not node.GetSegmentation().ContainsRepresentation("Closed surface"), "surfaces built unasked"
    mrml.show_surfaces(node, True, 0.1)
    rough = surface_points(node)
    assert mrml.update_surface_smoothing(node, 0.8)
    assert node.GetSegmentation().GetConversionParameter(mrml.SMOOTHING_PARAMETER) == "0.8"
    smooth = surface_points(node)
    assert rough.shape != smooth.shape or not np.allclose(rough, smooth), "the surfaces did not change"
    assert not mrml.update_surface_smoothing(node, 0.8), "rebuilt with the smoothing they already have"

    for shown in (False, True):
        mrml.show_surfaces(node, shown, 0.8)
        restored = saved_and_restored(ctx, node, f"saved {shown}.seg.nrrd")
        assert restored.GetSegmentation().ContainsRepresentation("Closed surface") == shown
        assert not mrml.update_surface_smoothing(restored, 0.8), "a restored scene's surfaces were rebuilt"


def test_cancel_leaves_scene_unchanged(ctx):
    """Cancelling, before or during the network, changes nothing: no new node, the output untouched."""
    from MSDSegmentLib import errors, mrml

    ct = ctx.load_volume(cropped_ct(ctx), "CT")
    spleen = card(ctx, "spleen")
    target = mrml.import_labels(threshold_labels(mrml.volume_to_image(ct), spleen), ct, spleen)
    ids, state = node_ids(ctx.scene), segmentation_state(target)
    for stop_at in (1, 3):
        calls = []

        def cancel():
            calls.append(1)
            return len(calls) >= stop_at

        for output in (None, target):
            calls.clear()
            try:
                segment(ctx, ct, "spleen", output_node=output, cancel=cancel)
            except errors.Cancelled:
                pass
            else:
                raise AssertionError("the run was not cancelled")
            assert node_ids(ctx.scene) == ids
            assert segmentation_state(target) == state


def test_bad_inputs_leave_no_node(ctx):
    """Each bad input gives a one-line error and leaves the scene as it was."""
    import vtk
    from vtk.util import numpy_support

    from MSDSegmentLib import errors, mrml

    ct = ctx.load_volume(cropped_ct(ctx), "CT")
    spleen = card(ctx, "spleen")

    def volume(name, voxels, node_class="vtkMRMLScalarVolumeNode"):
        node = ctx.scene.AddNewNodeByClass(node_class, name)
        image = vtk.vtkImageData()
        image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
        components = voxels.shape[3] if voxels.ndim == 4 else 1
        image.AllocateScalars(numpy_support.get_vtk_array_type(voxels.dtype), components)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = voxels.reshape(-1, components).squeeze()
        node.SetAndObserveImageData(image)
        node.SetSpacing(1.0, 1.0, 1.0)
        return node

    empty = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    constant = volume("constant", np.full((20, 30, 30), 40, np.int16))
    single_slice = volume("slice", np.random.default_rng(0).integers(-500, 500, (1, 30, 30)).astype(np.int16))
    label_map = volume("labels", np.ones((20, 30, 30), np.uint8), "vtkMRMLLabelMapVolumeNode")
    colour = volume("colour", np.zeros((20, 30, 30, 3), np.uint8), "vtkMRMLVectorVolumeNode")
    wrong_grid = sitk.Image([5, 5, 5], sitk.sitkUInt8)
    unknown_value = threshold_labels(mrml.volume_to_image(ct), spleen) * 7
    missing_file = os.path.join(ctx.folder, "no such file.nrrd")
    cases = {
        "no input": lambda: segment(ctx, None, "spleen"),
        "no voxels": lambda: segment(ctx, empty, "spleen"),
        "constant volume": lambda: segment(ctx, constant, "spleen"),
        "single slice": lambda: segment(ctx, single_slice, "spleen"),
        "label map input": lambda: segment(ctx, label_map, "spleen"),
        "colour input": lambda: segment(ctx, colour, "spleen"),
        "unknown task": lambda: segment(ctx, ct, "brain"),
        "prostate without ADC": lambda: segment(ctx, ct, "prostate"),
        "result on another grid": lambda: mrml.import_labels(wrong_grid, ct, spleen),
        "result with unknown labels": lambda: mrml.import_labels(unknown_value, ct, spleen),
        "result file missing": lambda: mrml.import_label_file(missing_file, ct, "spleen", models_dir=ctx.models_dir),
    }
    ids = node_ids(ctx.scene)
    for name, run in cases.items():
        try:
            run()
        except errors.MSDSegmentError as error:
            assert_one_line_error(error)
        else:
            raise AssertionError(f"{name}: no error")
        assert node_ids(ctx.scene) == ids, f"{name}: the scene changed"


def test_removing_a_new_segmentation_leaves_nothing_behind(ctx):
    """The clean-up used when an import fails removes the node, its display node and its hierarchy item."""
    from MSDSegmentLib import mrml

    spleen = card(ctx, "spleen")
    ct = ctx.load_volume(need(ctx.ct_path, "real CT"), "CT")
    put_in_study(ctx.scene, ct)
    hierarchy = ctx.scene.GetSubjectHierarchyNode()
    ids, items = node_ids(ctx.scene), hierarchy.GetNumberOfItems()
    node = mrml.import_labels(threshold_labels(mrml.volume_to_image(ct), spleen), ct, spleen)
    assert node.GetDisplayNode() is not None and hierarchy.GetItemByDataNode(node)
    mrml.remove_node(node)
    assert node_ids(ctx.scene) == ids and hierarchy.GetNumberOfItems() == items


def test_input_under_transform_output_follows(ctx):
    """A segmentation of a transformed volume sits under the same transform (same world place)."""
    import vtk

    from MSDSegmentLib import mrml

    spleen = card(ctx, "spleen")
    ct = ctx.load_volume(need(ctx.ct_path, "real CT"), "CT")
    transform = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Registration")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(matrix)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    labels = threshold_labels(mrml.volume_to_image(ct), spleen)
    node = mrml.import_labels(labels, ct, spleen)
    assert node.GetTransformNodeID() == transform.GetID()
    # The Segment Editor's grid is the reference geometry, stored in the segmentation's own (local) frame:
    # it must be the input's own grid, not one shifted by the transform.
    assert node.GetSegmentation().GetConversionParameter("Reference image geometry") == \
        slicer_geometry(*geometry_of(ct))
    assert np.allclose(labelmap_geometry(node), mrml.ijk_to_ras(ct))
    # A reused segmentation that lay under another transform moves into the input's frame too.
    other = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Other")
    target = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT liver segmentation")
    target.SetAndObserveTransformNodeID(other.GetID())
    mrml.import_labels(labels, ct, spleen, target)
    assert target.GetTransformNodeID() == transform.GetID()
    assert target.GetSegmentation().GetConversionParameter("Reference image geometry") == \
        slicer_geometry(*geometry_of(ct))


def slicer_geometry(matrix, size):
    """Slicer's serialised reference image geometry of a grid."""
    import slicer

    return slicer.vtkSegmentationConverter.SerializeImageGeometry(reference_grid(matrix, size))


def test_adc_under_a_transform_is_moved_onto_the_t2(ctx):
    """An ADC registered to the T2 with a linear transform reaches the engine where the transform puts it; one
    under a non-linear transform is refused with a one-line error and nothing changes."""
    import vtk

    from MSDSegmentLib import errors, mrml

    t2 = ctx.load_volume(cropped_ct(ctx), "T2")
    adc = ctx.load_volume(cropped_ct(ctx), "ADC")
    untransformed = mrml.channel_images([t2, adc])[1]
    shift = vtk.vtkMatrix4x4()
    for axis, millimetres in enumerate((25.0, -10.0, 40.0)):
        shift.SetElement(axis, 3, millimetres)
    registration = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ADC to T2")
    registration.SetMatrixTransformToParent(shift)
    adc.SetAndObserveTransformNodeID(registration.GetID())
    moved = mrml.channel_images([t2, adc])[1]
    lps_shift = mrml.LPS_FROM_RAS @ np.array([25.0, -10.0, 40.0])
    assert np.allclose(np.array(moved.GetOrigin()) - untransformed.GetOrigin(), lps_shift)
    assert np.array_equal(sitk.GetArrayViewFromImage(moved), sitk.GetArrayViewFromImage(untransformed))
    # Both under the same transform: nothing between them to fold in.
    t2.SetAndObserveTransformNodeID(registration.GetID())
    assert np.allclose(mrml.channel_images([t2, adc])[1].GetOrigin(), untransformed.GetOrigin())
    t2.SetAndObserveTransformNodeID(None)

    deformable = ctx.scene.AddNewNodeByClass("vtkMRMLTransformNode", "Deformable")
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for corner in np.ndindex(2, 2, 2):
        point = 200.0 * np.array(corner) - 100.0
        source.InsertNextPoint(*point)
        target.InsertNextPoint(*(point + (5.0 if corner == (0, 0, 0) else 0.0)))
    spline = vtk.vtkThinPlateSplineTransform()
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    deformable.SetAndObserveTransformToParent(spline)
    adc.SetAndObserveTransformNodeID(deformable.GetID())
    ids = node_ids(ctx.scene)
    try:
        mrml.write_inputs([t2, adc], ctx.folder)
    except errors.InputError as error:
        assert_one_line_error(error)
        assert "non-linear" in str(error)
    else:
        raise AssertionError("an ADC under a non-linear transform was accepted")
    assert node_ids(ctx.scene) == ids and not os.path.exists(os.path.join(ctx.folder, "input0.nrrd"))


FAULTY_ENGINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faulty_engine.py")


def engine_program(ctx, fault=None):
    """The engine process's program as the module starts it (under a launcher outside Slicer). fault: (an
    exception name or "crash", the call of engine.segment that meets it), through faulty_engine.py."""
    from MSDSegmentLib import background

    program = background.worker_program(ctx.python) if fault is None else [ctx.python, FAULTY_ENGINE, *map(str, fault)]
    return list(ctx.launcher) + program


def run_in_background(ctx, batch, fault=None, cancel_when=None, standby=None, **options):
    """(Outcome, [(fraction, text)]) of a background run of `batch` with the test models on the CPU.
    cancel_when(fraction, text) -> bool cancels the run from its progress report; standby: a StandbyEngine
    the run may take over."""
    from MSDSegmentLib import background

    reports = []

    def progress(fraction, text):
        reports.append((fraction, text))
        if cancel_when is not None and cancel_when(fraction, text):
            run.cancel()

    options = dict(dict(task=batch.task, device="cpu", models_dir=ctx.models_dir), **options)
    run = background.BackgroundSegmentation(batch, options, background.SubprocessTransport,
                                            engine_program(ctx, fault), progress=progress, standby=standby)
    return run.start().wait(timeout=900), reports


def ready_standby(ctx, **options):
    """A StandbyEngine for the test models on the CPU (spleen unless told), once its networks are loaded: (the
    engine, the pid of its worker)."""
    from MSDSegmentLib import background

    options = dict(dict(task="spleen", device="cpu", models_dir=ctx.models_dir), **options)
    standby = background.StandbyEngine(options, background.SubprocessTransport, engine_program(ctx))
    ready = standby.wait_until_ready(timeout=300)
    assert ready is not None and "error" not in ready, f"the standby engine did not get ready: {ready}"
    return standby, ready["pid"]


def live_processes_mentioning(text):
    """PIDs of running (not zombie) processes whose command line contains `text` (Linux /proc)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as stream:
                command = stream.read().decode("utf-8", "replace")
            with open(f"/proc/{name}/stat", encoding="utf-8") as stream:
                state = stream.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in command and state not in ("Z", "X"):
            found.append(int(name))
    return found


def process_ends(pid, seconds):
    """Whether process `pid` is gone (or a zombie) within `seconds` (Linux /proc)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as stream:
                if stream.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def mask_of(segmentation_node, volume_node):
    return mask_on_grid(segmentation_node, "Segment_1", *geometry_of(volume_node))


def test_background_batch_runs_in_one_engine_process(ctx):
    """The panel's path for several volumes: one engine process serves the batch; each result is imported as it
    is done, in input order, with its quality; progress names each volume and rises to 1 overall; the
    segmentations are those the engine makes in this process."""
    from MSDSegmentLib import mrml

    volumes = [ctx.load_volume(cropped_ct(ctx), f"CT {index}") for index in range(1, 4)]
    target = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my result")
    batch = mrml.VolumeBatch(volumes, "spleen", [target, None, None], ctx.models_dir)
    outcome, reports = run_in_background(ctx, batch)
    assert not outcome.errors and not outcome.cancelled, outcome.report()
    assert len(set(outcome.processes)) == 1, f"{len(set(outcome.processes))} engine processes served one batch"
    assert outcome.results[0] is target and target.GetName() == "my result"
    assert [node.GetName() for node in outcome.results[1:]] == ["CT 2 spleen segmentation", "CT 3 spleen segmentation"]
    assert segmentation_nodes(ctx.scene) == outcome.results and outcome.output is outcome.results[-1]
    assert outcome.report().startswith("Done: 3 of 3 segmented.")
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(text.startswith("CT 2 (2 of 3), ") for _, text in reports)
    in_process = segment(ctx, volumes[0], "spleen")
    assert np.array_equal(mask_of(target, volumes[0]), mask_of(in_process, volumes[0]))
    assert mrml.quality_from_tags(target) == mrml.quality_from_tags(in_process)
    assert set(mrml.quality_from_tags(target)) == {"Spleen"}


def test_a_standby_engine_serves_the_next_run(ctx):
    """The panel's engine started ahead of the run (prepareEngine): it loads and runs the networks before any
    input exists, and the run with the same options is served by that process, with the labels of a run in
    this process."""
    from MSDSegmentLib import mrml

    volume = ctx.load_volume(cropped_ct(ctx), "CT 1")  # before the engine: a test without the CT stops here
    standby, pid = ready_standby(ctx)
    try:
        outcome, _ = run_in_background(ctx, mrml.VolumeBatch([volume], "spleen", models_dir=ctx.models_dir),
                                       standby=standby)
    finally:
        standby.stop()
    assert not outcome.errors, outcome.report()
    assert outcome.processes == [pid], "the run did not take over the engine started ahead of it"
    assert standby.process is None  # handed over: stopping the standby now cannot stop the run's engine
    in_process = segment(ctx, volume, "spleen")
    assert np.array_equal(mask_of(outcome.results[0], volume), mask_of(in_process, volume))


def test_a_standby_engine_for_other_choices_or_one_that_died_is_not_used(ctx):
    """An engine started ahead for other options is stopped and the run starts its own; so does a run whose
    engine started ahead has died since (a crash, the out-of-memory killer): no volume fails for it."""
    import signal
    import time

    from MSDSegmentLib import mrml

    if not os.path.isdir("/proc/self"):
        raise unittest.SkipTest("needs /proc to see processes (Linux)")
    volume = ctx.load_volume(cropped_ct(ctx), "CT 1")
    other, other_pid = ready_standby(ctx, tta=True)
    try:
        outcome, _ = run_in_background(ctx, mrml.VolumeBatch([volume], "spleen", models_dir=ctx.models_dir),
                                       standby=other)
    finally:
        left_running = other.process is not None  # the run stops an engine it does not take
        other.stop()
    assert not left_running and process_ends(other_pid, 5.0), "the engine started for other options was left running"
    assert not outcome.errors and outcome.processes and outcome.processes[0] != other_pid, outcome.report()

    dead, dead_pid = ready_standby(ctx)
    try:
        os.kill(dead_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while dead.process.alive() and time.monotonic() < deadline:  # its launcher exits with it
            time.sleep(0.05)
        outcome, _ = run_in_background(ctx, mrml.VolumeBatch([volume], "spleen", models_dir=ctx.models_dir),
                                       standby=dead)
    finally:
        dead.stop()
    assert not outcome.errors and outcome.processes and outcome.processes[0] != dead_pid, outcome.report()


def test_background_two_channel_case(ctx):
    """The panel's prostate path: [T2, ADC] written as two channels, one engine process, the result on the T2's
    grid named after it; the same labels as in Slicer's process."""
    from MSDSegmentLib import mrml

    small = os.path.join(ctx.folder, "small.nrrd")  # the prostate's fine grid makes many windows: keep it small
    sitk.WriteImage(sitk.ReadImage(cropped_ct(ctx))[40:88, 40:88, 12:28], small)
    t2 = ctx.load_volume(small, "T2")
    adc = ctx.load_volume(small, "ADC")
    outcome, _ = run_in_background(ctx, mrml.VolumeBatch([[t2, adc]], "prostate", models_dir=ctx.models_dir))
    assert not outcome.errors, outcome.report()
    node = outcome.output
    assert node.GetName() == "T2 prostate segmentation"
    # The stand-in "MR" is a CT crop: the run completes, and its report carries the engine's modality warning.
    report = outcome.report().splitlines()
    assert report[0] == "Done: 1 of 1 segmented." and "looks like CT, not MR" in report[1], report
    in_process = segment(ctx, [t2, adc], "prostate")
    for label in card(ctx, "prostate").trained_labels:
        segment_id = mrml.segment_id(label)
        assert np.array_equal(mask_on_grid(node, segment_id, *geometry_of(t2)),
                              mask_on_grid(in_process, segment_id, *geometry_of(t2)))


def test_any_error_stays_with_its_own_volume(ctx):
    """A plain RuntimeError, a MemoryError or the engine process dying on the middle volume of three: the other
    two are done and in the scene, the report says "2 of 3" and why the middle one failed."""
    from MSDSegmentLib import mrml

    volumes = [ctx.load_volume(cropped_ct(ctx), f"CT {index}") for index in range(1, 4)]
    expected = {"RuntimeError": "Unexpected error: RuntimeError: injected on call 2",
                "MemoryError": "Out of memory: injected on call 2", "crash": "engine process died on call 2"}
    for kind, message in expected.items():
        before = segmentation_nodes(ctx.scene)
        outcome, _ = run_in_background(ctx, mrml.VolumeBatch(volumes, "spleen", models_dir=ctx.models_dir),
                                       fault=(kind, 2))
        added = [node for node in segmentation_nodes(ctx.scene) if node not in before]
        assert outcome.results[1] is None and added == [outcome.results[0], outcome.results[2]], kind
        assert [node.GetName() for node in added] == ["CT 1 spleen segmentation", "CT 3 spleen segmentation"]
        assert list(outcome.errors) == [1] and message in str(outcome.errors[1]), (kind, str(outcome.errors[1]))
        assert_one_line_error(outcome.errors[1])
        assert outcome.report().splitlines()[:2] == ["Done: 2 of 3 segmented.", f"Failed: CT 2: {outcome.errors[1]}"]
        if kind != "crash":  # one process served all three, the failure included
            assert len(set(outcome.processes)) == 1, kind
        else:
            assert len(set(outcome.processes)) == 2, "a new engine process should take the volume left"
            assert outcome.errors[1].details, "the dead process's output is kept for the error's details"


def test_a_volume_that_cannot_be_written_fails_alone_and_the_engine_refuses_a_blank_one(ctx):
    """Inputs that fail before the engine (no voxels) and in it (a constant volume): each fails with its one-line
    reason, the others are done."""
    from MSDSegmentLib import mrml

    first = ctx.load_volume(cropped_ct(ctx), "CT 1")
    empty = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    blank = constant_volume(ctx, "blank")
    last = ctx.load_volume(cropped_ct(ctx), "CT 4")
    outcome, _ = run_in_background(ctx, mrml.VolumeBatch([first, empty, blank, last], "spleen",
                                                         models_dir=ctx.models_dir))
    assert sorted(outcome.errors) == [1, 2] and [node.GetName() for node in outcome.done] == \
        ["CT 1 spleen segmentation", "CT 4 spleen segmentation"]
    for error in outcome.errors.values():
        assert_one_line_error(error)
    assert "has no voxels" in str(outcome.errors[1])
    assert segmentation_nodes(ctx.scene) == outcome.done


def test_cancel_ends_the_engine_process_and_keeps_what_finished(ctx):
    """Cancel as the module does it (close the engine's standard input, kill the process started) while the engine
    runs the second volume under a launcher: within 2 s no engine process is left; the first volume's result
    stays, nothing else is added, and the temporary files are gone."""
    import time

    from MSDSegmentLib import mrml

    if not os.path.isdir("/proc/self"):
        raise unittest.SkipTest("needs /proc to list processes (Linux)")
    small = ctx.load_volume(cropped_ct(ctx), "CT 1")
    large = ctx.load_volume(write_phantom_ct(os.path.join(ctx.folder, "large_ct.nrrd"), size=(320, 320, 240),
                                             spacing=(1.0, 1.0, 1.0)), "large")
    marker = os.path.realpath(ctx.models_dir)  # on the engine's command line (and its launcher's)
    engines = []

    def cancel_when(fraction, text):
        if text.startswith("large (2 of 3)") and "Preprocessing" in text and not engines:
            engines.extend(live_processes_mentioning(marker))
            return True
        return False

    batch = mrml.VolumeBatch([small, large, small], "liver", models_dir=marker)
    outcome, _ = run_in_background(ctx, batch, cancel_when=cancel_when, models_dir=marker)
    assert engines, "the engine never reached the second volume"
    stopped = time.monotonic()
    while set(engines) & set(live_processes_mentioning(marker)) and time.monotonic() - stopped < 2.0:
        time.sleep(0.05)
    left = set(engines) & set(live_processes_mentioning(marker))
    assert not left, f"engine processes still running 2 s after cancel: {sorted(left)}"
    assert outcome.cancelled and outcome.results[0] is not None and outcome.results[1:] == [None, None]
    assert segmentation_nodes(ctx.scene) == [outcome.results[0]]
    assert outcome.report().startswith("Done: 1 of 3 segmented. Cancelled")


def test_every_frame_in_one_engine_process(ctx):
    """The panel's path for a sequence: every frame in one engine process, recorded as the segmentation sequence
    that the in-process path makes; a failed frame adds nothing and says why."""
    from MSDSegmentLib import mrml

    proxy, sequence, browser = sequence_of_ct_frames(ctx, 3)
    outcome, reports = run_in_background(ctx, mrml.FrameBatch(proxy, "spleen", ctx.models_dir))
    assert not outcome.errors and len(set(outcome.processes)) == 1, outcome.report()
    shown = outcome.output
    results = browser.GetSequenceNode(shown)
    assert results is not None and results.GetNumberOfDataNodes() == 3
    assert mrml.is_sequence_output(shown) and not mrml.is_sequence_output(segment(ctx, proxy, "spleen"))
    for index in range(3):
        matrix, size = geometry_of(sequence.GetNthDataNode(index))
        assert np.array_equal(mask_on_grid(results.GetNthDataNode(index), "Segment_1", matrix, size),
                              segment_frame_alone(ctx, sequence.GetNthDataNode(index)))
    assert any(text.startswith("frame 3 (3 of 3), ") for _, text in reports)

    ids = node_ids(ctx.scene)
    outcome, _ = run_in_background(ctx, mrml.FrameBatch(proxy, "spleen", ctx.models_dir), fault=("RuntimeError", 2))
    assert list(outcome.errors) == [1] and outcome.output is None and node_ids(ctx.scene) == ids
    assert "nothing was added" in outcome.report()


def test_prostate_t2_and_adc_on_another_grid(ctx):
    """Prostate: T2 and an ADC on a coarser grid; the ADC is found by name; the result is on the T2 grid."""
    from MSDSegmentLib import mrml
    from MSDSegmentLib.imageio import read_channels

    t2, adc = read_channels([need(ctx.prostate_path, "real prostate MR")])
    size = np.array(t2.GetSize())
    crop = np.minimum(list(PROSTATE_CROP) + [size[2]], size)
    start = (size - crop) // 2
    t2 = t2[tuple(slice(int(a), int(a + n)) for a, n in zip(start, crop))]
    coarse = sitk.Image([int(n) for n in (size[:2] * 2 // 3).tolist() + [int(size[2])]], sitk.sitkFloat32)
    coarse.SetSpacing([s * 1.5 for s in adc.GetSpacing()[:2]] + [adc.GetSpacing()[2]])
    coarse.SetOrigin(adc.GetOrigin())
    coarse.SetDirection(adc.GetDirection())
    adc = sitk.Resample(adc, coarse, sitk.Transform(), sitk.sitkLinear, 0.0)
    paths = []
    for name, image in (("T2", t2), ("ADC", adc)):
        paths.append(os.path.join(ctx.folder, f"{name}.nrrd"))
        sitk.WriteImage(image, paths[-1])
    t2_node = ctx.load_volume(paths[0], "T2")
    adc_node = ctx.load_volume(paths[1], "ADC")
    assert mrml.guess_adc_volume(ctx.scene, t2_node) is adc_node
    node = segment(ctx, [t2_node, adc_node], "prostate")
    prostate = card(ctx, "prostate")
    assert node.GetName() == "T2 prostate segmentation"
    assert [node.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(node.GetSegmentation().GetNumberOfSegments())] \
        == [label.name for label in prostate.trained_labels]
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is t2_node
    assert node.GetSegmentation().GetNumberOfLayers() == 1  # the zones share one label map, as in .seg.nrrd


def test_adc_guess_prefers_same_study(ctx):
    """With several ADC-named volumes, the one in the T2's study is chosen; none when no name says ADC."""
    from MSDSegmentLib import mrml

    path = cropped_ct(ctx)
    t2 = ctx.load_volume(path, "T2 axial")
    assert mrml.guess_adc_volume(ctx.scene, t2) is None
    ctx.load_volume(path, "ADC other patient")
    study = put_in_study(ctx.scene, t2)
    mine = ctx.load_volume(path, "ep2d_diff ADC")
    hierarchy = ctx.scene.GetSubjectHierarchyNode()
    item = hierarchy.GetItemByDataNode(mine) or hierarchy.CreateItem(study, mine)
    hierarchy.SetItemParent(item, study)
    assert mrml.guess_adc_volume(ctx.scene, t2) is mine


TRAINED_MODEL_TESTS = ["test_oblique_input_with_trained_model"]  # meaningful with the shipped models only

TESTS = [name for name in list(globals()) if name.startswith("test_") and name not in TRAINED_MODEL_TESTS]
