"""Reading a session's host ring as the flusher does: every record verified
(header checksum, session, payload checksum) before it is trusted, and the
drain that moves what a dead owner left in its ring into that owner's chain.

Invariant: nothing unverified leaves the ring. A walk stops at the first
damaged record; the drain refuses a damaged ring before it changes anything
(or, salvaging, keeps the records before the damage and drops the rest).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpu_runtime.logring import LogRing
from gpu_runtime.records import (
    HEADER_SIZE,
    FramingError,
    RecordHeader,
    RecordType,
    decode_header,
    header_fields,
    payload_sum,
    record_size,
)

from ._replay import valid_size
from ._segments import SEGMENT_HEADER_SIZE, SegmentWriter, list_segments, new_header
from .errors import CorruptLogError

__all__ = ["checked_header", "drain_ring", "intact_end", "ring_holds_unflushed", "verified_span"]

_COPY_CHUNK = 8 << 20


def ring_holds_unflushed(path: Path) -> int:
    """Bytes a ring file holds that its flusher has not appended to segments
    (0 for an empty or a fully flushed ring). A ring that cannot be read counts
    as holding everything: never delete what cannot be checked."""
    try:
        ring = LogRing.open(path)
    except (OSError, CorruptLogError):
        try:
            return max(1, path.stat().st_size)
        except OSError:
            return 0
    try:
        return ring.written - ring.consumed
    finally:
        ring.close()


def checked_header(ring: LogRing, tag: int, pos: int, limit: int) -> RecordHeader:
    """The header of the record at log offset ``pos`` of ``ring``, after checking
    its checksum, its session and that the record ends by ``limit``; raises
    CorruptLogError naming the ring and offset otherwise."""
    try:
        header = decode_header(ring.read(pos, HEADER_SIZE))
    except FramingError as e:
        raise CorruptLogError(f"host ring holds a bad record header at log offset {pos}: {e.reason}",
                              path=str(ring.path), offset=pos) from None
    if header.session_tag != tag:
        raise CorruptLogError(f"host ring holds a record of another session (tag {header.session_tag:016x}) at "
                              f"log offset {pos}", path=str(ring.path), offset=pos)
    if pos + header.size > limit:
        raise CorruptLogError(f"host ring record at log offset {pos} runs past the published end {limit}",
                              path=str(ring.path), offset=pos)
    return header


def check_payload(ring: LogRing, pos: int, header: RecordHeader) -> None:
    if not _payload_intact(ring, pos, header.length, header.version, header.payload_sum):
        raise _payload_error(ring, pos, header.type, header.epoch)


def _payload_error(ring: LogRing, pos: int, rtype: RecordType, epoch: int) -> CorruptLogError:
    return CorruptLogError(f"host ring record at log offset {pos} ({rtype.name}, epoch {epoch}) fails its payload "
                           "checksum", path=str(ring.path), offset=pos)


def _payload_intact(ring: LogRing, pos: int, length: int, version: int, expected: int,
                    data: memoryview | None = None) -> bool:
    """Whether the payload of the record at log offset ``pos`` sums to
    ``expected``: from a slice of ``data`` (the ring's ``data_view``, which the
    walk holds) where it does not wrap, else from the joined pieces."""
    body = (pos + HEADER_SIZE) % ring.capacity
    if data is not None and body + length <= ring.capacity:
        return payload_sum(data[body:body + length], version) == expected
    views = ring.views(pos + HEADER_SIZE, length)
    whole: Any = views[0] if len(views) == 1 else b"".join(bytes(v) for v in views)
    return payload_sum(whole, version) == expected


def intact_end(ring: LogRing, tag: int, start: int, end: int) -> tuple[int, CorruptLogError | None]:
    """Walk the records of ``[start, end)``, verifying each (header and payload):
    the end of the intact ones, and the error of the first damaged one (None if
    all are intact)."""
    pos = start
    while pos < end:
        try:
            header = checked_header(ring, tag, pos, end)
            check_payload(ring, pos, header)
        except CorruptLogError as e:
            return pos, e
        pos += header.size
    return pos, None


_COMMIT = int(RecordType.COMMIT)


def verified_span(ring: LogRing, tag: int, start: int, limit: int,
                   chunk: int) -> tuple[int, tuple[int, int] | None]:
    """``(end, commit)``: the end of the whole, verified records from ``start``
    that fit in ``chunk`` bytes (at least one) and stop before ``limit`` or the
    first damaged record, and ``(epoch, end)`` of the last COMMIT among them
    (None if none). Raises CorruptLogError only if the first record is damaged.

    The flusher runs this on every epoch beside the decode loop, so its
    per-record Python is time a compiled ``durable_generate`` waits for the
    GIL: a header is checked in place (``header_fields``: no copy, no
    ``RecordHeader``) and a payload that does not wrap is summed from a view
    of the mapping. A record the fast checks do not pass (its header wraps
    around the ring's end, fails a check, holds an unknown flag or another
    session's tag, or the record runs past ``limit``) takes the
    record-by-record path, whose error is the one raised; a first record
    whose payload fails raises the same error as that path."""
    data, cap = ring.data_view, ring.capacity
    pos, commit = start, None
    while pos < limit:
        at = pos % cap
        fields = header_fields(data, at) if at + HEADER_SIZE <= cap else None
        if fields is None or fields[2] != tag or pos + record_size(fields[4]) > limit:
            try:  # the same checks, with the error that names what failed
                header = checked_header(ring, tag, pos, limit)
                if pos > start and pos + header.size - start > chunk:
                    break  # verified as the first record of the next span
                check_payload(ring, pos, header)
            except CorruptLogError:
                if pos == start:
                    raise
                break  # copy the intact records before it; the next span starts at the damage and raises
            rtype, epoch, size = int(header.type), header.epoch, header.size
        else:
            rtype, version, _, epoch, length, expected = fields
            size = record_size(length)
            if pos > start and pos + size - start > chunk:
                break
            if not _payload_intact(ring, pos, length, version, expected, data):
                if pos == start:  # check_payload's error, from what was read (not a second read of the bytes)
                    raise _payload_error(ring, pos, RecordType(rtype), epoch)
                break
        pos += size
        if rtype == _COMMIT:
            commit = (epoch, pos)
    return pos, commit


def drain_ring(ring: LogRing, directory: Path, tag: int, log: Any, *, salvage: bool = False) -> int:
    """Move what a previous owner left in the ring into its own chain, after
    verifying every record. A damaged record raises CorruptLogError before
    anything is changed; with ``salvage`` the records before it are moved and
    the rest of the ring is dropped. Returns the bytes dropped."""
    if ring.written <= ring.consumed:
        return 0
    chain = ring.chain_token
    _, deltas = list_segments(directory)
    mine = [f for f in deltas if f.token == chain]
    start = ring.consumed
    tail_end = -1
    valid = -1
    if mine:
        tail = mine[-1]
        # What the dead flusher published as consumed was written whole; only the
        # bytes after it can be a torn append (restore verifies the rest).
        valid = valid_size(tail.path, session_tag=tag,
                           verify_from=max(0, ring.consumed - tail.base) + SEGMENT_HEADER_SIZE)
        tail_end = tail.base + valid - SEGMENT_HEADER_SIZE
        start = max(start, tail_end)
    if start < ring.base or start > ring.written:
        raise CorruptLogError(
            f"expected the ring to hold log offsets from {start}, found [{ring.base}, {ring.written})",
            path=str(ring.path), offset=80)
    # Verify before changing anything: a refused open leaves ring and segments as they were.
    end, damage = intact_end(ring, tag, start, ring.written)
    dropped = ring.written - end
    if damage is not None:
        if not salvage:
            raise CorruptLogError(f"{damage.reason}; resume with allow_rollback=True to continue from the newest "
                                  "intact epoch", path=str(ring.path), offset=end) from damage
        log.warning("host ring damaged; dropping its tail", offset=end, bytes=dropped, error=str(damage))
    if mine and valid != mine[-1].size:
        # A torn append by the dead flusher. ``consumed`` never passes a
        # whole record, so the ring still holds every byte cut off here.
        with open(mine[-1].path, "r+b") as f:
            f.truncate(valid)
            os.fsync(f.fileno())
    if start < end:
        if mine and start == tail_end:
            seg = SegmentWriter.reopen(mine[-1].path, session_tag=tag)  # continue the dead flusher's segment
        else:
            seg = SegmentWriter.create(directory, new_header(session_tag=tag, token=chain, base=start))
        try:
            pos = start
            while pos < end:
                n = min(_COPY_CHUNK, end - pos)
                seg.append(ring.read(pos, n))
                pos += n
            seg.sync()
        finally:
            seg.close()
        log.info("drained host ring of the previous owner", bytes=end - start, chain=chain)
    ring.publish_consumed(end)
    return dropped
