"""The jobs' command lines: shared flags, exit codes, SIGTERM, and every console command's --help."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from jobs.common import cli
from padim_core.errors import ConfigError, DatasetError

from support.paths import BIN, DEMO_CONFIG

COMMANDS = {
    # command -> what its --help must show besides the description and the example
    "padim-fit": ["--categories CATEGORIES", "(overrides data.root)", "--set KEY=VALUE"],
    "padim-score": ["--input PATH", "(default: error)", "--set KEY=VALUE"],
    "padim-shift": ["--models MODELS", "(default: OUTPUT/models"],
    "padim-demo": ["(default: configs/demo.yaml)"],
    "padim-evaluate": ["category_dir", "(default: auto)"],
    "padim-compare": ["--output OUTPUT"],
    "padim-update": ["--new-images NEW_IMAGES", "--from ORIGIN"],
}
MODULES = {"padim-fit": "jobs.fit.job", "padim-score": "jobs.score.job", "padim-shift": "jobs.shift.job",
           "padim-demo": "jobs.demo.job", "padim-evaluate": "padim_core.evaluate", "padim-compare": "jobs.compare.job",
           "padim-update": "jobs.update.job"}


# --------------------------------------------------------------------------- exit codes
def test_an_error_before_the_work_exits_2_saying_nothing_was_started(capsys: pytest.CaptureFixture[str]) -> None:
    worked = []

    def prepare() -> None:
        raise ConfigError("padim.n_features: 0 is out of range")

    assert cli.run_main("padim-test", prepare, worked.append) == 2
    assert worked == []
    assert capsys.readouterr().err == "padim-test: error: padim.n_features: 0 is out of range (nothing was started)\n"


def test_an_error_during_the_work_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    def work(prepared: str) -> int:
        assert prepared == "ready"
        raise DatasetError("category 'bottle' has no test images")

    assert cli.run_main("padim-test", lambda: "ready", work) == 1
    error = capsys.readouterr().err
    assert error == "padim-test: failed: category 'bottle' has no test images\n" and "nothing was started" not in error
    assert cli.run_main("padim-test", lambda: "ready", lambda prepared: 0) == 0
    assert cli.run_main("padim-test", lambda: "ready", lambda prepared: 1) == 1


def test_a_bug_is_not_mistaken_for_a_padim_error() -> None:
    """Anything but a PadimError keeps its traceback: a ValueError is no longer 'nothing was fitted'."""

    def work(prepared: None) -> int:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        cli.run_main("padim-test", lambda: None, work)
    with pytest.raises(KeyError):
        cli.run_main("padim-test", lambda: {}["missing"], work)


def test_sigterm_unwinds_like_an_exit() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        cli.exit_on_sigterm()
        with pytest.raises(SystemExit) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs before this sleep ends
        assert caught.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


# -------------------------------------------------------------------------------- flags
def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(prog="padim-test")
    cli.add_experiment_flags(made)
    return made


def test_flags_override_the_config_and_paths_stay_verbatim(tmp_path: Path) -> None:
    args = parser().parse_args([
        "--config", str(DEMO_CONFIG), "--data-root", str(tmp_path / "on"), "--categories", "brick, grass",
        "--output", str(tmp_path / "1e3"), "--set", "padim.n_features=50", "--set", "output=ignored",
    ])
    config = cli.build_config(args)
    assert config.data.root == str(tmp_path / "on") and config.output == str(tmp_path / "1e3")  # flags win over --set
    assert config.data.categories == ("brick", "grass") and config.padim.n_features == 50
    assert cli.build_config(parser().parse_args(["--config", str(DEMO_CONFIG), "--categories", "all"])).data.categories == "all"
    unchanged = cli.build_config(parser().parse_args(["--config", str(DEMO_CONFIG)]))
    assert (unchanged.data.root, unchanged.output) == ("demo_data", "outputs/demo")
    with pytest.raises(ConfigError, match="n_features"):
        cli.build_config(parser().parse_args(["--config", str(DEMO_CONFIG), "--set", "padim.n_features=0"]))
    with pytest.raises(SystemExit):
        parser().parse_args(["--data-root", "x"])  # --config is required


def test_relative_paths_under_job_submission_are_warned_about(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    cli.build_config(parser().parse_args(["--config", str(DEMO_CONFIG), "--data-root", "/abs/data"]))
    error = capsys.readouterr().err
    assert "warning: output 'outputs/demo' is relative to the job's working-dir copy" in error
    assert "data root" not in error


# --------------------------------------------------------------------- console commands
def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`command --help` as its `main` prints it (the console script runs the same `main`)."""
    from importlib import import_module

    with pytest.raises(SystemExit) as exit:
        import_module(MODULES[command]).main(["--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def test_the_console_commands_are_installed_and_run() -> None:
    installed = {path.name for path in BIN.iterdir() if path.name.startswith("padim-")}
    assert installed >= set(COMMANDS)
    shown = subprocess.run([str(BIN / "padim-compare"), "--help"], check=False, capture_output=True, text=True,
                           timeout=180)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: padim-compare ")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_explains_itself(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(command, capsys)
    assert text.startswith(f"usage: {command} ")
    description = text.split("\n\n", 1)[1].split("\npositional arguments:\n")[0].split("\noptions:\n")[0].strip()
    assert len(description) > 100 and "--" not in description.splitlines()[0]
    assert f"\nexample:\n  {command} " in text
    example = text.split("\nexample:\n", 1)[1].strip()
    assert len(example.splitlines()) == 1
    flowing = " ".join(text.split())  # help lines are wrapped at the terminal's width
    for snippet in COMMANDS[command]:
        assert snippet in flowing


def test_detectors_flag_lists_known_kinds_or_falls_back_to_the_config() -> None:
    from jobs.common.config import load_job_config

    config = load_job_config(None, ["detector=patchcore"])
    assert cli.detector_kinds(argparse.Namespace(detectors=None), config) == ["patchcore"]
    assert cli.detector_kinds(argparse.Namespace(detectors="padim, patchcore"), config) == ["padim", "patchcore"]
    for bad in ("padim,padim", "padim,vae", ","):
        with pytest.raises(ConfigError, match="expected distinct names from \\['padim', 'patchcore'\\]"):
            cli.detector_kinds(argparse.Namespace(detectors=bad), config)
