"""The engine's precision choice (auto, fp32, bf16, fp16) and the faster pieces behind `make bench`: each gives
what the slower code it replaced gave."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk

from images import synthetic_ct
from MSDSegmentLib import engine, modelcard, preprocessing
from MSDSegmentLib.cli import main
from MSDSegmentLib.engine import channel_argmax, pick_precision, segment
from MSDSegmentLib.errors import MSDSegmentError
from MSDSegmentLib.inference import windows_per_batch
from MSDSegmentLib.boxes import bounding_box
from MSDSegmentLib.preprocessing import antialias, canonical_reference, resample, to_array


def card_with(precision):
    card = modelcard.find_card("liver")
    return modelcard.ModelCard(**{**card.__dict__, "precision": precision})


MEASURED = {"fp32": {"Liver": 0.9500}, "bf16": {"Liver": 0.9490}, "fp16": {"Liver": 0.9530}, "tolerance": 0.002}


def test_a_reduced_precision_is_allowed_only_where_measured_within_the_tolerance():
    assert card_with(MEASURED).auto_precisions() == ["bf16"]  # fp16 moved the Dice by 0.003
    assert card_with({}).auto_precisions() == []  # never measured (e.g. a re-exported card): fp32
    assert card_with({"fp32": {"Liver": 0.95}, "bf16": {}, "tolerance": 0.002}).auto_precisions() == []


@pytest.mark.parametrize("native_bf16, device, expected", [(True, "cpu", "bf16"), (False, "cpu", "fp32"),
                                                           (True, "cuda", "fp32")])
def test_auto_picks_bf16_on_cpus_that_compute_it_natively_and_fp16_on_a_gpu(monkeypatch, native_bf16, device,
                                                                           expected):
    monkeypatch.setattr(engine, "native_bf16_cpu", lambda: native_bf16)
    assert pick_precision("auto", device, card_with(MEASURED)) == expected  # fp16 not measured good enough
    allowed = dict(MEASURED, fp16={"Liver": 0.9505})
    assert pick_precision("auto", "cuda", card_with(allowed)) == "fp16"
    assert pick_precision("auto", device, card_with({})) == "fp32"
    assert pick_precision("fp16", "cpu", card_with({})) == "fp16"  # asked for explicitly: used as asked
    with pytest.raises(MSDSegmentError, match="Unknown precision"):
        pick_precision("int8", device, card_with(MEASURED))


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert engine.native_bf16_cpu()
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx2", "avx512f"})
    import torch
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert not engine.native_bf16_cpu()


def test_bf16_gives_nearly_the_labels_of_fp32_and_the_summary_records_it(tmp_path, tiny_models_dir, capsys):
    image = synthetic_ct()
    full = segment([image], "spleen", models_dir=tiny_models_dir, device="cpu", precision="fp32")
    reduced = segment([image], "spleen", models_dir=tiny_models_dir, device="cpu", precision="bf16")
    assert (full.precision, reduced.precision) == ("fp32", "bf16")
    agreement = np.mean(to_array(full.labels) == to_array(reduced.labels))
    assert agreement > 0.99, agreement
    path = str(tmp_path / "ct.nii.gz")
    sitk.WriteImage(image, path)
    output = str(tmp_path / "out.nii.gz")
    assert main(["segment", "--task", "spleen", "--models-dir", tiny_models_dir, "--device", "cpu",
                 "--output", output, path]) == 0
    with open(str(tmp_path / "out.json"), encoding="utf-8") as stream:
        summary = json.load(stream)
    assert summary["precision"] == "fp32"  # the tiny models' cards have no precision measurement
    assert "fp32" in capsys.readouterr().out


def network_output_types(models_dir, task):
    """The dtypes the task's networks put out from now on (a forward hook on each), and a function removing the
    hooks."""
    seen, handles = set(), []
    for stage in modelcard.find_card(task, models_dir).stages:
        network = engine.network_for(stage, "cpu")
        handles.append(network.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype)))
    return seen, lambda: [handle.remove() for handle in handles]


def segment_from_the_command_line(tmp_path, models_dir, precision, capsys):
    path = str(tmp_path / "ct.nii.gz")
    sitk.WriteImage(synthetic_ct(), path)
    output = str(tmp_path / f"out-{precision}.nii.gz")
    assert main(["segment", "--task", "spleen", "--models-dir", models_dir, "--device", "cpu", "--precision",
                 precision, "--output", output, path]) == 0
    with open(str(tmp_path / f"out-{precision}.json"), encoding="utf-8") as stream:
        return json.load(stream), capsys.readouterr().err


def test_fp16_asked_on_the_cpu_computes_in_fp16_and_the_summary_says_so(tmp_path, tiny_models_dir, capsys):
    import torch
    seen, remove = network_output_types(tiny_models_dir, "spleen")
    try:
        summary, err = segment_from_the_command_line(tmp_path, tiny_models_dir, "fp16", capsys)
    finally:
        remove()
    assert seen == {torch.float16} and summary["precision"] == "fp16" and not summary["warnings"], (seen, err)


def test_a_pytorch_without_fp16_on_the_cpu_runs_fp32_and_says_so(monkeypatch, tmp_path, tiny_models_dir, capsys):
    """PyTorch before 2.3 turns CPU autocast to fp16 off with a warning and computes in fp32 (reproduced here by
    wrapping torch.autocast): the run must not report fp16."""
    import warnings

    import torch
    real_autocast = torch.autocast

    def old_autocast(device_type, dtype=None, **options):
        if device_type == "cpu" and dtype == torch.float16:
            warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.")
            options["enabled"] = False
        return real_autocast(device_type, dtype=dtype, **options)

    monkeypatch.setattr(torch, "autocast", old_autocast)
    assert engine.usable_precision("fp16", "cpu")[0] == "fp32"
    assert engine.usable_precision("bf16", "cpu") == ("bf16", None)
    seen, remove = network_output_types(tiny_models_dir, "spleen")
    try:
        summary, err = segment_from_the_command_line(tmp_path, tiny_models_dir, "fp16", capsys)
    finally:
        remove()
    assert seen == {torch.float32} and summary["precision"] == "fp32", (seen, summary["precision"])
    assert any("fp16 was asked for" in warning and "ran in fp32" in warning for warning in summary["warnings"])
    assert "warning: fp16 was asked for" in err


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_gpu_runs_only_where_the_gpu_has_it(monkeypatch, has_bf16):
    """The capability query is faked (no GPU here): a GPU without bf16 (before Ampere) runs fp32 and says so,
    instead of ending in a torch error; fp16 runs on every CUDA GPU."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: has_bf16)
    precision, warning = engine.usable_precision("bf16", "cuda")
    assert (precision, warning is None) == (("bf16", True) if has_bf16 else ("fp32", False))
    assert has_bf16 or "no bf16" in warning
    assert engine.usable_precision("fp16", "cuda") == ("fp16", None)
    assert engine.usable_precision("fp32", "cuda") == ("fp32", None)


