"""transformers: a durable KV cache and ``durable_generate``.

Protocol of one call ``durable_generate(model, input_ids, session_id=...)``:

1. Open (or create) the session; if it holds a previous run, check its
   fingerprint (model config and dtype, prompt, attention mask, generation
   arguments) and raise ``ResumeMismatchError`` naming what differs.
2. Preallocate one KV storage tensor ``[2 * layers, batch, kv_heads, max_len,
   head_dim]`` and a token buffer ``[batch, max_len]`` and register both as
   ``kv`` regions; on resume they are restored in place (no re-prefill: the
   cache holds ``len(tokens) - 1`` positions and ``generate`` feeds only the
   last token). With ``return_dict_in_generate`` and ``output_scores`` /
   ``output_logits``, also ``scores`` / ``logits`` regions ``[batch,
   max_new_tokens, vocab]`` (float32), one row per generated token.
3. ``model.generate(..., past_key_values=cache)`` with a stopping-criteria hook
   that, after each sampled token, commits an epoch every
   ``checkpoint_every`` tokens: the new KV rows, the new tokens, the RNG states
   (sampling resumes identically), the new score/logit rows if kept, and the
   token count. The invariant at that point is ``cache length == len(tokens) -
   1``. On the GPU the commit returns once its tasks are queued (the executor
   copies during the next step), and the executor stays resident across steps
   while ``generate`` runs (``Backend.resident``).
4. A final epoch marks the run done; calling again returns the stored result
   without running the model, as the same type: a tensor, or a
   ``GenerateDecoderOnlyOutput`` rebuilt from the regions (also what a resumed
   call returns, so its scores/logits cover every token, not only those since
   the resume).

Observing a call: ``durable_generate(..., on_event=f)`` calls ``f`` with a
:class:`GenerateEvent` at three points: ``"opened"`` (the session is open and
its lease held; nothing committed by this call yet), ``"token_committed"``
(after each epoch holding new tokens) and ``"done"`` (the final epoch is
durable; the session is not closed yet). It runs on the calling thread, inside
``generate`` for ``"token_committed"``. An exception it raises ends the call as
any failure does: the session is given back, or released resumable after this
call's commits, never marked closed.

Why a callback, and not environment variables or a test-only hook module: it is
an argument of one call, visible in the signature and typed, so no process-wide
switch lives in library code and no other call or thread is affected. Crash
tests and demo workers pass one that SIGKILLs the process at the point they
test (``os.kill(os.getpid(), signal.SIGKILL)`` at ``"token_committed"`` with
``n_generated >= N``, at ``"opened"``, or at ``"done"``); anyone else can use it
for progress, metrics or a supervisor's heartbeat.

The cache works with ``model.generate`` directly too (``DurableCache.for_model``;
to persist it, register ``cache.storage`` as a kv region with ``seq_axis=3``),
beam search included: build it with ``batch_size = batch * num_beams`` (the
batch ``generate`` runs); ``reorder_cache`` permutes the storage's rows in
place. A cache used with another batch size raises ``ConcordiaError`` at the
first forward, naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicLayer

from concordia_agents import ConcordiaError, Runtime, Session

__all__ = ["DurableCache", "DurableLayer", "GenerateEvent", "GeneratePhase", "ResumeMismatchError",
           "durable_generate"]

#: where a ``durable_generate`` call is when it calls ``on_event`` (see the module docs)
GeneratePhase = Literal["opened", "token_committed", "done"]


class ResumeMismatchError(ConcordiaError):
    """``durable_generate`` was called again for a session recorded with another
    model, prompt or generation arguments."""


@dataclasses.dataclass(frozen=True, slots=True)
class GenerateEvent:
    """One point of a ``durable_generate`` call, passed to its ``on_event``.

    * ``"opened"``: the session is open and its lease held, before the call
      checks, restores or commits anything;
    * ``"token_committed"``: an epoch holding tokens up to ``n_generated`` was
      committed (every ``checkpoint_every`` tokens). On the host backend it is
      in the host ring; on a GPU it was handed to the executor, which may
      still be copying it (``durable_generate`` does not wait there);
    * ``"done"``: the final epoch is durable (flushed); the session is closed
      right after. Not called when the session had already finished and the
      call returns the stored result.
    """

    phase: GeneratePhase
    session_id: str
    #: the session's newest committed epoch (0: none yet)
    epoch: int
    #: tokens generated per sequence so far, those restored from the log included
    n_generated: int


class DurableLayer(DynamicLayer):
    """One layer's K/V as views into the shared preallocated storage: written in
    place, never reallocated (fixed addresses for the GPU executor)."""

    def __init__(self, storage: torch.Tensor, index: int, cache: DurableCache) -> None:
        super().__init__()
        self._k = storage[2 * index]
        self._v = storage[2 * index + 1]
        self._cache = cache
        self._i = index
        self.device = storage.device
        self.is_initialized = True
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = self._cache.lengths[self._index]
        n = key_states.shape[-2]
        if t0 + n > self._k.shape[-2]:
            raise ConcordiaError(f"durable cache full: expected at most {self._k.shape[-2]} positions, "
                                 f"found {t0 + n}; pass a larger max_cache_len")
        # copy_ broadcasts: without this check a batch of 1 would silently fill
        # every row of a cache built for more, and other mismatches would surface
        # as torch shape errors deep inside attention. Every layer shares the
        # storage's shape, so the first layer of each forward checks for all
        # (this runs per layer per token: ~0.2 us a check on the CI machine).
        if self._i == 0:
            b, h, _, d = key_states.shape
            if b != self._k.shape[0] or h != self._k.shape[1] or d != self._k.shape[3]:
                raise ConcordiaError(_shape_mismatch(self._k.shape, key_states.shape))
        self._k[:, :, t0:t0 + n].copy_(key_states)
        self._v[:, :, t0:t0 + n].copy_(value_states)
        self._cache.lengths[self._index] = t0 + n
        self.keys, self.values = self._k[:, :, :t0 + n], self._v[:, :, :t0 + n]
        return self.keys, self.values

    @property
    def _index(self) -> int:
        return self._i

    def get_seq_length(self) -> int:
        return self._cache.lengths[self._index]

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop() takes a negative count of tokens to remove")
        i = self._index
        self._cache.lengths[i] = max(0, self._cache.lengths[i] + tokens_to_remove)
        n = self._cache.lengths[i]
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def reset(self) -> None:
        self._cache.lengths[self._index] = 0
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``, in place.

        The inherited method rebinds ``keys``/``values`` to new tensors, which
        ``update`` never reads (it writes and returns the storage): beam search
        then ran on the unreordered rows and returned wrong beams silently."""
        batch = self._k.shape[0]
        if beam_idx.shape != (batch,):
            raise ConcordiaError(f"durable cache reorder: expected {batch} beam indices (the cache's batch size), "
                                 f"found shape {list(beam_idx.shape)}")
        n = self.get_seq_length()
        if n > 0:
            idx = beam_idx.to(self._k.device)
            # index_select makes a new tensor, so no source row is overwritten
            # before it is read; copy_ then keeps the storage's address.
            self._k[:, :, :n].copy_(self._k[:, :, :n].index_select(0, idx))
            self._v[:, :, :n].copy_(self._v[:, :, :n].index_select(0, idx))
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ConcordiaError(f"a durable cache has a fixed batch size: expected it to stay {self._k.shape[0]}, "
                             f"found a request to repeat it {repeats} times; build the cache with the expanded "
                             "batch size instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ConcordiaError(f"a durable cache has a fixed batch size: expected it to stay {self._k.shape[0]}, "
                             f"found a request to keep {len(indices)} rows")


