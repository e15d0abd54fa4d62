"""``durable_generate``: the call protocol of the package docstring, its
events, the run fingerprint and the per-token checkpointer."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from concordia_agents import ConcordiaError, Runtime, Session

from ._cache import DurableCache, DurableStaticCache
from ._errors import ResumeMismatchError
from ._outputs import _dict_output, _StepOutputs
from ._rng import cuda_rng_meta, output_vocab, philox_step, restore_rng, rng_regions
from ._steps import StepCheckpointer
from ._tp import agree, check_layout, rank_session_id, tensor_parallel

__all__ = ["GenerateEvent", "GeneratePhase", "ResumeMismatchError", "durable_generate"]

#: where a ``durable_generate`` call is when it calls ``on_event`` (see the module docs)
GeneratePhase = Literal["opened", "token_committed", "done"]


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
    #: epochs of this call committed by the in-step producer inside the model step (the static cache
    #: on a GPU), which calls no ``token_committed`` for them; set on ``"done"``
    in_step_epochs: int = 0


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


class _Checkpointer(StoppingCriteria):
    """Commits an epoch at token boundaries; never stops generation itself."""

    def __init__(self, session: Session, cache: DurableCache | DurableStaticCache, tokens: torch.Tensor,
                 meta: dict[str, Any],
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
            if "cuda_rng" in self.meta:  # the region now holds the state before sampling position n (_rng.py)
                self.meta["cuda_rng"] = cuda_rng_meta(n, self.meta["cuda_rng"]["step"])
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


@contextlib.contextmanager
def _cache_keyword_quiet() -> Iterator[None]:
    """Silence transformers' deprecation of ``past_key_values``: 5.24 renames
    it ``cache``, which 5.17 rejects, so the old name is the one both take."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        yield


def _stepper(session: Session, cache: DurableStaticCache, tokens: torch.Tensor, meta: dict[str, Any], every: int,
             rng: torch.Tensor | None, on_event: Callable[[GenerateEvent], None] | None, prompt_len: int, *,
             device: bool) -> StepCheckpointer:
    """The per-step checkpointer of the static path (``_steps.py``)."""
    steps = session.step_commits(kv="kv", tokens="tokens", meta=meta, length_key="n_tokens", every=every,
                                 device=device)

    def committed(length: int) -> None:
        if on_event is not None:
            on_event(GenerateEvent("token_committed", session.id, session.epoch, length - prompt_len))

    return StepCheckpointer(steps, cache, tokens, rng, committed)


@contextlib.contextmanager
def _compiled_first_step(model: Any) -> Iterator[None]:
    """Route ``generate``'s first forward through its compiled decode step
    while the uncached input is one token (a resume of the static path).

    ``generate`` runs its first forward (``_prefill``) eagerly and every later
    one through ``get_compiled_call``; eager and compiled kernels round
    differently, so a resume whose first forward were eager could pick another
    token than the uninterrupted compiled run did at that position. With one
    uncached token the first forward is a decode step: this shadows the
    model's ``_prefill`` (transformers 5.17 and 5.24+: ``_prefill(input_ids,
    generation_config, model_kwargs, is_first_iteration)``) for the call, and
    prepares and runs it as the decode loop does. Anything else, or where
    ``generate`` would not compile, goes to the original."""
    original = model._prefill

    def prefill(input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict[str, Any],
                is_first_iteration: bool = True) -> Any:
        # generate's keyword: `cache` in 5.24+ (it renames `past_key_values`), `past_key_values` in 5.17
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if (cache is None or model_kwargs.get("inputs_embeds") is not None
                or input_ids.shape[1] - int(cache.get_seq_length()) != 1
                or not model._valid_auto_compile_criteria(model_kwargs, generation_config)):
            return original(input_ids, generation_config, model_kwargs, is_first_iteration=is_first_iteration)
        inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
        return model.get_compiled_call(generation_config.compile_config)(**inputs, return_dict=True)

    model._prefill = prefill
    try:
        yield
    finally:
        del model._prefill


