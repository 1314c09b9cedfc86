#!/usr/bin/env bash
# The demo command: sets up .venv on a fresh machine, then LoRA-trains the embedded default (SmolLM2-135M,
# passkey retrieval at 2K tokens) under context parallelism on 2 CPU ranks. Extra `--key value` args override
# the recipe (e.g. --max_steps 4).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
accelerate launch --config_file recipes/accelerate/cpu_gloo_2proc.yaml --main_process_port "${MASTER_PORT:-29511}" \
    recipes/train_lora.py --config recipes/embedded-passkey-2k.yaml "$@"
