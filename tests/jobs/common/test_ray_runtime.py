"""Which Ray a job uses and what each task asks of it: GPU shares, devices, threads, fail-fast addresses."""

from __future__ import annotations

import socket
import time

import pytest

from jobs.common import ray_runtime
from jobs.common.config import TasksConfig
from jobs.common.ray_runtime import ClusterError
from padim_core.errors import ConfigError, PadimError

from support.servers import free_port


@pytest.mark.parametrize(
    ("setting", "available", "expected"),
    [("auto", 0.0, 0.0), ("auto", 4.0, 1.0), ("auto", 0.5, 0.0), (0.0, 2.0, 0.0), (0.25, 1.0, 0.25), (2.0, 2.0, 2.0)],
)
def test_num_gpus_per_task(setting: str | float, available: float, expected: float) -> None:
    assert ray_runtime.resolve_num_gpus(setting, available, "tasks.num_gpus") == expected


def test_asking_for_more_gpus_than_the_cluster_has_is_an_error_not_a_hang() -> None:
    with pytest.raises(ConfigError, match=r"scoring\.num_gpus=1.0 but the Ray cluster has 0 GPUs"):
        ray_runtime.resolve_num_gpus(1.0, 0.0, "scoring.num_gpus")


def test_unreachable_ray_address_is_a_clear_error_within_seconds() -> None:
    started = time.monotonic()
    with pytest.raises(ClusterError, match="unreachable"):
        ray_runtime.check_reachable(f"127.0.0.1:{free_port()}")
    with pytest.raises(ClusterError, match="dashboard URL"):
        ray_runtime.check_reachable("http://127.0.0.1:8265")
    assert time.monotonic() - started < 3
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        ray_runtime.check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
        ray_runtime.check_reachable(f"ray://127.0.0.1:{listening.getsockname()[1]}")
    ray_runtime.check_reachable("auto")  # left to Ray
    assert issubclass(ClusterError, PadimError)


def test_task_device_follows_the_gpu_share() -> None:
    assert ray_runtime.task_device("auto", 1.0) == "cuda"
    assert ray_runtime.task_device("auto", 0.25) == "cuda"
    assert ray_runtime.task_device("auto", 0.0) == "cpu"
    assert ray_runtime.task_device("cpu", 1.0) == "cpu"
    with pytest.raises(ConfigError, match="no GPUs"):
        ray_runtime.task_device("cuda", 0.0)
    assert ray_runtime.torch_threads(0.5) == 1 and ray_runtime.torch_threads(2.0) == 2


def test_task_resources_come_from_the_tasks_section_and_the_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_runtime, "cluster_gpus", lambda: 2.0)
    gpu = ray_runtime.task_resources(TasksConfig(num_cpus=3, max_retries=1))
    assert gpu == ray_runtime.TaskResources(num_cpus=3.0, num_gpus=1.0, device="cuda", threads=3, max_retries=1)
    assert gpu.describe() == "per task 3 CPUs, 1 GPUs, device cuda"
    assert ray_runtime.task_resources(TasksConfig(device="cpu", num_gpus=0)).device == "cpu"
    monkeypatch.setattr(ray_runtime, "cluster_gpus", lambda: 0.0)
    assert ray_runtime.task_resources(TasksConfig()).num_gpus == 0.0
    with pytest.raises(ConfigError, match=r"tasks\.num_gpus=1"):
        ray_runtime.task_resources(TasksConfig(num_gpus=1))


def test_job_submission_is_told_by_the_supervisors_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not ray_runtime.under_job_submission()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert ray_runtime.under_job_submission()
