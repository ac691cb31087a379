#!/usr/bin/env bash
# The main job on its embedded default: set up .venv, then generate synthetic data, train the tiny
# model through both stages, evaluate it, write pictures and predict from Python (CPU, minutes).
# Extra arguments go to scripts/demo.py (e.g. --out runs/demo2 train.stage2_epochs=4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/demo.py "$@"
