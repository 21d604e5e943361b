#!/usr/bin/env bash
# Install everything the tests need, then run ruff, mypy and the test suite (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check jupyter_linuxworker tests
echo "== mypy"
.venv/bin/mypy jupyter_linuxworker
echo "== pytest"
.venv/bin/python -m pytest "$@"
