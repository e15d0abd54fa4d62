#!/usr/bin/env bash
# One device run of the GPU suite: install the pure-Python wheels the GPU image
# lacks (from .wheels), record the device and library versions, run the GPU
# tests, then, when asked, GPU benchmarks and the durable agent example.
# Logs go under $OUT (default /tmp/out); a benchmark writes its JSON to
# bench/results/ and a copy to $OUT.
#
#   scripts/gpu_suite.sh [--tests "FILES" | --no-tests] [--bench "NAME [ARGS]"]... [--agent]
#                        [--test-timeout S] [--timeout S]
#
#   --tests FILES       test files to run, their GPU-marked tests only (default: tests/test_gpu.py
#                       tests/test_instrument_gpu.py tests/test_transformers_gpu.py tests/test_step_commit_gpu.py tests/test_step_commit_ring_gpu.py
#                       tests/test_conversation_gpu.py tests/test_record_versions.py tests/conformance, the last being the backend
#                       conformance suite's CuPy variants)
#   --no-tests          run no tests
#   --bench "NAME ARGS" run a GPU benchmark with ARGS, repeatable; NAME: gpu (bench/bench_gpu.py),
#                       instrument (bench/bench_instrument_gpu.py), transformers (bench/bench_transformers_gpu.py),
#                       compiled (bench/bench_compiled_decode_gpu.py), stepcommit (bench/bench_step_commit_gpu.py),
#                       conversation (bench/bench_conversation_gpu.py)
#   --agent             examples/durable_agent.py with a 1B-shaped model: SIGKILL inside the LLM
#                       node, resume, compare with an uninterrupted run ($OUT/agent_*.json)
#   --test-timeout S    pytest's per-test timeout (default 240)
#   --timeout S         wall-clock limit of each step (default 600)
#
# Examples:
#   scripts/gpu_suite.sh
#   scripts/gpu_suite.sh --tests tests/test_gpu.py --bench "gpu --quick"
#   scripts/gpu_suite.sh --no-tests --bench "transformers --quick --only decode --shapes llama-3.2-1b"
#
# Exit status: 0 when every step passed, 1 otherwise (each step's status is printed).
set -uo pipefail
OUT=${OUT:-/tmp/out}

TESTS="tests/test_gpu.py tests/test_instrument_gpu.py tests/test_transformers_gpu.py tests/test_step_commit_gpu.py tests/test_step_commit_ring_gpu.py tests/test_conversation_gpu.py tests/test_record_versions.py tests/conformance"
BENCHES=()
AGENT=""
TEST_TIMEOUT=240
STEP_TIMEOUT=600
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) TESTS="$2"; shift 2 ;;
    --no-tests) TESTS=""; shift ;;
    --bench) BENCHES+=("$2"); shift 2 ;;
    --agent) AGENT=1; shift ;;
    --test-timeout) TEST_TIMEOUT="$2"; shift 2 ;;
    --timeout) STEP_TIMEOUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CONCORDIA_HOME=${CONCORDIA_HOME:-/tmp/chome}
mkdir -p "$OUT"
FAILED=0
step() {  # step NAME LOG CMD...: run CMD under the step timeout, tee into $OUT/LOG, record its status
  local name="$1" log="$2"; shift 2
  # SIGINT at the limit, not SIGTERM: pytest then prints its failures and summary so far (a
  # step cut by its limit on 2026-12-07 lost why a test had failed), a benchmark writes its JSON
  timeout -s INT -k 30 "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$log" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc" | tee -a "$OUT/steps.txt"
  [ "$rc" -eq 0 ] || FAILED=1
}

python3 scripts/install_missing_wheels.py .wheels 2>&1 | grep -v "Running pip as" | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 - <<'PY' | tee -a "$OUT/device.txt"
import importlib.metadata as md
import sys

names = ("torch", "cupy-cuda13x", "cuda-bindings", "transformers", "sqlalchemy", "structlog", "langgraph")
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        found.append(f"{name} missing")
print("python", sys.version.split()[0], "|", ", ".join(found))
PY

if [ -n "$TESTS" ]; then
  # shellcheck disable=SC2086  # TESTS is a list of paths
  step "tests" gpu_tests.log python3 -m pytest -v --durations=0 -p no:cacheprovider -m gpu -rs --timeout "$TEST_TIMEOUT" $TESTS
fi

MARK=$(mktemp)
for spec in "${BENCHES[@]}"; do
  read -r name args <<<"$spec"
  case "$name" in
    gpu) script=bench/bench_gpu.py ;;
    instrument|transformers) script="bench/bench_${name}_gpu.py" ;;
    compiled) script=bench/bench_compiled_decode_gpu.py ;;
    stepcommit) script=bench/bench_step_commit_gpu.py ;;
    conversation) script=bench/bench_conversation_gpu.py ;;
    *) echo "== bench $name: unknown (gpu, instrument, transformers, compiled, stepcommit, conversation)" | tee -a "$OUT/steps.txt"; FAILED=1; continue ;;
  esac
  # shellcheck disable=SC2086  # args are the benchmark's own options
  step "bench $spec" "bench_$name.log" python3 "$script" $args
done
find bench/results -type f -newer "$MARK" -exec cp {} "$OUT/" \;  # the result files come back with $OUT
rm -f "$MARK"

if [ -n "$AGENT" ]; then
  agent() {
    CONCORDIA_LOG_LEVEL=error python3 examples/durable_agent.py --session gpu-agent --crash-after 100
    echo "crash run exit: $? (137: SIGKILLed as asked)"
    CONCORDIA_LOG_LEVEL=error python3 examples/durable_agent.py --session gpu-agent --resume --json \
      > "$OUT/agent_resumed.json" || return 1
    CONCORDIA_LOG_LEVEL=error python3 examples/durable_agent.py --session gpu-agent-ref --json \
      > "$OUT/agent_reference.json" || return 1
    python3 - "$OUT" <<'PY'
import json
import sys

out = sys.argv[1]
r, ref = (json.load(open(f"{out}/agent_{n}.json")) for n in ("resumed", "reference"))
print("final state equal:", r["state"] == ref["state"], "| nodes after resume:", r["nodes"],
      "| forwards after resume:", len(r["forwards"]), "first input length:", r["forwards"][:1],
      "| reference forwards:", len(ref["forwards"]), "first:", ref["forwards"][:1])
sys.exit(0 if r["state"] == ref["state"] else 1)
PY
  }
  export -f agent
  export OUT
  step "agent" agent.log env CONCORDIA_HOME=/tmp/agent-home bash -c agent
fi

exit "$FAILED"
