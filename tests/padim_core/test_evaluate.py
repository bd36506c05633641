"""Evaluation: fit, conformal calibration on held-out normal images, test-split figures; the command,
its JSON report and split manifest, and its errors."""

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
    "image_auroc", "pixel_auroc", "aupro", "threshold", "false_alarm_rate", "realised_false_alarm_rate", "recall",
    "oracle_f1_threshold", "n_train", "n_calibration", "n_test", "fit_images_per_second", "predict_images_per_second",
    "peak_rss_mb",
}


@pytest.mark.slow
def test_bottle_accuracy_matches_the_paper_setting(mvtec_root):
    """efficientnet_lite0 at 256x256 on the real bottle category, fitted on 80% of train/good and
    calibrated on the other 20%: the test split plays no part in the model."""
    config = load_config(None, ["padim.backbone=efficientnet_lite0", "padim.image_size=256"])
    evaluation = evaluate_category(MvtecCategory.from_folder(mvtec_root / "bottle"), config)
    metrics = evaluation.metrics
    assert metrics["n_train"] == 167 and metrics["n_calibration"] == 42 and metrics["n_test"] == 83
    assert metrics["image_auroc"] >= 0.99
    assert metrics["pixel_auroc"] >= 0.97
    assert metrics["aupro"] >= 0.85
    calibration = evaluation.model.calibration_
    assert metrics["threshold_method"] == "conformal on 42 held-out normal images" and calibration.is_conformal
    assert metrics["false_alarm_rate"] == calibration.false_alarm_rate == 1 / 43  # 42 images cannot support 0.01
    assert evaluation.model.threshold_ == metrics["threshold"] == max(calibration.scores)
    held_out = set(evaluation.split.paths("calibration"))
    assert len(held_out) == 42 and not held_out & set(evaluation.split.paths("fit"))
    flagged = evaluation.model.is_anomalous(evaluation.scores)
    assert metrics["realised_false_alarm_rate"] == flagged[evaluation.labels == 0].mean() <= 0.1
    assert metrics["recall"] == flagged[evaluation.labels == 1].mean() >= 0.9
    assert metrics["oracle_f1_threshold"] != metrics["threshold"]


@pytest.fixture(scope="module")
def demo_category(tmp_path_factory):
    root = build_demo_dataset(tmp_path_factory.mktemp("demo") / "data", train=12, test_good=4, test_defect=2, size=64)
    return root / "brick"


@pytest.mark.slow
def test_command_prints_and_writes_every_figure(demo_category, tmp_path):
    report = tmp_path / "out" / "brick.json"
    result = subprocess.run(
        [sys.executable, "-m", "padim_core.evaluate", str(demo_category), "--config", str(DEMO_CONFIG),
         "--image-size", "64", "--json", str(report), "--manifest", str(tmp_path / "brick-split.json")],
        capture_output=True, text=True, check=True,
    )
    figures = json.loads(report.read_text())
    assert REPORTED <= set(figures)
    manifest = json.loads((tmp_path / "brick-split.json").read_text())
    assert (len(manifest["fit"]), len(manifest["calibration"]), len(manifest["test"])) == (10, 2, 12)
    assert "not read by padim-evaluate (they configure the jobs): drift, fit, output, scoring, tasks, tracking" in result.stderr
    assert figures["n_train"] == 10 and figures["n_calibration"] == 2 and figures["n_test"] == 4 + 4 * 2
    assert figures["false_alarm_rate"] == 1 / 3  # the smallest two calibration images support
    assert "brick: 2 calibration images support a false-alarm rate of at least 1/3 = 0.3333" in result.stderr
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



@pytest.mark.parametrize(("calibration", "message"), [
    ("false_alarm_rate: 0.05", "calibration.false_alarm_rate 0.05 needs at least 19 calibration images, got 2"),
    ("fraction: 0.99", "holds out 12 and leaves none to fit on"),
    ("manifest: nowhere.json", "split manifest nowhere.json for category 'brick' does not exist"),
])
def test_command_refuses_a_calibration_the_data_cannot_give_and_exits_2(demo_category, tmp_path, capsys, calibration, message):
    config = tmp_path / "config.yaml"
    config.write_text(f"calibration:\n  {calibration}\n")
    assert main([str(demo_category), "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("padim-evaluate: error: ") and message in error


@pytest.mark.slow
def test_patchcore_gets_a_conformal_threshold_too(demo_category):
    config = load_config(None, ["patchcore.image_size=64", "patchcore.coreset_ratio=0.5", "calibration.fraction=0.25"])
    evaluation = evaluate_category(MvtecCategory.from_folder(demo_category), config, "cpu", kind="patchcore")
    calibration = evaluation.model.calibration_
    assert evaluation.model.kind == "patchcore" and calibration.is_conformal and calibration.count == 3
    assert evaluation.metrics["threshold"] == max(calibration.scores) and evaluation.metrics["false_alarm_rate"] == 0.25
    assert evaluation.metrics["n_train"] == 9
