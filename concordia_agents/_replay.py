"""Replay: find the last intact committed epoch of a session's log, and where
every record to restore it lives.

Algorithm (``scan``):

1. Take the newest base image, if any; its records are the state at its epoch
   and it *covers* the log up to offset ``start``. A layer (``_segments``) is
   read on top of its chain: the full base image at the chain's root first,
   then each layer in order, their records applied in that order (a later
   layer's bytes overwrite an earlier one's, as the epochs they fold did).
2. Group delta segments by owner token into chains. The first segment of chain
   ``t`` starts at ``t``'s handoff offset; chain ``t`` is read up to the next
   chain's handoff (bytes an old owner wrote after a takeover are ignored:
   that is the log half of fencing). Within a chain, segments must be
   contiguous.
3. Read records in log order, skipping those below ``start``. Data records
   wait in ``pending``; a COMMIT record of epoch ``e`` takes exactly its
   ``aux`` records starting at its ``offset`` (anything before is an aborted
   attempt) and must be epoch ``last + 1``.

Damage: a record cut short at the physical end of the newest chain is a torn
tail (a crash mid-append) and ends the scan quietly: its epoch has no commit.
Anything else that fails framing or a checksum raises ``CorruptLogError`` with
the file and byte offset. Never wrong data, never a silent jump over damage.

Salvage (``scan(..., salvage=True)``, asked for explicitly by a resume with
``allow_rollback``): every payload is verified, and the first damage of any
kind ends the scan instead of raising; the index is the newest epoch whose
records all lie before it, and ``index.damage`` says what was found. A chain
is read only up to the *lowest* handoff of the chains after it: an owner that
resumed at an older epoch (a rollback) starts its chain below the end of the
previous one, and everything the older chains hold past that point is no
longer history.

What is verified when: the scan checks every header (its own checksum, the
framing) and the payload checksums of the records it parses (REGION, COMMIT;
of the COMMIT bodies only the newest is decoded, in a salvage scan every one:
``verify`` and ``allow_rollback`` therefore report an older body that checksums
but does not decode, a writer's bug, as damage, while a plain open uses only
the newest body and goes on);
it does not read data payloads (PAGES, ROWS), which can be gigabytes of KV
cache. Those are verified when they are read to be applied
(``PayloadReader``), before a byte of them reaches a region: a damaged data
record of a committed epoch raises ``CorruptLogError`` at restore instead of at
open, and one of an epoch that never committed is never read at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gpu_runtime.records import (
    HEADER_SIZE,
    FramingError,
    RecordFlags,
    RecordHeader,
    RecordType,
    decode_header,
    payload_sum,
    record_size,
)
from gpu_runtime.regions import RegionSpec

from ._payloads import PayloadReader, RecordLoc
from ._segments import (
    KIND_BASE,
    KIND_LAYER,
    SEGMENT_HEADER_SIZE,
    SegmentFile,
    base_chain,
    base_name,
    list_segments,
    read_segment_header,
)
from .errors import CorruptLogError

__all__ = ["LogIndex", "PayloadReader", "RecordLoc", "last_commit", "scan", "valid_size"]


@dataclass(slots=True)
class LogIndex:
    """What replay found. ``records[region_id]`` lists data records to apply in order."""

    epoch: int = 0
    end: int = 0  #: log offset past the last COMMIT (where a new owner's chain starts)
    body: dict[str, Any] = field(default_factory=dict)
    specs: dict[int, RegionSpec] = field(default_factory=dict)
    records: dict[int, list[RecordLoc]] = field(default_factory=dict)
    base: Path | None = None  #: the newest base image or layer the state starts from
    base_epoch: int = 0
    base_covers: int = 0  #: the log offset ``base`` covers
    chain: tuple[Path, ...] = ()  #: the base images read, root first (``base`` last)
    base_specs: dict[int, RegionSpec] = field(default_factory=dict)  #: regions as the chain left them
    delta_bytes: int = 0  #: bytes of delta records after the base (compaction trigger)
    damage: CorruptLogError | None = None  #: where a salvage scan stopped (None: it read everything)
    #: the newest COMMIT's verified payload, its file and offset, until ``scan`` parses it into ``body``
    #: (a log of per-token commits holds thousands of bodies, and only the newest is used)
    _raw_body: tuple[bytes, Path, int] | None = None

    @property
    def meta(self) -> Any:
        return self.body.get("meta")

    @property
    def lengths(self) -> dict[str, int]:
        return dict(self.body.get("lengths", {}))


#: record types whose payload the scan parses (and therefore verifies)
_PARSED = frozenset({RecordType.REGION, RecordType.COMMIT})


class _Reader:
    """Sequential record reader over one file's first ``size`` bytes, verifying
    every checksum. Positional reads (``os.pread``: one call per header, not a
    seek and a read), not a mapping: a file cut back by another process while
    mapped would kill the process with SIGBUS instead of raising."""

    def __init__(self, path: Path, f: BinaryIO, size: int) -> None:
        self.path, self.size, self._fd = path, size, f.fileno()

    def next(self, pos: int, *, verify_past: int | None = None) -> tuple[RecordHeader, bytes] | None:
        """The record at ``pos``, None at the clean end of the file. Its payload is
        read and verified if the scan parses it (REGION, COMMIT) or the record ends
        beyond file offset ``verify_past``; otherwise it is returned empty. Raises
        FramingError (torn or not) on damage."""
        if pos == self.size:
            return None
        header = decode_header(os.pread(self._fd, HEADER_SIZE, pos))
        end = pos + record_size(header.length)
        if end > self.size:
            raise FramingError(f"record of {end - pos} bytes runs past the end of the file", torn=True)
        if header.type not in _PARSED and (verify_past is None or end <= verify_past):
            return header, b""
        payload = os.pread(self._fd, header.length, pos + HEADER_SIZE)
        if len(payload) < header.length:
            raise FramingError(f"expected a {header.length}-byte payload, found {len(payload)} bytes", torn=True)
        if payload_sum(payload, header.version) != header.payload_sum:
            raise FramingError("payload checksum mismatch", torn=False)
        return header, payload


def valid_size(path: Path, *, session_tag: int, verify_from: int = 0) -> int:
    """Bytes of a segment up to its last whole, checksummed record. Data
    payloads are verified only for records that end beyond file offset
    ``verify_from`` (bytes before it were published as flushed: damage there
    is not a torn append, and restore verifies them anyway)."""
    read_segment_header(path, session_tag=session_tag)
    size = path.stat().st_size
    pos = SEGMENT_HEADER_SIZE
    with open(path, "rb") as fh:
        reader = _Reader(path, fh, size)
        while True:
            try:
                rec = reader.next(pos, verify_past=verify_from)
            except FramingError:
                return pos
            if rec is None:
                return pos
            pos += rec[0].size


def last_commit(path: Path, *, session_tag: int) -> tuple[int, int] | None:
    """``(epoch, log offset past it)`` of the last COMMIT record in a sealed delta
    segment, None if it holds none. Headers only (each checksummed), plus the
    COMMIT payloads: the uploader's step from one remote segment to the next
    (``_uploader``), instead of a scan of the whole log per upload."""
    hdr = read_segment_header(path, session_tag=session_tag)
    size = path.stat().st_size
    found = None
    pos = SEGMENT_HEADER_SIZE
    with open(path, "rb") as fh:
        reader = _Reader(path, fh, size)
        while True:
            try:
                rec = reader.next(pos)
            except FramingError as e:
                raise CorruptLogError(f"record at log offset {hdr.base + pos - SEGMENT_HEADER_SIZE}: {e.reason}",
                                      path=str(path), offset=pos) from None
            if rec is None:
                return found
            pos += rec[0].size
            if rec[0].type is RecordType.COMMIT:
                found = (rec[0].epoch, hdr.base + pos - SEGMENT_HEADER_SIZE)


def _spec(payload: bytes, path: Path, pos: int) -> RegionSpec:
    try:
        return RegionSpec.from_json(payload)
    except Exception as e:  # any decode failure is corruption here
        raise CorruptLogError(f"REGION record holds no valid descriptor ({e})", path=str(path), offset=pos) from e


def _body(payload: bytes, path: Path, pos: int) -> dict[str, Any]:
    try:
        body = json.loads(payload)
        assert isinstance(body, dict)
        return body
    except Exception as e:
        raise CorruptLogError(f"COMMIT record holds no valid body ({e})", path=str(path), offset=pos) from e


#: the longest chain of layers a scan follows (compaction writes a full base image long before)
MAX_CHAIN = 256


def _base_chain(newest: SegmentFile, bases: list[SegmentFile]) -> list[SegmentFile]:
    """``newest`` and the base images it lies on, root first (``_segments.base_chain``)."""
    by_name = {f.path.name: f for f in bases}
    names = base_chain(newest.path.name, by_name.keys())
    if names is None:
        raise CorruptLogError(f"layer lies on the base image {base_name(newest.parent)} (or a layer covering log "
                              f"offset {newest.parent}), or that one on another, which is missing",
                              path=str(newest.path), offset=0)
    if len(names) > MAX_CHAIN:
        raise CorruptLogError(f"expected a chain of at most {MAX_CHAIN} base images, found {len(names)}",
                              path=str(newest.path), offset=0)
    return [by_name[n] for n in reversed(names)]


def _read_base(newest: SegmentFile, bases: list[SegmentFile], tag: int, index: LogIndex,
               verify_past: int | None = None) -> None:
    """Read a base image (a layer: its chain, root first) into ``index``, which
    changes only at whole images: after a CorruptLogError it holds the state of
    the last intact image of the chain (what a salvage scan keeps)."""
    chain = _base_chain(newest, bases)
    epoch, covers = 0, -1
    specs: dict[int, RegionSpec] = {}
    records: dict[int, list[RecordLoc]] = {}
    for i, f in enumerate(chain):
        e, body, f_specs, pending = _read_image(f, tag, verify_past, parent=covers)
        if e <= epoch:
            raise CorruptLogError(f"layer of epoch {e} lies on a base image of epoch {epoch}", path=str(f.path),
                                  offset=48)
        # Nothing below can fail: the index takes the whole image or, above, none of it.
        epoch, covers = e, f.base
        specs.update(f_specs)
        for loc in pending:
            records.setdefault(loc.header.region, []).append(loc)
        index.epoch = index.base_epoch = epoch
        index.body = body
        index.specs, index.base_specs = dict(specs), dict(specs)
        index.records = records
        index.base = f.path
        index.base_covers = index.end = f.base
        index.chain = tuple(g.path for g in chain[:i + 1])


def _read_image(f: SegmentFile, tag: int, verify_past: int | None,
                parent: int) -> tuple[int, dict[str, Any], dict[int, RegionSpec], list[RecordLoc]]:
    """``(epoch, body, specs, data records)`` of one base image or layer; ``parent``:
    the offset the image it lies on covers (-1: none, a full base image)."""
    hdr = read_segment_header(f.path, session_tag=tag)
    want_kind = KIND_BASE if parent < 0 else KIND_LAYER
    if hdr.kind != want_kind or hdr.base != f.base or (parent >= 0 and f.parent != parent):
        raise CorruptLogError(f"base image header says kind {hdr.kind} covering {hdr.base}; its name and chain "
                              f"expect kind {want_kind} covering {f.base}", path=str(f.path), offset=24)
    epoch, body = 0, {}
    size = f.size
    pending: list[RecordLoc] = []
    specs: dict[int, RegionSpec] = {}
    with open(f.path, "rb") as fh:
        reader = _Reader(f.path, fh, size)
        pos = SEGMENT_HEADER_SIZE
        while True:
            try:
                rec = reader.next(pos, verify_past=verify_past)
            except FramingError as e:
                raise CorruptLogError(f"base image record: {e.reason}", path=str(f.path), offset=pos) from None
            if rec is None:
                raise CorruptLogError("base image ends without its BASE commit record", path=str(f.path), offset=pos)
            header, payload = rec
            if header.session_tag != tag:
                raise CorruptLogError("record of another session in a base image", path=str(f.path), offset=pos)
            if header.type is RecordType.COMMIT:
                if not header.flags & RecordFlags.BASE or header.aux != len(pending) + len(specs):
                    raise CorruptLogError("base image commit does not match its records", path=str(f.path), offset=pos)
                if header.offset != max(parent, 0):
                    raise CorruptLogError(f"base image commit names the parent covering {header.offset}, its name "
                                          f"{max(parent, 0)}", path=str(f.path), offset=pos)
                epoch, body = header.epoch, _body(payload, f.path, pos)
                break
            if header.type is RecordType.REGION:
                specs[header.region] = _spec(payload, f.path, pos)
            else:
                pending.append(RecordLoc(f.path, pos, -1, header))
            pos += header.size
    if hdr.epoch != epoch:
        raise CorruptLogError(f"base image header names epoch {hdr.epoch}, its commit epoch {epoch}",
                              path=str(f.path), offset=48)
    return epoch, body, specs, pending


def scan(directory: Path, *, session_tag: int, salvage: bool = False, only: Collection[str] | None = None) -> LogIndex:
    """Scan a session directory; see the module docstring. ``only``: the log
    made of just these files (what a host holding only the remote objects sees)."""
    index = LogIndex()
    try:
        _scan(directory, session_tag, index, salvage, only)
    except CorruptLogError as e:
        if not salvage:
            raise
        index.damage = e  # the last intact base image of the chain, or epoch 0 (compaction deleted the rest)
    if index._raw_body is not None:  # the newest body (a salvage scan parsed every one as it went)
        index.body, index._raw_body = _body(*index._raw_body), None
    return index


def _scan(directory: Path, session_tag: int, index: LogIndex, salvage: bool, only: Collection[str] | None) -> None:
    """The scan proper. ``index`` changes only at whole commits (``_commit``,
    ``_read_base``), so after a CorruptLogError it holds the newest epoch before
    the damage."""
    verify_past = 0 if salvage else None  # salvage: read and verify every payload
    bases, deltas = list_segments(directory, only)
    if bases:
        _read_base(bases[-1], bases, session_tag, index, verify_past)
    start = index.end
    chains: dict[int, list[SegmentFile]] = {}
    for seg in deltas:
        chains.setdefault(seg.token, []).append(seg)
    tokens = sorted(chains)
    handoff = {t: chains[t][0].base for t in tokens}
    pending: list[RecordLoc] = []
    for ci, token in enumerate(tokens):
        pending = []  # an old chain's uncommitted records end at the next handoff
        later = [handoff[t] for t in tokens[ci + 1:]]
        limit = min(later) if later else None
        newest = limit is None
        expected: int | None = None
        segs = chains[token]
        for si, seg in enumerate(segs):
            last_file = newest and si == len(segs) - 1
            size = seg.size
            if size < SEGMENT_HEADER_SIZE and last_file:
                break  # created but its header never made it: torn
            if limit is not None and seg.base >= limit:
                break  # written after a later owner took over: not part of the history
            hdr = read_segment_header(seg.path, session_tag=session_tag)
            if hdr.base != seg.base or hdr.token != seg.token:
                raise CorruptLogError(f"segment header says token {hdr.token} base {hdr.base}, its name "
                                      f"token {seg.token} base {seg.base}", path=str(seg.path), offset=24)
            if expected is not None and seg.base != expected:
                raise CorruptLogError(
                    f"expected the next segment of chain {token} to start at log offset {expected}, found {seg.base}: "
                    "a segment is missing or was cut short", path=str(seg.path), offset=0)
            seg_end = seg.base + size - SEGMENT_HEADER_SIZE
            if seg_end <= start:  # wholly covered by the base image
                expected = seg_end
                continue
            pos = SEGMENT_HEADER_SIZE
            with open(seg.path, "rb") as fh:
                reader = _Reader(seg.path, fh, size)
                while True:
                    logical = seg.base + pos - SEGMENT_HEADER_SIZE
                    if limit is not None and logical >= limit:
                        break
                    try:
                        # salvage verifies what it may apply: records past the base image
                        rec = reader.next(pos, verify_past=verify_past if logical >= start else None)
                    except FramingError as e:
                        if e.torn and last_file:
                            break  # torn tail of the newest chain: that epoch never committed
                        raise CorruptLogError(f"record at log offset {logical}: {e.reason}",
                                              path=str(seg.path), offset=pos) from None
                    if rec is None:
                        break
                    header, payload = rec
                    rsize = record_size(header.length)
                    if header.session_tag != session_tag:
                        raise CorruptLogError("record of another session", path=str(seg.path), offset=pos)
                    if logical >= start:
                        loc = RecordLoc(seg.path, pos, logical, header)
                        if header.type is RecordType.COMMIT:
                            _commit(index, pending, loc, payload, parse=salvage)
                            pending = []
                        else:
                            if header.type is RecordType.REGION:
                                # parsed now, applied only if its epoch commits
                                loc = RecordLoc(seg.path, pos, logical, header, _spec(payload, seg.path, pos))
                            pending.append(loc)
                            index.delta_bytes += rsize
                    pos += rsize
            expected = seg.base + pos - SEGMENT_HEADER_SIZE


def _commit(index: LogIndex, pending: list[RecordLoc], loc: RecordLoc, payload: bytes, *, parse: bool) -> None:
    """Take epoch ``loc.header.epoch`` into ``index``. Its body (checksummed by
    the reader) is parsed now if ``parse``, else kept raw for ``scan`` to parse
    if it is the newest."""
    h = loc.header
    recs = [r for r in pending if r.logical >= h.offset]
    first = recs[0].logical if recs else loc.logical
    if len(recs) != h.aux or first != h.offset:
        raise CorruptLogError(
            f"COMMIT of epoch {h.epoch} names {h.aux} records from log offset {h.offset}, found {len(recs)} "
            f"from {first}", path=str(loc.path), offset=loc.file_offset)
    if h.epoch != index.epoch + 1:
        raise CorruptLogError(f"expected the commit of epoch {index.epoch + 1}, found epoch {h.epoch}",
                              path=str(loc.path), offset=loc.file_offset)
    body = _body(payload, loc.path, loc.file_offset) if parse else None
    for r in recs:
        if r.header.type is RecordType.REGION:
            assert r.spec is not None
            index.specs[r.header.region] = r.spec
        else:
            index.records.setdefault(r.header.region, []).append(r)
    index.epoch = h.epoch
    if body is None:
        index._raw_body = (payload, loc.path, loc.file_offset)
    else:
        index.body, index._raw_body = body, None
    index.end = loc.logical + h.size
