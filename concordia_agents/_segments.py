"""Durable segment files: the on-disk tier of a session's append log.

A session directory holds these files:

* ``seg-<token>-<base>.log`` — a *delta segment*: a header, then records
  exactly as they were framed in the host ring, back to back. ``base`` is the
  log (logical) offset of its first record; the records' own offsets follow
  from their position. ``token`` is the fencing token of the owner that wrote
  it: the segments of one owner form a *chain*, and the first segment of each
  chain marks its *handoff offset* (where that owner took over).
* ``base-<covers>.img`` — a *base image* written by compaction: REGION records
  and full region contents, then a COMMIT record flagged BASE, equal to the
  state after the epoch that ends at log offset ``covers``.
* ``base-<covers>-on-<parent>.img`` — a *layer*: a base image that holds only
  what the log wrote between the base image ``base-<parent>…`` it lies on and
  ``covers`` (REGION records of every region, the byte ranges and rows those
  epochs wrote, merged, then the BASE COMMIT, whose ``offset`` repeats
  ``parent``). The state at ``covers`` is its parent's state with the layer's
  records applied on top; a parent is itself a base image or a layer, the
  chain ending in a full one. Layers let a log of thousands of per-token
  epochs fold its tail into a few large records at the cost of the tail's
  bytes, not of the whole state (``_base_image``).

Header, format version 1 (a layer: 2, the same layout; 64 bytes, little-endian)::

    0  8s magic b"CNCRSEG\\0"      32 u64 base (log offset of the first record;
    8  u32 version (1; 2: a layer)         for a base image, the offset it covers)
    12 u32 header_size (64)         40 u64 created_ns
    16 u64 session_tag              48 u64 epoch (base image: its epoch; else 0)
    24 u64 token                    56 u32 kind (0 delta, 1 base, 2 layer)
                                    60 u32 CRC-32 of bytes [0, 60)

All are written and then made durable by ``fsync`` of the file and of
the directory; base images go through a temporary name and ``os.replace``, so a
base exists under its final name only when complete.

Older readers: a Concordia that knows no layers does not list them (their
names do not match its pattern), finds the log short of the epochs the
catalog recorded as durable, and refuses to resume (``CorruptLogError`` naming
the lost epochs) instead of restoring an older state; a layer's header says
version 2, so one read by name is refused too, never taken for a whole state.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from gpu_runtime.records import checksum

from .errors import CorruptLogError, LogFullError, StorageError

__all__ = [
    "SEGMENT_HEADER_SIZE",
    "SegmentFile",
    "SegmentHeader",
    "SegmentWriter",
    "base_chain",
    "fsync_dir",
    "list_segments",
    "parse_segment_name",
    "read_segment_header",
]

SEGMENT_MAGIC = b"CNCRSEG\0"
SEGMENT_VERSION = 1
LAYER_VERSION = 2  #: the format version of a layer's header (module docstring)
_HDR = struct.Struct("<8sIIQQQQQII")
SEGMENT_HEADER_SIZE = _HDR.size
assert SEGMENT_HEADER_SIZE == 64
KIND_DELTA, KIND_BASE, KIND_LAYER = 0, 1, 2
_DELTA_RE = re.compile(r"^seg-(\d{10})-([0-9a-f]{16})\.log$")
_BASE_RE = re.compile(r"^base-([0-9a-f]{16})(?:-on-([0-9a-f]{16}))?\.img$")


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    session_tag: int
    token: int
    base: int
    created_ns: int
    epoch: int
    kind: int

    def encode(self) -> bytes:
        version = LAYER_VERSION if self.kind == KIND_LAYER else SEGMENT_VERSION
        raw = _HDR.pack(SEGMENT_MAGIC, version, SEGMENT_HEADER_SIZE, self.session_tag, self.token,
                        self.base, self.created_ns, self.epoch, self.kind, 0)
        return raw[:60] + struct.pack("<I", checksum(raw[:60]))


@dataclass(frozen=True, slots=True)
class SegmentFile:
    """A segment or base file found in a session directory (from its name)."""

    path: Path
    kind: int
    token: int
    base: int
    parent: int = -1  #: a layer: the offset its parent base image covers (else -1)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def delta_name(token: int, base: int) -> str:
    return f"seg-{token:010d}-{base:016x}.log"


def base_name(covers: int, parent: int = -1) -> str:
    """A base image's name; with ``parent``, a layer's."""
    if parent >= 0:
        return f"base-{covers:016x}-on-{parent:016x}.img"
    return f"base-{covers:016x}.img"


def base_chain(newest: str, names: Collection[str]) -> list[str] | None:
    """The names of base image ``newest`` and of the images it lies on (a
    layer's chain, from the names alone), newest first; None if one of them is
    not among ``names``. What must be kept (and, remotely, fetched) with it."""
    by_covers: dict[int, str] = {}
    for n in names:
        if m := _BASE_RE.match(n):
            by_covers[int(m.group(1), 16)] = n
    chain, name = [], newest
    while True:
        m = _BASE_RE.match(name)
        if m is None or name not in names:
            return None
        chain.append(name)
        if m.group(2) is None:
            return chain
        parent = int(m.group(2), 16)
        if parent >= int(m.group(1), 16) or parent not in by_covers:
            return None
        name = by_covers[parent]


def parse_segment_name(name: str) -> tuple[str, int, int] | None:
    """``(kind, token, base)`` of a segment or base image name ("delta" or "base"), else None."""
    if m := _DELTA_RE.match(name):
        return "delta", int(m.group(1)), int(m.group(2), 16)
    if m := _BASE_RE.match(name):
        return "base", 0, int(m.group(1), 16)
    return None


def list_segments(directory: Path, only: Collection[str] | None = None) -> tuple[list[SegmentFile], list[SegmentFile]]:
    """``(bases, deltas)`` found by name, bases by offset, deltas by (token, base);
    ``only``: just the files of these names (the uploader's view of what is remote)."""
    bases, deltas = [], []
    if not directory.is_dir():
        return [], []
    for p in directory.iterdir():
        if only is not None and p.name not in only:
            continue
        if m := _DELTA_RE.match(p.name):
            deltas.append(SegmentFile(p, KIND_DELTA, int(m.group(1)), int(m.group(2), 16)))
        elif m := _BASE_RE.match(p.name):
            if m.group(2) is None:
                bases.append(SegmentFile(p, KIND_BASE, 0, int(m.group(1), 16)))
            else:
                bases.append(SegmentFile(p, KIND_LAYER, 0, int(m.group(1), 16), int(m.group(2), 16)))
    bases.sort(key=lambda f: f.base)
    deltas.sort(key=lambda f: (f.token, f.base))
    return bases, deltas


def read_segment_header(path: Path, *, session_tag: int) -> SegmentHeader:
    """Read and verify a file's header (CorruptLogError on any mismatch)."""
    with open(path, "rb") as f:
        raw = f.read(SEGMENT_HEADER_SIZE)
    if len(raw) < SEGMENT_HEADER_SIZE:
        raise CorruptLogError(f"expected a {SEGMENT_HEADER_SIZE}-byte segment header, found {len(raw)} bytes",
                              path=str(path), offset=0)
    magic, version, hsize, tag, token, base, created, epoch, kind, crc = _HDR.unpack(raw)
    if magic != SEGMENT_MAGIC:
        raise CorruptLogError(f"expected segment magic {SEGMENT_MAGIC!r}, found {magic!r}", path=str(path), offset=0)
    if checksum(raw[:60]) != crc:
        raise CorruptLogError("segment header checksum mismatch", path=str(path), offset=0)
    if version not in (SEGMENT_VERSION, LAYER_VERSION) or hsize != SEGMENT_HEADER_SIZE:
        raise CorruptLogError(f"expected segment format version {SEGMENT_VERSION} or {LAYER_VERSION}, found {version}",
                              path=str(path), offset=8)
    if (version == LAYER_VERSION) != (kind == KIND_LAYER):
        raise CorruptLogError(f"segment header of format version {version} names kind {kind}", path=str(path),
                              offset=56)
    if tag != session_tag:
        raise CorruptLogError(f"expected session tag {session_tag:016x}, found {tag:016x}: a file of another session",
                              path=str(path), offset=16)
    return SegmentHeader(tag, token, base, created, epoch, kind)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(e: OSError, path: Path, what: str = "append to") -> Exception:
    """The named error for a failed write or fsync: a full disk (LogFullError)
    or any other failure of the storage (StorageError). Both stop the flusher,
    and the next commit raises them."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return LogFullError(f"cannot {what} {path}: {os.strerror(e.errno)}; committed epochs stay in the "
                            "host ring until space is freed", orig=e)
    reason = os.strerror(e.errno) if e.errno else str(e)
    return StorageError(f"cannot {what} {path}: {reason}; committed epochs stay in the host ring until the "
                        "segment disk works again", orig=e)


class SegmentWriter:
    """Appends to one segment file. Not thread-safe (the flusher owns it)."""

    def __init__(self, path: Path, fd: int, header: SegmentHeader, size: int) -> None:
        self.path = path
        self._fd = fd
        self.header = header
        self.size = size  #: bytes in the file, header included

    @classmethod
    def create(cls, directory: Path, header: SegmentHeader, *, final_name: str | None = None) -> SegmentWriter:
        """A new file with its header written and made durable (file and directory)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = final_name or (delta_name(header.token, header.base) if header.kind == KIND_DELTA
                              else base_name(header.base))
        path = directory / name
        try:
            # 0600: a segment holds someone's conversation (the umask can only narrow it)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as e:
            raise _disk_error(e, path) from e
        w = cls(path, fd, header, 0)
        try:
            w.append(header.encode())
            w.sync()
            fsync_dir(directory)
        except BaseException:
            w.close()
            path.unlink(missing_ok=True)
            raise
        return w

    @classmethod
    def reopen(cls, path: Path, *, session_tag: int) -> SegmentWriter:
        """Append to an existing segment (its tail must already be whole records)."""
        header = read_segment_header(path, session_tag=session_tag)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise _disk_error(e, path) from e
        return cls(path, fd, header, os.fstat(fd).st_size)

    @property
    def end(self) -> int:
        """Log offset just past the last byte (delta segments)."""
        return self.header.base + self.size - SEGMENT_HEADER_SIZE

    def append(self, data: bytes | memoryview) -> None:
        """Write all of ``data``; on a disk error the file is cut back to its
        previous size, so a segment never ends in a partial append we made."""
        view = memoryview(data)
        before = self.size
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n
        except OSError as e:
            try:
                os.ftruncate(self._fd, before)
            finally:
                self.size = before
            raise _disk_error(e, self.path) from e

    def append_all(self, parts: list[memoryview]) -> None:
        """Append several buffers as one unit (cut back together on a disk error)."""
        before = self.size
        try:
            for p in parts:
                self.append(p)
        except BaseException:
            os.ftruncate(self._fd, before)
            self.size = before
            raise

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise _disk_error(e, self.path, "fsync") from e

    def truncate(self, size: int) -> None:
        """Cut the file back to ``size`` bytes (bytes whose fsync failed: the
        kernel may have dropped them, so they are written again from the ring)."""
        try:
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise _disk_error(e, self.path, "truncate") from e
        self.size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def new_header(*, session_tag: int, token: int, base: int, kind: int = KIND_DELTA, epoch: int = 0) -> SegmentHeader:
    return SegmentHeader(session_tag, token, base, time.time_ns(), epoch, kind)
