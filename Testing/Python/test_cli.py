"""The command line contract and every bad input: one-line error, non-zero exit, no output file."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPOSITORY
from images import synthetic_ct, synthetic_mr, write_dicom_series
from MSDSegmentLib.cli import main


@pytest.fixture
def ct_file(tmp_path):
    path = str(tmp_path / "ct.nii.gz")
    sitk.WriteImage(synthetic_ct(), path)
    return path


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("msdsegment: error: ")
    assert pattern in lines[0], lines[0]


def files_in(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
def test_label_map_on_exactly_the_input_grid_with_volumes_json(tmp_path, ct_file, tiny_models_dir, capsys, suffix):
    output = str(tmp_path / f"out{suffix}")
    code, out, err = run(["segment", "--task", "liver", "--models-dir", tiny_models_dir, "--output", output, ct_file],
                         capsys)
    assert code == 0, err
    labels, image = sitk.ReadImage(output), sitk.ReadImage(ct_file)
    assert labels.GetSize() == image.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(labels.GetDirection(), image.GetDirection(), atol=1e-6)
    summary = json.load(open(str(tmp_path / "out.json")))
    assert set(summary["volumes_ml"]) == {"Liver", "Liver tumour"}
    assert summary["model"]["card"] == "liver.json"
    assert summary["model"]["weights"] == ["abdomen.pt", "abdomen-fine.pt", "liver-fine.pt"]  # the cascade's stages
    assert {"read", "load", "preprocess", "network", "postprocess", "write"} <= set(summary["timings_s"])
    assert "Liver" in out


def test_nifti_output_keeps_the_input_affine(tmp_path, ct_file, tiny_models_dir, capsys):
    output = str(tmp_path / "out.nii.gz")
    assert run(["segment", "--task", "spleen", "--models-dir", tiny_models_dir, "--output", output, ct_file],
               capsys)[0] == 0
    np.testing.assert_allclose(nib.load(output).affine, nib.load(ct_file).affine, atol=1e-4)
    assert nib.load(output).shape == nib.load(ct_file).shape


def test_seg_nrrd_carries_segment_names_colours_and_terminology(tmp_path, ct_file, tiny_models_dir, capsys):
    output = str(tmp_path / "case.seg.nrrd")
    assert run(["segment", "--task", "pancreas", "--models-dir", tiny_models_dir, "--output", output, ct_file],
               capsys)[0] == 0
    image = sitk.ReadImage(output)
    assert image.GetMetaData("Segment0_Name") == "Pancreas"
    assert image.GetMetaData("Segment0_LabelValue") == "1"
    assert "SCT^15776009^Pancreas" in image.GetMetaData("Segment0_Tags")


def test_output_dir_segments_each_input(tmp_path, tiny_models_dir, capsys):
    inputs = []
    for index in range(2):
        path = str(tmp_path / f"case{index}.nrrd")
        sitk.WriteImage(synthetic_ct(seed=index), path)
        inputs.append(path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(["segment", "--task", "spleen", "--models-dir", tiny_models_dir, "--output-dir", str(out_dir),
                        "--quiet"] + inputs, capsys)
    assert code == 0, err
    assert files_in(out_dir) == ["case0.json", "case0.nii.gz", "case1.json", "case1.nii.gz"]


def test_one_bad_file_in_a_batch_fails_alone(tmp_path, tiny_models_dir, capsys):
    """A NIfTI with NaN voxels (which ITK would read as 0) in the middle of a batch: it gets its one-line
    reason and no output, the others are segmented and kept, and the exit status reports the failure."""
    inputs = []
    for index in range(3):
        path = str(tmp_path / f"case{index}.nii.gz")
        inputs.append(path)
        if index == 1:
            voxels = sitk.GetArrayFromImage(synthetic_ct(seed=index)).transpose(2, 1, 0).astype(np.float32)
            voxels[10, 10, 5] = np.nan
            nib.save(nib.Nifti1Image(voxels, np.diag([3.0, 3.0, 5.0, 1.0])), path)
        else:
            sitk.WriteImage(synthetic_ct(seed=index), path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(["segment", "--task", "spleen", "--models-dir", tiny_models_dir, "--output-dir", str(out_dir),
                        "--quiet"] + inputs, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"msdsegment: error: {inputs[1]}: ") and "NaN" in lines[0]
    assert lines[1] == f"msdsegment: error: 1 of 3 inputs failed: {inputs[1]}"
    assert files_in(out_dir) == ["case0.json", "case0.nii.gz", "case2.json", "case2.nii.gz"]


def test_nan_in_a_nifti_file_is_refused(tmp_path, tiny_models_dir, capsys):
    path = str(tmp_path / "nan.nii")
    voxels = sitk.GetArrayFromImage(synthetic_ct()).transpose(2, 1, 0).astype(np.float32)
    voxels[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), path)
    assert np.isnan(nib.load(path).get_fdata()).any() and not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(path))).any()
    output = str(tmp_path / "out.nii.gz")
    code, _, err = run(["segment", "--task", "spleen", "--models-dir", tiny_models_dir, "--output", output, path],
                       capsys)
    assert_one_line_error(code, err, "contains NaN or infinite voxels")
    assert files_in(tmp_path) == ["nan.nii"]


def test_prostate_from_one_4d_file_or_t2_and_adc_files(tmp_path, tiny_models_dir, capsys):
    four_d = str(tmp_path / "mr.nii.gz")
    sitk.WriteImage(synthetic_mr(), four_d)
    t2, adc = str(tmp_path / "t2.nii.gz"), str(tmp_path / "adc.nii.gz")
    channels = [sitk.Extract(synthetic_mr(), [48, 48, 12, 0], [0, 0, 0, c]) for c in range(2)]
    sitk.WriteImage(channels[0], t2)
    sitk.WriteImage(channels[1], adc)
    for inputs, name in (([four_d], "a"), ([t2, adc], "b")):
        output = str(tmp_path / f"{name}.nii.gz")
        code, _, err = run(["segment", "--task", "prostate", "--models-dir", tiny_models_dir, "--tta",
                            "--output", output] + inputs, capsys)
        assert code == 0, err
        assert sitk.ReadImage(output).GetSize() == (48, 48, 12)


def test_dicom_series_folder_is_read(tmp_path, tiny_models_dir, capsys):
    folder = tmp_path / "dicom"
    write_dicom_series(sitk.Cast(synthetic_ct(size=(48, 40, 12)), sitk.sitkInt16), str(folder))
    output = str(tmp_path / "out.nii.gz")
    code, _, err = run(["segment", "--task", "spleen", "--models-dir", tiny_models_dir, "--output", output,
                        str(folder)], capsys)
    assert code == 0, err
    labels = sitk.ReadImage(output)
    assert labels.GetSize() == (48, 40, 12)
    np.testing.assert_allclose(labels.GetSpacing(), (3.0, 3.0, 5.0), atol=1e-3)


def test_tasks_lists_the_catalogue_with_figures(tiny_models_dir, capsys):
    code, out, _ = run(["tasks", "--models-dir", tiny_models_dir], capsys)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines() if not line.startswith(" ")] == \
        ["liver", "spleen", "pancreas", "abdomen", "organs", "prostate"]
    assert "not yet measured" in out
    assert "Liver tumour: learnt from synthetic lesions only" in out


# ---- bad input: one line, non-zero exit, no output file, input untouched ----

def write_array(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, path)
    return path


def bad_inputs(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image" * 10)
    huge = tmp_path / "huge.mhd"   # header of a 4000^3 volume; its (sparse) data file takes no disk
    huge.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_SHORT\n"
                    "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n")
    with open(tmp_path / "huge.raw", "wb") as raw:
        raw.truncate(4000 ** 3 * 2)
    # NaN and inf survive in MetaImage (ITK writes NaN as 0 in NIfTI).
    nan = np.full((20, 20, 20), 40.0, np.float32)
    nan[5, 5, 5] = np.nan
    inf = np.full((20, 20, 20), 40.0, np.float32)
    inf[5, 5, 5] = np.inf
    return {
        "missing": ([str(tmp_path / "nope.nii.gz")], "Input not found"),
        "unreadable": ([str(garbage)], "Cannot read image"),
        "2-D": ([write_array(str(tmp_path / "flat.nii.gz"), np.zeros((30, 30), np.int16))], "2-D"),
        "one slice": ([write_array(str(tmp_path / "slice.nii.gz"), np.ones((1, 30, 30), np.int16))], "single slice"),
        "constant": ([write_array(str(tmp_path / "const.nii.gz"), np.full((20, 20, 20), 40, np.int16))], "constant"),
        "empty": ([write_array(str(tmp_path / "zeros.nii.gz"), np.zeros((20, 20, 20), np.int16))], "constant"),
        "NaN": ([write_array(str(tmp_path / "nan.mha"), nan)], "NaN or infinite"),
        "inf": ([write_array(str(tmp_path / "inf.mha"), inf)], "NaN or infinite"),
        "too large": ([str(huge)], "too large for memory"),
    }


@pytest.mark.parametrize("case", ["missing", "unreadable", "2-D", "one slice", "constant", "empty", "NaN", "inf",
                                  "too large"])
def test_bad_input_gets_a_one_line_error_and_no_output(tmp_path, tiny_models_dir, capsys, case):
    inputs, message = bad_inputs(tmp_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = {p: open(p, "rb").read() for p in inputs if os.path.isfile(p)}
    code, _, err = run(["segment", "--task", "liver", "--models-dir", tiny_models_dir,
                        "--output", str(out_dir / "seg.nii.gz")] + inputs, capsys)
    assert_one_line_error(code, err, message)
    assert files_in(out_dir) == []
    assert {p: open(p, "rb").read() for p in before} == before


def test_4d_input_with_the_wrong_channel_count(tmp_path, tiny_models_dir, capsys):
    path = str(tmp_path / "mr3.nii.gz")
    sitk.WriteImage(synthetic_mr(channels=3), path)
    code, _, err = run(["segment", "--task", "prostate", "--models-dir", tiny_models_dir,
                        "--output", str(tmp_path / "seg.nii.gz"), path], capsys)
    assert_one_line_error(code, err, "needs 2 channel(s) (T2, ADC); input has 3")
    assert not os.path.exists(tmp_path / "seg.nii.gz")


@pytest.mark.parametrize("damage", ["corrupted", "missing"])
def test_damaged_weights_name_the_file(tmp_path, tiny_models_dir, ct_file, capsys, damage):
    import shutil
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    weights = models / "abdomen.pt"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    code, _, err = run(["segment", "--task", "spleen", "--models-dir", str(models),
                        "--output", str(tmp_path / "seg.nii.gz"), ct_file], capsys)
    assert_one_line_error(code, err, str(weights))
    assert not os.path.exists(tmp_path / "seg.nii.gz")


def test_unsupported_output_format_is_refused_before_any_work(tmp_path, ct_file, tiny_models_dir, capsys):
    code, _, err = run(["segment", "--task", "spleen", "--models-dir", tiny_models_dir,
                        "--output", str(tmp_path / "seg.png"), ct_file], capsys)
    assert_one_line_error(code, err, "Unsupported output format")
    assert files_in(tmp_path) == ["ct.nii.gz"]


def test_mr_given_to_a_ct_task_is_warned_about(tmp_path, tiny_models_dir, capsys):
    path = str(tmp_path / "t2.nii.gz")
    sitk.WriteImage(sitk.Extract(synthetic_mr(), [48, 48, 12, 0], [0, 0, 0, 0]), path)
    code, _, err = run(["segment", "--task", "liver", "--models-dir", tiny_models_dir,
                        "--output", str(tmp_path / "seg.nii.gz"), path], capsys)
    assert code == 0
    assert "warning: The input does not look like CT" in err


def test_console_process_exit_codes(tmp_path, ct_file, tiny_models_dir):
    """The real process: exit 0 on success, non-zero with one line on stderr otherwise."""
    command = [sys.executable, "-m", "MSDSegmentLib", "segment", "--task", "spleen", "--models-dir", tiny_models_dir,
               "--quiet"]
    cwd = os.path.join(REPOSITORY, "MSDSegment")
    ok = subprocess.run(command + ["--output", str(tmp_path / "a.nii.gz"), ct_file], cwd=cwd, capture_output=True,
                        text=True)
    assert ok.returncode == 0 and ok.stdout == "" and ok.stderr == ""
    bad = subprocess.run(command + ["--output", str(tmp_path / "b.nii.gz"), str(tmp_path / "missing.nii.gz")],
                         cwd=cwd, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Input not found" in bad.stderr


def test_outputs_get_ordinary_file_permissions(tmp_path, ct_file, tiny_models_dir, capsys):
    output = tmp_path / "seg.nii.gz"
    assert run(["segment", "--task", "spleen", "--models-dir", tiny_models_dir, "--output", str(output), ct_file],
               capsys)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    for path in (output, tmp_path / "seg.json"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