def _shape_mismatch(expected: torch.Size, found: torch.Size) -> str:
    b, h, _, d = expected
    msg = (f"durable cache: expected key/value states of shape [batch={b}, kv_heads={h}, *, head_dim={d}] "
           f"(the shape it was built with), found {list(found)}")
    if found[0] != b:
        msg += (f"; it was built for batch_size={b} and generate runs {found[0]} sequences (generate expands the "
                "batch num_beams * num_return_sequences times: build the cache with that batch size)")
    return msg


class DurableCache(Cache):
    """A transformers ``Cache`` whose K/V live in one preallocated tensor
    ``storage[2 * layer + (0: K, 1: V)] = [batch, kv_heads, max_len, head_dim]``."""

    def __init__(self, *, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, max_cache_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.storage = torch.zeros(2 * num_layers, batch_size, kv_heads, max_cache_len, head_dim,
                                   dtype=dtype, device=device)
        self.lengths = [0] * num_layers
        self.durable_layers = [DurableLayer(self.storage, i, self) for i in range(num_layers)]
        super().__init__(layers=list[Any](self.durable_layers))

    @classmethod
    def for_model(cls, model: Any, *, batch_size: int, max_cache_len: int) -> DurableCache:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(num_layers=cfg.num_hidden_layers, batch_size=batch_size, kv_heads=kv_heads, head_dim=head_dim,
                   max_cache_len=max_cache_len, dtype=model.dtype, device=model.device)

    @property
    def length(self) -> int:
        return self.lengths[0]

    def set_length(self, n: int) -> None:
        for i, layer in enumerate(self.durable_layers):
            self.lengths[i] = n
            layer.keys, layer.values = layer._k[:, :, :n], layer._v[:, :, :n]


#: generate() arguments that do not change which tokens come out (callbacks that
#: observe; a stop is recorded as the run's end), so a resume may pass new ones
_NOT_FINGERPRINTED = frozenset({"stopping_criteria", "streamer"})
# The GPU executor stays resident between tokens while generate runs
# (Backend.resident): relaunching it for every token cost about 0.1 ms of host
# time per step on the H100 host. Its lifetime is the backend's default, 500 ms
# (it was 50 ms: a relaunch every ~4 tokens of a 1B-shaped decode, every ~20
# with 500 ms; whether that lowers the per-token cost was not settled by
# bench/results/paired_knobs_gpu-*.json (H100) — one run 0.61 -> 0.28 ms a checkpoint with a 1 s
# lifetime, another 0.40 -> 0.37 ms with 500 ms). It parks that often, so a
# kernel module that generate loads for the first time meanwhile (the first
# decode steps in a process) or a device-wide synchronize in a user's streamer
# or stopping criterion waits up to that long; a step longer than
# _DECODE_IDLE_MS parks it too.
_DECODE_IDLE_MS = 50.0
_DECODE_MAX_LIFE_MS = 500.0


def _fingerprint(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 kwargs: dict[str, Any], stored: tuple[str, ...] = ()) -> dict[str, str]:
    def h(data: bytes) -> str:
        return hashlib.blake2b(data, digest_size=12).hexdigest()

    cfg = model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else repr(model.config)
    gen: dict[str, Any] = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                           for k, v in sorted(kwargs.items()) if k not in _NOT_FINGERPRINTED}
    if stored:
        # The per-step outputs the log keeps, however they were asked for (the
        # model's generation_config too): a run that stored none cannot resume
        # into one that returns them. Absent when none, so that sessions
        # recorded before this key existed keep their fingerprint.
        gen[" stored outputs"] = list(stored)
    return {
        "model": h(cfg.encode() + str(model.dtype).encode()),
        "prompt": h(input_ids.detach().cpu().numpy().tobytes() + str(tuple(input_ids.shape)).encode()),
        "attention_mask": h(attention_mask.detach().cpu().numpy().astype(np.int8).tobytes()),
        "generation": h(json.dumps(gen, sort_keys=True).encode()),
    }