def _detach_quietly(stepper: StepCheckpointer) -> None:
    """Take the log back from the device while another error is on its way
    out: what stopped the producer too is a warning, not a new exception."""
    try:
        stepper.detach()
    except Exception as e:  # noqa: BLE001 - the error on its way out is the one to raise
        warnings.warn(f"durable_generate: the in-step producer also stopped: {e}", RuntimeWarning, stacklevel=3)


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
    durable (see the module docs); it is not part of the run's fingerprint.

    ``cache_implementation="static"`` keeps the K/V in a
    :class:`DurableStaticCache` (compileable: on a GPU ``generate`` compiles its
    decode step, as with transformers' ``StaticCache``; eager on a CPU); the
    default is the dynamic-style :class:`DurableCache`. The choice is part of
    the fingerprint: a run resumes with the cache it started with."""
    if checkpoint_every < 1:
        raise ConcordiaError(f"checkpoint_every: expected >= 1, found {checkpoint_every}")
    as_dict, want_scores, want_logits = _check_supported(model, generate_kwargs)
    implementation = generate_kwargs.get("cache_implementation")
    if implementation not in (None, "dynamic", "static"):
        raise ConcordiaError(f"durable_generate: expected cache_implementation None, 'dynamic' or 'static', found "
                             f"{implementation!r}")
    cache_class = DurableStaticCache if implementation == "static" else DurableCache
    own_runtime = runtime is None
    rt = runtime or Runtime.open()
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    max_new = int(generate_kwargs.get("max_new_tokens") or 20)
    batch, prompt_len = input_ids.shape
    max_len = max_cache_len or prompt_len + max_new + 1
    stored = tuple(name for name, wanted in (("scores", want_scores), ("logits", want_logits)) if wanted)
    fp = _fingerprint(model, input_ids, mask, generate_kwargs, stored)
    sampling = bool(generate_kwargs.get("do_sample", False))
    tp = tensor_parallel(model)
    check_layout(rt, session_id, tp)
    session = rt.session(rank_session_id(session_id, tp) if tp is not None else session_id)
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
        # A new cache per call, as transformers' own static path builds a new StaticCache per call
        # (_prepare_static_cache): the compiled step's CUDA graphs are recorded again for its addresses.
        cache = cache_class.for_model(model, batch_size=batch, max_cache_len=max_len)
        tokens = torch.zeros(batch, max_len, dtype=input_ids.dtype, device=input_ids.device)
        session.register("kv", cache.storage, kind="kv", seq_axis=3)
        session.register("tokens", tokens, kind="kv", seq_axis=1)
        rng, cuda_rng = rng_regions(session, input_ids.device, sampling)
        if stored:
            steps = _StepOutputs(model, session, batch=batch, max_new=max_new, prompt_len=prompt_len,
                                 device=input_ids.device, scores=want_scores, logits=want_logits)
        n_tokens = int(meta.get("n_tokens", 0))
        if tp is not None:  # the newest token every rank holds (_tp.py)
            agreed, all_done, states = agree(tp, n_tokens, bool(meta.get("done")), [rng, cuda_rng])
            for region, state in zip((rng, cuda_rng), states, strict=True):
                if region is not None and state is not None:
                    region.copy_(state)
            if agreed < n_tokens:
                # Crop to the agreed token, durably (one epoch, as a conversation's crop):
                # the KV the resume keeps, the tokens before it, the stored per-step outputs.
                keep = 0 if agreed <= prompt_len else min(session.regions["kv"].length, agreed - 1)
                crop = {"kv": (keep, keep), "tokens": (agreed, agreed)}
                if steps is not None:
                    kept_steps = max(agreed - prompt_len, 0)
                    crop.update({name: (kept_steps, kept_steps) for name in steps.buffers})
                meta.update(n_tokens=agreed, done=False)
                if "cuda_rng" in meta:  # the states agreed are those before sampling position `agreed`
                    meta["cuda_rng"] = cuda_rng_meta(agreed, meta["cuda_rng"]["step"])
                session.commit(dict(meta), rows=crop)
                n_tokens = agreed
            if not all_done:
                meta["done"] = False
        if meta.get("done"):
            cache.set_length(session.regions["kv"].length)
            seq = tokens[:, :n_tokens].clone()
            session.cancel()  # nothing ran: the finished session is left exactly as it was
            return _dict_output(seq, cache, steps) if as_dict else seq
        if n_tokens:  # resume
            # An epoch of a step (the static path) holds the KV of every token it
            # holds: the last one is re-run as the one-token first forward, for
            # its logits (module docs of _steps.py).
            # Before any generated token (the prefill's epoch) the prompt is prefilled
            # again: its last position computed alone would round otherwise than in
            # the uninterrupted run's whole-prompt forward.
            cache.set_length(0 if n_tokens <= prompt_len else min(session.regions["kv"].length, n_tokens - 1))
            seq = tokens[:, :n_tokens].clone()
            restore_rng(rng, cuda_rng, input_ids.device, meta)
        else:
            seq = input_ids
            tokens[:, :prompt_len].copy_(input_ids)
            meta = {"fingerprint": fp, "prompt_len": prompt_len, "n_tokens": prompt_len, "done": False}
            if cuda_rng is not None:  # the state generate starts sampling from, and its step per token (_rng.py)
                cuda_rng.copy_(torch.cuda.get_rng_state(input_ids.device))
                meta["cuda_rng"] = cuda_rng_meta(prompt_len, philox_step(output_vocab(model), batch, input_ids.device))
            session.commit(dict(meta), rows={"tokens": prompt_len})
        full_mask = torch.cat([mask, torch.ones(batch, seq.shape[1] - prompt_len, dtype=mask.dtype,
                                                device=mask.device)], dim=1)
        hook = _Checkpointer(session, cache, tokens, meta, checkpoint_every, rng, cuda_rng, steps, on_event)
        kwargs = dict(generate_kwargs)
        kwargs.pop("cache_implementation", None)  # the cache is passed in: generate refuses both
        kwargs["max_new_tokens"] = max_new - (seq.shape[1] - prompt_len)
        user_criteria = list(kwargs.pop("stopping_criteria", []) or [])
        # The static cache without stored outputs commits at model steps (inside
        # the compiled step on a GPU; sampling too: the CUDA generator's state at
        # a step follows from the length, _rng.py). Tensor parallel sampling on a
        # GPU keeps the token-boundary commits (its ranks agree on copied states).
        stepper = None
        if isinstance(cache, DurableStaticCache) and steps is None and (cuda_rng is None or tp is None):
            stepper = _stepper(session, cache, tokens, meta, checkpoint_every, rng, on_event, prompt_len,
                               device=input_ids.is_cuda)
        criteria = StoppingCriteriaList(user_criteria if stepper is not None else [*user_criteria, hook])
        if kwargs["max_new_tokens"] > 0:
            if steps is not None:
                steps.attach(model, seq.shape[1] - prompt_len)
            if stepper is not None:
                stepper.attach(model)
            try:
                with _cache_keyword_quiet():
                    # The executor stays resident between token-boundary commits; the
                    # in-step producer needs none (it would only hold SMs).
                    resident = (rt.backend.resident(_DECODE_IDLE_MS, _DECODE_MAX_LIFE_MS) if stepper is None
                                else contextlib.nullcontext())
                    first_step: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
                    regions = session.regions
                    if (isinstance(cache, DurableStaticCache) and input_ids.is_cuda
                            and seq.shape[1] - cache.length == 1 and cache.length >= prompt_len
                            and (stepper is None or regions["kv"].length == regions["tokens"].length)):
                        # A resume: its one-token first forward runs through the compiled
                        # step, as the uninterrupted run computed that position; the
                        # device producer is armed before it (no eager step will arm it).
                        first_step = _compiled_first_step(model)
                        if stepper is not None:
                            stepper.arm_now()
                    with resident, first_step:
                        out = model.generate(seq, attention_mask=full_mask, past_key_values=cache,
                                             stopping_criteria=criteria, **kwargs)
            except BaseException:
                if stepper is not None:
                    _detach_quietly(stepper)
                raise
            else:
                if stepper is not None:
                    stepper.detach()  # raises what stopped the in-step producer, if anything
            finally:
                if steps is not None:
                    steps.detach()
        else:
            out = seq
        sequences = out.sequences if hasattr(out, "sequences") else out
        if stepper is not None:
            hook.committed = session.regions["tokens"].length  # the final epoch adds the tokens after it
        hook.commit(sequences, done=True)
        # fsynced before returning; a remote-level session's upload follows within
        # CONCORDIA_REMOTE_INTERVAL_S, not on this call's latency
        session.flush(level="disk")
        if on_event is not None:
            on_event(GenerateEvent("done", session_id, session.epoch, sequences.shape[1] - prompt_len,
                                   stepper.in_step_epochs if stepper is not None else 0))
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
