"""Where things are: the repository, its configs, and the virtual environment's commands."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
BIN = Path(sys.executable).parent
"""The folder of this interpreter's console scripts (`ray`, `mlflow`, `padim-fit`, ...)."""
