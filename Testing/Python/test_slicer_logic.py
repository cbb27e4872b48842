"""The Slicer module's MRML logic (MSDSegmentLib.mrml) on a real scene built from slicer-core.

The test bodies live in MSDSegment/Testing/Python/MSDSegmentLogicTests.py so that the module's tests inside
Slicer (MSDSegmentTest, registered with ctest) run exactly the same checks. Here they get real BTCV / MSD prostate files
and small random-weight models written by Training's export code (structure, not accuracy).
"""

import json
import os
import subprocess
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


NO_TORCH_SCRIPT = """
import sys
sys.path[:0] = {paths!r}
from slicer_fixture import SlicerSession
import MSDSegmentLogicTests as bodies
from MSDSegmentLib import background, mrml

session = SlicerSession().publish()
path = bodies.write_phantom_ct({folder!r} + "/ct.nrrd")
volumes = [session.load_volume(path, "CT %d" % index) for index in (1, 2)]
options = dict(task="spleen", device="cpu", models_dir={models!r})
program = background.worker_program(sys.executable)
outcome = background.BackgroundSegmentation(mrml.VolumeBatch(volumes, "spleen", models_dir={models!r}), options,
                                            background.SubprocessTransport, program).start().wait(600)
assert len(outcome.done) == 2, outcome.report()
heavy = sorted(name for name in ("torch", "monai", "scipy") if name in sys.modules)
assert not heavy, heavy
print("segmented in the background without torch here:", outcome.report())
session.close()
"""


def test_the_background_path_never_imports_torch_into_this_process(tiny_models_dir, tmp_path):
    """The panel's path (volumes written, one engine process, results imported into the scene) in a fresh
    interpreter with a real MRML scene: it segments, and torch, MONAI and SciPy are never imported there."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from conftest import MODULE_TESTS, REPOSITORY

    here = os.path.dirname(os.path.abspath(__file__))
    script = NO_TORCH_SCRIPT.format(paths=[os.path.join(REPOSITORY, "MSDSegment"), REPOSITORY, MODULE_TESTS, here],
                                    folder=str(tmp_path), models=tiny_models_dir)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done: 2 of 2 segmented." in result.stdout
