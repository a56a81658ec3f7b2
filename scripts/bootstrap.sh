#!/usr/bin/env bash
# Creates .venv with the project, its dev tools and the plots extra installed; re-installs when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.qkms-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # dev: test and lint tools (import-linter included); plots: matplotlib, which the key-rate plot tests use.
  .venv/bin/python -m pip install --quiet -e '.[dev,plots]'
  echo "$want" > "$stamp"
fi
