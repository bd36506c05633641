#!/usr/bin/env bash
# Install everything, then run the main job on embedded defaults: build the offline demo data,
# fit every category (local Ray, local MLflow store), score the test images packed in a tar.
# Extra arguments go to `python -m jobs.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m jobs.demo "$@"
