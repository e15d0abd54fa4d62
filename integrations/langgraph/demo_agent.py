"""A small durable agent: plan → llm → report, used by ``concordia demo`` and
``examples/durable_agent.py``.

* ``plan`` turns the question into a numbered plan (cheap, deterministic).
* ``llm`` generates ``new_tokens`` tokens with ``durable_generate`` under the
  task's session ID (``task_session_id(config)``): if the process dies during
  this node, resuming the graph re-runs the node, and the generation continues
  from its last durable token instead of starting over.
* ``report`` summarizes the generation.

The model is a Llama with random weights built from a config (no download):
tiny on the CPU, Llama-3.2-1B-shaped in bf16 on a GPU. ``Trace`` records which
nodes ran and the input length of every forward call, so a caller can show what
a resume reused and what it recomputed; a ``Trace`` with a ``path`` keeps that
in a JSON file while it runs (pass it to ``make_app``). ``make_app``'s
``on_generate_event`` is the ``llm`` node's ``durable_generate`` ``on_event``:
the demo worker and the crash tests SIGKILL the process from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from concordia_agents import Runtime
from integrations.testing import llama_1b, tiny_llama
from integrations.transformers import GenerateEvent, durable_generate

from ._app import DurableGraph, wrap
from ._task import task_session_id

__all__ = ["AgentState", "Trace", "build_model", "make_app"]

QUESTION = "Why do long-running agents need durable GPU state?"


class AgentState(TypedDict, total=False):
    question: str
    plan: list[str]
    tokens: list[int]
    report: str


@dataclass
class Trace:
    """What ran in this process: node names in order, forward input lengths."""

    nodes: list[str] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)
    path: Path | None = None

    def add_node(self, name: str) -> None:
        self.nodes.append(name)
        self.save()

    def add_forward(self, length: int) -> None:
        self.forwards.append(length)
        if len(self.forwards) % 16 == 1:
            self.save()  # a SIGKILL may come at any token: keep the file nearly current

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"nodes": self.nodes, "forwards": self.forwards}))
            tmp.replace(self.path)


def build_model(device: str = "cpu") -> Any:
    """A random-weight Llama (seeded: every process builds the same weights):
    tiny on the CPU, Llama-3.2-1B-shaped in bf16 on a GPU."""
    return tiny_llama(device, max_positions=1024) if device == "cpu" else llama_1b(device)


def _encode(text: str, vocab: int) -> list[int]:
    """A byte-level stand-in for a tokenizer (the model has random weights anyway)."""
    return [3 + b % (vocab - 3) for b in text.encode()]


def make_app(runtime: Runtime, *, model: Any = None, device: str = "cpu", new_tokens: int = 240,
             trace: Trace | None = None,
             on_generate_event: Callable[[GenerateEvent], None] | None = None) -> DurableGraph:
    """The agent graph, wrapped for durable runs on ``runtime``; ``on_generate_event``
    observes the ``llm`` node's generation (``durable_generate``'s ``on_event``)."""
    model = model if model is not None else build_model(device)
    if trace is None:
        trace = Trace()

    def count_forward(_module: Any, args: tuple, kwargs: dict) -> None:
        ids: Any = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        trace.add_forward(int(ids.shape[1]))

    model.register_forward_pre_hook(count_forward, with_kwargs=True)

    def plan(state: AgentState) -> AgentState:
        trace.add_node("plan")
        q = state["question"]
        return {"plan": [f"1. restate: {q}", "2. list what a crash loses", "3. answer in one paragraph"]}

    def llm(state: AgentState, config: RunnableConfig) -> AgentState:
        trace.add_node("llm")
        text = state["question"] + "\n" + "\n".join(state["plan"])
        ids = torch.tensor([_encode(text, model.config.vocab_size)], device=model.device)
        out = durable_generate(model, ids, session_id=task_session_id(config), runtime=runtime,
                               max_new_tokens=new_tokens, do_sample=False, on_event=on_generate_event)
        return {"tokens": out[0, ids.shape[1]:].tolist()}

    def report(state: AgentState) -> AgentState:
        trace.add_node("report")
        digest = hashlib.sha256(json.dumps(state["tokens"]).encode()).hexdigest()[:16]
        return {"report": f"{len(state['tokens'])} tokens generated, sha256 {digest}"}

    builder = StateGraph(AgentState)
    builder.add_node("plan", plan)
    builder.add_node("llm", llm)
    builder.add_node("report", report)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "llm")
    builder.add_edge("llm", "report")
    builder.add_edge("report", END)
    return wrap(builder, runtime=runtime)
