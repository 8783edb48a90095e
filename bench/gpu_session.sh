#!/usr/bin/env bash
# Every GPU figure in one run of a few minutes, on a machine whose python3 has torch with CUDA, numpy,
# scipy, scikit-learn, rich, typer and pytest: the CUDA tests (tests/test_gpu.py), batched candidate
# evaluation against the network's saturated throughput (bench/gpu_batched.py), and the DC fit time per
# (NFE, CFG) on the GPU and on 2 CPU threads (bench/dc_fit_time.py). Logs and JSON go to $OUT (default
# runs/bench).
#
#     bash bench/gpu_session.sh
#     QUICK=1 bash bench/gpu_session.sh      # tiny sizes: checks the script where there is no GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/bench}"
mkdir -p "$OUT" runs/bench
export PYTHONUNBUFFERED=1
# the package laid out as pyproject.toml's package-dir maps it (no build, no dependencies fetched)
SITE="${TMPDIR:-/tmp}/steptune-site"
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r app "$SITE/steptune"
for sub in space evaluators search storage; do cp -r "$sub" "$SITE/steptune/$sub"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
python3 -P -c "import torch, steptune.space; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
'|', torch.cuda.get_device_name() if torch.cuda.is_available() else '-', '| steptune from', steptune.space.__file__)" \
    | tee "$OUT/gpu_session.log"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "== $name" | tee -a "$OUT/gpu_session.log"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$OUT/gpu_session.log"
    [ "$rc" = 0 ] || status=1
}
step tests 150 python3 -P -m pytest -q -p no:cacheprovider tests/test_gpu.py
if [ -n "${QUICK:-}" ]; then
    step batched 240 python3 -P bench/gpu_batched.py --quick
    step dc_fit_time 150 python3 -P bench/dc_fit_time.py --threads 2 --configs 5:3 --repeats 1
else
    step batched 240 python3 -P bench/gpu_batched.py
    step dc_fit_time 150 python3 -P bench/dc_fit_time.py --threads 2 --repeats 3
fi
for f in gpu_batched gpu_batched_quick dc_fit_time; do
    [ -f "runs/bench/$f.json" ] && [ "$OUT" != runs/bench ] && cp "runs/bench/$f.json" "$OUT/"
done
exit $status
