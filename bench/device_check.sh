#!/usr/bin/env bash
# Issue 19's GPU checks in one call of a lent device machine (see bench/README.md): the CUDA sync-debug test, then
# bench/gpu.py's figures. Logs go to $OUT (the device tool brings them back). Packages the machine's image lacks
# travel as wheels in .whl/ (git-ignored; bench/README.md says which and how to fetch them).
#   bash bench/device_check.sh                       # bench/gpu.py --budget 330
#   bash bench/device_check.sh ARGS [--then ARGS]... # bench/gpu.py once per group of arguments
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', \
accelerate.__version__)" || exit 1
timeout 150 python3 -m pytest -m gpu tests/training/test_no_host_sync.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest.log" | tail -5
run_bench() { timeout 500 python3 bench/gpu.py "$@" 2>&1 | tee -a "$OUT/bench.log" | grep -v "^{" | tail -40; }
if [ $# -eq 0 ]; then
  run_bench --budget 330
else  # groups of bench/gpu.py arguments, one run each, separated by --then
  group=()
  for arg in "$@"; do
    if [ "$arg" = "--then" ]; then run_bench "${group[@]}"; group=(); else group+=("$arg"); fi
  done
  run_bench "${group[@]}"
fi
