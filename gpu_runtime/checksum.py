"""Payload checksum shared by the host and the GPU handlers.

Definition, record format version 2 (what every writer writes)::

    n     = payload length in bytes
    y_i   = little-endian u32 words of the payload, zero-padded to a multiple of 8 bytes
    W_i   = (splitmix64(i mod 1024) | 1) * (splitmix64(1024 + i div 1024) | 1)  mod 2**64
    s     = sum_i y_i * W_i  mod 2**64
    check = splitmix64(s ^ n)

Version 1 (still read: a record's header names its version) summed u64 words
``x_j * (splitmix64(j) | 1)``; device code computes version 2 on u64 words too,
as ``lo32(x_j) * W_2j + hi32(x_j) * W_2j+1``.

Why the weights are a product: each ``W_i`` is odd and, pair by pair, as good
as random, while the host sums a 4 KiB block with one weight vector that
stays in cache (``sum_b u_b * sum_i y_bi * w_i``, a matrix-vector product,
as the page hash does) instead of streaming a weight per word from memory:
weights of their own per 32-bit word made the host sum 4.5x slower than
version 1 on the CI machine (88 against 19 ms for 256 MiB); with the blocks it
is about 2.5x (56 against 22 ms).

Why 32-bit words: a change ``d`` of one word has its lowest set bit at
``a <= 31``, so ``d * w_i`` keeps at least 33 significant bits mod 2**64, and
two changes cancel only if the weights satisfy a congruence mod ``2**(64-a)``
(about 2**-32 over the weights; two flips of one bit position ``a`` in words
``i`` and ``j`` cancel when ``W_i = +-W_j mod 2**(64-a)``, which a payload
of megabytes holds for a few of its many word pairs). With 64-bit words (version 1) a change
confined to the top bits keeps only the top bits: two sign flips of bit 63 in
two words of a payload always cancelled (``2**63 * (w_i + w_j) = 0`` for odd
weights), +1 in byte 7 of two words about once in 128 pairs. The page hash
made the same change for the same reason (``pagehash.py``).

Why not CRC-32: a weighted sum is associative, so a GPU block computes it with
every thread on its own words and one tree reduction, and the host computes it
with one vectorized dot product. Guarantees: any change confined to one 32-bit
word (version 1: one 8-byte word) is always detected (an odd weight is
invertible mod 2**64 and the finalizer is a bijection).
"""

from __future__ import annotations

import numpy as np

__all__ = ["SUM_VERSIONS", "partial_sum", "payload_sum", "payload_sum_finish", "splitmix64", "splitmix64_array"]

#: record format versions whose checksum this module computes (records.py: the header names one)
SUM_VERSIONS = (1, 2)

_M = (1 << 64) - 1
_weights = np.empty(0, np.uint64)


def splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def splitmix64_array(j: np.ndarray) -> np.ndarray:
    """``splitmix64`` of each element of a u64 array (wrapping, as the scalar one masks)."""
    with np.errstate(over="ignore"):
        z = j + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _weights_for(words: int) -> np.ndarray:
    global _weights
    if _weights.size < words:
        size = max(words, 2 * _weights.size, 1 << 17)
        _weights = splitmix64_array(np.arange(size, dtype=np.uint64)) | np.uint64(1)
    return _weights[:words]


_BLOCK = 1024  #: u32 words per weight block (version 2)
_blocks = np.empty(0, np.uint64)


def _block_weights(count: int) -> np.ndarray:
    """``u_b = splitmix64(1024 + b) | 1`` for the first ``count`` blocks."""
    global _blocks
    if _blocks.size < count:
        size = max(count, 2 * _blocks.size, 1 << 12)
        _blocks = splitmix64_array(np.arange(_BLOCK, _BLOCK + size, dtype=np.uint64)) | np.uint64(1)
    return _blocks[:count]


