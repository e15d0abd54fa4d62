"""How a restore reads a region's records from the log's files: grouped into
spans of back-to-back records (one pinned buffer each, laid out as in the
file, headers' places left unread), and a span's payloads cut into reader
tasks (``pieces``), so that several threads read one large span at once.

Invariants: every record lands in exactly one span, in log order; a span's
tasks cover each of its payload bytes exactly once and no header byte; a
part is read to the buffer offset it has in the file span.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..records import HEADER_SIZE

__all__ = ["Piece", "Span", "payload_at", "pieces", "read_pieces", "read_span", "spans"]

Span = tuple[Any, int, int, list[Any]]  #: (path, file offset, bytes, records)
Piece = tuple[Any, int, int, int]  #: (record location, offset in the span's buffer, offset in its payload, bytes)


def spans(locs: Sequence[Any], limit: int) -> list[Span]:
    """Group records that lie back to back in one file into spans of at most
    ``limit`` bytes (a larger record is a span of its own), in log order."""
    out: list[Span] = []
    for loc in locs:
        size = loc.header.size
        if out:
            path, start, nbytes, group = out[-1]
            if path == loc.path and start + nbytes == loc.file_offset and nbytes + size <= limit:
                group.append(loc)
                out[-1] = (path, start, nbytes + size, group)
                continue
        out.append((loc.path, loc.file_offset, size, [loc]))
    return out


def payload_at(loc: Any, start: int) -> int:
    """Where ``loc``'s payload lies in the buffer of a span that starts at file
    offset ``start`` (after the record's header, whose place is left unread)."""
    return loc.file_offset - start + HEADER_SIZE


def read_span(read: Callable[[Any, np.ndarray], None], buf: Any, span: Span) -> None:
    """``read`` each record payload of ``span`` into pinned ``buf`` at its place
    in the span (headers are not copied: the locations carry them)."""
    _, start, _, group = span
    for loc in group:
        at = payload_at(loc, start)
        read(loc, buf.array[at:at + loc.header.length])


def pieces(span: Span, limit: int) -> list[list[Piece]]:
    """The reader tasks of ``span``'s payloads: the whole span as one task
    (``limit`` 0), else tasks of ``limit`` bytes (the last one less), each a
    list of record parts in span order; a record larger than the rest of a
    task is cut, and small records share one. Together they cover every
    payload byte once, headers never (no task for a span of empty payloads)."""
    _, start, _, group = span
    every = [(loc, payload_at(loc, start), 0, loc.header.length) for loc in group
             if loc.header.length]
    if limit <= 0:
        return [every] if every else []
    tasks: list[list[Piece]] = []
    room = 0  # bytes the last task can still take: none yet, so the first part opens one
    for loc, at, _, n in every:
        done = 0
        while done < n:
            if room == 0:
                tasks.append([])
                room = limit
            take = min(room, n - done)
            tasks[-1].append((loc, at + done, done, take))
            done += take
            room -= take
    return tasks


def read_pieces(reader: Any, buf: Any, task: list[Piece]) -> None:
    """One reader task: each part of ``task`` read, unverified, to its place in ``buf``."""
    for loc, at, begin, n in task:
        reader.read_part(loc, buf.array[at:at + n], begin)
