"""padim_core: the PaDiM algorithm (Defard et al., ICPR 2021) with a streaming Gaussian fit.

Plain torch: no Ray, no MLflow. `PadimModel` is the entry point. It is imported lazily, so
commands that need no torch (building the demo data set, reading configs) start quickly.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("padim")
except PackageNotFoundError:  # running from a source checkout that was never installed
    __version__ = "0.0.0+source"

__all__ = ["ModelFileError", "PadimModel", "__version__"]


def __getattr__(name: str):
    if name in ("ModelFileError", "PadimModel"):
        from padim_core import model

        return getattr(model, name)
    raise AttributeError(f"module 'padim_core' has no attribute {name!r}")
