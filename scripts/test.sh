#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine, then lints and runs the whole suite (CPU, gloo ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
ruff check .
python -m pytest tests "$@"
