"""``concordia demo``: an agent killed inside its LLM node, resumed by session ID.

1. A worker process runs the demo agent (plan → llm → report, see
   ``integrations.langgraph.demo_agent``) and SIGKILLs itself after
   ``crash_at`` tokens of the LLM node, from ``durable_generate``'s
   ``on_event``.
2. This process resumes the thread by its ID: the plan node does not run again,
   and the LLM node's generation continues from its last durable token.
3. The result is checked against an uninterrupted run of the same agent, and
   what the catalog and the log hold is printed.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from concordia_agents import ConcordiaError, Runtime
from integrations.langgraph._schema import BLOBS, CHECKPOINTS, WRITES
from integrations.langgraph.demo_agent import QUESTION, Trace, make_app
from integrations.transformers import GenerateEvent

from ._demo import run_killed_worker

__all__ = ["agent_worker", "run_agent_demo"]

NEW_TOKENS = 240


def agent_worker(home: str, catalog: str | None, session_id: str, crash_at: int) -> None:
    """The crashing process (``concordia demo --agent-worker``): SIGKILLed from
    the llm node's ``on_event`` right after its ``crash_at``-th token is committed."""

    def crash(e: GenerateEvent) -> None:
        if e.phase == "token_committed" and e.n_generated >= crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    rt = Runtime.open(home=home, catalog_url=catalog, backend="host")
    trace = Trace()
    app = make_app(rt, new_tokens=NEW_TOKENS, trace=trace, on_generate_event=crash)
    print(f"  worker: running the agent on thread {session_id!r}", flush=True)
    app.invoke({"question": QUESTION}, session_id=session_id)
    raise ConcordiaError("the demo worker was meant to die inside the llm node")


def _rows(rt: Runtime, thread_id: str) -> dict[str, int]:
    with rt.catalog.read() as s:
        return {t.name.removeprefix("concordia_lg_"): s.execute(
            select(func.count()).select_from(t).where(t.c.session_id == thread_id)).scalar_one()
            for t in (CHECKPOINTS, BLOBS, WRITES)}


def run_agent_demo(*, home: Path, catalog: str | None, crash_at: int = 100,
                   say: Callable[[str], Any] = print) -> dict[str, Any]:
    thread = f"agent-{uuid.uuid4().hex[:8]}"
    say(f"Concordia demo: a LangGraph agent (plan -> llm -> report) on thread {thread!r}, home {home}")
    say(f"1. A worker process runs it; the llm node generates {NEW_TOKENS} tokens with durable_generate and "
        f"the worker is SIGKILLed after {crash_at} of them.")
    t0 = time.perf_counter()
    run_killed_worker(home, catalog, [], ["--agent-worker", "--session", thread, "--crash-at", str(crash_at)], say)

    with Runtime.open(home=home, catalog_url=catalog, backend="host") as rt:
        info = rt.info(thread)
        tasks = rt.catalog.list(prefix=thread + "#task:")
        say(f"2. The catalog says: thread {info.status}; "
            + "; ".join(f"generation session {t.id} {t.status}" for t in tasks))
        trace = Trace()
        app = make_app(rt, new_tokens=NEW_TOKENS, trace=trace)
        t1 = time.perf_counter()
        state = app.resume(thread)
        resume_s = time.perf_counter() - t1
        computed = len(trace.forwards)
        say(f"   resumed {thread!r} in {resume_s:.2f} s: nodes run now {trace.nodes} (plan was not re-run); "
            f"{computed} forward passes, the first with {trace.forwards[0] if trace.forwards else '-'} "
            "token(s) per sequence (no re-prefill)")
        say(f"   reused {NEW_TOKENS - computed} generated tokens and their KV cache from the log; "
            f"computed {computed}")

        say("3. Compare with an uninterrupted run of the same agent.")
        ref = make_app(rt, new_tokens=NEW_TOKENS, trace=Trace()).invoke({"question": QUESTION},
                                                                        session_id=thread + "-reference")
        equal = ref == state
        say(f"   final state equal to the uninterrupted run: {equal} ({state['report']})")
        if not equal:
            raise ConcordiaError("the resumed agent's final state differs from the uninterrupted run")
        rows = _rows(rt, thread)
        gen = rt.catalog.list(prefix=thread + "#task:")
        say(f"Saved: {rows['checkpoints']} graph checkpoints, {rows['blobs']} channel values (each stored once per "
            f"version), {rows['writes']} pending writes in {rt.catalog._redacted()}; generation log "
            f"{sum(g.log_bytes for g in gen) / 2**10:.0f} KiB under {home / 'sessions'}. Total "
            f"{time.perf_counter() - t0:.1f} s. Inspect with: concordia sessions list")
        return {"thread": thread, "crash_at": crash_at, "computed": computed, "nodes": trace.nodes,
                "first_forward": trace.forwards[0] if trace.forwards else None, "equal": equal,
                "resume_s": resume_s, "total_s": time.perf_counter() - t0, **rows}
