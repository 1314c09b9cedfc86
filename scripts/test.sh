#!/usr/bin/env bash
# The test command: sets up the venv on a fresh machine, then lints and runs the whole suite (CPU, gloo ranks).
# HF_RINGCP_DEPS=latest runs it on the newest releases, HF_RINGCP_DEPS=oldest on the declared floors (by default
# the fast subset below: the registry, the Trainer/TRL seams, DPO and GRPO, generation); see scripts/setup_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -c "import torch, transformers, accelerate, peft, trl; print('deps:', '${HF_RINGCP_DEPS:-locked}', 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', \
peft.__version__, 'trl', trl.__version__)"
if [ "${HF_RINGCP_DEPS:-locked}" = locked ]; then ruff check .; fi  # the linter's rules move with its releases too
if [ "${HF_RINGCP_DEPS:-locked}" = oldest ] && [ $# -eq 0 ]; then
  python -m pytest tests/integrations/test_hf_attention.py tests/integrations/test_trainer_callback.py \
    tests/integrations/test_trl.py tests/integrations/test_generation.py tests/integrations/test_plugin.py \
    tests/integrations/test_dpo.py tests/integrations/test_grpo.py
else
  python -m pytest tests "$@"
fi
