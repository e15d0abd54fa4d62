"""A durable LangGraph agent: kill it inside its LLM node, resume it by session ID.

    python examples/durable_agent.py --session agent-1 --crash-after 100   # SIGKILL after 100 tokens
    python examples/durable_agent.py --session agent-1 --resume            # continues: no re-prefill
    concordia resume agent-1 --app integrations.langgraph.demo_agent:make_app   # the same from the CLI

The graph (``integrations/langgraph/demo_agent.py``) plans, generates 240 tokens
with ``durable_generate(session_id=task_session_id(config))`` and reports. On a
resume, the plan node does not run again (its writes are in the catalog), and
the LLM node continues its generation from the last durable token. Runs a tiny
random Llama on the CPU by default; with a GPU, a 1B-shaped bf16 model on the
CuPy backend (``--device cpu`` forces the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from concordia_agents import Runtime
from integrations.langgraph.demo_agent import QUESTION, Trace, build_model, make_app
from integrations.transformers import GenerateEvent


def crash_after(n: int) -> Callable[[GenerateEvent], None]:
    """An ``on_event`` callback for the LLM node's generation that SIGKILLs this
    process (a real crash: no cleanup) right after its ``n``-th token is committed."""

    def on_event(e: GenerateEvent) -> None:
        if e.phase == "token_committed" and e.n_generated >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_event


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--session", default="example-agent")
    p.add_argument("--crash-after", type=int, default=0, help="SIGKILL this process after N tokens of the LLM node")
    p.add_argument("--resume", action="store_true", help="resume the session instead of starting it")
    p.add_argument("--new-tokens", type=int, default=240)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--home", default=None, help="Concordia home (default: $CONCORDIA_HOME or ~/.concordia)")
    p.add_argument("--json", action="store_true", help="print one JSON line: final state and what ran")
    args = p.parse_args()
    gpu = args.device != "cpu"
    if gpu:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    rt = Runtime.open(home=args.home, backend="cupy" if gpu else "host")
    trace = Trace()
    app = make_app(rt, model=build_model(args.device), new_tokens=args.new_tokens, trace=trace,
                   on_generate_event=crash_after(args.crash_after) if args.crash_after else None)
    t = time.perf_counter()
    if args.resume:
        state = app.resume(args.session)
    else:
        state = app.invoke({"question": QUESTION}, session_id=args.session)
    took = time.perf_counter() - t
    if args.json:
        print(json.dumps({"state": state, "nodes": trace.nodes, "forwards": trace.forwards}))
    else:
        print(f"session {args.session!r}: {state['report']} in {took:.2f} s")
        print(f"  nodes run in this process: {trace.nodes or 'none (already finished)'}")
        print(f"  forward passes here: {len(trace.forwards)}; first input length "
              f"{trace.forwards[0] if trace.forwards else '-'} (1 = continued a generation, no re-prefill)")
        for info in app.task_sessions(args.session):
            print(f"  generation session {info.id}: {info.status}, epoch {info.last_epoch}")
    rt.close()


if __name__ == "__main__":
    main()
