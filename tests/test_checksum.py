"""The payload checksum: defined once, computed alike by host and device."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from gpu_runtime.checksum import payload_sum, splitmix64


def _reference(data: bytes) -> int:
    """The definition, word by word in pure Python."""
    padded = data + bytes(-len(data) % 8)
    s = 0
    for j in range(len(padded) // 8):
        x = int.from_bytes(padded[8 * j:8 * j + 8], "little")
        s = (s + x * (splitmix64(j) | 1)) % 2**64
    return splitmix64(s ^ len(data))


@given(st.binary(max_size=200))
def test_matches_the_definition(data):
    """The vectorized checksum equals the word-by-word definition."""
    assert payload_sum(data) == _reference(data)


@given(st.integers(257, 40_000), st.integers(0, 2**32 - 1))
def test_vectorized_paths_match_the_definition(n, seed):
    """Longer payloads take NumPy paths (a dot product up to 4096 words, einsum
    beyond: n crosses 32 KiB); both equal the definition, for bytes and arrays."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    expected = _reference(data.tobytes())
    assert payload_sum(data.tobytes()) == expected
    assert payload_sum(data) == expected


@given(st.binary(min_size=1, max_size=300), st.data())
def test_any_single_word_change_is_detected(data, draw):
    """Changing bytes inside any one 8-byte word always changes the checksum."""
    b = bytearray(data)
    i = draw.draw(st.integers(0, len(b) - 1))
    b[i] ^= draw.draw(st.integers(1, 255))
    assert payload_sum(bytes(b)) != payload_sum(data)


def test_length_is_part_of_the_checksum():
    """Trailing zero bytes change the checksum (padding is not data)."""
    assert payload_sum(b"ab") != payload_sum(b"ab\0")


def test_numpy_and_bytes_agree():
    """Arrays of any dtype are checksummed by their bytes."""
    a = np.arange(1001, dtype=np.float32)
    assert payload_sum(a) == payload_sum(a.tobytes())
