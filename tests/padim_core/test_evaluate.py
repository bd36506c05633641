"""The evaluate command: accuracy on real data, its JSON report, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from padim_core.config import load_config
from padim_core.datasets import MvtecCategory
from padim_core.demo_data import build_demo_dataset
from padim_core.evaluate import evaluate_category, main

from support.paths import DEMO_CONFIG

REPORTED = {
    "image_auroc", "pixel_auroc", "aupro", "threshold", "n_train", "n_test",
    "fit_images_per_second", "predict_images_per_second", "peak_rss_mb",
}


@pytest.mark.slow
def test_bottle_accuracy_matches_the_paper_setting(mvtec_root):
    """efficientnet_lite0 at 256x256 on the real bottle category."""
    config = load_config(None, ["padim.backbone=efficientnet_lite0", "padim.image_size=256"])
    evaluation = evaluate_category(MvtecCategory.from_folder(mvtec_root / "bottle"), config)
    metrics = evaluation.metrics
    assert metrics["n_train"] == 209 and metrics["n_test"] == 83
    assert metrics["image_auroc"] >= 0.99
    assert metrics["pixel_auroc"] >= 0.97
    assert metrics["aupro"] >= 0.85
    # The threshold separates the classes about as well as the AUROC promises.
    flagged = evaluation.model.is_anomalous(evaluation.scores)
    assert (flagged == (evaluation.labels == 1)).mean() >= 0.95
    assert evaluation.model.threshold_ == metrics["threshold"] and metrics["threshold_method"] == "F1-optimal on the test split"
    assert evaluation.model.calibration_.scores == tuple(sorted(evaluation.scores[evaluation.labels == 0].tolist()))


@pytest.fixture(scope="module")
def demo_category(tmp_path_factory):
    root = build_demo_dataset(tmp_path_factory.mktemp("demo") / "data", train=12, test_good=4, test_defect=2, size=64)
    return root / "brick"


@pytest.mark.slow
def test_command_prints_and_writes_every_figure(demo_category, tmp_path):
    report = tmp_path / "out" / "brick.json"
    result = subprocess.run(
        [sys.executable, "-m", "padim_core.evaluate", str(demo_category), "--config", str(DEMO_CONFIG),
         "--image-size", "64", "--json", str(report)],
        capture_output=True, text=True, check=True,
    )
    figures = json.loads(report.read_text())
    assert REPORTED <= set(figures)
    assert "not read by padim-evaluate (they configure the jobs): fit, output, scoring, tasks, tracking" in result.stderr
    assert figures["n_train"] == 12 and figures["n_test"] == 4 + 4 * 2
    assert 0.5 < figures["image_auroc"] <= 1.0
    for key in REPORTED:
        assert key in result.stdout


def test_command_names_a_bad_folder_and_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("padim-evaluate: error: ") and str(tmp_path / "nowhere") in error


def test_command_names_a_bad_backbone_and_exits_2(demo_category, capsys):
    assert main([str(demo_category), "--backbone", "vgg16"]) == 2
    error = capsys.readouterr().err
    assert "padim.backbone" in error and "vgg16" in error and "efficientnet_lite0" in error


def test_command_names_an_unknown_detector_and_exits_2(demo_category, capsys):
    assert main([str(demo_category), "--detector", "nope"]) == 2
    assert "detector: 'nope' is not allowed; allowed: [" in capsys.readouterr().err
