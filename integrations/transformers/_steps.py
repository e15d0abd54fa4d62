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

Where the hook goes: on the model (the placement the GPU tests passed with).
The compiled call is the model's ``__call__``, whose own hooks dynamo
compiles as a frame of their own (a second graph, guards and CUDA graph
replay per step, with Python between them), while a submodule's call — its
hooks included — is inlined into the forward's graph (checked on the CPU with
inductor: the op in the one graph, after the last layer's cache write, no
recompilation per call). ``_HOOK_ON_DECODER`` puts the hook on the decoder
stack (``model.get_decoder()``) instead; it is off until the GPU tests have
passed with it, and ``CONCORDIA_STEP_HOOK=decoder`` (or ``model``) chooses
for a process and its children (the GPU tests' crash children included).
Dynamo does not guard on a submodule's hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so on its own a graph
compiled before the hook was added (any compiled plain ``generate`` earlier
in the process) would be replayed without it and the step commits would stop
silently (a hook added to the decoder after a compiled call ran 0 times of 3
on the CPU). What makes the placement safe: ``attach`` sets the cache's
``stepping`` flag when the hook goes on a submodule and ``detach`` clears
it, and every layer's ``update`` reads it, so each compiled step's guards
hold the flag's value and a graph compiled without the hook is never
replayed with it attached, nor the reverse (``DurableStaticLayer``; tested
on the CPU with a compiled step, ``tests/test_transformers_static.py``). A
model whose decoder takes ``inputs_embeds`` (multimodal wrappers) would give
the hook no ``input_ids``.

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
#: hook the decoder stack instead of the model (module docs; the benchmark's comparison)
_HOOK_ON_DECODER = False
_PLACEMENTS = ("model", "decoder")


def hook_placement() -> str:
    """Where the step hook goes: ``CONCORDIA_STEP_HOOK`` if set, else
    ``_HOOK_ON_DECODER`` (module docs)."""
    chosen = os.environ.get("CONCORDIA_STEP_HOOK", "")
    if chosen and chosen not in _PLACEMENTS:
        raise ConcordiaError(f"CONCORDIA_STEP_HOOK: expected one of {list(_PLACEMENTS)}, found {chosen!r}")
    return chosen or ("decoder" if _HOOK_ON_DECODER else "model")


def _step_module(model: Any) -> Any:
    """The module whose forward hook commits a step (module docs): the model,
    or (``hook_placement() == "decoder"``) its decoder stack if it has one."""
    if hook_placement() != "decoder":
        return model
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):  # a model that names no decoder
        return model
    return decoder if isinstance(decoder, torch.nn.Module) else model


@torch.library.custom_op("concordia::step_commit", mutates_args=("sink",))
def _step_commit(kv: list[torch.Tensor], length: torch.Tensor, ids: torch.Tensor, sink: torch.Tensor) -> None:
    """Launch the in-step producer on the current stream. ``kv`` are the
    layers' key/value tensors (inputs so that the launch follows their
    writes), ``length`` the new length (device int64), ``ids`` the step's
    input tokens ``[batch, n]``."""
    if not _current:
        raise ConcordiaError("concordia::step_commit ran with no durable_generate step producer attached")
    producer = _current[-1]
    producer.launch(torch.cuda.current_stream(ids.device).cuda_stream, length.data_ptr(), ids.data_ptr(),
                    int(ids.shape[1]), int(ids.stride(0)))


@_step_commit.register_fake
def _(kv: list[torch.Tensor], length: torch.Tensor, ids: torch.Tensor, sink: torch.Tensor) -> None:
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
        self._handle: Any = None
        self._stepping = False  # this hook set the cache's stepping flag (attach)
        self.in_step_epochs = 0  #: epochs the device producer committed (known after detach)
        self.first = True  #: the next host step commits whatever is new (the prefill, a resume's first step)
        if steps.device is not None:
            self._sink = cache.step_sink()

    def attach(self, model: Any) -> None:
        module = _step_module(model)  # first: a bad CONCORDIA_STEP_HOOK raises before anything is changed
        if self.steps.device is not None:
            _current.append(self.steps.device)
        self._handle = module.register_forward_hook(self, with_kwargs=True)
        # A submodule's hook is inlined into the forward's graph, whose guards
        # must then hold the flag (module docs); the model's own hook is a
        # compiled frame of its own, which needs none.
        self._stepping = module is not model
        if self._stepping:
            self.cache.set_stepping(True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            if self._stepping:
                self.cache.set_stepping(False)
        if self.steps.device is not None and self.steps.device in _current:
            _current.remove(self.steps.device)
        state = self.steps.close()
        if state is not None:
            self.in_step_epochs = state.commits

    def arm_now(self) -> None:
        """Arm the device producer before ``generate`` (a resume whose first
        forward is compiled: no eager step will arm it)."""
        if self.steps.device is not None:
            self.steps.arm(torch.cuda.current_stream(self.tokens.device).cuda_stream)
            self.first = False

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            raise ConcordiaError("durable_generate with a static cache: expected the model's forward to receive "
                                 "input_ids, found none (inputs_embeds are not supported)")
        if self.steps.device is not None and (torch.compiler.is_compiling() or self.steps.armed):
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
