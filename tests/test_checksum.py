"""The payload checksum: defined once, computed alike by host and device; both
record format versions (2 written, 1 still read)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_runtime.checksum import partial_sum, payload_sum, payload_sum_finish, splitmix64

M = 2**64


def _weight(i: int) -> int:
    """W_i of version 2, from the definition (checksum.py)."""
    return (splitmix64(i % 1024) | 1) * (splitmix64(1024 + i // 1024) | 1) % M


def _reference(data: bytes, version: int = 2) -> int:
    """The definition, word by word in pure Python."""
    padded = data + bytes(-len(data) % 8)
    s = 0
    if version == 1:
        for j in range(len(padded) // 8):
            s += int.from_bytes(padded[8 * j:8 * j + 8], "little") * (splitmix64(j) | 1)
    else:
        for i in range(len(padded) // 4):
            s += int.from_bytes(padded[4 * i:4 * i + 4], "little") * _weight(i)
    return splitmix64(s % M ^ len(data))


@pytest.mark.parametrize("version", [1, 2])
@given(data=st.binary(max_size=200))
def test_matches_the_definition(version, data):
    """The vectorized checksum equals the word-by-word definition."""
    assert payload_sum(data, version) == _reference(data, version)


@pytest.mark.parametrize("version", [1, 2])
@given(n=st.integers(257, 40_000), seed=st.integers(0, 2**32 - 1))
def test_vectorized_paths_match_the_definition(version, n, seed):
    """Longer payloads take NumPy paths (a dot product up to 4096 words, einsum
    beyond: n crosses 32 KiB; version 2 crosses its 4 KiB weight blocks); both
    equal the definition, for bytes and arrays."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    expected = _reference(data.tobytes(), version)
    assert payload_sum(data.tobytes(), version) == expected
    assert payload_sum(data, version) == expected


@pytest.mark.parametrize("version", [1, 2])
@given(words=st.integers(1, 3000), tail=st.integers(0, 7), cuts=st.lists(st.integers(0, 3000), max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_pieces_sum_to_the_whole(version, words, tail, cuts, seed):
    """A payload verified piece by piece (replay sums each piece of u64 words at
    its word index, then finishes with the tail bytes) gets the whole checksum,
    wherever the pieces are cut (across version 2's weight blocks too)."""
    n = 8 * words + tail
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    bounds = sorted({0, words, *(c for c in cuts if c < words)})
    x = data[: 8 * words].view(np.uint64)
    s = sum(partial_sum(x[a:b], a, version) for a, b in itertools.pairwise(bounds))
    assert payload_sum_finish(s % M, data[8 * words:].tobytes(), words, n, version) == payload_sum(data, version)


@given(st.binary(min_size=1, max_size=300), st.data())
def test_any_single_word_change_is_detected(data, draw):
    """Changing bytes inside any one 32-bit word always changes the checksum."""
    b = bytearray(data)
    i = draw.draw(st.integers(0, len(b) - 1))
    b[i] ^= draw.draw(st.integers(1, 255))
    assert payload_sum(bytes(b)) != payload_sum(data)


def test_two_sign_flips_are_detected():
    """The case version 1 missed: bit 63 flipped in two u64 words of a payload
    (two float64 sign flips, or the top bf16 of two words) left the version 1
    sum unchanged; version 2 sees it."""
    data = np.random.default_rng(3).standard_normal(512)
    flipped = data.copy()
    flipped[[1, 100]] *= -1
    assert payload_sum(flipped, 1) == payload_sum(data, 1)  # the weakness, shown
    assert payload_sum(flipped) != payload_sum(data)


@given(st.integers(8, 40_000), st.data())
def test_a_bit_flipped_in_each_of_two_words_is_detected(n, draw):
    """A bit flipped in each of two 32-bit words, in one weight block or two,
    changes the version 2 checksum. Not a guarantee for every pair: two flips
    cancel when the weights agree mod 2**(64 - bit) (checksum.py), about
    2**-33 per pair, so a chance failure of this test is that unlikely."""
    data = bytearray(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes())
    words = len(data) // 4
    i = draw.draw(st.integers(0, words - 2))
    j = draw.draw(st.integers(i + 1, words - 1))
    bad = bytearray(data)
    for w in (i, j):
        bit = draw.draw(st.integers(0, 31))
        bad[4 * w + bit // 8] ^= 1 << (bit % 8)
    assert payload_sum(bytes(bad)) != payload_sum(bytes(data))


def test_length_is_part_of_the_checksum():
    """Trailing zero bytes change the checksum (padding is not data)."""
    assert payload_sum(b"ab") != payload_sum(b"ab\0")


def test_numpy_and_bytes_agree():
    """Arrays of any dtype are checksummed by their bytes."""
    a = np.arange(1001, dtype=np.float32)
    assert payload_sum(a) == payload_sum(a.tobytes())


def test_an_unknown_version_is_refused():
    """A version this module does not define is a clear error, not a wrong sum."""
    with pytest.raises(ValueError, match=r"expected a record format version in .*found 3"):
        payload_sum(b"abc", 3)
