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
