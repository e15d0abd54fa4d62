"""Where a logged record lies (``RecordLoc``) and how its payload is read
and verified (``PayloadReader``): whole and checked piece by piece while in
the CPU cache, whole without a check, or a part of it, for a restore that
verifies on its device and reads one large record on several threads.

Invariant: a verified read raises ``CorruptLogError`` (file and offset) on a
payload that fails its checksum or is cut short, before the caller uses a
byte of it; an unverified read is for a caller that checks before use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpu_runtime.checksum import partial_sum, payload_sum_finish
from gpu_runtime.records import HEADER_SIZE, RecordHeader, payload_sum
from gpu_runtime.regions import RegionSpec

from .errors import CorruptLogError

__all__ = ["PayloadReader", "RecordLoc"]

_PIECE = 1 << 20  #: bytes read and summed at a time (fits a core's L2 cache)
_M64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class RecordLoc:
    path: Path
    file_offset: int  #: of the record header
    logical: int  #: log offset (-1 inside base images)
    header: RecordHeader
    spec: RegionSpec | None = None  #: parsed payload of a REGION record


class PayloadReader:
    """Reads and verifies payloads, keeping the files it has opened (restore
    reads thousands of records from a handful of segments). Thread-safe:
    reads are positional (``pread``), so restore pipelines read and verify
    records on several threads at once (NumPy releases the GIL while it sums)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def __call__(self, loc: RecordLoc) -> memoryview:
        data = memoryview(os.pread(self._fd(loc.path), loc.header.length, loc.file_offset + HEADER_SIZE))
        self.verify(loc, data)
        return data

    def _pieces(self, loc: RecordLoc, out: np.ndarray, piece: int, start: int | None = None
                ) -> Iterator[tuple[int, int]]:
        """``pread`` ``loc``'s whole payload (``start`` None: ``out`` must be its
        size) or bytes ``[start, start + out.size)`` of it into ``out`` (u8) at
        most ``piece`` bytes a call, yielding each ``(begin, end)`` of ``out``
        as it lands."""
        n, length = out.size, loc.header.length
        if start is None and n != length:
            raise ValueError(f"expected an output of {length} bytes, found {n}")
        first = start or 0
        if first < 0 or first + n > length:
            raise ValueError(f"expected a part within the payload's {length} bytes, found [{first}, {first + n})")
        fd, pos, base = self._fd(loc.path), 0, loc.file_offset + HEADER_SIZE + first
        while pos < n:
            got = os.preadv(fd, [out[pos:pos + min(piece, n - pos)].data], base + pos)
            if got <= 0:
                raise CorruptLogError(f"payload of a {loc.header.type.name} record of epoch {loc.header.epoch} is cut "
                                      f"short ({first + pos} of {length} bytes)", path=str(loc.path),
                                      offset=loc.file_offset)
            yield pos, pos + got
            pos += got

    def read_verified(self, loc: RecordLoc, out: np.ndarray) -> None:
        """Read ``loc``'s payload into ``out`` and verify it piece by piece, each
        piece summed while it is still in the CPU cache."""
        n, version = loc.header.length, loc.header.version
        whole, s, aligned = n // 8, 0, True
        for a, b in self._pieces(loc, out, _PIECE):
            aligned = aligned and a % 8 == 0 and (b % 8 == 0 or b == n)
            if aligned and min(b, 8 * whole) > a:
                s += partial_sum(out[a:min(b, 8 * whole)].view(np.uint64), a // 8, version)
        if aligned:
            ok = payload_sum_finish(s & _M64, out[8 * whole:].tobytes(), whole, n, version) == loc.header.payload_sum
        else:  # a read ended mid-word (rare): sum the whole payload again
            ok = payload_sum(out, version) == loc.header.payload_sum
        if not ok:
            self.raise_corrupt(loc)

    def read_unverified(self, loc: RecordLoc, out: np.ndarray) -> None:
        """Read ``loc``'s payload into ``out`` (its size) without checking it:
        for a caller that verifies it elsewhere (on the GPU) before using it."""
        for _ in self._pieces(loc, out, out.size):
            pass

    def read_part(self, loc: RecordLoc, out: np.ndarray, start: int) -> None:
        """Read bytes ``[start, start + out.size)`` of ``loc``'s payload into
        ``out`` without checking them (a restore's reader task: one large
        record is read on several threads, and verified on the GPU)."""
        for _ in self._pieces(loc, out, out.size, start):
            pass

    @staticmethod
    def raise_corrupt(loc: RecordLoc) -> None:
        """Raise the CorruptLogError of a payload that fails its checksum."""
        raise CorruptLogError(f"payload of a {loc.header.type.name} record of epoch {loc.header.epoch} fails "
                              "its checksum", path=str(loc.path), offset=loc.file_offset)

    @classmethod
    def verify(cls, loc: RecordLoc, payload: memoryview | np.ndarray) -> None:
        """Raise CorruptLogError unless ``payload`` is ``loc``'s intact payload."""
        if len(payload) != loc.header.length or payload_sum(payload, loc.header.version) != loc.header.payload_sum:
            cls.raise_corrupt(loc)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> PayloadReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
