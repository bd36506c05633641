"""jobs.score.job without Ray: what the command refuses before starting Ray or reading any image,
and where `prepare` puts the scoring run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray

from jobs.common.config import load_job_config
from jobs.score.job import ScoreRequest, main, prepare

from support.servers import free_port


def test_error_mode_refuses_an_existing_output_and_leaves_it_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "scores"
    output.mkdir()
    (output / "keep.txt").write_text("an earlier table")
    code = main(["--input", str(tmp_path), "--output", str(output), "--models", str(tmp_path)])
    assert code == 2 and not ray.is_initialized()
    message = capsys.readouterr().err
    assert message.startswith("padim-score: error: output ") and message.rstrip().endswith("(nothing was started)")
    assert "already exists" in message and "--mode overwrite" in message and "--mode append" in message
    assert [path.name for path in output.iterdir()] == ["keep.txt"]


def test_missing_inputs_and_models_are_refused_with_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "out"), "--models", str(tmp_path)]) == 2
    assert f"padim-score: error: input {tmp_path / 'absent'}: no such file or folder (nothing was started)" in capsys.readouterr().err
    (tmp_path / "bottle").mkdir()
    settings = ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", f"output={tmp_path}"]
    assert main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--models", str(tmp_path / "none"), *settings]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_arguments_that_cannot_work_together_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as both:
        main(["--input", "x", "--output", "y", "--model", "m.safetensors", "--models", "dir"])
    with pytest.raises(SystemExit) as route:
        main(["--input", "x", "--output", "y", "--models", "dir", "--route", "no-equals-sign"])
    with pytest.raises(SystemExit) as mode:
        main(["--input", "x", "--output", "y", "--models", "dir", "--mode", "merge"])
    assert both.value.code == route.value.code == mode.value.code == 2


def test_an_unreachable_tracking_server_is_refused_before_models_are_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in" / "bottle").mkdir(parents=True)
    (tmp_path / "in" / "bottle" / "a.png").write_bytes(b"x")
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--models", str(tmp_path / "none"),
                 "--set", f"tracking.tracking_uri=http://127.0.0.1:{free_port()}"])
    assert code == 2 and "unreachable" in capsys.readouterr().err and not ray.is_initialized()


def test_the_run_goes_to_mlflow_db_beside_the_output_by_default(
    tiny_padim_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = tmp_path / "bottle.safetensors"
    model.write_bytes(tiny_padim_file)
    (tmp_path / "in" / "bottle").mkdir(parents=True)
    (tmp_path / "in" / "bottle" / "a.png").write_bytes(b"x")
    output = tmp_path / "results" / "scores"
    # `output` in the config is jobs.fit's folder; the table's own folder decides where the run goes
    config = load_job_config(None, [f"output={tmp_path / 'elsewhere'}"])
    job = prepare(ScoreRequest(inputs=(str(tmp_path / "in"),), output=output, config=config, model=str(model), category="bottle"))
    try:
        assert job.tracking_uri == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
        assert (tmp_path / "results" / "mlflow.db").is_file() and not (tmp_path / "elsewhere").exists()
        assert not output.exists()  # the table itself appears only when it is complete
        assert job.catalog["bottle"].detector == "padim" and job.discovery.count("image") == 1
    finally:
        shutil.rmtree(job.scratch, ignore_errors=True)
