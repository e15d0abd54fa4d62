"""The host log ring: wrap-around, counters, validation, back-pressure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.errors import CorruptLogError, LogFullError
from gpu_runtime.logring import DATA_START, LogRing
from gpu_runtime.logwriter import LogWriter


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=40), st.integers(0, 2**40))
def test_wrap_around_round_trip(tmp_path_factory, chunks, base):
    """Writes at any logical offset read back identically across the wrap point."""
    path = tmp_path_factory.mktemp("ring") / "r.ring"
    ring = LogRing.create(path, capacity=8192, session_tag=1, owner_token=1, base=base)
    try:
        pos = base
        for c in chunks:
            ring.wait_for_space(pos + len(c), timeout=0.1)
            ring.write_at(pos, c)
            ring.publish_written(pos + len(c))
            assert ring.read(pos, len(c)) == c
            pos += len(c)
            ring.publish_consumed(pos)  # a flusher that keeps up
        assert ring.written == ring.consumed == pos
    finally:
        ring.unlink()


def test_reopen_sees_counters_and_data(tmp_path: Path):
    """A second mapping (another process after a crash) sees the same bytes and counters."""
    path = tmp_path / "r.ring"
    ring = LogRing.create(path, capacity=4096, session_tag=9, owner_token=3, base=100)
    ring.write_at(100, b"hello")
    ring.publish_commit(105, 7)
    other = LogRing.open(path)
    assert (other.base, other.written, other.committed, other.committed_epoch,
            other.owner_token) == (100, 105, 105, 7, 3)
    assert other.read(100, 5) == b"hello"
    other.set_owner(4)
    assert ring.owner_token == 4  # one shared mapping: the fence is visible at once
    other.close()
    ring.unlink()


def test_full_ring_times_out_with_log_full(tmp_path: Path):
    """With no flusher draining it, a full ring raises LogFullError after its timeout."""
    ring = LogRing.create(tmp_path / "r.ring", capacity=4096, session_tag=1, owner_token=1, base=0)
    ring.publish_written(4000)
    with pytest.raises(LogFullError, match="stayed full"):
        ring.wait_for_space(4200, timeout=0.05)
    writer = LogWriter(ring, session_tag=1, max_record_bytes=1024, space_timeout=0.05)
    with pytest.raises(LogFullError, match="ring capacity"):
        writer.reserve(5000)
    ring.unlink()


def test_open_rejects_bad_header(tmp_path: Path):
    """A ring file with a damaged header is refused with CorruptLogError naming it."""
    path = tmp_path / "r.ring"
    LogRing.create(path, capacity=4096, session_tag=1, owner_token=1, base=0).close()
    with open(path, "r+b") as f:
        f.seek(17)
        f.write(b"\xff")
    with pytest.raises(CorruptLogError, match=r"r\.ring"):
        LogRing.open(path)


def test_open_rejects_inconsistent_counters(tmp_path: Path):
    """Counters that break base <= consumed <= written are refused."""
    path = tmp_path / "r.ring"
    LogRing.create(path, capacity=4096, session_tag=1, owner_token=1, base=0).close()
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, (10).to_bytes(8, "little"), 256)  # consumed = 10 > written = 0
    os.close(fd)
    with pytest.raises(CorruptLogError, match="consumed"):
        LogRing.open(path)


def test_truncated_ring_file_is_refused(tmp_path: Path):
    """A ring file shorter than its header says is refused."""
    path = tmp_path / "r.ring"
    LogRing.create(path, capacity=8192, session_tag=1, owner_token=1, base=0).close()
    os.truncate(path, DATA_START + 4096)
    with pytest.raises(CorruptLogError, match="expected a ring file"):
        LogRing.open(path)


def test_release_gives_back_an_unused_tail_only(tmp_path: Path):
    """A device writer's unused reservation tail can be given back (the next record goes there);
    an offset outside the last reservation is refused."""
    ring = LogRing.create(tmp_path / "r.ring", capacity=4096, session_tag=1, owner_token=1, base=0)
    writer = LogWriter(ring, session_tag=1, max_record_bytes=1024, space_timeout=0.05)
    at = writer.reserve(1024)
    writer.release(at + 200)
    assert writer.position == at + 200
    assert writer.reserve(8) == at + 200
    with pytest.raises(ValueError, match=r"within the last reservation \[0, 208\], found 300"):
        writer.release(300)
    ring.publish_written(208)
    with pytest.raises(ValueError, match="found 100"):
        writer.release(100)
    ring.unlink()
