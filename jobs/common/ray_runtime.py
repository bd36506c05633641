"""Which Ray to use, and how much of it each task or actor asks for.

Under `ray job submit` (or with `RAY_ADDRESS` set) a job joins that cluster; otherwise it
starts an embedded local Ray for the length of the job, so `padim-fit` works on a laptop with
nothing running.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray._private import ray_constants

from padim_core.errors import ConfigError, PadimError


class ClusterError(PadimError):
    """The Ray cluster named by RAY_ADDRESS cannot be reached or used."""


_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted entrypoint


def under_job_submission() -> bool:
    """Whether this process is the entrypoint of a `ray job submit`."""
    return bool(os.environ.get(_JOB_ENV))


def connect(num_cpus: int | None = None) -> str:
    """Join the cluster named by `RAY_ADDRESS`, or start an embedded local Ray; says which.

    `address="local"` rather than Ray's default: with no address Ray would otherwise join
    whatever cluster was last started on this machine (`/tmp/ray/ray_current_cluster`),
    which is someone else's on a shared host. `num_cpus` only applies to the embedded Ray.

    The embedded Ray listens on loopback only. Ray binds every server (GCS, raylet, workers,
    agents, the /metrics endpoints) to 127.0.0.1 exactly when its node address is 127.0.0.1,
    which on Linux it takes only with its single-machine switch (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`
    off; read when Ray is imported, so its constant is set here); an address other than
    loopback afterwards is an error rather than a job that listens on the network.
    """
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address)
        return f"Ray cluster at {address}"
    reap_orphaned_agents()
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    node_address = ray.util.get_node_ip_address()
    if node_address != LOOPBACK:
        ray.shutdown()
        raise ClusterError(f"the embedded Ray took the address {node_address}, not {LOOPBACK}; refusing to run "
                           "with servers on the network")
    return f"embedded local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs, on {LOOPBACK})"


LOOPBACK = "127.0.0.1"
_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def reap_orphaned_agents() -> list[int]:
    """Kill this user's Ray agents whose raylet is gone; returns their process ids.

    When a driver is killed (SIGKILL), its embedded Ray's daemons die with it, but its two agents
    wait about a minute on the dead GCS before exiting, holding their ports. An agent whose parent
    is no longer a raylet is such a leftover (the test the agents apply to themselves, without the
    wait); a live Ray's agents are left alone.
    """
    import psutil

    killed = []
    for process in psutil.process_iter(["cmdline", "uids"]):
        with contextlib.suppress(psutil.Error):
            command = process.info["cmdline"] or []
            if not command or command[0] not in _AGENTS or process.info["uids"].real != os.getuid():
                continue
            parent = process.parent()
            if parent is not None and (parent.cmdline()[:1] or [""])[0].endswith("/raylet"):
                continue
            process.kill()
            killed.append(process.pid)
    return killed


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One TCP connect to `host:port` (or `ray://host:port`): `ray.init` would otherwise retry a
    dead address for minutes. Other forms ('auto') are left to Ray."""
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={address} is a dashboard URL, which `ray job submit` takes; a driver joins "
            "a cluster through its GCS address host:6379 (submitted jobs get it set by Ray)"
        )
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise ClusterError(
            f"Ray cluster at RAY_ADDRESS={address} is unreachable ({error.strerror or error}); start it "
            "(ray start --head), fix RAY_ADDRESS (the GCS address host:6379, not the dashboard URL), "
            "or unset it to run on an embedded local Ray"
        ) from None


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def resolve_num_gpus(setting: str | float, available: float, key: str) -> float:
    """GPUs per task or actor: 'auto' -> 1 when the cluster has a GPU, else 0; numbers as given.

    Asking for more GPUs than the whole cluster has would wait forever, so that is an error
    here (naming the config `key`) rather than a job that hangs.
    """
    if setting == "auto":
        return 1.0 if available >= 1 else 0.0
    gpus = float(setting)
    if gpus > available:
        raise ConfigError(
            f"{key}={setting} but the Ray cluster has {available:g} GPUs, so it could never be scheduled; "
            "allowed: 'auto', 0, or at most the cluster's GPUs"
        )
    return gpus


def task_device(setting: str, num_gpus: float) -> str:
    """The torch device of a task: the config's choice, or CUDA exactly when Ray gave the task a GPU.

    With 'auto', a task without a GPU share runs on the CPU even on a GPU node: the GPU there
    belongs to whichever task Ray gave it to.
    """
    if setting == "cuda" and num_gpus == 0:
        raise ConfigError("tasks.device is 'cuda' but the Ray cluster has no GPUs; use tasks.device auto or cpu")
    if setting != "auto":
        return setting
    return "cuda" if num_gpus > 0 else "cpu"


@dataclass(frozen=True)
class TaskResources:
    """What each per-category task asks Ray for, and how it runs torch."""

    num_cpus: float
    num_gpus: float
    device: str
    threads: int
    max_retries: int

    def describe(self) -> str:
        return f"per task {self.num_cpus:g} CPUs, {self.num_gpus:g} GPUs, device {self.device}"


def task_resources(tasks: Any) -> TaskResources:
    """The resources of each per-category task, from a config's `tasks` section."""
    num_gpus = resolve_num_gpus(tasks.num_gpus, cluster_gpus(), "tasks.num_gpus")
    return TaskResources(tasks.num_cpus, num_gpus, task_device(tasks.device, num_gpus), torch_threads(tasks.num_cpus),
                         tasks.max_retries)


def torch_threads(num_cpus: float) -> int:
    """Intra-op threads for a task holding `num_cpus` Ray CPUs (at least one)."""
    return max(1, int(num_cpus))


def as_completed(pending: Mapping[Any, str]) -> Iterator[tuple[str, Any]]:
    """(name, result) for each task of `pending` (ObjectRef -> name) in the order they finish.

    A task that never returned (its worker died more often than its retries allow, or it was
    cancelled) gives its `ray.exceptions.RayError` as the result.
    """
    waiting = dict(pending)
    while waiting:
        (ref,), _ = ray.wait(list(waiting), num_returns=1)
        name = waiting.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as error:
            result = error
        yield name, result
