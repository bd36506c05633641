"""Real servers for end-to-end tests: `mlflow server` and `ray start --head`, on 127.0.0.1 only.

Every server runs in its own session and is stopped by process id together with everything it
started, found through the process tree (`ray stop` would kill every Ray process on the
machine, other people's included).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from support.paths import BIN


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_tree(process: subprocess.Popen) -> None:
    """SIGTERM the process and everything it started (found before signalling), then SIGKILL stragglers."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def kill_processes(processes: list[psutil.Process]) -> None:
    """Kill whichever of these (found earlier, e.g. a command's children) are still alive."""
    for member in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


@contextlib.contextmanager
def started(command: list[str], log: Path, env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`command` running in its own session, output to `log`; its whole process tree is stopped on exit."""
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield process
    finally:
        stop_process_tree(process)


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until `url` answers at all (401 counts: Ray's dashboard wants a token); fail with the log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[:2]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def mlflow_server_command(folder: Path, port: int) -> list[str]:
    """A SQLite-backed `mlflow server` that serves artifacts from `folder/artifacts`.

    `--artifacts-destination` (artifact serving is on by default) rather than
    `--default-artifact-root PATH`: new experiments then get `mlflow-artifacts:/` locations,
    so clients upload and download artifacts through the server over HTTP.
    """
    return [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
    ]


def ray_head_command(temp_dir: Path, gcs_port: int, dashboard_port: int, num_cpus: int = 2) -> list[str]:
    """`ray start --head --block` with every port chosen here, so a second Ray on the machine
    cannot collide with this one. `temp_dir` must be short: Ray's socket paths stay under 107
    characters."""
    ports = {
        "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(), "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    return [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
        f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]


def ray_env(token_file: Path) -> dict[str, str]:
    """The environment of a Ray head and of `ray job submit` to it.

    The venv's python first on PATH (a submitted `python -m jobs.fit` runs with the head's
    environment), token authentication with this test's own token, and loopback addresses:
    Ray replaces 127.0.0.1 by the machine's network address unless told it is single-node.
    """
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@dataclass(frozen=True)
class Cluster:
    """A running Ray head and `mlflow server`, as a test reaches them."""

    env: dict[str, str]  # for `ray job submit` and drivers: the head's token and loopback settings
    tracking_uri: str
    gcs_port: int
    dashboard_port: int

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"


@contextlib.contextmanager
def running_cluster(folder: Path) -> Iterator[Cluster]:
    """`mlflow server` (SQLite and artifacts under `folder/mlflow`) and a token-authenticated Ray
    head, both on free loopback ports, logs in `folder`; both stopped on exit."""
    # Ray's socket paths must stay under 107 characters: a short folder of our own in /tmp.
    ray_temp = Path(tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp"))
    token_file = folder / "ray_token"
    token_file.write_text(secrets.token_hex(32))
    (folder / "mlflow").mkdir()
    env = ray_env(token_file)
    mlflow_port, gcs_port, dashboard_port = free_port(), free_port(), free_port()
    cluster = Cluster(env, f"http://127.0.0.1:{mlflow_port}", gcs_port, dashboard_port)
    try:
        with started(mlflow_server_command(folder / "mlflow", mlflow_port), folder / "mlflow.log") as server, \
                started(ray_head_command(ray_temp, gcs_port, dashboard_port), folder / "ray.log", env) as head:
            wait_for_http(f"{cluster.tracking_uri}/health", server, folder / "mlflow.log", timeout=120)
            wait_for_http(f"{cluster.dashboard}/api/version", head, folder / "ray.log", timeout=120)
            yield cluster
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def local_env() -> dict[str, str]:
    """This environment without RAY_ADDRESS and MLFLOW_TRACKING_URI: a job started with it runs
    on an embedded local Ray and tracks to SQLite in its output folder, as on a laptop."""
    return {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}


def wait_for_line(process: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """Read the process's (text) stdout until a line contains `text`; the lines read so far.

    A job that exits first or takes longer than `timeout` fails the test with what it printed."""
    import selectors

    lines: list[str] = []
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if selector.select(timeout=1):
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            lines.append(line)
            if text in line:
                return lines
    pytest.fail(f"never printed {text!r} (exit {process.poll()}):\n{''.join(lines)[-3000:]}")
