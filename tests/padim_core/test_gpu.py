"""The CUDA paths of padim_core give the CPU's figures. Skipped where there is no GPU (as in CI);
run on a GPU machine with `pytest tests/padim_core/test_gpu.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from padim_core.acceleration import resolve_device
from padim_core.calibration import Calibration
from padim_core.detector import load_detector
from padim_core.gaussian import GaussianAccumulator
from padim_core.padim import PadimModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SIZE = 96


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_auto_picks_the_gpu() -> None:
    assert resolve_device("auto").type == "cuda"


def test_gaussian_on_the_gpu_equals_the_cpu() -> None:
    embeddings = torch.randn(40, 16, 12, generator=torch.Generator().manual_seed(0))  # [L, B, C]
    results = []
    for device in ("cpu", "cuda"):
        accumulator = GaussianAccumulator.empty((5, 8), 12, device=device)
        for chunk in embeddings.split(5, dim=1):
            accumulator.update(chunk.to(device))
        mean, inverse = accumulator.finalize(0.01)
        results.append((mean.cpu(), inverse.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-4)


def test_fit_and_predict_on_the_gpu_match_the_cpu(tmp_path: Path) -> None:
    """Close, not equal: cuDNN runs convolutions in TF32 by default (about 1e-3 relative)."""
    train, test = [images(8, seed) for seed in range(3)], images(5, 10)
    figures = {}
    for device in ("cpu", "cuda"):
        model = PadimModel("efficientnet_lite0", n_features=40, image_size=SIZE, device=device)
        model.fit(train)
        scores, maps = model.predict(test)
        figures[device] = (model, scores, maps)
    cpu, gpu = figures["cpu"], figures["cuda"]
    assert gpu[0].mean_.device.type == "cuda" and gpu[1].device.type == "cpu"  # results come back to the CPU
    torch.testing.assert_close(gpu[0].mean_.cpu(), cpu[0].mean_, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gpu[2], cpu[2], rtol=1e-2, atol=5e-2)
    # A model fitted on the GPU loads on the CPU and on the GPU, giving that GPU's numbers.
    saved = gpu[0].save(tmp_path / "gpu.safetensors")
    torch.testing.assert_close(PadimModel.load(saved, device="cpu").predict(test)[1], cpu[2], rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(load_detector(saved.read_bytes(), device="cuda").predict(test)[1], gpu[2], rtol=1e-4, atol=1e-4)


def test_shift_figures_on_the_gpu_match_the_cpu(tmp_path: Path) -> None:
    from padim_core.datasets import MvtecCategory
    from padim_core.demo_data import build_demo_dataset
    from padim_core.loader import image_batches
    from padim_core.robustness import evaluate_shifts, load_test_split

    root = build_demo_dataset(tmp_path / "data", train=12, test_good=4, test_defect=2, size=96)
    category = MvtecCategory.from_folder(root / "brick")
    results = {}
    for device in ("cpu", "cuda"):
        model = PadimModel("efficientnet_lite0", n_features=40, image_size=SIZE, device=device)
        model.fit(image_batches(category.train_images, model.transform.to_pixels, batch_size=8, workers=2))
        split = load_test_split(category, model.transform, 8, 2)
        scores = model.predict(split.images)[0]
        model.calibrate(Calibration("median", float(scores.median()), tuple(sorted(scores.tolist()))))
        results[device] = evaluate_shifts(model, split, {"blur": [4.0], "noise": [0.1]}, seed=0, batch_size=8)
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        assert (cpu.shift, cpu.severity) == (gpu.shift, gpu.severity)
        assert np.isclose(cpu.image_auroc, gpu.image_auroc, atol=0.02)
        assert np.isclose(cpu.pixel_auroc, gpu.pixel_auroc, atol=0.01)


def test_patchcore_on_the_gpu_matches_the_cpu() -> None:
    """The whole bank (ratio 1.0) on both devices: the same patches up to TF32 convolutions; a
    coreset fit runs its greedy loop on the GPU and keeps its share of the patches."""
    from padim_core.patchcore import PatchcoreModel

    train, test = [images(6, seed) for seed in range(2)], images(4, 10)
    figures = {}
    for device in ("cpu", "cuda"):
        model = PatchcoreModel("efficientnet_lite0", image_size=SIZE, coreset_ratio=1.0, device=device).fit(train)
        figures[device] = (model, *model.predict(test))
    cpu, gpu = figures["cpu"], figures["cuda"]
    assert gpu[0].memory_bank_.device.type == "cuda" and gpu[1].device.type == "cpu"
    torch.testing.assert_close(gpu[0].memory_bank_.cpu(), cpu[0].memory_bank_, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(gpu[2], cpu[2], rtol=1e-2, atol=5e-2)
    coreset = PatchcoreModel("efficientnet_lite0", image_size=SIZE, coreset_ratio=0.1, chunk_patches=500,
                             device="cuda").fit(train)
    patches = 12 * (SIZE // 8) ** 2
    assert abs(coreset.memory_bank_.shape[0] - 0.1 * patches) <= -(-patches // 500)
