"""Restore building blocks that need no GPU: grouping records into spans, and
the payload reads the pipelines use (verified piecewise, unverified, and the
error a failed device check raises), and a run's account of its time."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concordia_agents import CorruptLogError
from concordia_agents._payloads import PayloadReader, RecordLoc
from gpu_runtime.checksum import payload_sum
from gpu_runtime.cuda.restore import RestoreOptions
from gpu_runtime.cuda.restore_stats import RestoreStats, waited
from gpu_runtime.cuda.spans import pieces, spans
from gpu_runtime.records import HEADER_SIZE, RecordFlags, RecordHeader, RecordType, record_size


def _loc(path: Path, at: int, n: int, psum: int = 0) -> RecordLoc:
    return RecordLoc(path, at, at, RecordHeader(RecordType.PAGES, 1, 1, 1, RecordFlags(0), 0, n, 0, psum))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5000), st.booleans()), min_size=1, max_size=40),
       st.integers(64, 20000))
def test_spans_keep_order_group_only_adjacent_records_and_respect_the_limit(recs, limit):
    """Every record lands in exactly one span, in log order; a span holds records
    of one file lying back to back; only a single record may exceed the limit."""
    locs, pos = [], {0: 64, 1: 64, 2: 64}
    for f, n, gap in recs:
        at = pos[f] + (128 if gap else 0)
        locs.append(_loc(Path(f"seg{f}"), at, n))
        pos[f] = at + record_size(n)
    out = spans(locs, limit)
    assert [loc for _, _, _, g in out for loc in g] == locs
    for path, start, nbytes, group in out:
        assert all(loc.path == path for loc in group) and group[0].file_offset == start
        for a, b in itertools.pairwise(group):
            assert a.file_offset + a.header.size == b.file_offset
        assert nbytes == sum(loc.header.size for loc in group)
        assert nbytes <= limit or len(group) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=12), st.integers(0, 3000))
def test_pieces_cover_every_payload_byte_once_in_tasks_of_the_limit(sizes, limit):
    """A span's reader tasks: every payload byte of every record once, at its place in the span's buffer (after
    its header), never a header byte; tasks of exactly ``limit`` bytes but the last; limit 0: one task."""
    locs, at = [], 64
    for n in sizes:
        locs.append(_loc(Path("seg"), at, n))
        at += record_size(n)
    (span,) = spans(locs, 1 << 40)
    tasks = pieces(span, limit)
    assert all(tasks) and bool(tasks) == (sum(sizes) > 0)
    covered = np.zeros(span[2], np.int64)
    for loc, buf_at, begin, n in (p for task in tasks for p in task):
        assert begin >= 0 and begin + n <= loc.header.length and n > 0
        assert buf_at == loc.file_offset - 64 + HEADER_SIZE + begin
        covered[buf_at:buf_at + n] += 1
    want = np.zeros(span[2], np.int64)
    for loc in locs:
        start = loc.file_offset - 64 + HEADER_SIZE
        want[start:start + loc.header.length] = 1
    assert np.array_equal(covered, want)
    sums = [sum(n for _, _, _, n in task) for task in tasks]
    if limit == 0 or not tasks:
        assert len(tasks) == (sum(sizes) > 0)
    else:
        assert all(s == limit for s in sums[:-1]) and 0 < sums[-1] <= limit


def test_payload_reads_verified_unverified_and_the_corruption_error(tmp_path: Path):
    """read_verified checks a multi-piece payload (with a tail); read_unverified
    returns the bytes as stored, damaged or not; raise_corrupt names file and offset."""
    data = np.random.default_rng(3).integers(0, 256, (3 << 20) + 5, dtype=np.uint8)
    seg = tmp_path / "seg"
    seg.write_bytes(bytes(64) + bytes(HEADER_SIZE) + data.tobytes())
    good = _loc(seg, 64, data.size, payload_sum(data))
    out = np.empty(data.size, np.uint8)
    with PayloadReader() as r:
        r.read_verified(good, out)
        assert np.array_equal(out, data)
        raw = bytearray(seg.read_bytes())
        raw[64 + HEADER_SIZE + 12345] ^= 1
        seg.write_bytes(bytes(raw))
        with pytest.raises(CorruptLogError) as e:
            r.read_verified(good, out)
        assert e.value.path == str(seg) and e.value.offset == 64
        r.read_unverified(good, out)
        assert out[12345] == data[12345] ^ 1 and np.array_equal(np.delete(out, 12345), np.delete(data, 12345))
        with pytest.raises(CorruptLogError, match="fails its checksum") as e:
            r.raise_corrupt(good)
        assert e.value.offset == 64
        short = _loc(seg, 64, data.size + 100)
        with pytest.raises(CorruptLogError, match="cut short"):
            r.read_unverified(short, np.empty(short.header.length, np.uint8))


def test_a_part_of_a_payload_is_read_where_asked_and_nothing_outside_it(tmp_path: Path):
    """read_part reads bytes [start, start + size) of a payload (a restore's reader task), from its first byte
    too; a part reaching past the payload, and a whole read into an output of the wrong size, raise ValueError."""
    data = np.random.default_rng(4).integers(0, 256, 20000, dtype=np.uint8)
    seg = tmp_path / "seg"
    seg.write_bytes(bytes(64) + bytes(HEADER_SIZE) + data.tobytes() + b"after")
    loc = _loc(seg, 64, data.size, payload_sum(data))
    with PayloadReader() as r:
        for start, n in ((0, 1000), (12000, 8000), (19999, 1)):
            part = np.empty(n, np.uint8)
            r.read_part(loc, part, start)
            assert np.array_equal(part, data[start:start + n])
        with pytest.raises(ValueError, match="within the payload"):
            r.read_part(loc, np.empty(10, np.uint8), data.size - 5)
        with pytest.raises(ValueError, match="expected an output of 20000 bytes"):
            r.read_unverified(loc, np.empty(1000, np.uint8))


def test_restore_stats_account_for_a_run_and_its_own_share():
    """A run's account: the time spent inside ``waited`` goes to the named part (also when the call raises),
    ``done`` fixes the total, and ``as_dict`` gives the calling thread's own share as the rest and the rate."""
    import time

    stats = RestoreStats(bytes=10**9, records=3, spans=2)
    waited(stats, "read_wait_s", time.sleep, 0.02)
    with pytest.raises(ZeroDivisionError):
        waited(stats, "device_wait_s", lambda: (time.sleep(0.01), 1 / 0))
    time.sleep(0.01)
    d = stats.done().as_dict()
    assert d["read_wait_s"] >= 0.02 and d["device_wait_s"] >= 0.01 and d["alloc_s"] == 0
    assert d["own_s"] >= 0.01 and abs(d["total_s"] - d["read_wait_s"] - d["device_wait_s"] - d["own_s"]) < 1e-9
    assert d["GBps"] == pytest.approx(1.0 / d["total_s"])
    assert (d["records"], d["spans"], d["bytes"]) == (3, 2, 10**9)


def test_restore_defaults_follow_the_checksum_site():
    """Device sums: 4 x 64 MiB spans read in 4 MiB pieces; host sums (a span is one task): 8 x 16 MiB; what is
    given wins, at least 2 buffers; a negative piece size is refused by name."""
    from concordia_agents import ConcordiaError

    device, host = RestoreOptions(), RestoreOptions(verify="host")
    assert (device.span_bytes, device.buffers, device.piece) == (64 << 20, 4, 4 << 20)
    assert (host.span_bytes, host.buffers) == (16 << 20, 8)
    assert (RestoreOptions(span=1 << 20, depth=1).span_bytes, RestoreOptions(depth=1).buffers) == (1 << 20, 2)
    with pytest.raises(ConcordiaError, match="restore_piece: expected 0"):
        RestoreOptions(piece=-1)


def test_the_scatter_kernel_is_refused_with_host_sums():
    """``restore_engine="kernel"`` scatters from the device staging buffer, which host sums never fill: a
    RegionError saying what was expected and found, not a restore that reads an unfilled buffer."""
    from gpu_runtime.errors import RegionError

    assert RestoreOptions(engine="kernel").engine == "kernel"
    with pytest.raises(RegionError, match="expected restore_verify 'device', found 'host'"):
        RestoreOptions(engine="kernel", verify="host")
    with pytest.raises(RegionError, match="expected 'executor', 'copy' or 'kernel', found 'dma'"):
        RestoreOptions(engine="dma")
