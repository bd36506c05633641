"""padim_core: visual anomaly detectors (PaDiM, Defard et al., ICPR 2021) behind one interface.

Plain torch: no Ray, no MLflow. `load_detector` reads any model file; `PadimModel` is the first
detector kind. Names are imported lazily, so commands that need no torch (building the demo
data set, listing image files) start quickly.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("padim")
except PackageNotFoundError:  # running from a source checkout that was never installed
    __version__ = "0.0.0+source"

_LAZY = {
    "Detector": "padim_core.detector",
    "load_detector": "padim_core.detector",
    "PadimModel": "padim_core.padim",
    "PadimError": "padim_core.errors",
    "ModelFileError": "padim_core.errors",
}
__all__ = [*_LAZY, "__version__"]  # noqa: PLE0604 (_LAZY's keys are strings)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'padim_core' has no attribute {name!r}")
