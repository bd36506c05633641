"""Fixtures of the jobs' tests: an embedded Ray session."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_session():
    """Ray for one test module (the CLI tests check that a refused job never starts one)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()
