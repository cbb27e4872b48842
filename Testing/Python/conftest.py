"""Shared pytest set-up: import paths and the location of the real data."""

import os
import shutil
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE_TESTS = os.path.join(REPOSITORY, "MSDSegment", "Testing", "Python")  # the module's test bodies
for path in (os.path.join(REPOSITORY, "MSDSegment"), REPOSITORY, MODULE_TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

from MSDSegmentLib.modelcard import STAGE_SETTINGS, settings_from  # noqa: E402  (the paths above first)
from Training.models import ABDOMINAL_ORGANS, MODELS  # noqa: E402

SHARED_DATA = os.environ.get("MSDSEGMENT_DATA", os.path.join(os.path.dirname(REPOSITORY), "shared", "data"))
BTCV = os.path.join(SHARED_DATA, "BTCV-Abdomen")
PROSTATE = os.path.join(SHARED_DATA, "Task05_Prostate")


@pytest.fixture(scope="session", autouse=True)
def torch_compiler_cache_in_a_temporary_folder(tmp_path_factory):
    """PyTorch makes its compiler's cache folder (/tmp/torchinductor_<user> unless TORCHINDUCTOR_CACHE_DIR says
    otherwise) whenever torch._dynamo is imported, as the first optimizer step does: the tests' training runs, and
    the processes they start, make it in pytest's temporary folder rather than leave it in /tmp."""
    with pytest.MonkeyPatch.context() as patch:
        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("torchinductor")))
        yield


def require(folder):
    """Skip, saying why, where the real data set is not present."""
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        pytest.skip(f"real data not found at {folder} (set MSDSEGMENT_DATA to the folder holding it)")
    return folder


@pytest.fixture
def btcv():
    return require(BTCV)


@pytest.fixture
def prostate_data():
    return require(PROSTATE)


FINE_CLASSES = MODELS["abdomen-fine"]["classes"]
CONTEXT_CLASSES = [name for name in ABDOMINAL_ORGANS if name not in FINE_CLASSES]
PANCREAS_CLASSES = MODELS["pancreas-fine"]["classes"]
PANCREAS_CONTEXT = [name for name in ABDOMINAL_ORGANS if name not in PANCREAS_CLASSES]


def tiny_ct_plan(classes, spacing, patch_size, context_classes=(), **settings):
    """A tiny stage of the abdominal cascade: CT, its normalisation, no mirroring, and the given stage settings."""
    plan = {"modality": "CT", "channels": ["CT"], "classes": list(classes) + list(context_classes),
            "spacing": spacing, "patch_size": patch_size, "mirror_axes": [],
            "normalisation": {"type": "ct", "window": [-125.0, 275.0], "mean": 90.0, "std": 60.0}, **settings}
    if context_classes:
        plan["context_classes"] = list(context_classes)
    return plan


FINE_REGION = {"after": "abdomen", "classes": ["spleen", "liver", "pancreas"], "margin_mm": [20, 20, 60]}

TINY_PLANS = {
    "abdomen": tiny_ct_plan(["background", "spleen", "liver", "pancreas"], [4.0, 4.0, 4.0], [32, 32, 32]),
    # The fine stage of the abdominal cascade, coarser than the real one to keep tests quick.
    "abdomen-fine": tiny_ct_plan(FINE_CLASSES, [3.0, 3.0, 4.0], [32, 32, 16], roi=FINE_REGION),
    # The organs task's fine stage: the fine stage with every other BTCV organ as a context class.
    "abdomen-wide": tiny_ct_plan(FINE_CLASSES, [3.0, 3.0, 4.0], [32, 32, 16], CONTEXT_CLASSES, roi=FINE_REGION),
    # The pancreas task's all-organ fine stage, and its wide pancreas stage on that one's largest cluster of pancreas
    # (every other organ a context class), then the pancreas stage deciding the tumour. Their stage settings are
    # the models'.
    "abdomen-neighbours": tiny_ct_plan(FINE_CLASSES, [3.0, 3.0, 4.0], [32, 32, 16], CONTEXT_CLASSES,
                                       **settings_from(MODELS["abdomen-neighbours"], STAGE_SETTINGS)),
    "pancreas-wide": tiny_ct_plan(PANCREAS_CLASSES, [2.0, 2.0, 4.0], [32, 32, 16], PANCREAS_CONTEXT,
                                  **settings_from(MODELS["pancreas-wide"], STAGE_SETTINGS)),
    "pancreas-fine": tiny_ct_plan(PANCREAS_CLASSES, [2.0, 2.0, 4.0], [32, 32, 16],
                                  **settings_from(MODELS["pancreas-fine"], STAGE_SETTINGS)),
    # The liver task's third stage, the same on the fine stage's liver.
    "liver-fine": tiny_ct_plan(["background", "liver", "liver tumour"], [2.0, 2.0, 4.0], [32, 32, 16],
                               roi={"after": "abdomen-fine", "classes": ["liver", "liver tumour"],
                                    "margin_mm": [15, 15, 12], "cluster_gap_mm": 10},
                               blend_previous=0.7, tumour_blend_previous=0.25),
    "prostate": {"modality": "MR", "channels": ["T2", "ADC"], "classes": ["background", "PZ", "TZ"],
                 "spacing": [1.0, 1.0, 3.0], "patch_size": [32, 32, 8], "mirror_axes": [0],
                 "normalisation": {"type": "zscore"}},
}


def write_tiny_models(folder, seed=0):
    """Model cards (written by Training's export code) with small random-weight networks.

    For tests of structure (geometry, file formats, MRML nodes, errors): the networks are untrained.
    """
    import torch

    from MSDSegmentLib.network import build_network, topology_for_patch
    from Training.export import export_model
    from Training.models import MODELS

    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for name, plan in TINY_PLANS.items():
        kernels, strides = topology_for_patch(plan["patch_size"], plan["spacing"], max_levels=3)
        plan = dict(plan, network={"in_channels": len(plan["channels"]), "out_channels": len(plan["classes"]),
                                   "kernel_sizes": kernels, "strides": strides, "filters": [4, 8, 16][:len(strides)]},
                    synthetic_lesions=MODELS[name].get("synthetic_lesions", {}),
                    dataset={"name": "synthetic", "label_mapping": {}, "excluded": []})
        checkpoint = os.path.join(folder, f"{name}-checkpoint.pt")
        torch.save(build_network(plan["network"]).state_dict(), checkpoint)
        export_model(name, plan, {"training": [], "validation": []}, checkpoint, folder, {})
        os.remove(checkpoint)
    # Combined tasks are defined over the single tasks' cards, not exported: the shipped definition serves.
    shutil.copy(os.path.join(REPOSITORY, "MSDSegment", "Resources", "Models", "abdomen.json"), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    return write_tiny_models(str(tmp_path_factory.mktemp("tiny-models")))


# A real MRML scene (slicer-core) for the Slicer module's logic tests.
from slicer_fixture import new_slicer_scene, slicer_session  # noqa: E402,F401