def test_channel_argmax_is_numpy_s_argmax_with_ties_to_the_first_class():
    rng = np.random.default_rng(0)
    probabilities = rng.random((4, 30, 20, 10)).astype(np.float32)
    probabilities[2, :5] = probabilities[1, :5]  # ties
    assert np.array_equal(channel_argmax(probabilities), np.argmax(probabilities, axis=0))
    assert np.array_equal(channel_argmax(list(probabilities)), np.argmax(probabilities, axis=0))
    scratch = [probabilities[0].copy()] + list(probabilities[1:])  # the first channel may be overwritten
    assert np.array_equal(channel_argmax(scratch, scratch=True), np.argmax(probabilities, axis=0))


def test_bounding_box_with_a_margin_per_axis():
    mask = np.zeros((20, 30, 40), bool)
    mask[5:8, 10, 20:25] = True
    assert bounding_box(mask, margin=(1, 2, 30)) == (slice(4, 9), slice(8, 13), slice(0, 40))
    assert bounding_box(mask, margin=0) == (slice(5, 8), slice(10, 11), slice(20, 25))
    assert bounding_box(np.zeros((3, 3), bool)) is None


def gaussian_only(image, target_spacing):
    """The anti-aliasing before block averaging was added: one Gaussian of the whole variance."""
    source, target = np.array(image.GetSpacing()), np.asarray(target_spacing, dtype=float)
    sigma = np.sqrt(np.maximum(target ** 2 - source ** 2, 0.0)) / 2.355
    sigma = np.where(target > 1.5 * source, sigma, 0.0)
    return sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma])


