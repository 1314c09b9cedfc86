#!/usr/bin/env bash
# Moves the lock to the newest releases: run after `HF_RINGCP_DEPS=latest bash scripts/test.sh` passed.
# Rewrites hf_ringcp/constraints/locked.txt from .venv-latest (its header kept); commit it with the fixes it needed.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=hf_ringcp/constraints/locked.txt
[ -x .venv-latest/bin/python ] || { echo "No .venv-latest: run HF_RINGCP_DEPS=latest bash scripts/test.sh first." >&2; exit 2; }
{
  grep -E '^#' "$lock"
  .venv-latest/bin/python -m pip freeze --exclude-editable | grep -v -E '^(#|-e )' | sed -E 's/^(torch==[^+]+)\+cpu$/\1/'
} > "$lock.new"
mv "$lock.new" "$lock"
git --no-pager diff --stat -- "$lock"
