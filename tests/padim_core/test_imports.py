"""padim_core promises "no Ray, no MLflow": importing it, or any module in it, loads neither.

Each check imports one module in a process of its own and looks at `sys.modules` afterwards,
so nothing this test session (or another check) imported can hide or cause a finding. The
processes are forked from one fresh interpreter that has loaded only the heavy third-party
libraries (`PRELOADED`: numpy, torch, torchvision, scikit-learn, matplotlib, scikit-image) and is
itself checked to hold no Ray or MLflow: each check then costs its own imports, not those
libraries' seconds again.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import padim_core

pytestmark = pytest.mark.slow  # one interpreter that imports torch, then a process per module

FORBIDDEN = ("ray", "mlflow")
PRELOADED = ("numpy", "torch", "torchvision", "sklearn.metrics", "matplotlib.figure", "skimage.segmentation")
MODULES = ["padim_core", *sorted(info.name for info in pkgutil.walk_packages(padim_core.__path__, "padim_core."))]

CHECKER = """
import importlib, json, os, sys

def forbidden():
    return sorted(name for name in sys.modules if name.partition(".")[0] in FORBIDDEN)

FORBIDDEN, preloaded, modules = json.loads(sys.argv[1])
for name in preloaded:
    importlib.import_module(name)
results = {"<preloaded>": {"loaded": forbidden(), "padim_core": [n for n in sys.modules if n.startswith("padim_core")]}}
for module in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            found = {"loaded": forbidden()}
        except BaseException as error:
            found = {"error": f"{type(error).__name__}: {error}"}
        os.write(write, json.dumps(found).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    results[module] = json.loads(answer or b'{"error": "the check died"}')
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def imported() -> dict[str, dict]:
    """Module -> what importing it alone loaded (`loaded`: the forbidden modules) or `error`."""
    done = subprocess.run(
        [sys.executable, "-c", CHECKER, json.dumps([FORBIDDEN, PRELOADED, MODULES])],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_checker_starts_clean(imported) -> None:
    assert imported["<preloaded>"] == {"loaded": [], "padim_core": []}
    assert {"padim_core", "padim_core.detector", "padim_core.padim", "padim_core.config"} <= set(imported)


@pytest.mark.parametrize("module", MODULES)
def test_importing_loads_neither_ray_nor_mlflow(imported, module: str) -> None:
    assert imported[module] == {"loaded": []}, f"importing {module} loaded {imported[module]}"
