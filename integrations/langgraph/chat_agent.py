"""A multi-turn durable agent whose conversation's KV cache is kept across its
LLM calls and across crashes: ``examples/conversation_agent.py``.

Each turn, the ``user`` node appends a user message (deterministic stand-in
text) to the conversation, and the ``llm`` node calls
``conversation_generate`` with the whole conversation as its prompt, the
graph's thread ID as the conversation ID and the task's session ID as the
call ID. So turn N prefills only what turn N adds (its user message and the
previous reply's last token) instead of the whole conversation; after a crash,
resuming the thread re-runs only the interrupted node, whose call continues
from its last durable token (one-token first forward) with the conversation's
KV restored from the log. ``Turns`` records per turn how many prompt tokens
were reused and how many computed; with a ``path`` it keeps them in a JSON
file while it runs.

The model is the tiny random Llama of ``demo_agent`` with room for 32k
positions on the CPU, Llama-3.2-1B-shaped on a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from concordia_agents import Runtime
from integrations.testing import llama_1b, tiny_llama
from integrations.transformers import ConversationCall, conversation_generate

from ._app import DurableGraph, wrap
from ._task import conversation_ids

__all__ = ["ChatState", "Turns", "build_chat_model", "make_chat_app"]


class ChatState(TypedDict, total=False):
    turn: int
    conversation: list[int]
    replies: list[int]  #: new tokens per reply


@dataclass
class Turns:
    """Per LLM call in this process: its ConversationCall as a dict."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None

    def add(self, call: ConversationCall) -> None:
        self.calls.append(asdict(call))
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.calls))
            tmp.replace(self.path)


def build_chat_model(device: str = "cpu", max_positions: int = 32768) -> Any:
    return tiny_llama(device, max_positions=max_positions) if device == "cpu" else llama_1b(device)


def _user_message(turn: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + turn)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def make_chat_app(runtime: Runtime, *, model: Any, turns: int, user_tokens: int, reply_tokens: int,
                  max_cache_len: int, trace: Turns | None = None,
                  stopping: Callable[[int], Any] | None = None,
                  cache_implementation: str | None = None) -> DurableGraph:
    """The chat graph (``user`` → ``llm`` → back to ``user`` until ``turns``
    replies), wrapped for durable runs on ``runtime``. ``stopping(turn)`` may
    return a ``StoppingCriteriaList`` for that turn's generation (the example
    SIGKILLs itself from one); ``cache_implementation`` goes to
    ``conversation_generate`` (``"static"``: compiled decode on a GPU)."""
    trace = trace if trace is not None else Turns()
    vocab = model.config.vocab_size

    def user(state: ChatState) -> ChatState:
        turn = state.get("turn", 0) + 1
        return {"turn": turn,
                "conversation": state.get("conversation", []) + _user_message(turn, user_tokens, vocab)}

    def llm(state: ChatState, config: RunnableConfig) -> ChatState:
        conversation_id, call_id = conversation_ids(config)
        ids = torch.tensor([state["conversation"]], device=model.device)
        extra: dict[str, Any] = {}
        if cache_implementation is not None:
            extra["cache_implementation"] = cache_implementation
        if stopping is not None and (criteria := stopping(state["turn"])) is not None:
            extra["stopping_criteria"] = criteria
        out = conversation_generate(model, ids, conversation_id, call_id, runtime=runtime,
                                    max_cache_len=max_cache_len, max_new_tokens=reply_tokens, do_sample=False,
                                    on_call=trace.add, **extra)
        return {"conversation": out[0].tolist(), "replies": [*state.get("replies", []), out.shape[1] - ids.shape[1]]}

    def more(state: ChatState) -> str:
        return "user" if state["turn"] < turns else END

    builder = StateGraph(ChatState)
    builder.add_node("user", user)
    builder.add_node("llm", llm)
    builder.add_edge(START, "user")
    builder.add_edge("user", "llm")
    builder.add_conditional_edges("llm", more, ["user", END])
    return wrap(builder, runtime=runtime)
