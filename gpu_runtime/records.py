"""Log record framing: the one byte format that every writer (host backend, GPU
handlers) produces and every reader (flusher, replay, compaction) consumes.

Layout, format version 2 (all integers little-endian)::

    offset size field
    0      4    magic        b"CNCR"
    4      1    version      RECORD_VERSION
    5      1    type         RecordType
    6      2    flags        RecordFlags
    8      8    session_tag  first 8 bytes of blake2b(session id)
    16     8    epoch        epoch the record belongs to (>= 1)
    24     4    region       region id within the session (0 for COMMIT)
    28     4    header_crc   CRC-32 (zlib) of bytes [0, 28) and [32, 64)
    32     8    offset       PAGES: byte offset in the region
                             ROWS: first row along the sequence axis
                             COMMIT: log offset of the epoch's first data record
    40     8    length       payload length in bytes (excluding padding)
    48     8    aux          ROWS: row count; COMMIT: number of data records
    56     8    payload_sum  checksum of the payload (gpu_runtime.checksum, by version)
    64     …    payload, then zero padding to a multiple of RECORD_ALIGN

The same layout is spelled out for device code in ``kernels/concordia.cuh``.

Invariants:

* A record occupies ``record_size(length)`` bytes; every record starts at a
  multiple of ``RECORD_ALIGN`` in the log's logical offset space (8-byte
  alignment lets device code store words, and device atomics act on the ring).
* An epoch is committed only by its COMMIT record, written after all of its
  data records. Its data records are exactly the ``aux`` records lying in
  ``[offset, commit record's own offset)``: anything else before it is an
  aborted attempt and is ignored by replay.
* The header checksum is verified before any length field is trusted, so a
  flipped bit can never make a reader run past the end of a file.

Bump ``RECORD_VERSION`` whenever this layout changes. Version 2 changed only
the payload checksum (32-bit words: ``checksum.py`` says why); version 1
records are still read, each verified by its own header's version.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .checksum import SUM_VERSIONS, payload_sum

__all__ = [
    "HEADER_SIZE",
    "READ_VERSIONS",
    "RECORD_ALIGN",
    "RECORD_MAGIC",
    "RECORD_VERSION",
    "FramingError",
    "RecordFlags",
    "RecordHeader",
    "RecordType",
    "checksum",
    "decode_header",
    "encode_header",
    "encode_record",
    "header_fields",
    "payload_sum",
    "record_size",
    "session_tag",
]

RECORD_MAGIC = b"CNCR"
RECORD_VERSION = 2
#: versions a reader accepts (each record is verified by the checksum of its own version)
READ_VERSIONS = frozenset(SUM_VERSIONS)
RECORD_ALIGN = 8
_HEADER = struct.Struct("<4sBBHQQIIQQQQ")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 64


class RecordType(enum.IntEnum):
    """What a record's payload holds."""

    REGION = 1  #: JSON region descriptor (name, kind, dtype, shape, …)
    PAGES = 2  #: raw bytes of a run of pages at byte ``offset``
    ROWS = 3  #: ``aux`` rows from row ``offset``, gathered as [outer, rows, inner]
    COMMIT = 4  #: JSON commit body (user meta, KV lengths); commits the epoch


class RecordFlags(enum.IntFlag):
    NONE = 0
    BASE = 1  #: COMMIT of a compacted base image (replay may start here)


