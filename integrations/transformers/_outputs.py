"""The per-step ``scores`` / ``logits`` of ``generate``'s dict output, kept in
kv regions, and the dict output rebuilt from them."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from concordia_agents import ConcordiaError, Session

from ._cache import DurableCache, DurableStaticCache

__all__: list[str] = []  # private to the package


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


def _dict_output(sequences: torch.Tensor, cache: DurableCache | DurableStaticCache, steps: _StepOutputs | None
                 ) -> Any:
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
