"""GPU memory: the adaptive sliding-window inferer moves the blended output off the GPU when it does not fit
there, and what still does not fit runs on the CPU. Both out-of-memory errors are simulated: this machine has no
GPU, so the input is made to look like a GPU tensor and the error is raised where a GPU would raise it."""

import inspect

import numpy as np
import pytest
import torch

from MSDSegmentLib import engine, inference
from MSDSegmentLib.errors import MSDSegmentError
from MSDSegmentLib.network import build_network

NETWORK = {"in_channels": 1, "out_channels": 3, "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2],
                                                                                          [2, 2, 2]],
           "filters": [4, 8, 8]}


def small_case():
    torch.manual_seed(0)
    network = build_network(NETWORK).eval()
    image = np.random.default_rng(0).standard_normal((1, 40, 36, 20)).astype(np.float32)
    return network, image


def simulated_oom(message="CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"):
    kind = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return kind(message)


def test_an_output_buffer_too_large_for_the_gpu_is_blended_in_memory_with_the_same_result(monkeypatch):
    from monai.inferers import inferer as monai_inferer

    network, image = small_case()
    inference._inferers.clear()
    expected = inference.predict_probabilities(network, image, [16, 16, 16], overlap=0.5)

    original = monai_inferer.sliding_window_inference
    attempts = []

    def sliding_window(*args, **kwargs):
        buffered = inspect.signature(original).bind(*args, **kwargs).arguments.get("buffer_steps") is not None
        attempts.append("buffered on the CPU" if buffered else "on the GPU")
        if not buffered:  # the output buffer on the GPU: allocating it fails
            raise simulated_oom()
        return original(*args, **kwargs)

    monkeypatch.setattr(monai_inferer, "sliding_window_inference", sliding_window)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the input "is" on a GPU
    inference._inferers.clear()
    adapted = inference.predict_probabilities(network, image, [16, 16, 16], overlap=0.5)
    monkeypatch.undo()
    assert attempts == ["on the GPU", "buffered on the CPU"]
    np.testing.assert_allclose(adapted, expected, atol=1e-5)  # blended slab by slab: the same sums, in another order
    inference._inferers.clear()


def test_a_network_that_does_not_fit_on_the_gpu_runs_on_the_cpu(monkeypatch, tmp_path):
    """The inferer's own fallbacks exhausted, the out-of-memory error reaches the engine, which reruns the stage
    on the CPU and says so; any other error is not mistaken for it, whatever its text."""
    network, image = small_case()
    stage = type("Stage", (), {"mirror_axes": [], "patch_size": [16, 16, 16], "overlap": 0.5, "network": NETWORK})()
    devices, messages = [], []

    def predict(net, array, patch_size, device, *args, **kwargs):
        devices.append(device)
        if device == "cuda":
            raise simulated_oom()
        return inference.predict_probabilities(net, array, patch_size, device, *args, **kwargs)

    monkeypatch.setattr(engine, "network_for", lambda stage, device: network)
    monkeypatch.setattr(engine, "predict_probabilities", predict)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    probabilities, device = engine.run_network(stage, image, "cuda", False, lambda f, text: messages.append(text),
                                               None, "fp16")
    assert devices == ["cuda", "cpu"] and device == "cpu"
    assert "GPU out of memory: running on the CPU instead" in messages
    assert np.array_equal(probabilities, inference.predict_probabilities(network, image, [16, 16, 16]))

    def other_error(*args, **kwargs):
        raise RuntimeError("the text says out of memory but it is another error")

    monkeypatch.setattr(engine, "predict_probabilities", other_error)
    with pytest.raises(RuntimeError, match="another error"):
        engine.run_network(stage, image, "cuda", False, lambda f, text: None, None)


def test_out_of_memory_is_recognised_by_its_type():
    assert inference.out_of_memory(simulated_oom())
    assert not inference.out_of_memory(RuntimeError("CUDA out of memory"))
    assert not inference.out_of_memory(MSDSegmentError("out of memory"))
