"""What a fit leaves in its child run: the score table, the ROC curve, the histogram, heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.common.evaluation_report import heatmap_sample, write_category_artifacts
from padim_core.calibration import Calibration
from padim_core.evaluate import Evaluation
from padim_core.manifest import SplitManifest
from padim_core.padim import PadimModel

from support.images import noise_png


@pytest.mark.parametrize(
    ("labels", "count", "normal", "defective"),
    [([0] * 5 + [1] * 10, 4, 2, 2), ([0] * 1 + [1] * 10, 4, 1, 3), ([0] * 6, 4, 4, 0), ([0, 1], 0, 0, 0)],
)
def test_heatmap_sample_mixes_normal_and_defective(labels: list[int], count: int, normal: int, defective: int) -> None:
    labels = np.array(labels)
    chosen = heatmap_sample(labels, count)
    assert len(chosen) == len(set(chosen)) == normal + defective
    assert (labels[chosen] == 0).sum() == normal and (labels[chosen] == 1).sum() == defective


def test_defective_heatmaps_spread_over_the_group() -> None:
    labels = np.array([0] * 4 + [1] * 9)
    assert heatmap_sample(labels, 4) == [0, 3, 4, 12]


def evaluation_of(model: PadimModel, folder: Path, calibrated: bool) -> Evaluation:
    """Four scored test images (two normal, two defective) as padim_core.evaluate returns them."""
    sources, defects = [], ["good", "good", "hole", "crack"]
    for index, defect in enumerate(defects):
        sources.append(folder / defect / f"{index:03d}.png")
        sources[-1].parent.mkdir(parents=True, exist_ok=True)
        sources[-1].write_bytes(noise_png(48, seed=index))
    scores, maps = model.predict(torch.stack([model.transform.to_pixels(path) for path in sources]))
    scores, maps = scores.numpy(), maps.numpy()
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros(maps.shape, dtype=bool)
    masks[2:, 10:20, 10:20] = True
    if calibrated:  # on the two normal images: both at or below the threshold, their maximum
        model.calibrate(Calibration.conformal(scores[:2], false_alarm_rate=1 / 3),
                        map_min=float(maps.min()), map_max=float(maps.max()))
    metrics = {"image_auroc": 0.75 if calibrated else None}
    split = SplitManifest("brick", folder, "fixed", (), (), ())
    return Evaluation(model, split, metrics, sources, defects, labels, scores, maps, masks)


def test_a_calibrated_category_gets_every_artifact(tiny_padim_file: bytes, tmp_path: Path) -> None:
    evaluation = evaluation_of(PadimModel.load(tiny_padim_file), tmp_path / "test", calibrated=True)
    folder = tmp_path / "artifacts"
    write_category_artifacts(evaluation, "brick", folder, heatmap_examples=2)
    table = pq.read_table(folder / "scores.parquet").to_pandas()
    assert list(table.columns) == ["source", "category", "detector", "defect", "label", "image_score", "p_value",
                                   "is_anomalous", "threshold"]
    assert table["source"].tolist() == [str(path) for path in evaluation.sources]
    assert set(table["category"]) == {"brick"} and set(table["detector"]) == {"padim"}
    np.testing.assert_allclose(table["image_score"], evaluation.scores, rtol=1e-6)
    threshold = evaluation.model.threshold_
    assert (table["threshold"] == threshold).all()
    assert table["is_anomalous"].tolist() == (evaluation.scores > threshold).tolist()
    assert table["p_value"].tolist() == evaluation.model.calibration_.p_values(evaluation.scores).tolist()
    assert (table["is_anomalous"] == (table["p_value"] <= 1 / 3)).all()
    for name in ("roc_curve.png", "score_histogram.png"):
        assert Image.open(folder / name).format == "PNG"
    heatmaps = sorted(path.name for path in (folder / "heatmaps").iterdir())
    assert heatmaps == ["good_000.png", "hole_002.png"]  # one normal, one defective
    assert Image.open(folder / "heatmaps" / "hole_002.png").size == (64, 64)


def test_an_uncalibrated_category_without_auroc_gets_scores_and_no_roc(tiny_padim_file: bytes, tmp_path: Path) -> None:
    evaluation = evaluation_of(PadimModel.load(tiny_padim_file), tmp_path / "test", calibrated=False)
    folder = tmp_path / "artifacts"
    write_category_artifacts(evaluation, "brick", folder, heatmap_examples=0)
    table = pq.read_table(folder / "scores.parquet").to_pandas()
    assert table["is_anomalous"].isna().all() and table["threshold"].isna().all() and table["p_value"].isna().all()
    assert sorted(path.name for path in folder.iterdir()) == ["score_histogram.png", "scores.parquet"]
