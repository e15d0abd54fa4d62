#!/usr/bin/env bash
# One device run for the transformers integration (issue 4): install the wheels
# the GPU image lacks, run the GPU tests named in $GPU_TESTS (default: the
# runtime's), then bench/bench_transformers_gpu.py with $BENCH_ARGS. Logs and the
# result JSON go under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 scripts/install_missing_wheels.py .wheels 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
export CONCORDIA_HOME=/tmp/chome
GPU_TESTS=${GPU_TESTS-tests/test_gpu.py}  # unset: the runtime's GPU tests; set empty: no tests
if [ -n "$GPU_TESTS" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider --timeout 120 $GPU_TESTS 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout ${BENCH_TIMEOUT:-400} python3 bench/bench_transformers_gpu.py ${BENCH_ARGS:-} 2>&1 \
    | grep -v -i "warn" | tee "$OUT/bench.log" | tail -30
fi
