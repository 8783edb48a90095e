#!/usr/bin/env bash
# Refreshes constraints.txt: resolves the package with every extra afresh (newest releases that
# pyproject.toml's ranges admit) in a throw-away virtual environment and pins what was installed.
# Run it, then run scripts/test.sh, and commit constraints.txt if the tests pass.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(mktemp -d)/venv"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q ".[test,diffusers]"
{
    echo "# Pinned versions the README's set-up and .ci/run install (pip install -c constraints.txt ...)."
    echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$VENV/bin/python" --version); rerun it to refresh."
    "$VENV/bin/pip" freeze --exclude steptune | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'
} > constraints.txt
rm -rf "$(dirname "$VENV")"
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
