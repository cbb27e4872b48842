"""The demo's and the benchmark's own functions (no downloads, no models: each test takes well under a second)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for folder in ("scripts", "bench"):
    if os.path.join(REPOSITORY, folder) not in sys.path:
        sys.path.insert(0, os.path.join(REPOSITORY, folder))

import bench_cli  # noqa: E402
import demo  # noqa: E402


def test_dice_counts_overlap_and_is_undefined_for_two_empty_masks():
    first = np.zeros((4, 4, 4), bool)
    second = np.zeros((4, 4, 4), bool)
    assert math.isnan(demo.dice(first, second))
    first[0] = True                      # 16 voxels
    assert demo.dice(first, first) == 1.0
    assert demo.dice(first, second) == 0.0
    second[0, :2] = True                 # 8 voxels, all inside `first`
    assert demo.dice(first, second) == 2 * 8 / (16 + 8)


def test_best_slice_weighs_each_structure_by_its_own_largest_section():
    large = np.zeros((10, 20, 20), bool)
    small = np.zeros((10, 20, 20), bool)
    large[0:8, :, :10] = True
    large[3, :, :] = True                # the large organ's widest slice is 3 ...
    small[6:8, 5:7, 5:7] = True          # ... but only slices 6-7 show the small one too
    assert demo.best_slice([large], 0) == 3
    assert demo.best_slice([large, small], 0) == 6
    assert demo.best_slice([np.zeros((9, 4, 4), bool)], 0) == 4   # nothing segmented: the middle slice


def test_views_are_radiological_whatever_the_file_axis_order():
    # Axes flipped as in a RAS-stored NIfTI: index x grows toward the patient's right, y toward anterior.
    image = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16))   # x 7, y 6, z 5 voxels
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    image.SetSpacing((1.0, 2.0, 3.0))
    image[0, 0, 4] = 1      # the patient's far left, most posterior, most superior corner
    volume, spacing = demo.oriented(image)
    assert spacing == (1.0, 2.0, 3.0)
    index = tuple(np.argwhere(volume == 1)[0])
    assert index == (4, 5, 6)                                   # (z, y, x): superior, posterior, left ends
    axial, coronal, sagittal = demo.view_slices(volume, index)
    assert np.argwhere(axial == 1).tolist() == [[5, 6]]         # posterior at the bottom, left on the right
    assert np.argwhere(coronal == 1).tolist() == [[0, 6]]       # superior at the top, left on the right
    assert np.argwhere(sagittal == 1).tolist() == [[0, 5]]      # superior at the top, posterior on the right
    assert demo.view_extents(volume.shape, spacing) == [(7.0, 12.0), (7.0, 15.0), (12.0, 15.0)]


def test_colour_overlay_fills_half_transparent_and_outlines_opaque():
    labels = np.zeros((7, 7), np.uint8)
    labels[1:6, 1:6] = 2
    rgba = demo.colour_overlay([labels], [{2: (255, 0, 0), 1: (0, 255, 0)}])
    assert rgba[0, 0, 3] == 0.0                                  # background untouched
    assert rgba[3, 3].tolist() == pytest.approx([1.0, 0.0, 0.0, demo.FILL_ALPHA])  # interior
    assert rgba[1, 3, 3] == 1.0                                  # outline
    assert not np.any(rgba[..., 1] > 0)                          # absent label 1 not drawn


def test_missing_models_names_each_task_and_what_it_lacks(tmp_path):
    assert demo.missing_models(["liver", "spleen"], str(tmp_path)) == ["liver (liver.json)", "spleen (spleen.json)"]
    card = {"task": "spleen", "title": "Spleen", "description": "", "modality": "CT", "channels": ["CT"],
            "labels": [{"value": 1, "name": "Spleen", "color": [157, 108, 162], "source_class": "spleen"}],
            "stages": [{"weights": "abdomen.pt", "sha256": "0" * 64, "network": {}, "spacing": [4, 4, 4],
                        "patch_size": [64, 64, 64], "normalisation": {"type": "ct"}, "classes": ["background", "spleen"]}],
            "postprocessing": {}, "training": {}, "validation": {}, "licence": ""}
    (tmp_path / "spleen.json").write_text(json.dumps(card))
    assert demo.missing_models(["spleen"], str(tmp_path)) == ["spleen (abdomen.pt)"]
    (tmp_path / "abdomen.pt").write_bytes(b"weights")
    assert demo.missing_models(["spleen"], str(tmp_path)) == []


def test_text_table_aligns_numbers_right():
    text = demo.format_table([["liver", "1043.1", "0.951"], ["spleen", "n/a", "-"]], ["Task", "mL", "Dice"])
    lines = text.splitlines()
    assert lines[0] == "Task        mL   Dice"
    assert lines[2] == "liver   1043.1  0.951"
    assert lines[3] == "spleen     n/a      -"


def test_compact_png_stays_under_the_size_limit(tmp_path):
    from PIL import Image

    gradient = np.tile(np.linspace(0, 255, 2000, dtype=np.uint8), (1500, 1))
    Image.fromarray(np.stack([gradient, gradient.T[:1500, :1500].repeat(2, axis=1)[:, :2000], gradient], -1)).save(
        tmp_path / "big.png")
    size = demo.compact_png(str(tmp_path / "big.png"), str(tmp_path / "small.png"), max_bytes=300_000)
    with Image.open(tmp_path / "small.png") as small:
        assert small.mode == "P" and small.width <= 1200
    assert size == os.path.getsize(tmp_path / "small.png") <= 300_000


def test_benchmark_grid_is_centred_and_stretch_fills_every_slice():
    source = sitk.Image([20, 16, 12], sitk.sitkFloat32)
    source.SetSpacing((3.0, 3.0, 3.0))
    source.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    source.SetOrigin((10.0, -5.0, 40.0))
    source += -1000.0
    source[:, :, 0] = sitk.Image([20, 16], sitk.sitkFloat32) + 100.0     # lowest slice
    source[:, :, 11] = sitk.Image([20, 16], sitk.sitkFloat32) + 300.0    # highest slice
    grid = bench_cli.benchmark_grid(source, size=(40, 24, 24), spacing=(2.0, 2.0, 2.5))
    centre = lambda image: np.array(image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in image.GetSize()]))
    assert np.allclose(centre(grid), centre(source))
    assert grid.GetDirection() == source.GetDirection()
    resampled = sitk.GetArrayFromImage(sitk.Resample(source, grid, bench_cli.slice_stretch(source, grid),
                                                     sitk.sitkNearestNeighbor, -1024.0))
    assert resampled[0, 12, 20] == 100.0 and resampled[-1, 12, 20] == 300.0   # anatomy in the end slices
    assert resampled[12, 12, 0] == -1024.0                                     # air beyond the field of view
    assert set(np.unique(resampled[:, 12, 20]).tolist()) == {100.0, -1000.0, 300.0}


def test_run_measured_reports_each_process_own_peak_memory(tmp_path):
    # Measured from a small parent, as `make bench` runs: a forked child counts its parent's pages until it
    # executes, so from inside pytest (PyTorch loaded) every child would look at least that large.
    measure = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_cli; "
               "print(json.dumps([bench_cli.run_measured([sys.executable, '-c', sys.argv[2], size], sys.argv[3])"
               " for size in ('300', '1')] + [bench_cli.run_measured([sys.executable, '-c', 'raise SystemExit(3)'],"
               " sys.argv[3])]))")
    allocate = "import sys; b = bytearray(int(sys.argv[1]) * 2**20); b[::4096] = b'x' * len(b[::4096])"
    result = subprocess.run([sys.executable, "-c", measure, os.path.join(REPOSITORY, "bench"), allocate,
                             str(tmp_path / "log")], capture_output=True, text=True, check=True)
    (big_code, big_wall, big), (small_code, _, small), (failed_code, _, _) = json.loads(result.stdout)
    assert big_code == 0 and small_code == 0 and big_wall > 0
    assert big >= 300 * 2**20 > small   # each process's own peak, not the maximum over all children so far
    assert failed_code == 3


def test_markdown_table_splits_the_wall_time_compares_precisions_and_flags_missed_targets():
    timings = {"read": 1.0, "load": 2.0, "preprocess": 3.0, "network": 10.0, "postprocess": 4.0, "write": 0.5}
    rows = [{"task": "liver", "asked": "fp32", "precision": "fp32", "wall_s": 17.0, "peak_rss_bytes": 1.4e9,
             "timings_s": timings},
            {"task": "liver", "asked": "auto", "precision": "bf16", "wall_s": 8.5, "peak_rss_bytes": 1.0e9,
             "timings_s": dict(timings, network=1.5)},
            {"task": "spleen", "asked": "auto", "precision": "fp32", "wall_s": 13.0, "peak_rss_bytes": 1.0e9,
             "timings_s": timings}]
    lines = bench_cli.markdown_table(rows).splitlines()
    assert lines[0].startswith("| Task | precision (used) | read | load | preprocess | network | postprocess | write |")
    assert lines[2] == ("| liver | fp32 (fp32) | 1.0 | 2.0 | 3.0 | 10.0 | 4.0 | 0.5 | 0.0 | 17.0 | 1.00 | 1.40 | "
                        "<= 18 s, 1.5 GB: yes |")
    assert lines[3] == ("| liver | auto (bf16) | 1.0 | 2.0 | 3.0 | 1.5 | 4.0 | 0.5 | 0.0 | 8.5 | 0.50 | 1.00 | "
                        "<= 12 s, 1.5 GB: yes |")
    assert lines[4].endswith("| 13.0 |  | 1.00 | <= 12 s, 1.5 GB: **no** |")


def test_benchmark_report_gives_each_stage_share_and_the_overhead_ratio():
    stages = {"read": 0.5, "load": 1.0, "preprocess": 1.5, "network": 4.0, "postprocess": 1.0, "write": 0.0}
    rows = [{"task": "liver", "asked": asked, "precision": "bf16", "wall_s": wall, "timings_s": stages}
            for asked, wall in (("auto", 8.0), ("fp32", 6.0))]
    assert bench_cli.overhead_ratio(rows[0]) == pytest.approx(1.0)  # (8 - 4) / 4
    lines = bench_cli.share_table(rows).splitlines()
    assert lines[2].split(" | ")[2:10] == ["6 %", "12 %", "19 %", "50 %", "12 %", "0 %", "0 %", "1.00"]
    assert lines[2].endswith("<= 0.6: **no** |") and lines[3].endswith("0.50 |  |  |")


def test_fresh_auto_processes_are_measured_again_and_reported_by_their_median_ratio(monkeypatch):
    """The median run's stages and wall time, every run's ratio, and the highest peak memory of them; a forced
    precision runs once."""
    stages = {"read": 0.5, "load": 1.0, "preprocess": 0.5, "network": 5.0, "postprocess": 0.5, "write": 0.0}
    walls, calls = iter([9.0, 7.5, 8.0]), []

    def measure_task(task, ct_path, work_dir, device, cores, models_dir=None, precision="auto"):
        calls.append(precision)
        wall = next(walls)
        return {"task": task, "asked": precision, "precision": "bf16", "wall_s": wall, "timings_s": stages,
                "peak_rss_bytes": int(wall * 1e8)}

    monkeypatch.setattr(bench_cli, "measure_task", measure_task)
    row = bench_cli.measure_fresh("liver", "ct.nii.gz", "work", "cpu", [0, 1], repeats=3)
    assert row["wall_s"] == 8.0 and row["ratios"] == pytest.approx([0.5, 0.6, 0.8])
    assert row["peak_rss_bytes"] == int(9.0e8) and calls == ["auto"] * 3
    assert bench_cli.share_table([row]).splitlines()[2].endswith("| 0.60 | 0.50-0.80 | <= 0.6: yes |")
    walls = iter([12.0])
    single = bench_cli.measure_fresh("liver", "ct.nii.gz", "work", "cpu", [0, 1], precision="fp32", repeats=3)
    assert single["wall_s"] == 12.0 and calls[3:] == ["fp32"] and bench_cli.repeats_of([row, single]) == 3


def test_benchmark_report_gives_the_warm_ratio_and_the_imports_against_each_network():
    stages = {"read": 0.5, "load": 0.0, "preprocess": 1.0, "network": 5.0, "postprocess": 0.5, "write": 0.0}
    warm = [{"task": "liver", "asked": "auto", "precision": "bf16", "timings_s": stages},
            {"task": "spleen", "asked": "auto", "precision": "bf16", "timings_s": dict(stages, postprocess=2.0)}]
    assert bench_cli.warm_overhead_ratio(warm[0]) == pytest.approx(0.4)  # (7 - 5) / 5, no start-up to count
    lines = bench_cli.warm_table(warm).splitlines()
    assert lines[2].endswith("| 0.40 |  | <= 0.6: yes |") and lines[3].endswith("| 0.70 |  | <= 0.6: **no** |")
    fresh = [dict(row, wall_s=9.0) for row in warm] + [{"task": "liver", "asked": "fp32", "timings_s": stages}]
    (line,) = bench_cli.import_lines(4.0, fresh)
    assert "4.0 s" in line and "liver 0.80, spleen 0.80." in line


def test_benchmark_report_gives_the_panel_case_from_the_job_wall_time():
    stages = {"read": 0.5, "load": 0.0, "preprocess": 1.0, "network": 5.0, "postprocess": 0.5, "write": 0.1}
    rows = [{"task": "liver", "asked": "auto", "precision": "bf16", "timings_s": stages, "ready_s": 6.0, "job_s": 7.5},
            {"task": "spleen", "asked": "auto", "precision": "bf16", "timings_s": stages, "ready_s": 5.0, "job_s": 8.5}]
    assert bench_cli.standby_overhead_ratio(rows[0]) == pytest.approx(0.5)  # (7.5 - 5) / 5: what the user waits
    lines = bench_cli.standby_table(rows).splitlines()
    assert lines[0].startswith("| Task | precision (used) | ready after s | read |")
    assert lines[2] == "| liver | auto (bf16) | 6.0 | 0.5 | 0.0 | 1.0 | 5.0 | 0.5 | 0.1 | 7.5 | 0.50 |  | <= 0.6: yes |"
    assert lines[3].endswith("| 8.5 | 0.70 |  | <= 0.6: **no** |")


def test_the_engine_running_cases_report_the_median_run_and_the_range_of_the_ratio():
    stages = {"read": 0.5, "load": 0.0, "preprocess": 1.0, "network": 5.0, "write": 0.0}
    runs = [{"task": "liver", "asked": "auto", "precision": "bf16", "timings_s": dict(stages, postprocess=seconds)}
            for seconds in (0.5, 2.0, 1.0)]
    row = bench_cli.median_run(runs, bench_cli.warm_overhead_ratio)
    assert row["timings_s"]["postprocess"] == 1.0 and row["ratios"] == pytest.approx([0.4, 0.5, 0.7])
    assert bench_cli.warm_table([row]).splitlines()[2].endswith("| 0.50 | 0.40-0.70 | <= 0.6: yes |")