def test_block_averaging_then_gaussian_is_the_gaussian_on_the_network_grid():
    """0.8 mm to 4 mm (the whole-CT first stage): the cheaper filter gives nearly what the network saw before,
    on real CT where it is available and on a synthetic CT otherwise. Measured, as a share of the intensity range:
    btcv_00 at 0.8 mm (clipped to the abdominal window) mean 0.23 %, 99th percentile 1.4 %; the synthetic CT, whose
    body edge is a 1000 HU step against air, mean 0.26 %, 99th percentile 2.8 % (the edge voxels)."""
    from conftest import BTCV
    path = os.path.join(BTCV, "imagesTr", "btcv_00.nii.gz")
    real = os.path.isfile(path)
    image = sitk.ReadImage(path, sitk.sitkFloat32) if real else sitk.Cast(synthetic_ct(), sitk.sitkFloat32)
    image = sitk.Resample(image, [int(n * s / 0.8) for n, s in zip(image.GetSize()[:2], image.GetSpacing()[:2])]
                          + [image.GetSize()[2]], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                          (0.8, 0.8, image.GetSpacing()[2]), image.GetDirection())
    image += sitk.Cast(sitk.AdditiveGaussianNoise(image * 0, 12.0, 0.0, 1), sitk.sitkFloat32)  # scanner noise
    target = (4.0, 4.0, 4.0)
    grid = canonical_reference(image, target)
    new, old = (to_array(resample(filtered, grid, sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
                for filtered in (antialias(image, target), gaussian_only(image, target)))
    value_range = float(np.ptp(old))
    assert value_range > 300 and np.mean(new > -900) > 0.2, "the grid does not cover the CT"
    difference = np.abs(new - old) / value_range
    largest_99th = 0.025 if real else 0.035
    assert difference.mean() < 0.004 and np.percentile(difference, 99) < largest_99th, \
        (difference.mean(), np.percentile(difference, 99))


def test_in_plane_anti_aliasing_is_the_sampled_gaussian_over_the_axes_it_smooths_in_any_number_of_threads():
    """0.8 x 0.8 x 2.5 mm to a fine stage's 2 x 2 x 3 mm: the slices are not smoothed, and the in-plane passes are
    scipy's sampled Gaussian over the whole image, voxel for voxel however many threads share the slabs. They stay
    close to the recursive Gaussian the fine stages used before: 0.52 HU apart on average on this synthetic CT, whose
    body edge is a 1000 HU step (0.05 % of its range; 0.14 HU on the bench CT's fine-stage region)."""
    from scipy import ndimage

    image = sitk.Cast(synthetic_ct(), sitk.sitkFloat32)
    image.SetSpacing((0.8, 0.8, 2.5))
    image += sitk.Cast(sitk.AdditiveGaussianNoise(image * 0, 12.0, 0.0, 1), sitk.sitkFloat32)
    target = (2.0, 2.0, 3.0)
    sigma = np.sqrt(np.square(target[0]) - np.square(image.GetSpacing()[0])) / 2.355 / image.GetSpacing()[0]
    expected = sitk.GetArrayFromImage(image)
    for axis in (2, 1):  # x, then y, in array order (z, y, x)
        expected = ndimage.gaussian_filter1d(expected, sigma, axis=axis, mode="nearest", truncate=4.0)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        for count in (1, 2, 3):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
            smoothed = sitk.GetArrayFromImage(antialias(image, target))
            assert np.array_equal(smoothed, expected), f"{count} threads"
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    assert not np.array_equal(smoothed, sitk.GetArrayFromImage(image)), "nothing was smoothed"
    recursive = sitk.GetArrayFromImage(gaussian_only(image, target))
    difference = np.abs(smoothed - recursive).mean() / np.ptp(recursive)
    assert difference < 0.001, difference


def reoriented(image, axes, signs):
    """`image`'s voxels with index axis a running along physical axis axes[a], in the sense signs[a]."""
    direction = np.zeros((3, 3))
    direction[list(axes), [0, 1, 2]] = signs
    image = sitk.Image(image)
    image.SetDirection(direction.ravel().tolist())
    return image


@pytest.mark.parametrize("spacing", [(4.0, 4.0, 4.0), (2.0, 2.0, 3.0)], ids=["whole-CT stage", "fine stage"])
@pytest.mark.parametrize("axes, signs", [((0, 1, 2), (1, 1, 1)), ((0, 1, 2), (-1, -1, 1)), ((2, 0, 1), (1, -1, -1))],
                         ids=["LPS", "RAS", "permuted"])
def test_one_matrix_per_axis_resamples_as_the_filters_do(spacing, axes, signs):
    """The canonical grid from one small matrix per axis (block averaging, the Gaussian, linear interpolation) is
    what ITK's filters give, whatever the axis order and flips: over the whole image, over a region, and on a grid
    partly outside the image (the default value there)."""
    image = reoriented(synthetic_ct(size=(120, 110, 40), spacing=(0.8, 0.8, 2.5)), axes, signs)
    lower, upper = preprocessing.physical_bounds(image)
    beyond = canonical_reference(image, spacing)
    # 15.3 mm: no point on the image's edge, where rounding alone decides between the edge voxel and the default.
    beyond.SetOrigin([float(o) + 15.3 for o in beyond.GetOrigin()])
    for grid in (canonical_reference(image, spacing), beyond,
                 canonical_reference(image, spacing, (lower + 0.3 * (upper - lower), lower + 0.8 * (upper - lower)))):
        filtered = preprocessing.antialias(sitk.Cast(preprocessing.covering(image, grid, spacing), sitk.sitkFloat32),
                                           spacing)
        expected = to_array(resample(filtered, grid, sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
        separable = preprocessing.separable_resample(image, grid, spacing, -1000.0)
        assert separable.shape == expected.shape and np.any(expected > 0)
        assert grid is not beyond or np.count_nonzero(expected == -1000.0) > 0.1 * expected.size  # the default
        np.testing.assert_allclose(separable, expected, atol=1e-3)  # HU, of a range over 1000


def test_oblique_or_unsmoothed_images_are_left_to_the_filters():
    image = synthetic_ct(size=(120, 110, 40), spacing=(0.8, 0.8, 2.5))
    oblique = sitk.Image(image)
    oblique.SetDirection(sitk.VersorTransform((0, 0, 1), 0.3).GetMatrix())
    assert preprocessing.separable_resample(oblique, canonical_reference(oblique, (2.0, 2.0, 3.0)), (2.0, 2.0, 3.0),
                                            -1000.0) is None
    finer = (0.5, 0.5, 2.0)  # upsampling: nothing to smooth
    assert preprocessing.separable_resample(image, canonical_reference(image, finer), finer, -1000.0) is None
    array, grid = preprocessing.to_canonical(oblique, (2.0, 2.0, 3.0), {"type": "ct", "window": [-1000, 1000]})
    assert array.shape == tuple(grid.GetSize()) and np.any(array > 0)


def test_a_stage_is_brought_onto_the_next_stages_grid_as_itk_resamples_it():
    """Blending: a stage's probabilities on the next stage's (finer, smaller) grid, one matrix per axis, are what ITK's
    linear resampling gives, and 0 where that grid reaches beyond the stage's."""
    image = synthetic_ct(size=(60, 50, 30), spacing=(2.0, 2.0, 3.0))
    source = canonical_reference(image, (2.0, 2.0, 3.0))
    probabilities = np.random.default_rng(3).random(tuple(source.GetSize())).astype(np.float32)
    lower, upper = preprocessing.physical_bounds(source)
    inside = canonical_reference(image, (1.5, 1.5, 3.0), (lower + 0.2 * (upper - lower), lower + 0.7 * (upper - lower)))
    beyond = canonical_reference(image, (1.5, 1.5, 3.0))
    beyond.SetOrigin([float(o) + 7.3 for o in beyond.GetOrigin()])
    for target in (inside, beyond):
        expected = to_array(resample(preprocessing.from_array(probabilities, source, np.float32), target))
        interpolated = preprocessing.interpolate(probabilities, preprocessing.interpolation_operators(source, target))
        assert interpolated.shape == expected.shape
        np.testing.assert_allclose(interpolated, expected, atol=1e-6)
    assert np.count_nonzero(expected == 0) > 0.1 * expected.size  # beyond the stage's grid


def test_networks_preloaded_while_the_input_is_read_serve_one_run(tiny_models_dir):
    key = ("spleen", "cpu", "fp32", tiny_models_dir)
    engine.preload(*key)
    assert key in engine._preloaded
    result = segment([synthetic_ct()], "spleen", device="cpu", precision="fp32", models_dir=tiny_models_dir)
    assert result.precision == "fp32" and not engine._preloaded
    engine.preload(*key)
    engine.discard_preloads()  # the input could not be read: nothing is left loading
    assert not engine._preloaded
    engine.preload("no such task", "cpu", "fp32", tiny_models_dir)  # left for segment() to report
    assert not engine._preloaded


def test_blas_leaves_the_network_loader_a_core_until_the_networks_are_ready(tiny_models_dir):
    """While the loader imports PyTorch, numpy's BLAS runs one thread fewer (2 -> 1 here), and the caller's
    result() gives it back; a loader with PyTorch imported already leaves BLAS alone."""
    output = run_fresh_python(f"""
        import json
        from threadpoolctl import threadpool_info
        from MSDSegmentLib import engine, modelcard

        numpy_blas = [library["filepath"] for library in threadpool_info() if library["user_api"] == "blas"]

        def blas_threads():
            return [library["num_threads"] for library in threadpool_info() if library["filepath"] in numpy_blas]

        card = modelcard.find_card("spleen", {str(tiny_models_dir)!r})
        threads = [blas_threads()]
        loader = engine.NetworkLoader(card, "cpu", "fp32")
        threads.append(blas_threads())
        loader.result()
        threads.append(blas_threads())
        again = engine.NetworkLoader(card, "cpu", "fp32")
        threads.append(blas_threads())
        again.result()
        loader.close()
        again.close()
        print(json.dumps(threads))
    """, OPENBLAS_NUM_THREADS="2")
    threads = json.loads(output)
    if threads[0] != [2]:
        pytest.skip(f"needs numpy's BLAS on two threads (here {threads[0]}): two cores, and a BLAS threadpoolctl "
                    "controls (not Accelerate on macOS)")
    assert threads == [[2], [1], [2], [2]]


def test_a_wider_network_takes_fewer_windows_at_once():
    """One batch's activations stay the size of the fine stage's 2 windows: the wide stages, with twice the
    feature maps, take 1 (peak memory; see docs/speed.md), every other shipped stage 2."""
    stages = {stage.model: stage for card in modelcard.catalogue().values() for stage in card.stages}
    batches = {model: windows_per_batch(stage.network["filters"], stage.patch_size) for model, stage in stages.items()}
    assert batches == {"abdomen": 2, "abdomen-fine": 2, "abdomen-wide": 1, "abdomen-neighbours": 2,
                       "pancreas-wide": 1, "pancreas-fine": 2, "liver-fine": 2, "prostate": 2}
    assert windows_per_batch([64, 128], [128, 128, 128]) == 1


def run_fresh_python(code, **variables):
    """`code` run by a fresh interpreter with the engine on its path (MONAI's imports happen once per process), and
    environment `variables` besides this process's."""
    engine_dir = os.path.dirname(os.path.dirname(modelcard.__file__))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([engine_dir, os.environ.get("PYTHONPATH", "")]),
                       **variables)
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


TINY_NETWORK = "{'in_channels': 1, 'out_channels': 2, 'kernel_sizes': [[3, 3, 3]] * 3, " \
               "'strides': [[1, 1, 1], [2, 2, 2], [2, 2, 2]], 'filters': [4, 8, 8]}"


def test_the_engine_s_processes_import_monai_without_the_extras_it_does_not_use():
    """The network and the sliding window work; the plotting, reader and configuration packages MONAI would have
    imported, SciPy among them, are not imported; all of them stay importable."""
    output = run_fresh_python(f"""
        import sys
        import torch
        from MSDSegmentLib import network
        from MSDSegmentLib.inference import inferer_for
        network.leave_out_monai_extras()
        model = network.build_network({TINY_NETWORK}).eval()
        with torch.inference_mode():
            result = inferer_for([8, 8, 8], 0.5, 2)(torch.zeros(1, 1, 12, 10, 8), model)
        print(tuple(result.shape))
        print(sorted(name for name in sys.modules if name.split(".")[0] in network.MONAI_EXTRAS))
        import matplotlib.pyplot, nibabel, scipy.ndimage, scipy.signal, scipy.sparse, yaml  # noqa: F401
        print("importable")
    """)
    assert output.splitlines() == ["(1, 2, 12, 10, 8)", "[]", "importable"]


def test_the_extras_are_absent_only_to_the_thread_that_imports_monai():
    """The loader thread imports MONAI while the main thread prepares the input with SciPy: SciPy is absent to the
    first (what the main thread imported meanwhile excepted) and imports as usual in the second."""
    output = run_fresh_python("""
        import sys, threading
        from MSDSegmentLib.network import AbsentInThisThread

        def attempt(name):
            try:
                __import__(name)
                return "imported"
            except ModuleNotFoundError:
                return "absent"

        steps, made, imported = [], threading.Event(), threading.Event()

        def loader():
            sys.meta_path.insert(0, AbsentInThisThread(["scipy"]))
            made.set()
            steps.append(attempt("scipy.ndimage"))
            imported.wait()
            steps.extend([attempt("scipy.ndimage"), attempt("scipy.sparse")])

        thread = threading.Thread(target=loader)
        thread.start()
        made.wait()
        steps.append("main " + attempt("scipy.ndimage"))
        imported.set()
        thread.join()
        print(steps)
    """)
    assert output.strip() == "['absent', 'main imported', 'imported', 'absent']"


def test_a_monai_that_needs_one_of_the_extras_is_imported_whole():
    """Simulated with PyTorch marked an extra: MONAI cannot import without it, and is imported again with it."""
    output = run_fresh_python(f"""
        import sys
        from MSDSegmentLib import network
        network.MONAI_EXTRAS = ("torch",)
        network.leave_out_monai_extras()
        model = network.build_network({TINY_NETWORK})
        print(type(model).__name__, sys.modules["torch"] is not None, "matplotlib.pyplot" in sys.modules)
    """)
    assert output.split() == ["DynUNet", "True", "True"]
