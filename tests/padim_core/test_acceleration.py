"""Device choice and the traced, frozen modules that only change speed, never results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from padim_core.acceleration import optimize_for_inference, resolve_device


def test_devices_resolve_and_a_missing_gpu_is_a_clear_error() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda requested but CUDA is not available"):
            resolve_device("cuda")


def test_an_optimised_module_gives_the_eager_results_for_any_batch_size() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    example = torch.randn(4, 3, 16, 16)
    fast = optimize_for_inference(module, example)
    for batch in (torch.randn(1, 3, 16, 16), torch.randn(5, 3, 16, 16)):
        with torch.no_grad():
            torch.testing.assert_close(fast(batch), module(batch), rtol=1e-4, atol=1e-5)


def test_a_module_that_cannot_be_traced_runs_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    class Untraceable(nn.Module):
        def forward(self, images: torch.Tensor) -> dict:
            return {"sum": images.sum()} if images.sum() > 0 else {"sum": -images.sum()}

    fast = optimize_for_inference(Untraceable(), torch.ones(1, 3, 4, 4))
    assert fast(torch.ones(2, 3, 4, 4))["sum"].item() == 96
    assert fast(-torch.ones(1, 3, 4, 4))["sum"].item() == 48  # a trace would have kept the first branch
    assert "could not trace Untraceable" in caplog.text
