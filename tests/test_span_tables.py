"""The device-verified restore's span tables (``gpu_runtime/cuda/span_tables.py``),
which need no GPU: the checksum check that finishes the device's sums for a
whole span at once, and the scatter table's geometry, replayed here by a NumPy
copy of what ``cnc_scatter_rows`` does (the kernel itself runs in
tests/test_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from concordia_agents._payloads import RecordLoc
from gpu_runtime.checksum import partial_sum, payload_sum
from gpu_runtime.cuda.span_tables import SCATTER_WORDS, SUM_V1, first_bad, placement, span_tables
from gpu_runtime.cuda.spans import spans
from gpu_runtime.records import HEADER_SIZE, RecordFlags, RecordHeader, RecordType, record_size
from gpu_runtime.regions import RegionSpec

_PAGES = RegionSpec("pages", 1, "pages", "uint8", (1 << 16,), "numpy", "cpu")


def _span(payloads: list[bytes], versions: list[int], headers=None):  # type: ignore[no-untyped-def]
    """A span laid out as in a segment file from offset 64 (headers' places left
    zero), its records PAGES at consecutive offsets unless ``headers`` are given."""
    locs, at, pos = [], 64, 0
    for r, (data, version) in enumerate(zip(payloads, versions, strict=True)):
        h = headers[r] if headers else RecordHeader(RecordType.PAGES, 1, 1, 1, RecordFlags(0), pos, len(data), 0,
                                                    payload_sum(data, version), version)
        locs.append(RecordLoc(Path("seg"), at, at, h))
        at += record_size(len(data))
        pos += len(data)
    (span,) = spans(locs, 1 << 40)
    buf = np.zeros(span[2], np.uint8)
    for loc, data in zip(locs, payloads, strict=True):
        start = loc.file_offset - 64 + HEADER_SIZE
        buf[start:start + len(data)] = np.frombuffer(data, np.uint8)
    return span, locs, buf


def _device_sums(tables, buf: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """What cnc_payload_sums returns: each record's sum of its whole words."""
    out = np.zeros(len(tables.lengths), np.uint64)
    for r, (at, entry) in enumerate(tables.sums.tolist()):
        words, version = entry & ~SUM_V1, 1 if entry & SUM_V1 else 2
        out[r] = partial_sum(buf[at:at + 8 * words].view(np.uint64), 0, version) & ((1 << 64) - 1)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=0, max_size=300), st.sampled_from([1, 2])), min_size=1, max_size=12),
       st.data())
def test_first_bad_finishes_every_sum_and_names_the_first_damaged_record(recs, data):
    """An intact span passes (tails of 1-7 bytes, empty payloads, both format versions); a flipped byte in
    any record's payload, words or tail, is found, and the first damaged record in log order is named."""
    payloads, versions = [p for p, _ in recs], [v for _, v in recs]
    span, locs, buf = _span(payloads, versions)
    tables = span_tables(span, _PAGES)
    assert tables.sums[:, 0].tolist() == [loc.file_offset - 64 + HEADER_SIZE for loc in locs]
    assert first_bad(tables, _device_sums(tables, buf), buf) == -1
    damaged = [r for r, p in enumerate(payloads) if p]
    if not damaged:
        return
    hits = sorted(set(data.draw(st.lists(st.sampled_from(damaged), min_size=1, max_size=3))))
    for r in hits:
        at = int(tables.offsets[r]) + data.draw(st.integers(0, len(payloads[r]) - 1))
        buf[at] ^= 1 << data.draw(st.integers(0, 7))
    assert first_bad(tables, _device_sums(tables, buf), buf) == hits[0]


def test_a_wrong_header_sum_is_named_even_when_the_payload_is_intact():
    """The check compares with each header's checksum: a header that names another sum fails its record."""
    payloads = [bytes(range(40)), bytes(range(16))]
    span, locs, buf = _span(payloads, [2, 2])
    h = locs[1].header
    wrong = RecordHeader(h.type, 1, 1, 1, RecordFlags(0), h.offset, h.length, 0, h.payload_sum ^ 1, 2)
    span, _, buf = _span(payloads, [2, 2], headers=[locs[0].header, wrong])
    tables = span_tables(span, _PAGES)
    assert first_bad(tables, _device_sums(tables, buf), buf) == 1


