"""The quality flag: each segment's confidence and place, the flag's calibration, and that it fires on inputs
that are wrong in ways a radiologist would not be warned of otherwise."""

import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from images import synthetic_ct
from conftest import REPOSITORY
from MSDSegmentLib import modelcard, mrml
from MSDSegmentLib.cli import main
from MSDSegmentLib.engine import segment
from MSDSegmentLib.imageio import read_channels, read_image
from MSDSegmentLib.mrml import quality_text
from Training.quality import choose_threshold


def test_the_threshold_tells_bad_segments_from_good_ones():
    segments = [("a", "Liver", 0.95, 0.95), ("b", "Spleen", 0.94, 0.93), ("c", "Pancreas", 0.19, 0.66),
                ("d", "Pancreas", 0.70, 0.72), ("e", "Liver", 0.78, 0.90), ("f", "Spleen", 0.91, 0.80)]
    threshold, bad, fine = choose_threshold(segments, good=0.8)
    assert 0.72 < threshold <= 0.80  # flags both pancreases, not the good spleen at 0.80
    assert len(bad) == 3 and len(fine) == 3
    with pytest.raises(Exception, match="both below and above"):
        choose_threshold(segments[:2])


def test_every_segment_gets_a_confidence_and_the_summary_records_it(tmp_path, tiny_models_dir, capsys):
    path = str(tmp_path / "ct.nii.gz")
    sitk.WriteImage(synthetic_ct(), path)
    output = str(tmp_path / "out.nii.gz")
    assert main(["segment", "--task", "liver", "--models-dir", tiny_models_dir, "--output", output, path]) == 0
    with open(str(tmp_path / "out.json"), encoding="utf-8") as stream:
        quality = json.load(stream)["quality"]
    assert set(quality) == {"Liver", "Liver tumour"}
    for name, entry in quality.items():
        assert set(entry) == {"confidence", "location_distance", "check", "reasons"} | ({"lesions"} if "tumour" in name
                                                                                        else set())
        assert entry["check"] == bool(entry["reasons"])
    # Each tumour lesion kept: its volume, confidence and one of its voxels, largest first.
    labels = sitk.GetArrayFromImage(sitk.ReadImage(output)).transpose(2, 1, 0)
    lesions = quality["Liver tumour"]["lesions"]
    assert len(lesions) == len(set(tuple(lesion["index"]) for lesion in lesions))
    for lesion in lesions:
        assert labels[tuple(lesion["index"])] == 2 and 0 < lesion["confidence"] <= lesion["peak"] <= 1
        assert lesion["contrast"] is None or -400 < lesion["contrast"] < 400  # HU against the liver around it
        assert lesion["elongation"] >= 1
    volumes = [lesion["volume_ml"] for lesion in lesions]
    assert volumes == sorted(volumes, reverse=True)
    assert sum(lesion["volume_ml"] for lesion in lesions) == pytest.approx(
        json.load(open(str(tmp_path / "out.json")))["volumes_ml"]["Liver tumour"], abs=0.01)
    assert quality_text({"check": True, "reasons": ["not found"]}) == "check this segment: not found"
    assert quality_text({"check": False, "reasons": [], "confidence": 0.934}) == "confidence 0.93"
    assert quality_text({"check": False, "reasons": [], "confidence": 0.81, "lesions": [
        {"volume_ml": 12.44, "confidence": 0.9}, {"volume_ml": 1.2, "confidence": 0.7}]}) == \
        "confidence 0.81; 2 lesions, largest 12.4 mL"
    assert quality_text({"check": False, "reasons": [], "lesions": [
        {"volume_ml": 3.0, "confidence": 0.9, "contrast": -34.6}]}) == "1 lesion, largest 3.0 mL (-35 HU)"


def bundled_case(name):
    from conftest import BTCV, require
    folder = require(BTCV)
    cards = modelcard.catalogue()
    if "spleen" not in cards or modelcard.missing_weights(cards["spleen"]):
        pytest.skip("bundled spleen model not found")
    return read_channels([os.path.join(folder, "imagesTr", name + ".nii.gz")])[0]


