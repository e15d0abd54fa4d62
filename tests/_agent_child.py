"""Child process for the LangGraph crash and ownership tests (``python -m tests._agent_child``).

Runs the demo agent (``integrations.langgraph.demo_agent``) once — ``invoke``
a new thread or ``resume`` one — and prints one JSON line: the final state, the
nodes that ran here and the input length of every forward call. With
``--go-file`` it prints ``ready`` after the (slow) imports and model build and
waits for that file, so a test can start two resumers at the same instant.
An OwnershipError prints ``{"ownership_error": ...}`` and exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["invoke", "resume"])
    p.add_argument("--home", required=True)
    p.add_argument("--catalog", default=None)
    p.add_argument("--session", required=True)
    p.add_argument("--crash-after", type=int, default=0, help="SIGKILL after N tokens of the llm node")
    p.add_argument("--new-tokens", type=int, default=240)
    p.add_argument("--go-file", default=None)
    p.add_argument("--trace", default=None, help="keep what ran in this JSON file while running")
    args = p.parse_args()
    from concordia_agents import OwnershipError, Runtime
    from integrations.langgraph.demo_agent import QUESTION, Trace, make_app
    from tests._gen_child import kill_switch

    rt = Runtime.open(home=args.home, catalog_url=args.catalog, backend="host")
    from pathlib import Path

    trace = Trace(path=Path(args.trace) if args.trace else None)
    app = make_app(rt, new_tokens=args.new_tokens, trace=trace,
                   on_generate_event=kill_switch(after_tokens=args.crash_after))
    if args.go_file:
        print("ready", flush=True)
        deadline = time.monotonic() + 120
        while not os.path.exists(args.go_file):
            if time.monotonic() > deadline:
                sys.exit("no go signal within 120 s")
            time.sleep(0.001)
    try:
        if args.mode == "invoke":
            state = app.invoke({"question": QUESTION}, session_id=args.session)
        else:
            state = app.resume(args.session)
    except OwnershipError as e:
        print(json.dumps({"ownership_error": str(e), "nodes": trace.nodes, "forwards": trace.forwards}), flush=True)
        rt.close()
        sys.exit(3)
    print(json.dumps({"state": state, "nodes": trace.nodes, "forwards": trace.forwards}), flush=True)
    rt.close()


if __name__ == "__main__":
    main()
