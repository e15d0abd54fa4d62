"""Per-page hashes for dirty detection in opaque (``pages``) regions.

Instead of a shadow copy of the region (100 % memory overhead), each page keeps
one 64-bit hash: 8 bytes per page, 0.2 % of a 4 KiB page.

Hash of a page of ``w`` 64-bit words ``x_i``: ``sum_i x_i * k_i mod 2**64`` with
fixed odd weights ``k_i``. A change of a single word always changes the hash
(an odd weight is invertible mod 2**64); a change of several words goes
undetected only if the weighted differences cancel exactly. Bytes past the last
whole word of a short final page are folded in by CRC-32.

On a 2-core CPU this hashes about 8 GB/s (256 MiB in 32 ms, measured with
``np.einsum`` in 32 MiB blocks), well above a full copy's cost.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from .planner import runs_from_bits

__all__ = ["dirty_runs", "page_hashes"]

_BLOCK_BYTES = 32 << 20


@functools.lru_cache(maxsize=16)
def _weights(words: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(0xC0C0_2606))
    return rng.integers(0, 2**63, size=words, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def page_hashes(data: np.ndarray, page_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Hashes of every page of the flat uint8 array ``data`` (last page may be short)."""
    n = data.size
    npages = -(-n // page_size)
    if out is None:
        out = np.empty(npages, dtype=np.uint64)
    full = n // page_size
    words = page_size // 8
    if full:
        w = _weights(words)
        matrix = data[: full * page_size].view(np.uint64).reshape(full, words)
        step = max(1, _BLOCK_BYTES // page_size)
        for i in range(0, full, step):
            j = min(i + step, full)
            np.einsum("ij,j->i", matrix[i:j], w, out=out[i:j])
    if npages > full:
        tail = data[full * page_size:]
        whole = tail.size // 8
        out[full] = zlib.crc32(tail[whole * 8:].data) | (tail.size << 32)
        if whole:
            head = tail[: whole * 8].view(np.uint64)
            out[full:] += np.einsum("j,j->", head, _weights(words)[:whole], dtype=np.uint64)
    return out


def dirty_runs(old: np.ndarray, new: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[p0, p1)`` of pages whose hashes differ (the planner's
    run finding, as the GPU backend applies it to the device's dirty bitmap)."""
    return runs_from_bits(old != new)
