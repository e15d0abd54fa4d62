"""The record planner: which data records an epoch's changes become.

One definition of chunking for every writer of the log, so that the host
backend, each CUDA commit path (general, per-token, fused pages) and
compaction write the same records for the same changes (what the flusher,
replay and the byte-identity tests rely on). Like torch DCP's planner/storage
split, this module says *what* is written; where the bytes go (a host loop, a
device task reserving ring space, a segment file) is the writer's business.

The rules (record format 1, ``records.py``):

* **ROWS** (kv regions): rows ``[t0, t1)`` are cut every ``per`` rows from
  ``t0``, ``per = rows_per_record(outer * row_bytes, max_record_bytes)``; a
  record holds rows ``[r, min(r + per, t1))`` of every outer slice
  (``offset`` = first row, ``aux`` = rows, payload ``[outer, rows, row_bytes]``).
* **PAGES** (pages regions): each run of dirty pages ``[p0, p1)`` is cut every
  ``per`` pages from ``p0``, ``per = pages_per_record(page_size, ...)``; the
  last page is clipped to the region's size (``offset`` = byte offset).
* A unit larger than the limit still makes one record per unit (a record is
  never split inside a row or a page).
* An epoch's records come in task order; per region, a REGION record first if
  the region is not yet described, then its data records; the COMMIT last.

Device code follows the same rules: the kv CHECKPOINT handler computes record
``k`` of a task as rows ``[t0 + k * per, ...)`` at ``log0 + k * record_size(per
rows)``, and SCAN_COMMIT's walker (``cnc_fused_emit`` in
``cuda/kernels/plan.cuh``) cuts runs as ``page_spans`` does. Both are checked
against this module: the arithmetic on the CPU by compiling ``plan.cuh`` as
host C++ (tests/test_planner.py), the bitmap walk by the GPU byte-identity
tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from .records import RecordType, record_size
from .regions import RegionSpec

__all__ = [
    "BASE_RECORD_BYTES",
    "EpochPlan",
    "PlannedRecord",
    "RegionDelta",
    "Span",
    "base_image_spans",
    "layer_spans",
    "page_spans",
    "pages_per_record",
    "plan_epoch",
    "region_spans",
    "row_spans",
    "rows_per_record",
    "runs_from_bits",
]

#: Record payload limit of compaction's base images (independent of the
#: session's ``max_record_bytes``: base images written by older sessions keep
#: their layout).
BASE_RECORD_BYTES = 1 << 20


class Span(NamedTuple):
    """One data record: its type and header fields (the payload is the
    region's bytes that these fields name). A NamedTuple: the per-token path
    makes a few per commit, and a tuple costs a third of a dataclass."""

    type: RecordType  #: ROWS or PAGES
    offset: int  #: ROWS: first row; PAGES: byte offset in the region
    length: int  #: payload bytes
    aux: int  #: ROWS: rows; PAGES: 0

    @property
    def size(self) -> int:
        """Bytes the record takes in the log (header, payload, padding)."""
        return record_size(self.length)


def _per(unit: int, max_record_bytes: int) -> int:
    return max(1, max_record_bytes // max(unit, 1))


def rows_per_record(row_unit: int, max_record_bytes: int) -> int:
    """Rows per ROWS record: ``row_unit`` is the bytes of one row across every
    outer slice (``outer * row_bytes``); at least one."""
    return _per(row_unit, max_record_bytes)


def pages_per_record(page_size: int, max_record_bytes: int) -> int:
    """Pages per PAGES record (at least one)."""
    return _per(page_size, max_record_bytes)


def row_spans(t0: int, t1: int, per: int, row_unit: int) -> list[Span]:
    """ROWS records for rows ``[t0, t1)``, ``per`` rows each from ``t0``."""
    return [Span(RecordType.ROWS, r, row_unit * (min(r + per, t1) - r), min(r + per, t1) - r)
            for r in range(t0, t1, per)]


def page_spans(runs: Iterable[tuple[int, int]], per: int, page_size: int, nbytes: int) -> list[Span]:
    """PAGES records for dirty page runs ``[p0, p1)``, cut every ``per`` pages
    from each run's start, the last page clipped to ``nbytes``."""
    out = []
    for p0, p1 in runs:
        for q in range(p0, p1, per):
            a = q * page_size
            out.append(Span(RecordType.PAGES, a, min(min(q + per, p1) * page_size, nbytes) - a, 0))
    return out


def runs_from_bits(bits: np.ndarray) -> list[tuple[int, int]]:
    """Runs ``[p0, p1)`` of set entries of a 0/1 array of pages (a dirty bitmap
    unpacked with ``bitorder="little"``)."""
    idx = np.flatnonzero(bits)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


class RegionDelta(NamedTuple):
    """One region's part of an epoch: ``rows`` (kv: the appended ``[t0, t1)``,
    None for nothing) or ``runs`` (pages: dirty page runs); ``described``: its
    REGION record is already in the log."""

    spec: RegionSpec
    described: bool = True
    rows: tuple[int, int] | None = None
    runs: Sequence[tuple[int, int]] = ()


def region_spans(delta: RegionDelta, max_record_bytes: int) -> list[Span]:
    """The data records of one region's delta, in log order."""
    spec = delta.spec
    if spec.kind == "pages":
        return page_spans(delta.runs, pages_per_record(spec.page_size, max_record_bytes), spec.page_size,
                          spec.nbytes)
    if delta.rows is None:
        return []
    unit = spec.outer * spec.row_bytes
    t0, t1 = delta.rows
    return row_spans(t0, t1, rows_per_record(unit, max_record_bytes), unit)


class PlannedRecord(NamedTuple):
    """A record of an epoch plan at its log position (relative to the epoch's
    first byte). ``span`` is None for the REGION record of ``region``."""

    at: int
    region: int
    span: Span | None
    size: int


class EpochPlan(NamedTuple):
    records: list[PlannedRecord]  #: REGION and data records in log order
    data_bytes: int  #: bytes before the COMMIT record
    nrecords: int  #: the COMMIT's ``aux``

    def commit_at(self) -> int:
        return self.data_bytes


def plan_epoch(deltas: Sequence[RegionDelta], max_record_bytes: int) -> EpochPlan:
    """The whole epoch: per delta, a REGION record if not described, then its
    data records; positions are relative to the epoch's start (a writer that
    reserves everything at once lays the records out exactly so)."""
    out: list[PlannedRecord] = []
    at = 0
    for delta in deltas:
        rid = delta.spec.region_id
        if not delta.described:
            size = record_size(len(delta.spec.to_json()))
            out.append(PlannedRecord(at, rid, None, size))
            at += size
        for span in region_spans(delta, max_record_bytes):
            out.append(PlannedRecord(at, rid, span, span.size))
            at += span.size
    return EpochPlan(out, at, len(out))


def base_image_spans(spec: RegionSpec, length: int) -> Iterator[Span]:
    """Records of a base image (compaction) of a region: every page of a
    pages region, rows ``[0, length)`` of a kv region, at ``BASE_RECORD_BYTES``."""
    if spec.kind == "pages":
        yield from page_spans([(0, spec.npages)] if spec.npages else [],
                              pages_per_record(spec.page_size, BASE_RECORD_BYTES), spec.page_size, spec.nbytes)
    else:
        unit = spec.outer * spec.row_bytes
        yield from row_spans(0, length, rows_per_record(unit, BASE_RECORD_BYTES), unit)


def _merged(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` sorted, those that overlap or touch merged into one."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def layer_spans(spec: RegionSpec, written: Iterable[tuple[int, int, int]]) -> list[Span]:
    """Records of a layer (compaction of a log's tail) of a region: what the
    tail's data records ``written`` (``(offset, length, aux)`` of each) wrote,
    merged where it touches, cut at ``BASE_RECORD_BYTES`` like a base image:
    the pages of a pages region, the rows of a kv region. Bytes no record of
    the tail wrote are not in the layer (they are its parent's)."""
    if spec.kind == "pages":
        ps = spec.page_size
        runs = _merged((off // ps, -(-(off + length) // ps)) for off, length, _ in written)
        return page_spans(runs, pages_per_record(ps, BASE_RECORD_BYTES), ps, spec.nbytes)
    unit = spec.outer * spec.row_bytes
    per = rows_per_record(unit, BASE_RECORD_BYTES)
    return [s for t0, t1 in _merged((off, off + aux) for off, _, aux in written) for s in row_spans(t0, t1, per, unit)]
