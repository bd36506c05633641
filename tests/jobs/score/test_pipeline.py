"""jobs.score.pipeline without a Ray cluster: the actor pool plan, and a scoring actor's rows."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from jobs.score import pipeline
from jobs.score.decoding import DECODED_SCHEMA
from jobs.score.pipeline import ModelHandle, RowOptions, ScoreActor, plan_pool
from jobs.score.table import row_schema
from padim_core.calibration import Calibration
from padim_core.errors import ConfigError
from padim_core.padim import PadimModel
from padim_core.scoring import score_batch

from support.models import SIZE, pixels


def test_pool_plan_shares_cpus_with_the_decoders_and_checks_gpus() -> None:
    one = plan_pool(1, 32, "auto", {"CPU": 2.0}, 2.0)
    assert (one.cpus, one.gpus, one.device, one.threads, one.decoders, one.readers) == (0.9, 0.0, "cpu", 1, 2, 1)
    two = plan_pool(2, 32, "auto", {"CPU": 2.0}, 2.0)
    assert (two.cpus, two.threads) == (0.45, 1)
    big = plan_pool(2, 32, 0, {"CPU": 64.0, "GPU": 4.0}, 16.0)  # an actor must fit on one 16-CPU node
    assert (big.cpus, big.threads, big.device, big.decoders, big.readers) == (7.95, 8, "cpu", 64, 8)
    gpu = plan_pool(2, 32, "auto", {"CPU": 8.0, "GPU": 2.0}, 8.0)
    assert (gpu.gpus, gpu.device, gpu.cpus) == (1.0, "cuda", 1.0)
    assert "2 scoring actors x (1 CPU, 1 GPU" in gpu.describe()
    with pytest.raises(ConfigError, match="scoring.actors=3"):
        plan_pool(3, 32, "auto", {"CPU": 8.0, "GPU": 2.0}, 8.0)
    with pytest.raises(ConfigError, match="scoring.num_gpus"):
        plan_pool(1, 32, 1, {"CPU": 8.0}, 8.0)


@pytest.fixture
def actor(tiny_padim_file: bytes, monkeypatch: pytest.MonkeyPatch) -> ScoreActor:
    """An actor scoring `bottle` with the tiny model, its file's bytes handed over as Ray would."""
    model = PadimModel.load(tiny_padim_file)
    scores = model.predict(pixels(4, seed=8))[0]
    model.calibrate(Calibration.conformal(scores, false_alarm_rate=0.5), map_min=0.0, map_max=10.0)
    monkeypatch.setattr(pipeline.ray, "get", lambda data: data)  # the object store is this process
    handle = ModelHandle("/m/padim/bottle.safetensors", "padim", model.threshold_, model.to_bytes())
    return ScoreActor({"bottle": handle}, device="cpu", threads=1, options=RowOptions(map_size=4, heatmaps=True))


def decoded(images: torch.Tensor, categories: list[str]) -> pa.Table:
    """Decoded rows as `decoding.decode_batch` gives them: HWC uint8 bytes at the model's size, original 900x600."""
    count = len(categories)
    arrays = [image.permute(1, 2, 0).numpy().tobytes() for image in images]
    return pa.table({
        "source": [f"/in/{index}.png" for index in range(count)], "category": categories, "input": [1] * count,
        "pixels": arrays[:count - 1] + [None], "height": [900] * count, "width": [600] * count,
        "error": [None] * (count - 1) + ["cannot decode image /in/last.png"], "skipped": [False] * count,
    }, schema=DECODED_SCHEMA)


def test_an_actor_scores_rows_as_score_batch_does(actor: ScoreActor, tiny_padim_file: bytes) -> None:
    images = pixels(4, seed=8)
    out = actor(decoded(images, ["bottle", "bottle", "screw", "bottle"]))
    assert out.schema.equals(row_schema(True, True))
    rows = out.to_pylist()
    model = actor._model("bottle")
    expected = score_batch(model, images[:2])
    assert [row["image_score"] for row in rows[:2]] == pytest.approx(expected.scores.tolist(), rel=1e-6)
    assert [row["is_anomalous"] for row in rows[:2]] == expected.is_anomalous.tolist()
    assert [row["p_value"] for row in rows[:2]] == expected.p_values.tolist()
    assert [row["is_anomalous"] for row in rows[:2]] == [row["p_value"] <= 0.5 for row in rows[:2]]
    assert [row["input"] for row in rows] == [1] * 4
    assert all(row["model_uri"] == "/m/padim/bottle.safetensors" and row["detector"] == "padim" for row in rows[:2])
    assert rows[0]["threshold"] == model.threshold_
    for row, scores_map in zip(rows[:2], expected.maps):
        assert len(row["anomaly_map"]) == 16 and max(row["anomaly_map"]) == pytest.approx(row["image_score"], rel=1e-6)
        y, x = divmod(int(scores_map.argmax()), SIZE)
        assert (row["max_y"], row["max_x"]) == (int((y + 0.5) * 900 / SIZE), int((x + 0.5) * 600 / SIZE))
        assert (row["heatmap_png"] is not None) == row["is_anomalous"]
    flagged = next(row for row in rows[:2] if row["is_anomalous"])
    assert Image.open(io.BytesIO(flagged["heatmap_png"])).size == (SIZE, SIZE)
    # no model for screw: no score, and the reason was set upstream by the router
    assert rows[2]["image_score"] is None and rows[2]["model_uri"] is None and rows[2]["detector"] is None
    assert rows[2]["p_value"] is None and rows[3]["p_value"] is None
    # a row that could not be decoded keeps its error, skips the model, but says which model it was for
    assert rows[3]["image_score"] is None and rows[3]["error"] == "cannot decode image /in/last.png"
    assert rows[3]["model_uri"] == "/m/padim/bottle.safetensors"


def test_an_actor_loads_each_model_once(actor: ScoreActor) -> None:
    first = actor._model("bottle")
    actor(decoded(pixels(3, seed=1), ["bottle"] * 3))
    assert actor._model("bottle") is first and first.device.type == "cpu"
    assert np.isfinite(first.mean_.numpy()).all()
