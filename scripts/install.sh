#!/usr/bin/env bash
# Create .venv (if missing) and install padim with everything it needs: torch, Ray, MLflow,
# anomalib, pytest. The first run takes a few minutes (torch is large); later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
