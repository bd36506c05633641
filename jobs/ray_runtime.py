"""Which Ray to use, and how much of it each fit task asks for.

Under `ray job submit` (or with `RAY_ADDRESS` set) the job joins that cluster; otherwise it
starts an embedded local Ray for the length of the job, so `python -m jobs.fit` works on a
laptop with nothing running.
"""

from __future__ import annotations

import os

import ray

_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted entrypoint


def under_job_submission() -> bool:
    """Whether this process is the entrypoint of a `ray job submit`."""
    return bool(os.environ.get(_JOB_ENV))


def connect(num_cpus: int | None = None) -> str:
    """Join the cluster named by `RAY_ADDRESS`, or start an embedded local Ray; says which.

    `address="local"` rather than Ray's default: with no address Ray would otherwise join
    whatever cluster was last started on this machine (`/tmp/ray/ray_current_cluster`),
    which is someone else's on a shared host. `num_cpus` only applies to the embedded Ray.
    """
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return f"Ray cluster at {address}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return f"embedded local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def resolve_num_gpus(setting: str | float, available: float) -> float:
    """GPUs per fit task: 'auto' -> 1 when the cluster has a GPU, else 0; numbers as given.

    A task asking for more GPUs than the whole cluster has would wait forever, so that is an
    error here rather than a job that hangs.
    """
    if setting == "auto":
        return 1.0 if available >= 1 else 0.0
    gpus = float(setting)
    if gpus > available:
        raise ValueError(
            f"fit.num_gpus={setting} but the Ray cluster has {available:g} GPUs, so the fit tasks "
            "could never be scheduled; allowed: 'auto', 0, or at most the cluster's GPUs"
        )
    return gpus


def task_device(setting: str, num_gpus: float) -> str:
    """The torch device of a fit task: the config's choice, or CUDA exactly when Ray gave the task a GPU.

    With 'auto', a task without a GPU share runs on the CPU even on a GPU node: the GPU there
    belongs to whichever task Ray gave it to.
    """
    if setting == "cuda" and num_gpus == 0:
        raise ValueError("fit.device is 'cuda' but the Ray cluster has no GPUs; use fit.device auto or cpu")
    if setting != "auto":
        return setting
    return "cuda" if num_gpus > 0 else "cpu"


def torch_threads(num_cpus: float) -> int:
    """Intra-op threads for a task holding `num_cpus` Ray CPUs (at least one)."""
    return max(1, int(num_cpus))
