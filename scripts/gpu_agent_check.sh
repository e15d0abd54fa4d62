#!/usr/bin/env bash
# The durable agent example on the GPU (1B-shaped bf16 model, CuPy backend): SIGKILL inside the
# LLM node, resume, and compare with an uninterrupted run. Writes $OUT/agent_*.json.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export CONCORDIA_HOME=${CONCORDIA_HOME:-/tmp/agent-home} PYTHONUNBUFFERED=1 CONCORDIA_LOG_LEVEL=error
python3 examples/durable_agent.py --session gpu-agent --crash-after 100; echo "crash run exit: $?"
python3 examples/durable_agent.py --session gpu-agent --resume --json > "$OUT/agent_resumed.json"; echo "resume exit: $?"
python3 examples/durable_agent.py --session gpu-agent-ref --json > "$OUT/agent_reference.json"; echo "reference exit: $?"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
r, ref = (json.load(open(f"{out}/agent_{n}.json")) for n in ("resumed", "reference"))
print("final state equal:", r["state"] == ref["state"], "| nodes after resume:", r["nodes"],
      "| forwards after resume:", len(r["forwards"]), "first input length:", r["forwards"][:1],
      "| reference forwards:", len(ref["forwards"]), "first:", ref["forwards"][:1])
PY
