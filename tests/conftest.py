"""Fixtures every test folder shares, and the `--test-order` option.

Real test data lives outside the repository: `PADIM_TEST_DATA`, default `../shared/data`.
Helpers that are not fixtures live in `tests/support/` (importable as `support.*`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from support.paths import REPO_ROOT

ORDERS = ("forward", "reverse", "random")


# ------------------------------------------------------------------------------ test order
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("padim")
    group.addoption(
        "--test-order", choices=ORDERS, default="forward",
        help="run the tests as collected, reversed, or shuffled (modules kept whole, so module "
             "fixtures are built once); the suite must pass in any order (default: forward)",
    )
    group.addoption("--test-order-seed", type=int, default=None,
                    help="seed of --test-order random (default: a new one, printed in the header)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--test-order") == "random" and config.getoption("--test-order-seed") is None:
        config.option.test_order_seed = random.SystemRandom().randrange(2**32)


def _order_line(config: pytest.Config) -> str | None:
    order = config.getoption("--test-order")
    if order == "random":
        seed = config.getoption("--test-order-seed")
        return f"test order: random, seed {seed} (repeat with --test-order random --test-order-seed {seed})"
    return None if order == "forward" else f"test order: {order}"


def pytest_report_header(config: pytest.Config) -> str | None:
    return _order_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The order again at the end, where -q shows it too: a failure that depends on it can be replayed."""
    line = _order_line(config)
    if line:
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = config.getoption("--test-order")
    if order == "reverse":
        items.reverse()
    elif order == "random":
        shuffle = random.Random(config.getoption("--test-order-seed")).shuffle
        modules: dict[str, list[pytest.Item]] = {}
        for item in items:
            modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
        groups = list(modules.values())
        shuffle(groups)
        for group in groups:
            shuffle(group)
        items[:] = [item for group in groups for item in group]


# --------------------------------------------------------------------------------- data
def _require_folder(folder: Path) -> Path:
    """Skip when test data is absent, but fail under CI, where missing data is a broken setup."""
    if not folder.is_dir():
        message = f"test data folder {folder} not found (set PADIM_TEST_DATA to the folder holding mvtec_ad/)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def test_data_root() -> Path:
    """The folder holding the real test data sets."""
    return _require_folder(Path(os.environ.get("PADIM_TEST_DATA", REPO_ROOT.parent / "shared" / "data")))


@pytest.fixture(scope="session")
def mvtec_root(test_data_root: Path) -> Path:
    """Real MVTec AD data (at least the bottle category)."""
    return _require_folder(test_data_root / "mvtec_ad")


@pytest.fixture(scope="session")
def tiny_padim_file() -> bytes:
    """The bytes of a fitted, uncalibrated PaDiM model (random-init resnet18, 64x64 inputs, a
    16x16 grid, 20 channels). Bytes, so no test can change what another one gets: load a copy
    with `PadimModel.load(tiny_padim_file)`."""
    from support.models import fit_tiny_padim

    return fit_tiny_padim().to_bytes()
