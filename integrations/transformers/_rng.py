"""Generator state for sampled ``durable_generate`` calls.

A sampled call keeps the CPU and (on a GPU) CUDA generator states as regions
``rng`` / ``cuda_rng`` next to the KV (device memory on a GPU, so every
backend can register them), restored from the log on a resume.

Token-boundary commits copy the states at every commit. The in-step producer
of the static path commits from inside the CUDA graph, where nothing on the
host runs, so it cannot copy the CUDA generator's state (host memory) per
token. It does not need to: CUDA sampling draws from a counter-based
generator (Philox: a seed and an offset), and ``generate`` samples once per
new token, always the same shape (``torch.multinomial`` of one sample draws
``empty_like(probs).exponential_()``, float32 ``[batch, vocab]``), so the
offset advances by the same ``step`` per token. The region then holds the
state before sampling position ``at`` and the session's meta keeps
``{"at": at, "step": step}`` (``meta["cuda_rng"]``); the state before sampling
position ``n`` is that state with the offset advanced by ``(n - at) * step``.
Token-boundary commits set ``at`` to the committed length (advance 0); the
static path sets it once, when the call starts. ``step`` is measured on the
device, on the same shape, when the call starts (it depends on the device's
SM count and torch's launch policy, both the same for a resume: the
fingerprint holds the model and the generation arguments, and a different
GPU model would be a different run anyway).

Invariant: sampling consumes the CUDA generator only through ``generate``'s
one draw per token (the model's forward draws nothing in eval mode; user
logits processors that draw random numbers would break it, as they would
break any replay).
"""

from __future__ import annotations

from typing import Any

import torch

from concordia_agents import Session

__all__ = ["advanced", "cuda_rng_meta", "output_vocab", "philox_step", "restore_rng", "rng_regions"]

_SEED_BYTES = 8  # torch.cuda.get_rng_state: uint64 seed, then int64 Philox offset (little-endian)


def rng_regions(session: Session, device: torch.device, sampling: bool
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """When sampling, the CPU and (on a GPU) CUDA generator states as
    regions ``rng`` / ``cuda_rng`` (see the module docs)."""
    if not sampling:
        return None, None
    rng = torch.zeros_like(torch.get_rng_state(), device=device)
    session.register("rng", rng)
    cuda_rng = None
    if device.type == "cuda":
        cuda_rng = torch.zeros_like(torch.cuda.get_rng_state(device), device=device)
        session.register("cuda_rng", cuda_rng)
    return rng, cuda_rng


def output_vocab(model: Any) -> int:
    """The width of the logits ``generate`` samples from."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def philox_step(vocab: int, batch: int, device: torch.device) -> int:
    """How far one token's sampling advances the CUDA generator's offset:
    measured with the draw ``torch.multinomial`` makes (module docs), the
    generator's state put back after."""
    state = torch.cuda.get_rng_state(device)
    torch.empty(batch, vocab, dtype=torch.float32, device=device).exponential_(1)
    after = torch.cuda.get_rng_state(device)
    torch.cuda.set_rng_state(state, device)
    return _offset(after) - _offset(state)


def cuda_rng_meta(at: int, step: int) -> dict[str, int]:
    """The ``meta["cuda_rng"]`` entry: the region holds the state before sampling position ``at``."""
    return {"at": at, "step": step}


def advanced(state: torch.Tensor, by: int) -> torch.Tensor:
    """A CUDA generator state (16 bytes, CPU) with its Philox offset advanced by ``by``."""
    raw = bytearray(state.cpu().numpy().tobytes())
    if len(raw) != 2 * _SEED_BYTES:
        raise ValueError(f"CUDA generator state: expected {2 * _SEED_BYTES} bytes (seed, offset), found {len(raw)}")
    offset = _offset(state) + by
    raw[_SEED_BYTES:] = offset.to_bytes(_SEED_BYTES, "little", signed=True)
    return torch.frombuffer(raw, dtype=torch.uint8).clone()


def restore_rng(rng: torch.Tensor | None, cuda_rng: torch.Tensor | None, device: torch.device,
                meta: dict[str, Any] | None = None) -> None:
    """Set the generators to the states restored into the regions (a
    resume), the CUDA one advanced to the resumed length (module docs)."""
    if rng is not None:
        torch.set_rng_state(rng.cpu())
    if cuda_rng is not None:
        meta = meta or {}
        where = meta.get("cuda_rng")  # absent: a log of token-boundary commits only (the state as copied)
        by = 0
        if where:
            n = int(meta["n_tokens"])
            if n < int(where["at"]):
                raise ValueError(f"CUDA generator state: expected the region's position {where['at']} at or before "
                                 f"the resumed length {n}")
            by = (n - int(where["at"])) * int(where["step"])
        torch.cuda.set_rng_state(advanced(cuda_rng, by), device)


def _offset(state: torch.Tensor) -> int:
    return int.from_bytes(state.cpu().numpy().tobytes()[_SEED_BYTES:2 * _SEED_BYTES], "little", signed=True)
