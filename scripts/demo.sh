#!/usr/bin/env bash
# The main job: set up, then run a KME on the embedded default (SQLite, simulated QKD link) and a
# master/slave SAE exchange over the real mTLS API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/qkms demo --dir demo-run "$@"
