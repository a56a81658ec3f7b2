#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: lint, types, then pytest (SQLite and a real
# PostgreSQL server that the tests start themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing the PostgreSQL server (Debian package) for the tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The suite must exercise a real PostgreSQL: fail rather than skip if it cannot start one.
export QKMS_REQUIRE_POSTGRES=1
exec .venv/bin/python -m pytest "$@"
