"""The pyfunc model: logged from code (nothing pickled), registered with an alias, and scoring
paths and bytes with a row per input, bad images included."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from jobs.common import tracking
from jobs.common.pyfunc import MODEL_ARTIFACT, log_pyfunc_model
from padim_core.calibration import Calibration
from padim_core.padim import PadimModel

from support.images import noise_png
from support.tracking import version_files


def test_pyfunc_model_is_code_not_pickle_and_scores_paths_and_bytes(
    tiny_padim_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_image = tmp_path / "hole.png"
    test_image.write_bytes(noise_png(80, seed=3))
    model = PadimModel.load(tiny_padim_file)
    expected, _ = model.predict_one(test_image)
    # nine calibration scores below this image's: it is above the threshold, with the smallest p-value, 1/10
    model.calibrate(Calibration.conformal([expected - 2.0 - index for index in range(9)], false_alarm_rate=0.1))
    model_file = model.save(tmp_path / "brick.safetensors")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve through the default registry
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(uri)
    experiment = tracking.prepare_experiment(client, "pyfunc", uri, tmp_path)
    versions = []
    for _ in range(2):
        run_id = client.create_run(experiment).info.run_id
        versions.append(log_pyfunc_model(uri, run_id, model_file, "padim-unit", "champion"))
        assert client.get_run(run_id).info.status == "FINISHED"
    assert versions == ["1", "2"]
    # no fluent state left behind in this process
    assert mlflow.tracking._tracking_service.utils._tracking_uri is None and os.environ["MLFLOW_TRACKING_URI"] == uri
    assert mlflow.active_run() is None
    champion = client.get_model_version_by_alias("padim-unit", "champion")
    assert str(champion.version) == "2"  # the alias follows the newest

    # Logged from code: the model's files hold the wrapper's source and both packages, never a pickle.
    files = version_files(client, "padim-unit", "champion")
    assert "MLmodel" in files and f"artifacts/{model_file.name}" in files
    assert "code/jobs/common/pyfunc_model.py" in files and "code/padim_core/detector.py" in files
    assert not [name for name in files if name.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    loaded = mlflow.pyfunc.load_model("models:/padim-unit@champion")

    frame = pd.DataFrame({"image": [str(test_image), test_image.read_bytes(), b"\x89PNG broken", str(tmp_path / "nope.png")]})
    scored = loaded.predict(frame)
    assert list(scored.columns) == ["image_score", "p_value", "is_anomalous", "error"] and len(scored) == 4
    assert scored.image_score[:2].tolist() == pytest.approx([expected, expected], rel=1e-4)
    assert scored.is_anomalous[:2].tolist() == [True, True] and scored.p_value[:2].tolist() == [0.1, 0.1]
    assert scored.image_score[2:].isna().all() and scored.is_anomalous[2:].isna().all() and scored.p_value[2:].isna().all()
    assert "cannot decode" in scored.error[2] and "nope.png" in scored.error[3]
    assert scored.error[:2].isna().all()
    by_path = loaded.predict(pd.DataFrame({"path": [str(test_image)] * 3}), params={"batch_size": 2})
    assert by_path.image_score.tolist() == pytest.approx([expected] * 3, rel=1e-4)
    with pytest.raises(Exception, match="column 'image' or 'path'"):
        loaded.predict(pd.DataFrame({"file": [str(test_image)]}))


def test_without_registering_no_version_is_made(tiny_padim_file: bytes, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    model_file = tmp_path / "m.safetensors"
    model_file.write_bytes(tiny_padim_file)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.prepare_experiment(client, "plain", uri, tmp_path)).info.run_id
    assert log_pyfunc_model(uri, run_id, model_file, None, "champion") is None
    assert client.search_registered_models() == []
    (logged,) = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert logged.name == MODEL_ARTIFACT and logged.source_run_id == run_id
