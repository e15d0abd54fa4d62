"""A span's records as the arrays the device-verified restore (``restore.py``)
works from: the sums kernel's table, the headers' checksums, and where each
record goes in its region. They are made for every span before the pipeline's
loop (while the first spans are read), so that the calling thread's work per
span is a few array copies and CUDA calls rather than a Python step per record.

Why: on the H100 (2026-12-07 22:28, 8B at 8k, 1.08 GB: 257 records in 18
spans) the restore's calling thread spent 21.5 ms of its own with 15 reader
threads and 9.0 ms with 8 at equal spans; its steps wait for the interpreter
lock the readers take, so fewer steps shorten it (an inference from those two
figures; docs/gpu.md "Recovery").

Invariants: ``first_bad`` finishes every record's device sum exactly as
``checksum.payload_sum_finish`` does (tail bytes included) and names the first
record, in log order, whose checksum differs from its header's; ``placement``
is the one geometry of a record in its region, used by the copy engine's
per-record copies and by the scatter kernel's table alike; ``disjoint`` is
true only when no two of a span's records write the same region byte (the
scatter kernel copies a span's records at once, so log order among them holds
only then; one epoch's records never overlap, and records of two epochs are
never back to back in a file, a COMMIT lying between them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checksum import payload_sum_finish, splitmix64_array
from ..records import RecordHeader, RecordType
from .spans import Span, payload_at

__all__ = ["SCATTER_WORDS", "SUM_V1", "SpanTables", "first_bad", "placement", "span_tables"]

SUM_V1 = 1 << 63  #: a sums-table entry's word count with this bit: a record format version 1 checksum (verify.cu)
SCATTER_WORDS = 5  #: u64 words of a scatter-table entry (verify.cu, cnc_scatter_rows)


def placement(spec: Any, h: RecordHeader) -> tuple[int, int, int, int]:
    """Where record ``h`` goes in a region of ``spec``: (byte offset of its
    first row, bytes per row, the region's pitch between rows, rows). A ROWS
    record is ``outer`` rows of ``aux`` sequence rows each (its payload holds
    them back to back); any other record is one row of its payload's bytes."""
    if h.type is RecordType.ROWS:
        width = h.aux * spec.row_bytes
        return h.offset * spec.row_bytes, width, spec.rows * spec.row_bytes, spec.outer
    return h.offset, h.length, h.length, 1


@dataclass(frozen=True, slots=True)
class SpanTables:
    """One span's records as arrays (module docs); row ``r`` is the span's
    ``r``-th record."""

    sums: np.ndarray  #: u64 (records, 2): payload offset in the span's buffer, whole words (| SUM_V1)
    expected: np.ndarray  #: u64 per record: the header's payload checksum
    lengths: np.ndarray  #: u64 per record: payload bytes
    tailed: tuple[int, ...]  #: records whose length is not a multiple of 8 (their tail is summed on the host)
    versions: tuple[int, ...]  #: per record: its format version
    places: np.ndarray  #: u64 (records, 4): ``placement`` of each record
    longest_words: int  #: whole words of the span's longest payload
    disjoint: bool  #: no two records write the same region byte (module docs)

    @property
    def offsets(self) -> np.ndarray:
        """Each record's payload offset in the span's buffer."""
        return self.sums[:, 0]

    def scatter(self, src: int, dst: int) -> np.ndarray:
        """The scatter kernel's table (u64, records x SCATTER_WORDS): source
        address (``src`` + payload offset), destination address (``dst`` +
        offset in the region), bytes per row, destination pitch, rows."""
        out = np.empty((len(self.lengths), SCATTER_WORDS), np.uint64)
        out[:, 0] = self.offsets + np.uint64(src)
        out[:, 1] = self.places[:, 0] + np.uint64(dst)
        out[:, 2:] = self.places[:, 1:]
        return out


def span_tables(span: Span, spec: Any) -> SpanTables:
    """The tables of ``span`` for a region of ``spec``."""
    _, start, _, group = span
    heads = [loc.header for loc in group]
    places = np.array([placement(spec, h) for h in heads], np.uint64).reshape(-1, 4)
    # Two records overlap where their first rows' byte ranges do: a ROWS record's
    # rows sit at the same offsets in every outer slice, with one pitch.
    first, end = places[:, 0], places[:, 0] + places[:, 1]
    order = np.argsort(first, kind="stable")
    return SpanTables(
        sums=np.array([(payload_at(loc, start), h.length // 8 | (SUM_V1 if h.version == 1 else 0))
                       for loc, h in zip(group, heads, strict=True)], np.uint64).reshape(-1, 2),
        expected=np.array([h.payload_sum for h in heads], np.uint64),
        lengths=np.array([h.length for h in heads], np.uint64),
        tailed=tuple(r for r, h in enumerate(heads) if h.length % 8),
        versions=tuple(h.version for h in heads), places=places,
        longest_words=max(h.length // 8 for h in heads),
        disjoint=bool((first[order][1:] >= end[order][:-1]).all()))


def first_bad(tables: SpanTables, sums: np.ndarray, buf: np.ndarray) -> int:
    """The index of the first record of the span whose checksum fails, or -1.
    ``sums``: the device's sum of each record's whole payload words (u64, one
    per record); ``buf``: the span's bytes (u8), for the tail bytes. A record
    without a tail finishes as ``splitmix64(sum ^ length)``, all at once; the
    few with one are finished one by one."""
    got = splitmix64_array(sums[:len(tables.lengths)] ^ tables.lengths)
    for r in tables.tailed:
        n, at = int(tables.lengths[r]), int(tables.offsets[r])
        whole = n // 8
        got[r] = payload_sum_finish(int(sums[r]), buf[at + 8 * whole:at + n].tobytes(), whole, n,
                                    tables.versions[r])
    bad = np.flatnonzero(got != tables.expected)
    return int(bad[0]) if bad.size else -1
