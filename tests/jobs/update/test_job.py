"""jobs.update: refusals before any work (the existing files untouched), and end to end through
`ray job submit` and `mlflow server`: a promoted update, and one that makes the model worse."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import ray

from jobs.common.catalog import model_path, statistics_path
from jobs.common.config import load_job_config
from jobs.update import job as update
from padim_core.datasets import MvtecCategory
from padim_core.demo_data import build_demo_dataset
from padim_core.loader import image_batches
from padim_core.statistics import write_statistics

from support.paths import BIN, DEMO_CONFIG, REPO_ROOT
from support.servers import Cluster, running_cluster

SMALL = ["padim.image_size=32", "padim.layers=[blocks.1, blocks.2]", "padim.n_features=16"]


@pytest.fixture
def demo_root(tmp_path: Path) -> Path:
    return build_demo_dataset(tmp_path / "data", train=6, test_good=1, test_defect=1, size=32)


@pytest.fixture
def fitted(demo_root: Path, tmp_path: Path) -> Path:
    """A padim-fit output folder for brick (model, statistics, manifest), made without Ray."""
    config = load_job_config(DEMO_CONFIG, SMALL)
    split = config.calibration.split(MvtecCategory.from_folder(demo_root / "brick"), 2)
    model = config.build_detector("padim", "cpu")
    sums = model.accumulate(image_batches(split.paths("fit"), model.transform.to_pixels, 8))
    model.fit_accumulator(sums)
    output = tmp_path / "out"
    model.save(model_path(output / "models", "padim", "brick"))
    write_statistics(statistics_path(output / "models", "padim", "brick"), sums, model, split.to_dict())
    split.save(output / "manifests" / "brick.json")
    return output


def refused(demo_root: Path, fitted: Path, images: Path, capsys: pytest.CaptureFixture[str], *settings: str) -> str:
    def files() -> dict[Path, tuple[bytes, int]]:  # the local tracking store aside
        return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in fitted.rglob("*")
                if path.is_file() and path.name != "mlflow.db"}

    before = files()
    overrides = [item for setting in (*SMALL, *settings) for item in ("--set", setting)]
    code = update.main(["--config", str(DEMO_CONFIG), "--data-root", str(demo_root), "--categories", "brick",
                        "--output", str(fitted), "--new-images", str(images), *overrides])
    assert code == 2
    assert files() == before  # nothing written, nothing replaced
    return capsys.readouterr().err


def test_updates_are_refused_before_any_work(demo_root: Path, fitted: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    images = tmp_path / "new"
    (images / "brick").mkdir(parents=True)
    error = refused(demo_root, fitted, images, capsys)
    assert f"no images for category 'brick' in {images / 'brick'}" in error and "(nothing was started)" in error
    shutil.copy(demo_root / "grass" / "train" / "good" / "000.png", images / "brick" / "new.png")
    model = model_path(fitted / "models", "padim", "brick")
    for setting, named in (("padim.image_size=64", "image_size [32, 32] (expected [64, 64])"),
                           ("padim.layers=[blocks.1, blocks.3]", "layers"), ("padim.seed=1", "the channel index"),
                           ("padim.backbone=resnet18", "backbone 'efficientnet_lite0'")):
        error = refused(demo_root, fitted, images, capsys, setting, *(["padim.layers=null", "padim.pretrained=false"] if "backbone" in setting else []))
        assert f"{model}: the model was fitted with other embeddings" in error and named in error
    shutil.copy(demo_root / "brick" / "test" / "good" / "000.png", images / "brick" / "test.png")
    assert "new images of 'brick' are in its split already" in refused(demo_root, fitted, images, capsys)
    (images / "brick" / "test.png").unlink()
    statistics_path(fitted / "models", "padim", "brick").unlink()
    assert f"{model}: a PaDiM model without its statistics" in refused(demo_root, fitted, images, capsys)
    assert not ray.is_initialized()


def test_promotion_rule() -> None:
    assert update.promotion(0.95, 0.941, 0.01)[0] and not update.promotion(0.95, 0.939, 0.01)[0]
    assert "fell from 0.9500 to 0.9000" in update.promotion(0.95, 0.90, 0.01)[1]
    assert not update.promotion(None, 0.9, 0.01)[0]


@pytest.mark.slow
def test_ray_job_submit_fit_then_updates_one_promoted_one_not(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    data = build_demo_dataset(tmp_path / "data", train=6, test_good=3, test_defect=2, size=64)
    fresh = build_demo_dataset(tmp_path / "fresh", train=6, test_good=0, test_defect=0, size=64, seed=1)
    # The test split's own defects, built again at 80 px (other bytes, the same crops and defects),
    # passed off as normal: the model learns them and must get worse.
    again = build_demo_dataset(tmp_path / "again", train=1, test_good=0, test_defect=2, size=80)
    good, bad = tmp_path / "good", tmp_path / "bad"
    shutil.copytree(fresh / "brick" / "train" / "good", good / "brick")
    for defect in (again / "brick" / "test").iterdir():
        shutil.copytree(defect, bad / "brick" / defect.name)
    output = tmp_path / "out"
    common = ["--config", "configs/demo.yaml", "--data-root", str(data), "--output", str(output), "--categories", "brick",
              "--set", "padim.image_size=64", "--set", "fit.heatmap_examples=0", "--set", "data.batch_size=8",
              "--set", "tracking.experiment=padim-update-e2e"]

    def submit(cluster: Cluster, module: str, *arguments: str) -> str:
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO_ROOT),
             "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": cluster.tracking_uri}}),
             "--", "python", "-m", module, *common, *arguments],
            env=cluster.env, capture_output=True, text=True, check=False, timeout=420)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-5000:]
        return log

    with running_cluster(tmp_path) as cluster:
        began = time.monotonic()
        submit(cluster, "jobs.fit")
        assert statistics_path(output / "models", "padim", "brick").is_file()
        log = submit(cluster, "jobs.update", "--new-images", str(good), "--from", "registry")
        assert "6 images added to version 1: version 2 promoted" in log
        log = submit(cluster, "jobs.update", "--new-images", str(bad), "--set", "update.max_auroc_drop=0")
        assert "version 3 NOT promoted: image AUROC fell from" in log
        print(f"fit and two updates took {time.monotonic() - began:.0f} s")
        client = MlflowClient(cluster.tracking_uri, registry_uri=cluster.tracking_uri)
        assert client.get_model_version_by_alias("padim-brick", "champion").version == "2"
        second, third = client.get_model_version("padim-brick", "2"), client.get_model_version("padim-brick", "3")
        run = client.get_run(second.run_id)
        assert run.data.params["parent_version"] == "1" and run.data.tags["parent_version"] == "1"
        assert run.data.params["n_added"] == "6" and run.data.tags["promoted"] == "true"
        assert {"before_image_auroc", "image_auroc", "before_pixel_auroc", "pixel_auroc"} <= set(run.data.metrics)
        added = Path(client.download_artifacts(second.run_id, "added_images.txt", str(tmp_path))).read_text().split()
        assert sorted(Path(path).name for path in added) == sorted(path.name for path in (good / "brick").iterdir())
        worse = client.get_run(third.run_id)
        assert worse.data.params["parent_version"] == "2" and worse.data.tags["promoted"] == "false"
        assert worse.data.metrics["image_auroc"] < worse.data.metrics["before_image_auroc"]
        assert (output / "candidates" / "models" / "padim" / "brick.safetensors").is_file()
        summary = json.loads((output / "update.json").read_text())["categories"]["brick/padim"]
        assert summary["promoted"] is False and "more than update.max_auroc_drop 0" in summary["reason"]
