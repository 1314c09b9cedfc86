#!/usr/bin/env bash
# The demo command: sets up .venv on a fresh machine, then runs the embedded default on CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
torchrun --nproc-per-node 4 --master-port "${MASTER_PORT:-29511}" recipes/ring_parity_demo.py "$@"
