#!/usr/bin/env bash
# Everything a GPU machine checks and times, in one go (under 8 minutes on one H100):
#   bench/gpu.sh [OUT_DIR]
# 1. bench/gpu_checks.py: the GPU checks (exit 1 on any failure);
# 2. bench/bench.py --cases gpu: jsae and sae_lens side by side, float32 and bfloat16 compute, jsae's sparse
#    TopK beside the dense default; the rows as JSON in OUT_DIR/gpu_bench.json and the table on stdout.
# Needs JAX's CUDA build and torch's CUDA build (docs/gpu.md); set PYTHON to choose the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench}"
py="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
"$py" bench/gpu_checks.py
checks=$?
"$py" bench/bench.py --cases gpu --compute-dtypes float32,bfloat16 --sparse-topk --warmup 1 --reps 3 \
    --steps-per-call 5 --json "$out/gpu_bench.json"
timed=$?
exit $(( checks || timed ))