def _option(model: Any, kwargs: dict[str, Any], name: str, default: Any) -> Any:
    """A generation option as ``generate`` resolves it: the keyword, else the
    ``generation_config`` passed, else the model's."""
    if name in kwargs:
        return kwargs[name]
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    value = getattr(cfg, name, None)
    return default if value is None else value


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.vocab_size)


class _StepOutputs:
    """The per-step ``scores`` / ``logits`` of ``generate``'s dict output, kept in
    kv regions ``[batch, max_new_tokens, vocab]`` (float32, as ``generate``
    returns them) and committed with each token's epoch, so that a resumed or
    finished call returns every step's, not only those computed since the
    resume. Only made when the caller asks for them: vocab-sized floats per
    token and sequence (513 KB for a 128k vocabulary) go into the log.

    ``scores`` come from the tuple ``generate`` passes to stopping criteria (the
    processed scores of this call's steps). Raw ``logits`` are not passed there,
    so a forward hook copies the last position's logits of each forward into the
    row of the token that forward produces (``generate`` converts them with the
    same ``.to(float32)``, so the stored values are bit-equal)."""

    def __init__(self, model: Any, session: Session, *, batch: int, max_new: int, prompt_len: int,
                 device: torch.device, scores: bool, logits: bool) -> None:
        vocab = _vocab_size(model)
        self.prompt_len = prompt_len
        self.buffers: dict[str, torch.Tensor] = {}
        for name, wanted in (("scores", scores), ("logits", logits)):
            if wanted:
                buf = torch.zeros(batch, max_new, vocab, dtype=torch.float32, device=device)
                session.register(name, buf, kind="kv", seq_axis=1)
                self.buffers[name] = buf
        self.scores, self.logits = self.buffers.get("scores"), self.buffers.get("logits")
        self._row = 0  # the generated-token index the next forward produces
        self._call_start = 0  # generated tokens before this generate call
        self._hook: Any = None

    def attach(self, model: Any, n_generated: int) -> None:
        self._row = self._call_start = n_generated
        if self.logits is not None:
            self._hook = model.register_forward_hook(self._on_forward)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_forward(self, module: Any, args: Any, output: Any) -> None:
        assert self.logits is not None
        last = output.logits[:, -1]
        if self._row >= self.logits.shape[1] or last.shape != self.logits[:, 0].shape:
            raise ConcordiaError(f"durable_generate logits: expected step < {self.logits.shape[1]} of shape "
                                 f"{list(self.logits[:, 0].shape)}, found step {self._row} of shape {list(last.shape)}")
        self.logits[:, self._row].copy_(last)

    def record(self, n_generated: int, scores: Any) -> None:
        """After token ``n_generated - 1`` was appended (stopping-criteria time)."""
        if self.scores is not None:
            step = n_generated - self._call_start
            if not isinstance(scores, tuple) or len(scores) != step or scores[-1].shape != self.scores[:, 0].shape:
                found = (f"{type(scores).__name__} of {len(scores)}" if isinstance(scores, tuple)
                         else type(scores).__name__)
                raise ConcordiaError(f"durable_generate scores: expected generate to pass stopping criteria the "
                                     f"tuple of this call's {step} score tensors, found {found}")
            self.scores[:, n_generated - 1].copy_(scores[-1])
        self._row = n_generated

    def tuples(self, n_generated: int) -> dict[str, tuple[torch.Tensor, ...] | None]:
        """Each requested field as ``generate`` returns it: one ``[batch, vocab]``
        tensor per generated token (copies: the buffers stay the session's)."""
        out: dict[str, tuple[torch.Tensor, ...] | None] = {"scores": None, "logits": None}
        for name, buf in self.buffers.items():
            out[name] = tuple(buf[:, :n_generated].transpose(0, 1).contiguous().unbind(0))
        return out


