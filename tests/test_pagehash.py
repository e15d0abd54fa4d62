"""Page hashes find exactly the pages that changed."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.pagehash import dirty_runs, page_hashes


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40_000), st.sampled_from([64, 512, 4096]), st.data())
def test_any_byte_change_marks_its_page(n, page, data):
    """Changing any one byte changes that page's hash and no other."""
    rng = np.random.default_rng(n)
    a = rng.integers(0, 256, size=n, dtype=np.uint8)
    before = page_hashes(a, page)
    i = data.draw(st.integers(0, n - 1))
    a[i] ^= data.draw(st.integers(1, 255))
    after = page_hashes(a, page)
    assert dirty_runs(before, after) == [(i // page, i // page + 1)]


def test_dirty_runs_coalesce_neighbours():
    """Adjacent dirty pages form one run; gaps split runs."""
    old = np.zeros(10, np.uint64)
    new = old.copy()
    new[[1, 2, 3, 7, 9]] = 1
    assert dirty_runs(old, new) == [(1, 4), (7, 8), (9, 10)]
    assert dirty_runs(old, old) == []


def test_overhead_is_under_one_percent():
    """8 bytes of hash per 4 KiB page: 0.2 % of the region."""
    a = np.zeros(1 << 20, np.uint8)
    assert page_hashes(a, 4096).nbytes / a.nbytes < 0.01


def test_changes_in_the_top_bits_of_two_words_are_seen():
    """Two sign flips of bit 63 (a float64's sign; a float32's in the upper half of a
    64-bit word) in one page, and +1 in byte 7 of two words, change the page's hash:
    with 64-bit words and odd weights they cancelled (always, and ~1 in 128 pairs)."""
    rng = np.random.default_rng(11)
    for _ in range(200):
        a = rng.integers(0, 256, size=8192, dtype=np.uint8)
        before = page_hashes(a, 4096).copy()
        i, j = rng.choice(512, size=2, replace=False)
        a[8 * i + 7] ^= 0x80
        a[8 * j + 7] ^= 0x80
        assert dirty_runs(before, page_hashes(a, 4096)) == [(0, 1)]
    a = np.zeros(8192, np.uint8)
    before = page_hashes(a, 4096).copy()
    a[6335] += 1  # the pair the review found: byte 7 of words 791 and 983
    a[7871] += 1
    assert dirty_runs(before, page_hashes(a, 4096)) == [(1, 2)]
    f = np.ones(1024, np.float64)
    before = page_hashes(f.view(np.uint8), 4096).copy()
    f[[3, 400]] *= -1
    assert dirty_runs(before, page_hashes(f.view(np.uint8), 4096)) == [(0, 1)]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1023), st.integers(0, 1023), st.integers(0, 31), st.data())
def test_two_word_changes_at_one_bit_position_are_seen(i, j, bit, data):
    """Flipping the same bit of two different 32-bit words of a page, from any
    contents, changes the page's hash."""
    if i == j:
        return
    a = np.frombuffer(data.draw(st.binary(min_size=4096, max_size=4096)), np.uint8).copy()
    before = page_hashes(a, 4096).copy()
    w = a.view(np.uint32)
    w[i] ^= np.uint32(1 << bit)
    w[j] ^= np.uint32(1 << bit)
    assert dirty_runs(before, page_hashes(a, 4096)) == [(0, 1)]
