"""The record planner (gpu_runtime/planner.py): its rules, the host backend
writing exactly its plan, and the device's planning code (kernels/plan.cuh,
compiled as host C++) agreeing with it on random inputs."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.backend import CheckpointTask
from gpu_runtime.host import HostBackend
from gpu_runtime.logring import LogRing
from gpu_runtime.logwriter import LogWriter
from gpu_runtime.planner import (
    BASE_RECORD_BYTES,
    RegionDelta,
    Span,
    base_image_spans,
    page_spans,
    pages_per_record,
    plan_epoch,
    row_spans,
    rows_per_record,
    runs_from_bits,
)
from gpu_runtime.records import HEADER_SIZE, RecordType, decode_header, record_size
from gpu_runtime.regions import RegionSpec

from ._harness import harness

HEADER = HEADER_SIZE
MAX_RECORDS_PER_TASK = 256


def kv_spec(rid: int, outer: int, rows: int, inner: int) -> RegionSpec:
    return RegionSpec(name=f"kv{rid}", region_id=rid, kind="kv", dtype="float32", shape=(outer, rows, inner),
                      library="numpy", device="cpu", seq_axis=1)


def pages_spec(rid: int, nbytes: int, page_size: int) -> RegionSpec:
    return RegionSpec(name=f"p{rid}", region_id=rid, kind="pages", dtype="uint8", shape=(nbytes,),
                      library="numpy", device="cpu", page_size=page_size)


@st.composite
def disjoint_runs(draw, npages: int) -> list[tuple[int, int]]:
    """Maximal runs of a random dirty bitmap of ``npages`` pages."""
    bits = draw(st.lists(st.booleans(), min_size=npages, max_size=npages))
    return runs_from_bits(np.array(bits, dtype=np.uint8))


# -- the rules -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500), st.integers(0, 500), st.integers(1, 64), st.integers(1, 4096))
def test_row_spans_cover_the_range_in_records_of_per_rows(t0, n, per, unit):
    """ROWS records tile [t0, t1) from t0, every one but the last of exactly per rows."""
    spans = row_spans(t0, t0 + n, per, unit)
    assert [s.offset for s in spans] == list(range(t0, t0 + n, per))
    assert sum(s.aux for s in spans) == n
    assert all(s.aux == per for s in spans[:-1]) and all(0 < s.aux <= per for s in spans)
    assert all(s.type is RecordType.ROWS and s.length == s.aux * unit for s in spans)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 300), st.sampled_from([16, 64, 4096]), st.integers(1, 9))
def test_page_spans_cut_each_run_from_its_start_and_clip_the_last_page(data, npages, page_size, per):
    """PAGES records cover exactly the dirty runs, cut every per pages from each run's start, the region's
    end clipped."""
    tail = data.draw(st.integers(0, page_size - 1))
    nbytes = npages * page_size - tail
    runs = data.draw(disjoint_runs(npages))
    spans = page_spans(runs, per, page_size, nbytes)
    covered = np.zeros(nbytes, dtype=bool)
    for s in spans:
        assert s.type is RecordType.PAGES and s.aux == 0 and s.offset % page_size == 0
        assert 0 < s.length <= per * page_size
        assert not covered[s.offset:s.offset + s.length].any()
        covered[s.offset:s.offset + s.length] = True
    expect = np.zeros(nbytes, dtype=bool)
    for p0, p1 in runs:
        expect[p0 * page_size:p1 * page_size] = True
        starts = [s.offset // page_size for s in spans if p0 <= s.offset // page_size < p1]
        assert starts == list(range(p0, p1, per))
    assert (covered == expect).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=200))
def test_runs_from_bits_finds_maximal_runs(bits):
    """Runs are maximal, sorted, and their union is the set bits."""
    runs = runs_from_bits(np.array(bits, dtype=np.uint8))
    rebuilt = [False] * len(bits)
    for p0, p1 in runs:
        assert p0 < p1
        rebuilt[p0:p1] = [True] * (p1 - p0)
        assert p0 == 0 or not bits[p0 - 1]
        assert p1 == len(bits) or not bits[p1]
    assert rebuilt == bits
    assert runs == sorted(runs)


def test_a_unit_over_the_limit_is_still_one_record_per_unit():
    """A row or page larger than the record limit makes one record each, never split."""
    assert rows_per_record(10_000, 4096) == 1 and pages_per_record(65536, 4096) == 1
    assert [s.length for s in row_spans(0, 3, 1, 10_000)] == [10_000] * 3


def test_base_images_use_their_own_record_limit():
    """Compaction's base images cut at BASE_RECORD_BYTES whatever the session's limit."""
    spec = pages_spec(1, 5 * BASE_RECORD_BYTES + 4096, 4096)
    spans = list(base_image_spans(spec, 0))
    assert [s.length for s in spans] == [BASE_RECORD_BYTES] * 5 + [4096]
    kv = kv_spec(2, 2, 100_000, 64)  # 512 bytes a row over both slices
    rows = list(base_image_spans(kv, 3000))
    assert sum(s.aux for s in rows) == 3000 and rows[0].aux == BASE_RECORD_BYTES // 512


# -- the host backend writes the plan --------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_host_backend_writes_exactly_the_epoch_plan(tmp_path_factory, data):
    """Two epochs (first: REGION records and everything; second: appended rows and dirty pages) through the
    host backend: the ring holds exactly plan_epoch's records at its positions, then the COMMIT."""
    limit = data.draw(st.sampled_from([4096, 8192, 65536]))
    path = tmp_path_factory.mktemp("ring") / "r.ring"
    ring = LogRing.create(path, capacity=1 << 22, session_tag=7, owner_token=1, base=0)
    backend = HostBackend()
    try:
        writer = LogWriter(ring, session_tag=7, max_record_bytes=limit, space_timeout=1.0)
        rows = data.draw(st.integers(4, 200))
        kv = kv_spec(1, data.draw(st.integers(1, 4)), rows, data.draw(st.sampled_from([2, 16, 64])))
        kv_arr = np.random.default_rng(0).random(kv.shape, dtype=np.float32)
        ps = data.draw(st.sampled_from([64, 4096]))
        pg = pages_spec(2, data.draw(st.integers(1, 40)) * ps - data.draw(st.sampled_from([0, 16])), ps)
        pg_arr = np.zeros(pg.nbytes, dtype=np.uint8)
        regions = [backend.attach(kv, kv_arr), backend.attach(pg, pg_arr)]
        t1 = data.draw(st.integers(0, rows))
        t2 = data.draw(st.integers(t1, rows))
        dirty = sorted(set(data.draw(st.lists(st.integers(0, pg.npages - 1), max_size=8))))
        bits = np.zeros(pg.npages, dtype=np.uint8)
        bits[dirty] = 1
        epochs = [
            ([RegionDelta(kv, False, (0, t1)), RegionDelta(pg, False, runs=[(0, pg.npages)])],
             [CheckpointTask(regions[0], (0, t1)), CheckpointTask(regions[1])]),
            ([RegionDelta(kv, True, (t1, t2)), RegionDelta(pg, True, runs=runs_from_bits(bits))],
             [CheckpointTask(regions[0], (t1, t2)), CheckpointTask(regions[1])]),
        ]
        for epoch, (deltas, tasks) in enumerate(epochs, start=1):
            if epoch == 2:
                for p in dirty:  # after the first commit: its page hashes are the baseline
                    pg_arr[p * ps] ^= 0xFF
            start = writer.position
            plan = plan_epoch(deltas, limit)
            end = backend.commit_epoch(writer, epoch, tasks, b"{}")
            got = []
            at = start
            while at < end:
                h = decode_header(ring.read(at, HEADER))
                got.append((at - start, h.type, h.region, h.offset, h.length, h.aux))
                at += h.size
            specs = {d.spec.region_id: d.spec for d in deltas}
            want = [(r.at, RecordType.REGION, r.region, 0, len(specs[r.region].to_json()), 0) if r.span is None
                    else (r.at, r.span.type, r.region, r.span.offset, r.span.length, r.span.aux)
                    for r in plan.records]
            assert got[:-1] == want
            assert got[-1][:2] == (plan.data_bytes, RecordType.COMMIT) and got[-1][5] == plan.nrecords
    finally:
        ring.unlink()


