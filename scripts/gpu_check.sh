#!/usr/bin/env bash
# One device run: install the pure-Python wheels the GPU image lacks, run the GPU
# tests, then the GPU benchmark. Results go under $OUT (device tool) and bench/results.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 scripts/install_missing_wheels.py .wheels 2>&1 | grep -v "Running pip as" | tail -3; python3 -c "import sqlalchemy, structlog; print(\"wheels ok\", sqlalchemy.__version__)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, cupy, transformers, sys; print(sys.version.split()[0], torch.__version__, cupy.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"
export CONCORDIA_HOME=/tmp/chome
python3 -m pytest -q -p no:cacheprovider --timeout 240 ${GPU_TESTS:-tests/test_gpu.py} 2>&1 | tee "$OUT/gpu_tests.log"
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout ${BENCH_TIMEOUT:-240} python3 bench/bench_gpu.py ${QUICK:+--quick} 2>&1 | tee "$OUT/bench.log" | tail -60
fi
