"""jobs.fit.shards: one category over several Ray tasks gives the same PaDiM model as one task."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from jobs.common.config import load_job_config
from jobs.fit.shards import ShardRequest, fit_sharded, shard_count, split
from padim_core.loader import image_batches
from padim_core.scoring import score_batch

pytestmark = pytest.mark.slow

SETTINGS = ["padim.image_size=64", "padim.layers=[blocks.1, blocks.2]", "padim.n_features=24",
            "patchcore.image_size=64", "patchcore.coreset_ratio=0.2", "data.batch_size=2"]


def test_shard_count_and_split() -> None:
    assert shard_count("auto", 10, 4) == 1 and shard_count("auto", 10_000, 32) == 3 and shard_count(4, 5, 2) == 3
    parts = split([Path(str(i)) for i in range(15)], 3, 2)  # 8 batches of 2 (the last of 1): 3, 3, 2 batches
    assert [len(part) for part in parts] == [6, 6, 3] and list(itertools.chain.from_iterable(parts)) == [Path(str(i)) for i in range(15)]


def test_a_sharded_padim_fit_equals_the_single_task_fit_for_any_split(mvtec_root: Path, ray_session: None) -> None:
    config = load_job_config(None, SETTINGS)
    images = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))[:15]
    test = sorted((mvtec_root / "bottle" / "test" / "broken_large").glob("*.png"))[:3]
    single = config.build_detector("padim", "cpu")
    single.fit(image_batches(images, single.transform.to_pixels, 2))
    pixels = torch.stack([single.transform.to_pixels(path) for path in test])
    expected = score_batch(single, pixels).scores
    request = ShardRequest(config, "padim", [str(path) for path in images], "cpu", 1)
    for shards in (1, 2, 3, 7):
        sharded = config.build_detector("padim", "cpu")
        merged = fit_sharded(sharded, request, shards, {"num_cpus": 1})
        assert merged.images == 15 and sharded.n_train_ == 15
        # float32 tolerance, on the scale of each tensor: shard tasks run torch on one thread, which
        # can round the last bits of a feature differently, and a near-singular covariance's
        # inverse magnifies that.
        scale = float(single.inv_covariance_.abs().max())
        torch.testing.assert_close(sharded.mean_, single.mean_, rtol=1e-5, atol=1e-6 * float(single.mean_.abs().max()))
        torch.testing.assert_close(sharded.inv_covariance_, single.inv_covariance_, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(torch.from_numpy(score_batch(sharded, pixels).scores), torch.from_numpy(expected), rtol=1e-4, atol=0)


def test_a_sharded_patchcore_bank_is_the_union_of_the_shards_coresets(mvtec_root: Path, ray_session: None) -> None:
    config = load_job_config(None, SETTINGS)
    images = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))[:6]
    detector = config.build_detector("patchcore", "cpu")
    merged = fit_sharded(detector, ShardRequest(config, "patchcore", [str(path) for path in images], "cpu", 1), 3, {"num_cpus": 1})
    patches = 6 * detector.grid_shape_[0] * detector.grid_shape_[1]
    assert detector.n_train_ == 6 and detector.memory_bank_.shape[0] == merged.bank.shape[0]
    assert abs(merged.bank.shape[0] - 0.2 * patches) <= 3  # each shard keeps its share, rounded
