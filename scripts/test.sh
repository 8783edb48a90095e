#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs ruff and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
