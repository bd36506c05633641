"""The console commands (`padim-fit`, `padim-score`, ...) and `python -m jobs.<job>`: each runs
its job's `main` with SIGTERM unwinding like Ctrl-C, so a killed job still cleans up."""

from __future__ import annotations

import sys
from importlib import import_module

from jobs.common.cli import exit_on_sigterm


def _console(module: str) -> None:
    exit_on_sigterm()
    sys.exit(import_module(module).main())


def fit() -> None:
    _console("jobs.fit.job")


def score() -> None:
    _console("jobs.score.job")


def shift() -> None:
    _console("jobs.shift.job")


def demo() -> None:
    _console("jobs.demo.job")


def compare() -> None:
    _console("jobs.compare.job")


def update() -> None:
    _console("jobs.update.job")