class FramingError(Exception):
    """Internal: bytes are not a valid record. ``torn`` means they end too early
    (a write cut short), as opposed to bytes that are present but wrong."""

    def __init__(self, reason: str, *, torn: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.torn = torn


@dataclass(frozen=True, slots=True)
class RecordHeader:
    type: RecordType
    session_tag: int
    epoch: int
    region: int
    flags: RecordFlags
    offset: int
    length: int
    aux: int
    payload_sum: int
    version: int = RECORD_VERSION  #: the record's format version: which payload checksum it carries

    @property
    def size(self) -> int:
        """Bytes the whole record occupies in the log, padding included."""
        return record_size(self.length)


def record_size(payload_length: int) -> int:
    """Size of a record with a payload of ``payload_length`` bytes, padded."""
    return HEADER_SIZE + (-(-payload_length // RECORD_ALIGN) * RECORD_ALIGN)


def checksum(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32 with the zlib polynomial (headers); ``value`` continues a running checksum."""
    return zlib.crc32(data, value) & 0xFFFFFFFF


def session_tag(session_id: str) -> int:
    """A stable 64-bit tag of a session ID, stored in every record and file header."""
    return int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=8).digest(), "little")


def encode_header(
    type: RecordType,
    *,
    session_tag: int,
    epoch: int,
    region: int = 0,
    flags: int = 0,
    offset: int = 0,
    length: int = 0,
    aux: int = 0,
    payload_sum: int = 0,
    version: int = RECORD_VERSION,
) -> bytes:
    """Pack a header; ``header_crc`` is computed here. ``version`` other than the
    current one only for tests and tools that make older logs."""
    head = _HEADER.pack(
        RECORD_MAGIC, version, int(type), int(flags), session_tag, epoch, region, 0,
        offset, length, aux, payload_sum,
    )
    return head[:28] + struct.pack("<I", _header_crc(head)) + head[32:]


_TYPE_OF = {int(t): t for t in RecordType}  #: decode_header's lookups (no enum construction per record)
_TYPES = frozenset(_TYPE_OF)
_FLAGS_OF = {int(f): f for f in (RecordFlags.NONE, RecordFlags.BASE)}


def _header_crc(raw: bytes) -> int:
    return checksum(raw[32:64], checksum(raw[:28]))


def encode_record(
    type: RecordType,
    payload: bytes | bytearray | memoryview | np.ndarray,
    *,
    session_tag: int,
    epoch: int,
    region: int = 0,
    flags: int = 0,
    offset: int = 0,
    aux: int = 0,
    version: int = RECORD_VERSION,
) -> bytes:
    """A whole record (header, payload, padding) as one bytes object, of format
    ``version`` (any of ``READ_VERSIONS``; writers use the current one)."""
    # bytes of any shape: len() of an ndarray would be its first dimension
    payload = (payload.data if isinstance(payload, np.ndarray) else memoryview(payload)).cast("B")
    n = len(payload)
    header = encode_header(
        type, session_tag=session_tag, epoch=epoch, region=region, flags=flags,
        offset=offset, length=n, aux=aux, payload_sum=payload_sum(payload, version), version=version,
    )
    pad = record_size(n) - HEADER_SIZE - n
    return b"".join((header, bytes(payload), b"\0" * pad))


def header_fields(buf: memoryview, off: int) -> tuple[int, int, int, int, int, int] | None:
    """``(type, version, session_tag, epoch, length, payload_sum)`` of the header
    at ``buf[off:off + HEADER_SIZE]`` if it passes ``decode_header``'s checks
    (magic, version, type, header checksum; flags the known ones), else None:
    ``decode_header`` then says which failed. The flusher's walk over a ring:
    no copy of the header's bytes and no ``RecordHeader`` per record (a
    per-token epoch is three records, each walked while ``generate``'s loop
    waits for the GIL)."""
    (magic, version, rtype, flags, tag, epoch, _region, hcrc, _offset, length, _aux,
     psum) = _HEADER.unpack_from(buf, off)
    if (magic != RECORD_MAGIC or version not in READ_VERSIONS or rtype not in _TYPES or flags not in _FLAGS_OF
            or zlib.crc32(buf[off + 32:off + 64], zlib.crc32(buf[off:off + 28])) != hcrc):
        return None
    return rtype, version, tag, epoch, length, psum


def decode_header(buf: bytes | bytearray | memoryview) -> RecordHeader:
    """Decode and verify a header from the first ``HEADER_SIZE`` bytes of ``buf``.

    Raises :class:`FramingError` (``torn=True`` if ``buf`` is too short or holds
    only zeros, which is what a file extended but never written reads as).
    """
    if len(buf) < HEADER_SIZE:
        raise FramingError(f"expected a {HEADER_SIZE}-byte header, found {len(buf)} bytes", torn=True)
    # A replay decodes one header per record (tens of thousands for a log
    # committed per token): no copy when given exactly a header's bytes, and
    # the enums looked up in dicts instead of constructed.
    raw = buf if type(buf) is bytes and len(buf) == HEADER_SIZE else bytes(buf[:HEADER_SIZE])
    (magic, version, rtype, flags, tag, epoch, region, hcrc, offset, length, aux, psum) = _HEADER.unpack(raw)
    if magic != RECORD_MAGIC:
        if raw == bytes(HEADER_SIZE):
            raise FramingError("expected a record header, found zero bytes", torn=True)
        raise FramingError(f"expected magic {RECORD_MAGIC!r}, found {magic!r}", torn=False)
    if _header_crc(raw) != hcrc:
        raise FramingError("header checksum mismatch", torn=False)
    if version not in READ_VERSIONS:
        raise FramingError(f"expected record format version {' or '.join(map(str, sorted(READ_VERSIONS)))}, "
                           f"found {version}", torn=False)
    kind = _TYPE_OF.get(rtype)
    if kind is None:
        raise FramingError(f"unknown record type {rtype}", torn=False)
    flag = _FLAGS_OF.get(flags)
    if flag is None:
        flag = RecordFlags(flags)
    return RecordHeader(kind, tag, epoch, region, flag, offset, length, aux, psum, version)