def _weight_v2(i: int) -> int:
    """``W_i`` of version 2, one word (tails, the definition's tests)."""
    return ((splitmix64(i % _BLOCK) | 1) * (splitmix64(_BLOCK + i // _BLOCK) | 1)) & _M


_SMALL_WEIGHTS = np.array([splitmix64(j) | 1 for j in range(32)], np.uint64)
_SMALL_WEIGHTS_V2 = np.array([_weight_v2(i) for i in range(64)], np.uint64)
# Measured on the CI machine: dot 1.5-2.2 us up to 1 000 words, einsum 6-7 us;
# at 131 072 words einsum is faster (77 vs 108 us).
_DOT_WORDS = 4096


def _within_block(y: np.ndarray, first: int) -> int:
    """``sum_i y_i * W_(first + i)`` (unreduced) for u32 words ``y`` that all lie in
    one weight block: the start or the end of a piece that is not block-aligned."""
    o = first % _BLOCK
    t = int(y.astype(np.uint64).dot(_weights_for(_BLOCK)[o:o + y.size]))
    return t * int(_block_weights(first // _BLOCK + 1)[-1])


def _sum_v2(y: np.ndarray, first: int) -> int:
    """``sum_i y_i * W_(first + i)`` mod 2**64 for u32 words ``y``: the words of
    each whole weight block summed with the block's in-cache vector, then the
    block sums with their block weights; a partial block at either end apart."""
    head = min(y.size, -first % _BLOCK)
    total = _within_block(y[:head], first) if head else 0
    full = (y.size - head) // _BLOCK
    if full:
        b0 = (first + head) // _BLOCK
        sums = np.einsum("ij,j->i", y[head:head + full * _BLOCK].reshape(full, _BLOCK), _weights_for(_BLOCK),
                         dtype=np.uint64, casting="unsafe")
        total += int(sums.dot(_block_weights(b0 + full)[b0:]))
    rest = head + full * _BLOCK
    if rest < y.size:
        total += _within_block(y[rest:], first + rest)
    return total & _M


def partial_sum(words: np.ndarray, first: int, version: int = 2) -> int:
    """The weighted sum of ``words`` (u64) taken as the payload's u64 words ``first,
    first+1, ...``: a payload's sum is the sum (mod 2**64) of its pieces' partial
    sums, so a reader can verify a large payload piece by piece while each is
    in cache."""
    if version not in SUM_VERSIONS:
        raise ValueError(f"expected a record format version in {SUM_VERSIONS}, found {version}")
    if words.size == 0:
        return 0
    if version == 2:
        return _sum_v2(words.view(np.uint32), 2 * first)  # little-endian: word j is u32 words 2j, 2j+1
    weights = _weights_for(first + words.size)[first:]
    if words.size <= _DOT_WORDS:
        # Integer dot products wrap mod 2**64 like einsum's; for short inputs
        # (commit bodies, descriptors) dot's call overhead is a quarter of einsum's.
        return int(words.dot(weights))
    return int(np.einsum("i,i->", words, weights, dtype=np.uint64))


def payload_sum_finish(s: int, tail: bytes, whole_words: int, n: int, version: int = 2) -> int:
    """The checksum from the sum ``s`` of the first ``whole_words`` u64 words and
    the ``n % 8`` trailing bytes ``tail`` of an ``n``-byte payload."""
    if tail:
        x = int.from_bytes(tail.ljust(8, b"\0"), "little")
        if version == 1:
            s += x * int(_weights_for(whole_words + 1)[whole_words])
        else:
            s += (x & 0xFFFFFFFF) * _weight_v2(2 * whole_words) + (x >> 32) * _weight_v2(2 * whole_words + 1)
    return splitmix64((s & _M) ^ n)


def payload_sum(data: bytes | bytearray | memoryview | np.ndarray, version: int = 2) -> int:
    """The checksum of ``data`` as defined above, for record format ``version``."""
    if version not in SUM_VERSIONS:
        raise ValueError(f"expected a record format version in {SUM_VERSIONS}, found {version}")
    if not isinstance(data, np.ndarray) and len(data) <= 256:
        # Commit bodies and descriptors (one per per-token epoch): one small dot
        # product with the weights at hand, about 2 us on the CI machine at any
        # length up to 256 bytes (a Python loop over the words took 4-16 us).
        raw = bytes(data)
        n = len(raw)
        raw += bytes(-n % 8)
        if version == 1:
            s = int(np.frombuffer(raw, np.uint64).dot(_SMALL_WEIGHTS[:len(raw) // 8]))
        else:
            s = int(np.frombuffer(raw, np.uint32).astype(np.uint64).dot(_SMALL_WEIGHTS_V2[:len(raw) // 4]))
        return splitmix64(s ^ n)
    buf = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    n = buf.size
    whole = n // 8
    s = partial_sum(buf[: whole * 8].view(np.uint64), 0, version)
    return payload_sum_finish(s, buf[whole * 8:].tobytes(), whole, n, version)
