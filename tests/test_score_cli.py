"""The jobs.score command line: what it refuses, before starting Ray or reading any image."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from jobs.score import main


def test_error_mode_refuses_an_existing_output_and_leaves_it_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "scores"
    output.mkdir()
    (output / "keep.txt").write_text("an earlier table")
    code = main(["--input", str(tmp_path), "--output", str(output), "--models", str(tmp_path)])
    assert code == 2 and not ray.is_initialized()
    message = capsys.readouterr().err
    assert "already exists" in message and "--mode overwrite" in message and "--mode append" in message
    assert [path.name for path in output.iterdir()] == ["keep.txt"]


def test_missing_inputs_and_models_are_refused_with_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "out"), "--models", str(tmp_path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
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
