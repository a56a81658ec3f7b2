#!/usr/bin/env bash
# Create a SEPARATE virtual environment holding SeQUeNCe (PyPI package `sequence`), used only by
# benchmarks/bench_vs_sequence.py for a side-by-side comparison. SeQUeNCe is not a QKMS dependency.
#
# Usage: benchmarks/sequence_env.sh [VENV_DIR]   (default: /tmp/qkms-seq-venv)
set -euo pipefail
VENV_DIR="${1:-${QKMS_SEQ_VENV:-/tmp/qkms-seq-venv}}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x "$VENV_DIR/bin/python" ]; then
    "$PYTHON" -m venv "$VENV_DIR"
fi
"$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip
"$VENV_DIR/bin/python" -m pip install --quiet sequence
"$VENV_DIR/bin/python" -c "import sequence, importlib.metadata as m; print('SeQUeNCe', m.version('sequence'), 'in', '$VENV_DIR')"