def _dict_output(sequences: torch.Tensor, cache: DurableCache, steps: _StepOutputs | None) -> Any:
    """``GenerateDecoderOnlyOutput`` as an uninterrupted ``generate`` returns it.
    Its cache field is ``past_key_values`` in transformers 5.17 and ``cache``
    in 5.24+."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    names = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    cache_field = "cache" if "cache" in names else "past_key_values"
    per_step = steps.tuples(sequences.shape[1] - steps.prompt_len) if steps is not None else {}
    fields: dict[str, Any] = {"sequences": sequences, "scores": per_step.get("scores"),
                              "logits": per_step.get("logits"), cache_field: cache}
    return GenerateDecoderOnlyOutput(**fields)


class _Checkpointer(StoppingCriteria):
    """Commits an epoch at token boundaries; never stops generation itself."""

    def __init__(self, session: Session, cache: DurableCache, tokens: torch.Tensor, meta: dict[str, Any],
                 every: int, rng: torch.Tensor | None, cuda_rng: torch.Tensor | None,
                 steps: _StepOutputs | None = None,
                 on_event: Callable[[GenerateEvent], None] | None = None) -> None:
        self.session, self.cache, self.tokens, self.meta = session, cache, tokens, meta
        self.every, self.rng, self.cuda_rng, self.steps = every, rng, cuda_rng, steps
        self.on_event = on_event
        self.committed = meta["n_tokens"]

    def commit(self, input_ids: torch.Tensor, *, done: bool = False) -> None:
        n = input_ids.shape[1]
        # narrow, not [:, a:b]: this runs on a cold cache every token, and indexing parses its key
        self.tokens.narrow(1, self.committed, n - self.committed).copy_(
            input_ids.narrow(1, self.committed, n - self.committed))
        if self.rng is not None:
            self.rng.copy_(torch.get_rng_state())
        if self.cuda_rng is not None:
            self.cuda_rng.copy_(torch.cuda.get_rng_state(self.tokens.device))
        self.meta.update(n_tokens=n, done=done)
        rows = {"kv": self.cache.length, "tokens": n}
        if self.steps is not None:
            for name in self.steps.buffers:
                rows[name] = n - self.meta["prompt_len"]
        self.session.commit(dict(self.meta), rows=rows, wait=not self.tokens.is_cuda)
        self.committed = n

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        n = input_ids.shape[1]
        if self.cache.length != n - 1:
            raise ConcordiaError(f"expected the cache to hold {n - 1} positions at a token boundary, found "
                                 f"{self.cache.length}")
        if self.steps is not None:
            self.steps.record(n - self.meta["prompt_len"], scores)
        if n - self.committed >= self.every:
            self.commit(input_ids)
            if self.on_event is not None:
                self.on_event(GenerateEvent("token_committed", self.session.id, self.session.epoch,
                                            n - self.meta["prompt_len"]))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _check_supported(model: Any, kwargs: dict[str, Any]) -> tuple[bool, bool, bool]:
    """Refuse, before anything runs, what a resumed call could not return the
    same; returns (return_dict_in_generate, output_scores, output_logits)."""
    beams = _option(model, kwargs, "num_beams", 1)
    if beams != 1:
        raise ConcordiaError(f"durable_generate supports greedy and sampled decoding, not beam search: expected "
                             f"num_beams=1, found {beams} (a DurableCache with model.generate supports beams)")
    returned = _option(model, kwargs, "num_return_sequences", 1)
    if returned != 1:
        raise ConcordiaError(f"durable_generate: expected num_return_sequences=1, found {returned}; repeat the "
                             "prompt rows in input_ids instead")
    as_dict = bool(_option(model, kwargs, "return_dict_in_generate", False))
    if as_dict:
        for name, what in (("output_attentions", "attention weights"), ("output_hidden_states", "hidden states")):
            if _option(model, kwargs, name, False):
                raise ConcordiaError(
                    f"durable_generate with return_dict_in_generate: {name}=True is not supported: the per-step "
                    f"{what} are not stored in the log, so a resumed call could return only those computed after "
                    f"the resume; expected {name}=False, found True (scores and logits are supported)")
    return (as_dict, as_dict and bool(_option(model, kwargs, "output_scores", False)),
            as_dict and bool(_option(model, kwargs, "output_logits", False)))


def durable_generate(model: Any, input_ids: torch.Tensor, session_id: str, runtime: Runtime | None = None,
                     attention_mask: torch.Tensor | None = None, checkpoint_every: int = 1,
                     max_cache_len: int | None = None, on_event: Callable[[GenerateEvent], None] | None = None,
                     **generate_kwargs: Any) -> Any:
    """``model.generate`` that survives a crash: call it again with the same
    ``session_id`` to continue from the last committed token (see module docs).

    Returns what the uninterrupted ``generate`` call returns: the sequences, or
    with ``return_dict_in_generate=True`` a ``GenerateDecoderOnlyOutput`` whose
    ``scores`` / ``logits`` (when asked for) cover every generated token, across
    crashes, and whose cache field is the ``DurableCache``. ``output_attentions``
    and ``output_hidden_states`` are refused with ``return_dict_in_generate``
    (not stored), as are beam search and ``num_return_sequences > 1``.

    ``on_event`` is called with a :class:`GenerateEvent` when the session is
    opened, after each committed token epoch and when the final epoch is
    durable (see the module docs); it is not part of the run's fingerprint."""
    if checkpoint_every < 1:
        raise ConcordiaError(f"checkpoint_every: expected >= 1, found {checkpoint_every}")
    as_dict, want_scores, want_logits = _check_supported(model, generate_kwargs)
    own_runtime = runtime is None
    rt = runtime or Runtime.open()
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    max_new = int(generate_kwargs.get("max_new_tokens") or 20)
    batch, prompt_len = input_ids.shape
    max_len = max_cache_len or prompt_len + max_new + 1
    stored = tuple(name for name, wanted in (("scores", want_scores), ("logits", want_logits)) if wanted)
    fp = _fingerprint(model, input_ids, mask, generate_kwargs, stored)
    sampling = bool(generate_kwargs.get("do_sample", False))
    session = rt.session(session_id)
    steps: _StepOutputs | None = None
    try:
        meta = dict(session.meta or {})
        if on_event is not None:
            on_event(GenerateEvent("opened", session_id, session.epoch,
                                   int(meta.get("n_tokens", 0)) - int(meta.get("prompt_len", 0))))
        if meta:
            diff = [k for k in fp if meta.get("fingerprint", {}).get(k) != fp[k]]
            if diff:
                raise ResumeMismatchError(
                    f"session {session_id!r} was recorded with a different {', '.join(diff)}; expected the same "
                    "model, prompt and generation arguments to resume it (or use a new session ID)")
        cache = DurableCache.for_model(model, batch_size=batch, max_cache_len=max_len)
        tokens = torch.zeros(batch, max_len, dtype=input_ids.dtype, device=input_ids.device)
        # RNG states live next to the KV (device memory on a GPU) so that every
        # backend can register them; they are copied in at each commit.
        rng = torch.zeros_like(torch.get_rng_state(), device=input_ids.device) if sampling else None
        cuda_rng = (torch.zeros_like(torch.cuda.get_rng_state(input_ids.device), device=input_ids.device)
                    if sampling and input_ids.is_cuda else None)
        session.register("kv", cache.storage, kind="kv", seq_axis=3)
        session.register("tokens", tokens, kind="kv", seq_axis=1)
        if rng is not None:
            session.register("rng", rng)
        if cuda_rng is not None:
            session.register("cuda_rng", cuda_rng)
        if stored:
            steps = _StepOutputs(model, session, batch=batch, max_new=max_new, prompt_len=prompt_len,
                                 device=input_ids.device, scores=want_scores, logits=want_logits)
        n_tokens = int(meta.get("n_tokens", 0))
        if meta.get("done"):
            cache.set_length(session.regions["kv"].length)
            seq = tokens[:, :n_tokens].clone()
            session.cancel()  # nothing ran: the finished session is left exactly as it was
            return _dict_output(seq, cache, steps) if as_dict else seq
        if n_tokens:  # resume
            cache.set_length(session.regions["kv"].length)
            seq = tokens[:, :n_tokens].clone()
            if rng is not None:
                torch.set_rng_state(rng.cpu())
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng.cpu(), input_ids.device)
        else:
            seq = input_ids
            tokens[:, :prompt_len].copy_(input_ids)
            meta = {"fingerprint": fp, "prompt_len": prompt_len, "n_tokens": prompt_len, "done": False}
            session.commit(dict(meta), rows={"tokens": prompt_len})
        full_mask = torch.cat([mask, torch.ones(batch, seq.shape[1] - prompt_len, dtype=mask.dtype,
                                                device=mask.device)], dim=1)
        hook = _Checkpointer(session, cache, tokens, meta, checkpoint_every, rng, cuda_rng, steps, on_event)
        kwargs = dict(generate_kwargs)
        kwargs["max_new_tokens"] = max_new - (seq.shape[1] - prompt_len)
        criteria = StoppingCriteriaList([*(kwargs.pop("stopping_criteria", []) or []), hook])
        if kwargs["max_new_tokens"] > 0:
            if steps is not None:
                steps.attach(model, seq.shape[1] - prompt_len)
            try:
                with warnings.catch_warnings():
                    # 5.24 renames `past_key_values` to `cache`, which 5.17 rejects: the old name works on both.
                    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
                    with rt.backend.resident(_DECODE_IDLE_MS, _DECODE_MAX_LIFE_MS):
                        out = model.generate(seq, attention_mask=full_mask, past_key_values=cache,
                                             stopping_criteria=criteria, **kwargs)
            finally:
                if steps is not None:
                    steps.detach()
        else:
            out = seq
        sequences = out.sequences if hasattr(out, "sequences") else out
        hook.commit(sequences, done=True)
        session.flush()
        if on_event is not None:
            on_event(GenerateEvent("done", session_id, session.epoch, sequences.shape[1] - prompt_len))
        session.close()
        # Rebuilt, not generate's own: a resumed call's would hold only the steps since the resume.
        return _dict_output(sequences, cache, steps) if as_dict else sequences
    except BaseException:
        # A call that fails (a mismatched resume, a region that does not fit, an error
        # in generate) leaves the session as it found it, or, after this call's
        # commits, released and resumable: never marked closed.
        session.cancel()
        raise
    finally:
        if own_runtime:
            rt.close()
