"""padim_core: the PaDiM algorithm (Defard et al., ICPR 2021) with a streaming Gaussian fit.

Plain torch: no Ray, no MLflow. `PadimModel` is the entry point.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("padim")
except PackageNotFoundError:  # running from a source checkout that was never installed
    __version__ = "0.0.0+source"

from padim_core.model import ModelFileError, PadimModel  # noqa: E402

__all__ = ["ModelFileError", "PadimModel", "__version__"]
