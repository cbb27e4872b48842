"""The module's logic tests inside Slicer: the bodies in MSDSegmentLogicTests.py (which pytest runs with
slicer-core) on Slicer's own scene, with the bundled models and Slicer's Python for the engine process.

Registered with ctest (CMakeLists.txt beside this file: `Slicer --no-main-window` runs it), and run by the
module's own MSDSegmentTest (Reload and Test) when the module is loaded from its source tree. Real data is
taken from MSDSEGMENT_DATA (or the repository's ../shared/data); without it the CT tests use a synthetic phantom.
"""

import json
import logging
import os
import shutil
import tempfile
import unittest

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

import MSDSegmentLogicTests as bodies
from MSDSegmentLib import application, dependencies, modelcard

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class MSDSegmentModuleTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        runLogicTests(self)


def runLogicTests(test):
    """Each test body once, on a cleared scene; a body that cannot run (no data) is logged as skipped. Without
    PyTorch or the packages the engine needs, the whole run is reported as a skip, never as a pass."""
    missing = (["PyTorch" + dependencies.torch_requirement()] if dependencies.torch_needed() else []) \
        + dependencies.unmet_requirements()
    if missing:
        message = ("MSDSegment logic tests NOT RUN: install " + ", ".join(missing)
                   + " first (click Segment once, or MSDSegmentLogic().installDependencies()).")
        logging.warning(message)
        test.delayDisplay(message, 3000)
        raise unittest.SkipTest(message)
    root = tempfile.mkdtemp(prefix="MSDSegmentTest-")
    try:
        for index, name in enumerate(bodies.TESTS + bodies.TRAINED_MODEL_TESTS):
            slicer.mrmlScene.Clear()
            test.delayDisplay(name, 100)
            folder = os.path.join(root, str(index))
            os.makedirs(folder)
            try:
                getattr(bodies, name)(context(folder))
            except unittest.SkipTest as reason:
                logging.info(f"{name} skipped: {reason}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    test.delayDisplay("Logic tests passed")


def context(folder):
    data = os.environ.get("MSDSEGMENT_DATA", os.path.join(os.path.dirname(REPOSITORY), "shared", "data"))
    btcv = firstCase(os.path.join(data, "BTCV-Abdomen"))
    ctPath = btcv.get("image") or bodies.write_phantom_ct(os.path.join(folder, "phantom_ct.nrrd"))
    return bodies.Context(
        scene=slicer.mrmlScene,
        load_volume=lambda path, name: slicer.util.loadVolume(path, {"name": name, "show": False}),
        new_scene=newScene, models_dir=modelcard.MODELS_DIR, folder=folder, ct_path=ctPath,
        ct_labels_path=btcv.get("label", ""),
        prostate_path=firstCase(os.path.join(data, "Task05_Prostate")).get("image", ""),
        python=application.python_executable())


def firstCase(folder):
    """{'image': path, 'label': path} of an MSD-layout data set's first training case, {} if absent."""
    try:
        with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as stream:
            case = json.load(stream)["training"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return {}
    return {key: os.path.normpath(os.path.join(folder, value)) for key, value in case.items()}


def newScene():
    """An empty scene that can hold segmentations (for reloading a saved file away from the main scene)."""
    scene = slicer.vtkMRMLScene()
    for nodeClass in (slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLSegmentationDisplayNode,
                      slicer.vtkMRMLSegmentationStorageNode):
        scene.RegisterNodeClass(nodeClass())
    return scene