# -- the device's planning code, compiled for the host ---------------------------------


@pytest.fixture(scope="module")
def dll(tmp_path_factory):
    return harness(Path(tmp_path_factory.mktemp("harness")))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 3000), st.integers(1, 200), st.integers(1, 8),
       st.sampled_from([8, 24, 256, 1024]), st.integers(0, 2**40))
def test_device_row_plan_matches_the_planner(dll, t0, n, per, outer, row_bytes, log0):
    """plan.cuh's kv records (first row, rows, log offset) equal the planner's spans laid back to back."""
    out = (ctypes.c_uint64 * (3 * (n // per + 2)))()
    count = dll.cnc_test_rows(t0, t0 + n, per, outer, row_bytes, log0, out)
    spans = row_spans(t0, t0 + n, per, outer * row_bytes)
    at, want = log0, []
    for s in spans:
        want += [s.offset, s.aux, at]
        at += s.size
    assert count == len(spans)
    assert list(out[:3 * count]) == want


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(1, 2000), st.sampled_from([16, 4096, 65536]), st.integers(1, 40))
def test_device_page_plan_matches_the_planner(dll, data, npages, page_size, per):
    """SCAN_COMMIT's record table (offset, bytes, log offset, first chunk) equals the planner's spans laid back
    to back, and it reports 'did not fit' exactly when a record passes the span or the task's record limit."""
    nbytes = npages * page_size - data.draw(st.integers(0, page_size // 16 - 1)) * 16
    runs = data.draw(disjoint_runs(npages))
    log0 = data.draw(st.integers(0, 2**40)) * 8
    spans = page_spans(runs, per, page_size, nbytes)
    total = sum(s.size for s in spans)
    limit = log0 + data.draw(st.one_of(st.just(total), st.integers(0, total + 1)))
    flat = (ctypes.c_uint64 * max(1, 2 * len(runs)))(*[x for r in runs for x in r])
    scratch = (ctypes.c_uint64 * (8 + 4 * (MAX_RECORDS_PER_TASK + 64)))()  # room for a planner that overruns
    result = (ctypes.c_uint64 * 3)()
    ok = dll.cnc_test_pages(page_size, nbytes, flat, len(runs), per, log0, limit, scratch, result)
    table, at, chunk = [], log0, 0
    fits = True
    for s in spans:
        assert s.size == HEADER + s.length  # lengths are multiples of 16: no padding
        if len(table) == MAX_RECORDS_PER_TASK or at + s.size > limit:
            fits = False
            break
        table.append([s.offset, s.length, at, chunk])
        at += s.size
        chunk += -(-(s.length // 8) // 2048)
    assert bool(ok) == fits
    n = int(result[0])
    assert n == len(table)
    assert [list(scratch[8 + 4 * i:12 + 4 * i]) for i in range(n)] == table
    if fits:
        assert (int(result[1]), int(result[2])) == (at, chunk)


def test_span_sizes_are_record_sizes():
    """Span.size is the framed size of its payload (header plus padding)."""
    assert Span(RecordType.ROWS, 0, 13, 1).size == record_size(13) == HEADER + 16
