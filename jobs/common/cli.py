"""Command lines of the jobs: the flags they share, their help, and how errors become exit codes.

Exit codes, for every job: 0 everything worked; 1 the work started and something failed (a
category, the scoring); 2 nothing was started (bad arguments, config, data, models, output
folder, tracking server or Ray address). `run_main` keeps that promise: `prepare` does every
check that can be done before any work, `work` does the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jobs.common.config import JobConfig, load_job_config
from jobs.common.ray_runtime import under_job_submission
from padim_core.detector import KINDS
from padim_core.errors import ConfigError, PadimError

Prepared = TypeVar("Prepared")


def add_config_flags(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("--config", type=Path, required=config_required, help="experiment YAML (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set padim.image_size=128 (repeatable)")


def add_experiment_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every per-category job; `build_config` turns them into a config."""
    add_config_flags(parser)
    parser.add_argument("--data-root", type=Path, help="MVTec-AD-style dataset folder (overrides data.root)")
    parser.add_argument("--categories", help="comma-separated category names, or 'all' (overrides data.categories)")
    parser.add_argument("--output", type=Path, help="output folder (overrides output)")
    parser.add_argument("--detectors", help="comma-separated detector kinds, one task each per category, e.g. "
                                             "padim,patchcore (default: the config's detector)")


def detector_kinds(args: argparse.Namespace, config: JobConfig) -> list[str]:
    """`--detectors` as a list of known kinds, or the config's `detector`."""
    if getattr(args, "detectors", None) is None:
        return [config.detector]
    kinds = [kind.strip() for kind in args.detectors.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise ConfigError(f"--detectors {args.detectors!r}: expected distinct names from {sorted(KINDS)}")
    return kinds


def build_config(args: argparse.Namespace) -> JobConfig:
    """The config file, `--set` overrides, then the dedicated flags (which win).

    Paths from flags are taken verbatim rather than parsed as YAML like `--set` values, so a
    folder called `on` or `1e3` stays a folder name.
    """
    config = load_job_config(args.config, args.set)
    changes: dict[str, Any] = {}
    data = config.data
    if getattr(args, "data_root", None) is not None:
        data = dataclasses.replace(data, root=str(args.data_root))
    if getattr(args, "categories", None) is not None:
        names = [name.strip() for name in args.categories.split(",") if name.strip()]
        data = dataclasses.replace(data, categories="all" if names == ["all"] else tuple(names))
    if data is not config.data:
        changes["data"] = data
    if getattr(args, "output", None) is not None:
        changes["output"] = str(args.output)
    config = dataclasses.replace(config, **changes) if changes else config
    if under_job_submission():
        for label, path in (("data root", config.data.root), ("output", config.output)):
            if not Path(path).is_absolute():
                print(f"warning: {label} {path!r} is relative to the job's working-dir copy ({os.getcwd()}); "
                      "pass an absolute path", file=sys.stderr, flush=True)
    return config


def exit_on_sigterm() -> None:
    """`kill` (SIGTERM) unwinds like Ctrl-C, so staging folders are removed and runs marked."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def run_main(prog: str, prepare: Callable[[], Prepared], work: Callable[[Prepared], int]) -> int:
    """`work(prepare())` with the exit codes of this module; a `PadimError` is one line, not a traceback."""
    try:
        prepared = prepare()
    except PadimError as error:
        print(f"{prog}: error: {error} (nothing was started)", file=sys.stderr, flush=True)
        return 2
    try:
        return work(prepared)
    except PadimError as error:
        print(f"{prog}: failed: {error}", file=sys.stderr, flush=True)
        return 1
