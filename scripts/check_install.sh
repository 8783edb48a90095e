#!/usr/bin/env bash
# The package as users get it: built into a wheel, installed non-editable into a fresh virtual environment,
# then used from the repository root, where the source folders must not shadow the installed package:
# `import steptune.storage` and a tiny job on Ray evaluators, run to the end.
# Dependencies come from .venv (made by scripts/test.sh) through a .pth file, so nothing is downloaded twice.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
python3 -m venv "$TMP/venv"
PURELIB="$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$PURELIB/parent_env.pth"
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$TMP/dist" . >/dev/null
"$TMP/venv/bin/pip" install -q --no-deps "$TMP"/dist/steptune-*.whl
# a stale editable finder from .venv must not be what resolves steptune here
"$TMP/venv/bin/python" -c "import steptune.storage, sys; p = steptune.storage.__file__; \
print('steptune.storage from', p); sys.exit(0 if p.startswith('$TMP') else 1)"
cat > "$TMP/tiny.toml" <<TOML
study = "install-check"
seed = 0
[problem]
name = "gmm-2d"
[search]
method = "random"
nfe = [3]
[evaluation]
cheap_samples = 16
train_samples = 32
heldout_samples = 64
confirm = 1
baseline = false
cache = "$TMP/cache"
[budget]
evaluations = 4
[storage]
db = "sqlite:///$TMP/check.db"
[backend]
kind = "ray"
workers = 1
TOML
"$TMP/venv/bin/steptune" run "$TMP/tiny.toml" --json > "$TMP/run.json"
"$TMP/venv/bin/python" -c "import json, sys; r = json.load(open('$TMP/run.json')); \
print('install check: ray job', r['status'], r['evaluations'], 'evaluations'); \
sys.exit(0 if r['status'] == 'complete' and r['evaluations'] == 4 else 1)"
