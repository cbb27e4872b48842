"""The Slicer module's MRML logic (MSDSegmentLib.mrml) on a real scene built from slicer-core.

The test bodies live in MSDSegment/Testing/Python/MSDSegmentLogicTests.py so that the module's tests inside
Slicer (MSDSegmentTest, registered with ctest) run exactly the same checks. Here they get real BTCV / MSD prostate files
and small random-weight models written by Training's export code (structure, not accuracy).
"""

import json
import os
import sys

import pytest

from conftest import BTCV, PROSTATE
import MSDSegmentLogicTests as selftests
from MSDSegmentLib import modelcard


def first_case(folder, key="image"):
    """A file of the first training case of an MSD-layout data set, or "" when the data set is absent."""
    try:
        with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as stream:
            entry = json.load(stream)["training"][0][key]
    except OSError:
        return ""
    return os.path.normpath(os.path.join(folder, entry))


# Runs its arguments as a child that inherits its standard input, and exits with the child's status: what the
# CTK launcher (PythonSlicer) does with python-real in Slicer.
LAUNCHER = (sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))")


def make_context(session, new_scene, models_dir, folder):
    return selftests.Context(scene=session.scene, load_volume=session.load_volume, new_scene=new_scene,
                             models_dir=models_dir, folder=folder, ct_path=first_case(BTCV),
                             ct_labels_path=first_case(BTCV, "label"), prostate_path=first_case(PROSTATE),
                             launcher=LAUNCHER)


@pytest.mark.parametrize("name", selftests.TESTS)
def test_mrml_logic(name, slicer_session, new_slicer_scene, tiny_models_dir, tmp_path):
    getattr(selftests, name)(make_context(slicer_session, new_slicer_scene, tiny_models_dir, str(tmp_path)))


@pytest.mark.parametrize("name", selftests.TRAINED_MODEL_TESTS)
def test_mrml_logic_with_bundled_models(name, slicer_session, new_slicer_scene, tmp_path):
    """The tests that need a trained model, with the models shipped in Resources/Models."""
    cards = modelcard.catalogue()
    if not cards or any(modelcard.missing_weights(card) for card in cards.values()):
        pytest.skip(f"no bundled models with weights in {modelcard.MODELS_DIR}")
    getattr(selftests, name)(make_context(slicer_session, new_slicer_scene, modelcard.MODELS_DIR, str(tmp_path)))