def _scatter_like_the_kernel(table: np.ndarray, memory: np.ndarray) -> None:
    """cnc_scatter_rows on one flat byte array: rows of ``width`` bytes from back-to-back sources to
    destinations ``pitch`` apart."""
    for src, dst, width, pitch, rows in table.tolist():
        for r in range(rows):
            memory[dst + r * pitch:dst + r * pitch + width] = memory[src + r * width:src + (r + 1) * width]


def test_the_scatter_table_puts_rows_records_where_the_copy_engine_does():
    """ROWS records (rows [t0, t1) of a [outer, rows, inner] kv region, gathered [outer, t1 - t0, inner] as the
    log stores them) scattered by the table's geometry rebuild the region's rows, and leave the rest alone."""
    spec = RegionSpec("kv", 2, "kv", "float16", (3, 2, 50, 4), "torch", "cuda:0", seq_axis=2)
    assert (spec.outer, spec.rows, spec.row_bytes) == (6, 50, 8)
    kv = np.random.default_rng(5).integers(0, 1 << 16, (3, 2, 50, 4), dtype=np.uint16)
    cuts = [(0, 7), (7, 8), (8, 31), (31, 40)]
    payloads = [np.ascontiguousarray(kv[:, :, a:b]).tobytes() for a, b in cuts]
    headers = [RecordHeader(RecordType.ROWS, 1, 1, 2, RecordFlags(0), a, len(p), b - a, payload_sum(p), 2)
               for (a, b), p in zip(cuts, payloads, strict=True)]
    span, _, buf = _span(payloads, [2] * 4, headers=headers)
    tables = span_tables(span, spec)
    assert [placement(spec, h) for h in headers][1] == (7 * 8, 8, 50 * 8, 6)
    # One flat memory: the staging buffer at 24, the region after it (the kernel gets device addresses).
    region_at = 24 + buf.size
    memory = np.zeros(region_at + kv.nbytes, np.uint8)
    memory[24:region_at] = buf
    table = tables.scatter(24, region_at)
    assert table.shape == (4, SCATTER_WORDS) and table.dtype == np.uint64
    _scatter_like_the_kernel(table, memory)
    got = memory[region_at:].view(np.uint16).reshape(kv.shape)
    assert np.array_equal(got[:, :, :40], kv[:, :, :40]) and not got[:, :, 40:].any()
    assert tables.disjoint


def test_overlapping_records_are_told_apart_from_disjoint_ones():
    """The scatter kernel copies a span's records at once, so a span whose records write the same bytes (rows
    [5, 9) then [8, 12), or pages overlapping by one byte) is marked for copies in log order instead."""
    spec = RegionSpec("kv", 2, "kv", "float16", (2, 50, 4), "torch", "cuda:0", seq_axis=1)

    def rows(cuts):  # type: ignore[no-untyped-def]
        payloads = [bytes(2 * (b - a) * 8) for a, b in cuts]
        heads = [RecordHeader(RecordType.ROWS, 1, 1, 2, RecordFlags(0), a, len(p), b - a, payload_sum(p), 2)
                 for (a, b), p in zip(cuts, payloads, strict=True)]
        return span_tables(_span(payloads, [2] * len(cuts), headers=heads)[0], spec).disjoint

    assert rows([(8, 12), (0, 5), (5, 8)]) and not rows([(5, 9), (8, 12)]) and not rows([(0, 4), (9, 10), (3, 5)])
    pages = [bytes(10), bytes(10)]
    heads = [RecordHeader(RecordType.PAGES, 1, 1, 1, RecordFlags(0), at, 10, 0, payload_sum(bytes(10)), 2)
             for at in (0, 9)]
    assert not span_tables(_span(pages, [2, 2], headers=heads)[0], _PAGES).disjoint


def test_pages_records_are_one_row_of_their_bytes():
    """A PAGES record is one row: its payload's bytes at its byte offset."""
    payloads = [bytes(range(24)), bytes(range(100, 131))]
    span, _, buf = _span(payloads, [2, 2])
    tables = span_tables(span, _PAGES)
    assert tables.places.tolist() == [[0, 24, 24, 1], [24, 31, 31, 1]]
    assert tables.longest_words == 3 and tables.tailed == (1,)
    memory = np.zeros(8 + buf.size + 64, np.uint8)
    memory[8:8 + buf.size] = buf
    _scatter_like_the_kernel(tables.scatter(8, 8 + buf.size), memory)
    assert memory[8 + buf.size:8 + buf.size + 55].tobytes() == payloads[0] + payloads[1] and tables.disjoint
