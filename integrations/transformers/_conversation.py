"""Conversations: one durable KV cache per conversation (a LangGraph thread, a
chat), reused by its successive ``generate`` calls and across crashes.

An agent's calls in one conversation send prompts that start with everything
said so far. ``conversation_generate`` keeps that conversation's KV in one
session (ID ``"conversation:" + conversation_id``) and prefills only what a
prompt adds to the longest prefix the conversation already holds: from GPU
memory when this process still holds it (``ResidentConversations``), else
restored from the log (a new process, after a crash, after eviction).

Session layout: kv regions ``kv`` (a ``DurableCache`` storage of one
sequence, ``max_cache_len`` positions, fixed at the conversation's first call)
and ``tokens`` (``[1, max_cache_len]``), the RNG states when sampling, and
meta ``{"fingerprint": {"model"}, "n_tokens": N, "call": {...}, "calls":
[...]}`` where ``call`` is the newest call (its ``id``, prompt hash and
length ``start``, generation arguments' hash, ``max_new``, ``done`` and, once
done, ``end``) and ``calls`` the last 32 finished calls whose results the
conversation still holds (a later crop below a call's ``end`` forgets it).

Protocol of a call ``conversation_generate(model, ids, conversation_id, call_id)``:

1. Open the session (lease). Its regions come from the resident copy if this
   process holds one at the session's epoch, else from the log.
2. The ``call_id`` of the newest call or of a remembered finished one: a
   retry. Its prompt and arguments must match (``ResumeMismatchError``);
   finished, it returns the stored result (``tokens[:end]``); interrupted, it
   continues from the last committed token (no re-prefill, the RNG
   restored). A call the conversation no longer remembers runs as a new one.
3. A new call: ``p`` = the longest common prefix of the held tokens and the
   prompt, at most ``len(prompt) - 1`` (the last prompt token is always
   forwarded, for its logits) and at most the KV held. The first epoch crops
   both regions to ``p`` and appends the prompt's new tokens (durable: a
   crash after it resumes the call from there); ``generate`` then prefills
   ``len(prompt) - p`` tokens.
4. One epoch per token (every ``checkpoint_every``) as ``durable_generate``
   commits them, the final one ``done``; the session is closed and its
   regions stay resident (LRU within the budget; past it, parked in host
   memory within ``host_budget_bytes``, else dropped: the log holds them).

Returns the sequences (prompt and new tokens) like ``model.generate``; the
call's :class:`ConversationCall` (reused and prefilled token counts, where the
KV came from) is passed to ``on_call``. Greedy or sampled decoding, batch 1.

The cache: the dynamic-style ``DurableCache`` (eager ``generate``) by default;
``cache_implementation="static"`` keeps a ``DurableStaticCache`` instead, with
which ``generate`` compiles its decode step on a GPU and the epochs of step 4
are committed inside the step (``durable_generate``'s static path,
``_steps.py``): the suffix prefill runs eager over the kept prefix, the decode
steps replay CUDA graphs. Both keep the same storage layout, so one log
serves either: a call with the other implementation than the resident copy's
restores from the log. A retry that continues an interrupted call at a
generated token runs its one-token first forward through the compiled step,
as ``durable_generate``'s resume does; one interrupted before its first new
token prefills its suffix again from the crop. A static call's epochs carry
the meta in the in-step producer's COMMIT body (at most 4 KiB), so it keeps
only the newest finished calls that fit (``_fit_step_body``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
from collections.abc import Callable
from typing import Any, Literal

import torch
from transformers import StoppingCriteriaList

from concordia_agents import ConcordiaError, MetaError, Runtime
from concordia_agents._logging import get_logger

from ._cache import DurableCache, DurableStaticCache
from ._generate import (
    _DECODE_IDLE_MS,
    _DECODE_MAX_LIFE_MS,
    ResumeMismatchError,
    _cache_keyword_quiet,
    _Checkpointer,
    _compiled_first_step,
    _detach_quietly,
    _fingerprint,
    _stepper,
)
from ._rng import cuda_rng_meta, output_vocab, philox_step, restore_rng, rng_regions
from ._tp import tensor_parallel

__all__ = ["DEFAULT_MAX_CACHE_LEN", "ConversationCall", "KvSource", "ResidentConversations", "conversation_generate"]

DEFAULT_MAX_CACHE_LEN = 32768  #: positions of a conversation's cache when neither the caller nor the model says less
_FINISHED_CALLS = 32  #: finished calls a conversation remembers for retries (their results it still holds)

#: where a call's reused KV came from: nowhere, device memory, host memory (parked), the log
KvSource = Literal["none", "resident", "host", "log"]


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationCall:
    """What one ``conversation_generate`` call reused and computed."""

    conversation_id: str
    call_id: str
    prompt_tokens: int
    #: prompt tokens whose KV came from the conversation (not recomputed)
    reused: int
    #: tokens the first forward computed (the prefill of the new suffix)
    prefilled: int
    #: where the reused KV came from: this process's device memory ("resident"), its host memory (a
    #: conversation parked there by ``ResidentConversations``), the log, or nowhere (nothing reused)
    source: KvSource
    #: the call had finished before (its stored result returned), or continued after a crash
    retried: Literal["no", "finished", "continued"]
    new_tokens: int


@dataclasses.dataclass
class _Resident:
    cache: DurableCache | DurableStaticCache
    tokens: torch.Tensor
    epoch: int
    key: tuple[Any, ...]
    source: KvSource = "resident"  #: "host": just brought back from host memory

    @property
    def nbytes(self) -> int:
        return self.cache.storage.numel() * self.cache.storage.element_size() + self.tokens.numel() * 8


@dataclasses.dataclass
class _Parked:
    """A conversation's KV and tokens copied to host memory (page-locked where
    there is a GPU, so the copies back run at the bus's speed)."""

    storage: torch.Tensor
    tokens: torch.Tensor
    epoch: int
    key: tuple[Any, ...]
    device: torch.device
    cache_class: type[DurableCache] | type[DurableStaticCache]

    @classmethod
    def of(cls, item: _Resident) -> _Parked:
        pin = item.cache.storage.is_cuda

        def host(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            out.copy_(t)  # synchronous: the device copy is freed after this
            return out

        return cls(host(item.cache.storage), host(item.tokens), item.epoch, item.key, item.cache.storage.device,
                   type(item.cache))

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size() + self.tokens.numel() * 8

    def unpark(self) -> _Resident:
        layers2, batch, kv_heads, max_len, head_dim = self.storage.shape
        cache = self.cache_class(num_layers=layers2 // 2, batch_size=batch, kv_heads=kv_heads, head_dim=head_dim,
                                 max_cache_len=max_len, dtype=self.storage.dtype, device=self.device)
        cache.storage.copy_(self.storage, non_blocking=True)
        tokens = self.tokens.to(self.device, non_blocking=True)
        if cache.storage.is_cuda:  # the pinned buffers are freed when this returns
            torch.cuda.current_stream(self.device).synchronize()
        return _Resident(cache, tokens, self.epoch, self.key, "host")


class ResidentConversations:
    """Conversations' KV kept in device memory between calls, least recently
    used first out past ``budget_bytes`` (``None``: unbounded). A conversation
    evicted from device memory is parked in host memory while the parked ones
    fit ``host_budget_bytes`` (0, the default: none is; least recently parked
    first out), and its next call copies it back instead of reading the log.
    Evicting only drops this process's copy: the KV is in the log, and the
    next call restores it from there. A copy is used only at the epoch the
    log holds (another process may have extended the conversation since).
    Not shared between threads for one conversation."""

    def __init__(self, budget_bytes: int | None = None, *, host_budget_bytes: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self._items: collections.OrderedDict[str, _Resident] = collections.OrderedDict()
        self._parked: collections.OrderedDict[str, _Parked] = collections.OrderedDict()
        self.evictions = 0  #: conversations dropped from device memory to stay within the budget
        self.parked = 0  #: of those, parked in host memory

    @property
    def nbytes(self) -> int:
        """Device memory held."""
        return sum(r.nbytes for r in self._items.values())

    @property
    def host_nbytes(self) -> int:
        """Host memory held by parked conversations."""
        return sum(p.nbytes for p in self._parked.values())

    def take(self, conversation_id: str, key: tuple[Any, ...]) -> _Resident | None:
        """The resident (or parked, copied back) copy of a conversation, removed
        (the caller puts it back)."""
        item = self._items.pop(conversation_id, None)
        if item is not None:
            return item if item.key == key else None
        parked = self._parked.pop(conversation_id, None)
        return parked.unpark() if parked is not None and parked.key == key else None

    def put(self, conversation_id: str, item: _Resident) -> None:
        self._parked.pop(conversation_id, None)  # the device copy is newer
        self._items[conversation_id] = item
        if self.budget_bytes is None:
            return
        # Least recently used first; the conversation just put goes too if it alone exceeds the budget.
        while self._items and self.nbytes > self.budget_bytes:
            cid, old = self._items.popitem(last=False)
            self.evictions += 1
            self._park(cid, old)

    def _park(self, conversation_id: str, item: _Resident) -> None:
        if item.nbytes > self.host_budget_bytes:
            return
        try:
            parked = _Parked.of(item)
        except (RuntimeError, MemoryError) as e:  # no page-locked memory to be had: the log holds the KV anyway
            get_logger().warning("conversation not parked in host memory", conversation=conversation_id,
                                 error=str(e))
            return
        self._parked[conversation_id] = parked
        self.parked += 1
        while self.host_nbytes > self.host_budget_bytes:
            self._parked.popitem(last=False)


_default_resident = ResidentConversations()


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[-1], b.shape[-1])
    if n == 0:
        return 0
    diff = (a[..., :n] != b[..., :n]).reshape(-1).nonzero()
    return int(diff[0]) if diff.numel() else n


def conversation_generate(model: Any, input_ids: torch.Tensor, conversation_id: str, call_id: str, *,
                          runtime: Runtime | None = None, max_cache_len: int | None = None,
                          checkpoint_every: int = 1, resident: ResidentConversations | None = None,
                          on_call: Callable[[ConversationCall], None] | None = None,
                          **generate_kwargs: Any) -> torch.Tensor:
    """``model.generate(input_ids, **generate_kwargs)`` for one call of a
    conversation, reusing the KV of the prompt's prefix the conversation holds
    (see the module docs). ``input_ids`` is ``[1, prompt_len]`` (no padding);
    ``max_cache_len`` is fixed at the conversation's first call (default: the
    model's ``max_position_embeddings``, at most ``DEFAULT_MAX_CACHE_LEN``:
    the whole window of a 128k-context model would hold 16 GiB of KV per
    conversation on an 8B shape)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConcordiaError(f"conversation_generate: expected input_ids of shape [1, prompt_len] (one "
                             f"conversation), found {list(input_ids.shape)}")
    implementation = generate_kwargs.get("cache_implementation")
    if implementation not in (None, "dynamic", "static"):
        raise ConcordiaError(f"conversation_generate: expected cache_implementation None, 'dynamic' or 'static', "
                             f"found {implementation!r}")
    cache_class = DurableStaticCache if implementation == "static" else DurableCache
    for name, allowed in (("attention_mask", ()), ("past_key_values", ()), ("num_beams", (1,)),
                          ("num_return_sequences", (1,))):
        value = generate_kwargs.get(name)
        if value is not None and not (isinstance(value, int) and value in allowed):
            raise ConcordiaError(f"conversation_generate: {name} is not supported (one unpadded sequence, the "
                                 f"conversation's own cache, greedy or sampled decoding); found {name}="
                                 f"{type(value).__name__ if isinstance(value, torch.Tensor) else repr(value)}")
    if checkpoint_every < 1:
        raise ConcordiaError(f"checkpoint_every: expected >= 1, found {checkpoint_every}")
    if tensor_parallel(model) is not None:
        raise ConcordiaError("conversation_generate does not support tensor parallelism yet (each rank would open "
                             "the same conversation session); expected a model on one device, found one sharded "
                             "with tp_plan (durable_generate supports it)")
    pool = resident if resident is not None else _default_resident
    own_runtime = runtime is None
    rt = runtime or Runtime.open()
    sid = "conversation:" + conversation_id
    prompt_len = int(input_ids.shape[1])
    max_new = int(generate_kwargs.get("max_new_tokens") or 20)
    sampling = bool(generate_kwargs.get("do_sample", False))
    device = input_ids.device
    # the default spelled out or not is one call (a retry compares the fingerprint)
    fp = _fingerprint(model, input_ids, torch.ones_like(input_ids),
                      {k: v for k, v in generate_kwargs.items()
                       if k != "cache_implementation" or v not in (None, "dynamic")})
    session = rt.session(sid)
    try:
        meta = dict(session.meta or {})
        if meta and meta.get("fingerprint", {}).get("model") != fp["model"]:
            raise ResumeMismatchError(f"conversation {conversation_id!r} was recorded with another model; expected "
                                      "the same model (or use a new conversation ID)")
        recorded = session.recorded.get("kv")
        max_len = int(recorded.shape[3]) if recorded is not None else int(
            max_cache_len or min(getattr(model.config, "max_position_embeddings", 0) or DEFAULT_MAX_CACHE_LEN,
                                 DEFAULT_MAX_CACHE_LEN))
        if prompt_len + max_new > max_len:
            raise ConcordiaError(f"conversation {conversation_id!r}: expected the prompt ({prompt_len}) and "
                                 f"max_new_tokens ({max_new}) to fit its cache of {max_len} positions, found "
                                 f"{prompt_len + max_new}")
        key = (id(model), max_len, str(device), str(model.dtype), cache_class.__name__)
        item = pool.take(conversation_id, key)
        source: KvSource = "log"
        if item is not None and item.epoch == session.epoch and session.epoch > 0:
            cache, tokens, source = item.cache, item.tokens, item.source
            session.register("kv", cache.storage, kind="kv", seq_axis=3, assume_restored=True)
            session.register("tokens", tokens, kind="kv", seq_axis=1, assume_restored=True)
        else:
            cache = item.cache if item is not None else cache_class.for_model(model, batch_size=1,
                                                                             max_cache_len=max_len)
            tokens = item.tokens if item is not None else torch.zeros(1, max_len, dtype=torch.int64, device=device)
            session.register("kv", cache.storage, kind="kv", seq_axis=3)
            session.register("tokens", tokens, kind="kv", seq_axis=1)
        item = _Resident(cache, tokens, 0, key)
        rng, cuda_rng = rng_regions(session, device, sampling)
        held = int(meta.get("n_tokens", 0))
        kv_held = min(session.regions["kv"].length, held)
        call = dict(meta.get("call") or {})
        finished = {c["id"]: c for c in meta.get("calls", [])}
        call_fp = {"prompt": fp["prompt"], "generation": fp["generation"], "start": prompt_len, "max_new": max_new}
        earlier = finished.get(call_id) if call.get("id") != call_id else None
        if call.get("id") == call_id or earlier is not None:  # a retry of the newest call, or of a finished one
            if earlier is not None:
                call = {**earlier, "done": True}
            if {k: call.get(k) for k in call_fp} != call_fp:
                raise ResumeMismatchError(f"conversation {conversation_id!r}: call {call_id!r} was made with another "
                                          "prompt or generation arguments; expected the same to retry it")
            if call.get("done"):
                held = int(call.get("end", held))
                out = tokens[:, :held].clone()
                session.cancel()
                _report(on_call, conversation_id, call_id, prompt_len, prompt_len, 0, source, "finished",
                        held - prompt_len)
                pool.put(conversation_id, dataclasses.replace(item, epoch=session.epoch))
                return out
            retried: Literal["no", "finished", "continued"] = "continued"
            if held <= int(call["start"]) and "reused" in call:
                # Before the call's first new token (the log ends at its crop or, with the
                # static cache, at its prefill's step): its suffix is prefilled again from the
                # crop, as the interrupted call computed it (its last position run alone as a
                # one-token forward would round otherwise).
                reuse = min(int(call["reused"]), kv_held)
            else:
                reuse = min(kv_held, held - 1)
            seq = tokens[:, :held].clone()
            restore_rng(rng, cuda_rng, device, meta)  # as copied at the commit, or advanced to `held` (_rng.py)
        else:
            retried = "no"
            common = _common_prefix(tokens[:, :held], input_ids)
            reuse = min(common, kv_held, prompt_len - 1)
            seq = input_ids
            tokens[:, reuse:prompt_len].copy_(input_ids[:, reuse:])
            # Finished calls whose result the conversation still holds (a retry returns it).
            kept = [c for c in meta.get("calls", []) if c["end"] <= common][-_FINISHED_CALLS:]
            meta = {"fingerprint": {"model": fp["model"]}, "n_tokens": prompt_len, "calls": kept,
                    "call": {"id": call_id, **call_fp, "reused": reuse, "done": False}}
            if cache_class is DurableStaticCache:
                _fit_step_body(meta)
            # The generators' live states, which this call samples from: in the crop's
            # epoch, so that a retry from it restores them (and not the last call's).
            if rng is not None:
                rng.copy_(torch.get_rng_state())
            if cuda_rng is not None:
                cuda_rng.copy_(torch.cuda.get_rng_state(device))
                meta["cuda_rng"] = cuda_rng_meta(prompt_len, philox_step(output_vocab(model), 1, device))
            # Crop to the reused prefix and take the prompt's new tokens: one epoch.
            session.commit(dict(meta), rows={"kv": (reuse, reuse), "tokens": (reuse, prompt_len)})
        if reuse == 0:
            source = "none"
        cache.set_length(reuse)
        hook = _Checkpointer(session, cache, tokens, meta, checkpoint_every, rng, cuda_rng)
        hook.committed = int(seq.shape[1])
        kwargs = dict(generate_kwargs)
        kwargs.pop("cache_implementation", None)  # the cache is passed in: generate refuses both
        kwargs["max_new_tokens"] = max_new - (seq.shape[1] - prompt_len)
        user_criteria = list(kwargs.pop("stopping_criteria", []) or [])
        if kwargs["max_new_tokens"] > 0 and isinstance(cache, DurableStaticCache):
            out = _static_generate(model, session, cache, tokens, hook, seq, checkpoint_every, rng,
                                   resume_from=prompt_len if retried == "continued" else None,
                                   criteria=user_criteria, **kwargs)
        elif kwargs["max_new_tokens"] > 0:
            with _cache_keyword_quiet(), rt.backend.resident(_DECODE_IDLE_MS, _DECODE_MAX_LIFE_MS):
                out = model.generate(seq, attention_mask=torch.ones_like(seq), past_key_values=cache,
                                     stopping_criteria=StoppingCriteriaList([*user_criteria, hook]), **kwargs)
        else:
            out = seq
        done_call = {**hook.meta["call"], "done": True, "end": int(out.shape[1])}
        hook.meta["call"] = done_call
        hook.meta["calls"] = [*hook.meta.get("calls", []), {k: v for k, v in done_call.items() if k != "done"}]
        hook.commit(out, done=False)
        session.flush(level="disk")  # as durable_generate: the upload of a remote session follows
        session.close()
        pool.put(conversation_id, dataclasses.replace(item, epoch=session.epoch))
        _report(on_call, conversation_id, call_id, prompt_len, reuse if retried == "no" else prompt_len,
                int(seq.shape[1]) - reuse, source, retried, int(out.shape[1]) - prompt_len)
        return out
    except BaseException:
        session.cancel()  # the resident copy, taken out of the pool, is not put back: it may not match the log
        raise
    finally:
        if own_runtime:
            rt.close()


def _static_generate(model: Any, session: Any, cache: DurableStaticCache, tokens: torch.Tensor,
                     hook: _Checkpointer, seq: torch.Tensor, every: int, rng: torch.Tensor | None, *,
                     resume_from: int | None, criteria: list[Any], **kwargs: Any) -> torch.Tensor:
    """``generate`` over the conversation's static cache, its epochs committed
    at model steps (``_steps.py``): inside the compiled step on a GPU, on the
    host for eager steps (the suffix prefill; every step on a CPU). A
    continued call passes its prompt's length as ``resume_from``. Leaves
    ``hook.committed`` at the tokens the steps committed, for the call's final
    epoch."""
    n = int(seq.shape[1])
    stepper = _stepper(session, cache, tokens, hook.meta, every, rng, None, n, device=seq.is_cuda)
    stepper.attach(model)
    try:
        first_step: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        regions = session.regions
        if resume_from is not None and seq.is_cuda and n - cache.length == 1 and cache.length >= resume_from \
                and regions["kv"].length == regions["tokens"].length:
            # The one-token first forward of a continued call, at a generated token, through
            # the compiled step, as the interrupted run computed it (durable_generate's resume).
            first_step = _compiled_first_step(model)
            stepper.arm_now()
        with _cache_keyword_quiet(), first_step:
            out = model.generate(seq, attention_mask=torch.ones_like(seq), past_key_values=cache,
                                 stopping_criteria=StoppingCriteriaList(criteria), **kwargs)
    except BaseException:
        _detach_quietly(stepper)
        raise
    stepper.detach()  # raises what stopped the in-step producer, if anything
    hook.committed = session.regions["tokens"].length  # the final epoch adds the tokens after it
    return out


#: bytes of JSON meta a static call's epochs may hold: the in-step producer's COMMIT body is
#: at most 4096 bytes (gpu_runtime/cuda/step_commit.py MAX_BODY), with the region lengths
_STEP_META_BYTES = 3072


def _fit_step_body(meta: dict[str, Any]) -> None:
    """Forget the oldest remembered finished calls until ``meta`` fits a static
    call's epochs (``_STEP_META_BYTES``; ``json.dumps``' spacing is wider than
    the body's): 32 calls of short IDs take about 4.5 KiB. A call whose own
    entry does not fit (an ID of kilobytes) raises ``MetaError`` here, before
    the call commits anything (the producer would refuse it only after the
    call's crop epoch, and again at every retry)."""
    while meta["calls"] and len(json.dumps(meta)) > _STEP_META_BYTES:
        meta["calls"] = meta["calls"][1:]
    found = len(json.dumps(meta))
    if found > _STEP_META_BYTES:
        raise MetaError(f"a static conversation call's epoch meta (call ID of {len(str(meta['call']['id']))} "
                        f"characters) must fit the in-step producer's COMMIT body: expected at most "
                        f"{_STEP_META_BYTES} bytes of JSON with no finished calls remembered, found {found} (use "
                        "a shorter call ID, or cache_implementation='dynamic')")


def _report(on_call: Callable[[ConversationCall], None] | None, conversation_id: str, call_id: str,
            prompt_len: int, reused: int, prefilled: int, source: KvSource,
            retried: Literal["no", "finished", "continued"], new_tokens: int) -> None:
    if on_call is not None:
        on_call(ConversationCall(conversation_id, call_id, prompt_len, reused, prefilled, source, retried,
                                 new_tokens))
