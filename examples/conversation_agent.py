"""A multi-turn durable agent whose conversation's KV cache is reused by every
LLM call and survives a crash: kill it mid-turn, resume it by thread ID.

    python examples/conversation_agent.py --session chat-1 --crash-in-turn 12   # SIGKILL mid-turn 12
    python examples/conversation_agent.py --session chat-1 --resume             # continues that turn

The graph (``integrations/langgraph/chat_agent.py``) alternates a user message
(``--user-tokens``) and a reply (``--reply-tokens``) for ``--turns`` turns;
the defaults grow the conversation to about 16.4k tokens. Each turn prints how
many prompt tokens it reused and how many it computed, and where the reused KV
came from (this process's memory, or the log after a restart). Runs a tiny
random Llama on the CPU by default.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from concordia_agents import Runtime
from integrations.langgraph.chat_agent import Turns, build_chat_model, make_chat_app


class _KillAfter(StoppingCriteria):
    """SIGKILLs this process (a real crash: no cleanup) after ``n`` new tokens of a reply."""

    def __init__(self, n: int) -> None:
        self.n, self.start = n, -1

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        if self.start < 0:
            self.start = input_ids.shape[1] - 1
        if input_ids.shape[1] - self.start >= self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--session", default="example-chat")
    p.add_argument("--resume", action="store_true", help="resume the thread instead of starting it")
    p.add_argument("--crash-in-turn", type=int, default=0, help="SIGKILL this process mid-reply of turn N")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--user-tokens", type=int, default=700)
    p.add_argument("--reply-tokens", type=int, default=120)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                   help="the conversation's KV cache: static compiles the decode step on a GPU")
    p.add_argument("--home", default=None, help="Concordia home (default: $CONCORDIA_HOME or ~/.concordia)")
    args = p.parse_args()
    gpu = args.device != "cpu"
    max_len = args.turns * (args.user_tokens + args.reply_tokens) + 16
    rt = Runtime.open(home=args.home, backend="cupy" if gpu else "host")
    trace = Turns()

    def stopping(turn: int) -> StoppingCriteriaList | None:
        if turn != args.crash_in_turn:
            return None
        return StoppingCriteriaList([_KillAfter(args.reply_tokens // 2)])

    app = make_chat_app(rt, model=build_chat_model(args.device, max_positions=max(max_len, 1024)), turns=args.turns,
                        user_tokens=args.user_tokens, reply_tokens=args.reply_tokens, max_cache_len=max_len,
                        trace=trace, stopping=stopping if args.crash_in_turn else None,
                        cache_implementation=args.cache)
    t = time.perf_counter()
    state = app.resume(args.session) if args.resume else app.invoke({}, session_id=args.session)
    took = time.perf_counter() - t
    print(f"thread {args.session!r}: {state['turn']} turns, conversation of {len(state['conversation'])} tokens, "
          f"{took:.1f} s in this process")
    for c in trace.calls:
        print(f"  call {c['call_id'].rsplit(':', 1)[-1][:12]}: prompt {c['prompt_tokens']:6d} tokens, reused "
              f"{c['reused']:6d} ({c['source']}), prefilled {c['prefilled']:5d}, new {c['new_tokens']}"
              + (f", retried: {c['retried']}" if c["retried"] != "no" else ""))
    computed = sum(c["prefilled"] for c in trace.calls)
    prompts = sum(c["prompt_tokens"] for c in trace.calls)
    print(f"  prompt tokens of the calls here: {prompts}; computed: {computed}; reused: {prompts - computed}")
    rt.close()


if __name__ == "__main__":
    main()