def test_a_good_spleen_is_not_flagged_and_a_spleen_moved_out_of_place_is():
    """btcv_00 (held back from training): its spleen is trusted. The same CT with the spleen's voxels moved
    below where a spleen lies (fat where it was): what the model calls spleen there is flagged."""
    from conftest import BTCV
    image = bundled_case("btcv_00")
    good = segment([image], "spleen", device="cpu").quality[1]
    assert not good["check"], good
    voxels = sitk.GetArrayFromImage(image)
    spleen = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(BTCV, "labelsTr", "btcv_00.nii.gz"))) == 1
    slices = np.nonzero(spleen.any(axis=(1, 2)))[0]
    moved = voxels.copy()
    moved[spleen] = -100  # fat
    moved[np.roll(spleen, -(slices.max() - slices.min() + 10), axis=0)] = voxels[spleen]
    shifted = sitk.GetImageFromArray(moved)
    shifted.CopyInformation(image)
    flagged = segment([shifted], "spleen", device="cpu").quality[1]
    assert flagged["check"] and any(reason.startswith(("not found", "volume", "not where"))
                                    for reason in flagged["reasons"]), flagged


def test_an_mr_given_to_a_ct_task_is_flagged():
    from conftest import PROSTATE, require
    bundled_case("btcv_00")
    folder = require(PROSTATE)
    t2 = read_channels([os.path.join(folder, "imagesTr", "prostate_10.nii.gz")])[0]  # channel 0 of the 4-D MR
    result = segment([t2], "abdomen", device="cpu")
    assert any("does not look like CT" in warning for warning in result.warnings)
    assert all(result.quality[value]["check"] for value in (1, 3, 4)), result.quality  # liver, spleen, pancreas
    assert all(any(reason.startswith(("not found", "volume", "not where")) for reason in result.quality[value]["reasons"])
               for value in (1, 3)), result.quality  # not just a confidence near the threshold


def example_file(name):
    """One of TotalSegmentator's example files (scripts/example_data.py: its source distribution, downloaded from
    PyPI once into .downloads/)."""
    if os.path.join(REPOSITORY, "scripts") not in sys.path:
        sys.path.insert(0, os.path.join(REPOSITORY, "scripts"))
    import example_data
    try:
        return example_data.example_file(getattr(example_data, name), say=lambda text: None)
    except example_data.DataError as error:
        pytest.skip(f"TotalSegmentator's example data not available: {error}")


def require_bundled(task):
    cards = modelcard.catalogue()
    if task not in cards or modelcard.missing_weights(cards[task]):
        pytest.skip(f"bundled {task} model not found")
    return cards[task]


def test_every_segment_of_a_ct_task_is_flagged_on_totalsegmentators_example_mr(tmp_path, slicer_session, capsys):
    """The abdomen task (CT) on TotalSegmentator's example MR returned a 240 mL spleen with no flag. Every segment
    is now flagged with the reason first: in the command line's summary, in the segments' tags that the module
    imports, and in the text of the panel's table."""
    card = require_bundled("abdomen")
    mr = example_file("SMALL_MR")
    output = str(tmp_path / "labels.nrrd")  # as the module's background process writes it
    assert main(["segment", "--task", "abdomen", "--device", "cpu", "--quiet", "--output", output, mr]) == 0
    assert "does not look like CT" in capsys.readouterr().err
    with open(str(tmp_path / "labels.json"), encoding="utf-8") as stream:
        summary = json.load(stream)
    reason = "the input does not look like CT (no voxels below -50 HU)"
    assert set(summary["quality"]) == {label.name for label in card.trained_labels}
    assert all(entry["check"] and entry["reasons"][0] == reason for entry in summary["quality"].values()), summary
    node = slicer_session.load_volume(mr, "MR")
    tags = mrml.quality_from_tags(mrml.import_label_file(output, node, "abdomen"))
    assert set(tags) == set(summary["quality"])
    assert all(quality_text(entry).startswith(f"check this segment: {reason}") for entry in tags.values()), tags


def test_a_ct_given_to_the_prostate_task_is_flagged():
    require_bundled("prostate")
    ct = read_image(example_file("SMALL_CT"))[30:90, 20:80, 5:25]  # 60 x 60 x 20 voxels of 3 mm: pelvis-sized
    result = segment([ct, ct], "prostate", device="cpu")  # as T2 and as ADC
    assert any("looks like CT" in warning for warning in result.warnings)
    assert result.quality and all(entry["check"] and entry["reasons"][0].startswith("the input looks like CT")
                                  for entry in result.quality.values()), result.quality
