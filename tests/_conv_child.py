"""Child process for the conversation crash tests: a 3-turn conversation.

Turn t's prompt is turn t-1's output plus 5 tokens of a fixed stream (turn 1:
12 tokens); each call is ``conversation_generate`` with call ID ``turn-t``, and
the seed ``100 + t`` set before it. ``--kill-turn T --kill-at N`` SIGKILLs the
process at the token boundary where turn T has N new tokens. Prints one JSON
line: every turn's output and its ``ConversationCall``. ``--plain`` runs
``model.generate`` on the same prompts instead (the reference); ``--static``
makes the conversation's calls use the static cache."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tests._gen_child import build

TURNS = 3


def extra_tokens(turn: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(50 + turn)
    return torch.randint(3, 256, (1, 12 if turn == 1 else 5), generator=g)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    p.add_argument("--sample", action="store_true")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--new-tokens", type=int, default=10)
    p.add_argument("--kill-turn", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--static", action="store_true")
    args = p.parse_args()
    from concordia_agents import Runtime
    from integrations.transformers import ConversationCall, conversation_generate

    model = build("llama")
    kwargs: dict[str, Any] = {"max_new_tokens": args.new_tokens, "do_sample": args.sample}
    if args.sample:
        kwargs.update(top_k=0, temperature=1.0)
    out = torch.zeros(1, 0, dtype=torch.int64)
    turns: list[dict[str, Any]] = []
    rt = None if args.plain else Runtime.open(home=args.home, backend="host")
    for turn in range(1, TURNS + 1):
        prompt = torch.cat([out, extra_tokens(turn)], dim=1)
        torch.manual_seed(100 + turn)
        if args.plain:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
            turns.append({"tokens": out.tolist()})
            continue
        calls: list[ConversationCall] = []
        extra: dict[str, Any] = {}
        if turn == args.kill_turn:
            class KillAt(StoppingCriteria):
                def __init__(self, start: int) -> None:
                    self.start = start

                def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
                    if input_ids.shape[1] - self.start >= args.kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return torch.zeros(1, dtype=torch.bool)

            extra["stopping_criteria"] = StoppingCriteriaList([KillAt(prompt.shape[1])])
        if args.static:
            extra["cache_implementation"] = "static"
        out = conversation_generate(model, prompt, "chat", f"turn-{turn}", runtime=rt, on_call=calls.append,
                                    **kwargs, **extra)
        turns.append({"tokens": out.tolist(), "call": dataclasses.asdict(calls[-1])})
    print(json.dumps(turns), flush=True)
    if rt is not None:
        rt.close()


if __name__ == "__main__":
    main()
