"""Per-step checkpoints of ``durable_generate`` with a ``DurableStaticCache``:
a forward hook on the model that commits each step's KV rows and input tokens
(``concordia_agents``' ``StepCommits``).

Where ``generate`` compiles the decode step (a GPU), the hook is traced into
the compiled forward and calls the ``concordia::step_commit`` custom op, whose
body launches the in-step producer kernel; CUDA graphs capture that launch,
so graph replays commit every step with no host work (the op's Python body
runs only while compiling and recording). Eager steps — the prefill, the
first step of a resumed call, every step on a CPU — commit on the host
(``StepCommits.host_step``) and then arm the device producer.

An epoch after a step of length ``L`` holds the KV rows and tokens ``[0, L)``
and ``meta["n_tokens"] = L``: the token sampled from that step's logits is
not in it yet (it is the next step's input). A resume therefore re-runs the
last committed token as its one-token first forward, which rewrites its KV
row and yields the logits to sample from (the same values in deterministic
mode) — that re-written row is committed again by the first eager step.

Where the hook goes (``hook_placement``): on the model (the default, with
which every GPU test has passed), on the decoder stack, or ``overlap``: on
the decoder stack with the producer on a side stream (six of the seven
step-commit GPU tests passed with it on 2026-12-07, the seventh not run to
its end; measured no faster than the default, docs/gpu.md). The compiled call is the model's
``__call__``, whose own hooks dynamo compiles as a frame of their own (a
second graph, guards and CUDA graph replay per step, with Python between
them), while a submodule's call — its hooks included — is inlined into the
forward's graph (checked on the CPU with inductor: the op in the one graph,
after the last layer's cache write, no recompilation per call). With
``overlap`` the decoder's hook forks (``concordia::step_commit_fork``: the
side stream waits for the current one, the producer launches on it) and a
hook on the output embeddings joins (``concordia::step_commit_join``), so
the producer runs beside the LM head — a read of the whole vocabulary
matrix, longer than a commit — instead of before it; a CUDA graph captures
the fork and the join as two branches that meet. ``_PLACEMENT`` is the
default, ``CONCORDIA_STEP_HOOK=model|decoder|overlap`` chooses for a process
and its children (the GPU tests' crash children included).
Dynamo does not guard on a submodule's hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so on its own a graph
compiled before the hook was added (any compiled plain ``generate`` earlier
in the process) would be replayed without it and the step commits would stop
silently (a hook added to the decoder after a compiled call ran 0 times of 3
on the CPU). What makes the submodule placements safe: ``attach`` sets the
cache's ``stepping`` value (1 decoder, 2 overlap) when the hooks go on
submodules and ``detach`` sets it back to 0, and every layer's ``update``
reads it, so each compiled step's guards hold it and a graph compiled
without the hooks (or with the other arrangement) is never replayed with
them attached, nor the reverse (``DurableStaticLayer``; tested on the CPU
with a compiled step, ``tests/test_transformers_static.py``). A model whose
decoder takes ``inputs_embeds`` (multimodal wrappers) would give the hook no
``input_ids``.

The custom op declares a small device ``sink`` tensor as mutated: an op with
no outputs and no mutated inputs may be dropped from the graph, and a sink
marked as a static address keeps CUDA graphs on
(``../shared/notes/compiled-decode.md``). The sink is the cache's
(``DurableStaticCache.step_sink``), not the call's, so a conversation's calls
on one kept cache give the compiled step the same input address. The
producer is looked up when the op's body runs (compiling, recording, eager),
not baked into the graph as a constant, so a new call does not recompile.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from concordia_agents import ConcordiaError, StepCommits

from ._cache import DurableStaticCache

__all__ = ["StepCheckpointer"]

# The producer the op's body launches: set while a StepCheckpointer is attached.
_current: list[Any] = []
#: where the step hook goes unless CONCORDIA_STEP_HOOK says (module docs; the benchmark compares them)
_PLACEMENT = "model"
#: each placement's number, the cache's ``stepping`` value while its hooks are on a submodule (0: the model's own)
_PLACEMENTS = {"model": 0, "decoder": 1, "overlap": 2}
# The overlapped commit's side stream per device, and the launches forked onto it that no join has
# waited for yet (the fork's and the join's bodies run in this order when eager, warming up or recording).
_side: dict[int, torch.cuda.Stream] = {}
_forked: list[torch.cuda.Stream] = []


def hook_placement() -> str:
    """Where the step hook goes: ``CONCORDIA_STEP_HOOK`` if set, else
    ``_PLACEMENT`` (module docs)."""
    chosen = os.environ.get("CONCORDIA_STEP_HOOK", "")
    if chosen and chosen not in _PLACEMENTS:
        raise ConcordiaError(f"CONCORDIA_STEP_HOOK: expected one of {list(_PLACEMENTS)}, found {chosen!r}")
    return chosen or _PLACEMENT


def _step_module(model: Any) -> Any:
    """The module whose forward hook commits a step (module docs): the model,
    or (placement ``decoder`` or ``overlap``) its decoder stack if it has one."""
    if hook_placement() == "model":
        return model
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):  # a model that names no decoder
        return model
    return decoder if isinstance(decoder, torch.nn.Module) else model


def _join_module(model: Any, step_module: Any) -> Any | None:
    """The module after whose forward an overlapped commit is joined (placement
    ``overlap``): the output embeddings (the LM head, the step's last large
    read, which the producer then runs beside), or None where the model has
    none apart from the step module (the commit is then joined at once)."""
    if hook_placement() != "overlap" or step_module is model:
        return None
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(head, torch.nn.Module) or any(head is m for m in step_module.modules()):
        return None
    return head


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side:
        # High priority, so that the producer's few blocks may go ahead of the LM head's queued ones and the
        # commit end inside the head's time (whether a captured graph keeps a stream's priority depends on
        # how the graph is instantiated: not checked; it costs nothing either way).
        _side[index] = torch.cuda.Stream(device=index, priority=-1)
    return _side[index]


def _launch(stream: int, length: torch.Tensor, ids: torch.Tensor) -> None:
    """Launch the attached step producer on ``stream`` (both ops' body)."""
    if not _current:
        raise ConcordiaError("concordia::step_commit ran with no durable_generate step producer attached")
    _current[-1].launch(stream, length.data_ptr(), ids.data_ptr(), int(ids.shape[1]), int(ids.stride(0)))


@torch.library.custom_op("concordia::step_commit", mutates_args=("sink",))
def _step_commit(kv: list[torch.Tensor], length: torch.Tensor, ids: torch.Tensor, sink: torch.Tensor) -> None:
    """Launch the in-step producer on the current stream. ``kv`` are the
    layers' key/value tensors (inputs so that the launch follows their
    writes), ``length`` the new length (device int64), ``ids`` the step's
    input tokens ``[batch, n]``."""
    _launch(torch.cuda.current_stream(ids.device).cuda_stream, length, ids)


@_step_commit.register_fake
def _(kv: list[torch.Tensor], length: torch.Tensor, ids: torch.Tensor, sink: torch.Tensor) -> None:
    return None


@torch.library.custom_op("concordia::step_commit_fork", mutates_args=("sink",))
def _step_commit_fork(kv: list[torch.Tensor], length: torch.Tensor, ids: torch.Tensor, sink: torch.Tensor) -> None:
    """``step_commit`` on the side stream, after everything queued on the
    current one: the step goes on (the LM head) while the producer runs.
    ``step_commit_join`` must follow in the same step (a CUDA graph's capture
    fails with a stream left unjoined; eager, the next step's cache update
    would move the length the producer reads)."""
    current, side = torch.cuda.current_stream(ids.device), _side_stream(ids.device)
    side.wait_stream(current)
    _launch(side.cuda_stream, length, ids)
    _forked.append(side)


@_step_commit_fork.register_fake
def _(kv: list[torch.Tensor], length: torch.Tensor, ids: torch.Tensor, sink: torch.Tensor) -> None:
    return None


@torch.library.custom_op("concordia::step_commit_join", mutates_args=("sink",))
def _step_commit_join(sink: torch.Tensor) -> None:
    """The current stream waits for the forked producer launches (if any:
    a host step forks none). Both ops mutate ``sink``, so a compiled graph
    keeps the join after the fork."""
    current = torch.cuda.current_stream(sink.device)
    while _forked:
        current.wait_stream(_forked.pop())


@_step_commit_join.register_fake
def _(sink: torch.Tensor) -> None:
    return None


class StepCheckpointer:
    """The forward hook (see the module docs). ``attach`` registers it,
    ``detach`` removes it and takes the log back from the device (raising
    what stopped the producer, if anything)."""

    def __init__(self, steps: StepCommits, cache: DurableStaticCache, tokens: torch.Tensor,
                 rng: torch.Tensor | None, committed: Callable[[int], None] | None = None) -> None:
        """``committed(length)`` is called after each host step's epoch (device
        steps call nothing: that is their point)."""
        self.steps, self.cache, self.tokens, self.rng = steps, cache, tokens, rng
        self._committed = committed
        self._length = cache.durable_layers[-1].cumulative_length  # after the last layer's update: L
        self._kv = [t for layer in cache.durable_layers for t in (layer.keys, layer.values)]
        self._sink = None
        self._handles: list[Any] = []
        self._stepping = False  # this hook set the cache's stepping value (attach)
        self._overlap = False  # commits fork onto the side stream, joined after the LM head (attach)
        self.in_step_epochs = 0  #: epochs the device producer committed (known after detach)
        self.first = True  #: the next host step commits whatever is new (the prefill, a resume's first step)
        if steps.device is not None:
            self._sink = cache.step_sink()

    def attach(self, model: Any) -> None:
        module = _step_module(model)  # first: a bad CONCORDIA_STEP_HOOK raises before anything is changed
        if self.steps.device is not None:
            _current.append(self.steps.device)
        head = _join_module(model, module)
        self._handles.append(module.register_forward_hook(self, with_kwargs=True))
        if head is not None:
            self._handles.append(head.register_forward_hook(self._join))
        self._overlap = head is not None
        # A submodule's hooks are inlined into the forward's graph, whose guards
        # must then hold which are on (module docs); the model's own hook is a
        # compiled frame of its own, which needs none.
        self._stepping = module is not model
        if self._stepping:
            self.cache.set_stepping(_PLACEMENTS["overlap" if self._overlap else "decoder"])

    def detach(self) -> None:
        if self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            if self._stepping:
                self.cache.set_stepping(0)
        if self.steps.device is not None and self.steps.device in _current:
            _current.remove(self.steps.device)
        _forked.clear()  # a fork whose join never ran (a failed forward): the device is synchronized below
        state = self.steps.close()
        if state is not None:
            self.in_step_epochs = state.commits

    def arm_now(self) -> None:
        """Arm the device producer before ``generate`` (a resume whose first
        forward is compiled: no eager step will arm it)."""
        if self.steps.device is not None:
            self.steps.arm(torch.cuda.current_stream(self.tokens.device).cuda_stream)
            self.first = False

    def _on_device(self) -> bool:
        """This step commits on the device: compiled, or eager after arming."""
        return self.steps.device is not None and (torch.compiler.is_compiling() or self.steps.armed)

    def _join(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        """The LM head's hook (placement ``overlap``): the step waits for its commit."""
        if self._on_device():
            torch.ops.concordia.step_commit_join(self._sink)

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            raise ConcordiaError("durable_generate with a static cache: expected the model's forward to receive "
                                 "input_ids, found none (inputs_embeds are not supported)")
        if self._on_device():
            if self._overlap:
                torch.ops.concordia.step_commit_fork(self._kv, self._length, ids, self._sink)
            else:
                torch.ops.concordia.step_commit(self._kv, self._length, ids, self._sink)
            return
        # A host step: store the step's tokens, commit, then arm the device.
        length = int(self._length)
        n = ids.shape[1]
        self.tokens.narrow(1, length - n, n).copy_(ids)
        if self.rng is not None:
            self.rng.copy_(torch.get_rng_state())
        epoch = self.steps.host_step(length, force=self.first)
        self.first = False
        if epoch is not None and self._committed is not None:
            self._committed(length)
        if self.steps.device is not None:
            self.steps.arm(torch.cuda.current_stream(ids.device).cuda_stream)
