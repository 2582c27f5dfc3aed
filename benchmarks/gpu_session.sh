#!/usr/bin/env bash
# Everything one lease of a lent GPU is used for, in one call (see benchmarks/README or the issue notes):
#   1. benchmarks/kernel_speed.py: every kernel vs cuBLAS / cuSPARSELt at the Llama-3-8B shapes (autotuned);
#   2. the whole kernel test suite on CUDA (first config of each table, 8 processes compiling in parallel).
# Writes gpu.txt, bench.log, tests.log and kernels-<gpu>.{json,md} to $OUT (default ./gpu-out).
#   LLMCOMMIT=<sha> bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1 LLMCOMPRESS_COMMIT=${LLMCOMMIT:-unknown}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/gpu.txt" 2>&1
start=$(date +%s)
timeout "${BENCH_S:-300}" python3 benchmarks/kernel_speed.py --out "$OUT" --budget-s "${BUDGET_S:-220}" ${MS:+--ms $MS} > "$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/gpu.txt"
start=$(date +%s)
LLMCOMPRESS_KERNEL_CONFIGS=first timeout "${TEST_S:-170}" \
  python3 -m pytest tests/kernels -q -n 8 -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^\| [0-9]+x[0-9]+ \| (1|2048) \|" "$OUT"/kernels-*.md | grep -E "cuBLAS|ours" | cut -c1-150
