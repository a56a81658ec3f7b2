#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: lint, types, then pytest (SQLite and a real
# PostgreSQL server that the tests start themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# System packages the tests exercise for real: a PostgreSQL server and SoftHSM2 (PKCS#11 KEK).
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
{ [ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null; } || missing+=(softhsm2)
# docker-compose (Debian's Compose v1) validates docker/compose.two-site.yml; the tests need no Docker
# engine, so its recommended docker.io is left out.
missing_norec=()
command -v docker-compose >/dev/null 2>&1 || missing_norec+=(docker-compose)
# promtool (Debian's prometheus package) checks and unit-tests docker/observability/ and a real
# KME's /metrics (tests/operator/test_observability.py); the server it also ships stays unused.
command -v promtool >/dev/null 2>&1 || missing_norec+=(prometheus)
# rsyslogd and its OpenSSL stream driver: the real syslog receiver (TCP and TLS, octet-counted) that
# the audit-to-SIEM tests start unprivileged on 127.0.0.1 (tests/siem/).
command -v rsyslogd >/dev/null 2>&1 || missing_norec+=(rsyslog)
ls /usr/lib/*/rsyslog/lmnsd_ossl.so >/dev/null 2>&1 || missing_norec+=(rsyslog-openssl)
# Headless chromium and its chromedriver: the web console's browser tests (tests/operator/test_console.py)
# drive them through Selenium with the driver's path given, so Selenium Manager downloads nothing.
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || missing_norec+=(chromium chromium-driver)
# A font for the pages' text in the screenshots (chromium only recommends one).
[ -d /usr/share/fonts/truetype/liberation ] || missing_norec+=(fonts-liberation)
if [ $((${#missing[@]} + ${#missing_norec[@]})) -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} ${missing_norec[*]} (Debian packages) for the tests"
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ ${#missing_norec[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_norec[@]}" >/dev/null
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Layering contracts ([tool.importlinter] in pyproject.toml); import cycles are tests/unit/test_layering.py.
.venv/bin/lint-imports --no-cache --no-logo
# The suite must exercise a real PostgreSQL (and check the compose pilot): fail rather than skip.
export QKMS_REQUIRE_POSTGRES=1 QKMS_REQUIRE_SOFTHSM=1 QKMS_REQUIRE_DOCKER_COMPOSE=1 QKMS_REQUIRE_PROMTOOL=1 QKMS_REQUIRE_RSYSLOG=1
export QKMS_REQUIRE_CHROMIUM=1 SE_OFFLINE=true
exec .venv/bin/python -m pytest "$@"
