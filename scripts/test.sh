#!/usr/bin/env bash
# Install everything, then run the whole test suite (pytest's exit code is the script's:
# 5 when no test was collected is a failure too). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
