"""The host log ring: the first durable tier of the append log.

A ring is a file in ``/dev/shm`` (or under the Concordia home where there is no
``/dev/shm``) mapped into the writer's address space. Bytes stored there outlive
the writing process and the GPU; only a host crash or reboot loses them, which
the flusher covers by copying them into segment files.

Offsets are *logical*: they grow monotonically for the life of a session's log
and never wrap. Logical offset ``x`` lives at byte ``DATA_START + x % capacity``
of the file; a record may wrap around the end of the data area.

File layout, format version 1 (little-endian)::

    offset field            who writes it
    0      magic b"CNCRRING"   creator
    8      u32 version         creator
    12     u32 data_start      creator (= 4096: one page of header)
    16     u64 capacity        creator (bytes of the data area)
    24     u64 session_tag     creator
    32     u32 static_crc      creator (CRC-32 of bytes [0, 32))
    64     u64 owner_token     the session's owner; a takeover stores its own
                               token here, which fences a stale writer
    72     u64 owner_pid       the owner (diagnostics)
    80     u64 base            logical offset at which the ring was (re)initialized
    88     u64 chain_token     token of the owner whose log chain the data continues
                               (the segment a recovering process drains it into)
    128    u64 written         writer: end of complete records (after their bytes)
    192    u64 committed       writer: end of the last COMMIT record
    200    u64 committed_epoch writer: epoch of that COMMIT record
    256    u64 consumed        flusher: end of bytes durably appended to segments

The counters sit in separate 64-byte lines so that a device writer and the host
flusher do not share a line. Protocol (one writer, one flusher):

1. The writer waits until ``written + n - consumed <= capacity``.
2. It stores the record bytes, then publishes ``written`` (and, after a COMMIT
   record, ``committed`` / ``committed_epoch``). Stores of aligned 8-byte words
   are single instructions, so readers see old or new values, never a mix.
3. The flusher copies ``[consumed, written)`` to a segment, makes it durable
   per the fsync policy, then publishes ``consumed``.

Invariant: ``base <= consumed <= written`` and ``committed <= written``.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import CorruptLogError, LogFullError
from .records import checksum

__all__ = ["DATA_START", "RING_MAGIC", "RING_VERSION", "LogRing", "default_ring_dir"]

RING_MAGIC = b"CNCRRING"
RING_VERSION = 1
DATA_START = 4096
_STATIC = struct.Struct("<8sIIQQ")  # magic, version, data_start, capacity, session_tag
# Word indices (u64) of the dynamic fields.
_OWNER_TOKEN, _OWNER_PID, _BASE, _CHAIN_TOKEN = 64 // 8, 72 // 8, 80 // 8, 88 // 8
_WRITTEN, _COMMITTED, _COMMITTED_EPOCH, _CONSUMED = 128 // 8, 192 // 8, 200 // 8, 256 // 8


def default_ring_dir(home: Path) -> Path:
    """``/dev/shm`` where it exists and is writable, else ``<home>/rings``."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return home / "rings"


class LogRing:
    """A mapped ring file. Use :meth:`create` or :meth:`open`; not thread-safe
    for several writers (a session has one)."""

    def __init__(self, *, path: Path, fd: int, mm: mmap.mmap, capacity: int, session_tag: int) -> None:
        self.path = path
        self._fd = fd
        self._mm = mm
        self.capacity = capacity
        self.session_tag = session_tag
        # Counters (u64 words of the header) and short bytes records go through
        # memoryviews: no NumPy scalar or array conversion on the per-token
        # commit path. Wider copies use the NumPy view of the data area.
        self._words = memoryview(mm).cast("Q")
        self._bytes = memoryview(mm)[DATA_START:]
        self._data = np.frombuffer(mm, dtype=np.uint8, offset=DATA_START, count=capacity)
        #: called before the mapping goes away (a backend unregisters it from the GPU)
        self.on_close: list[Callable[[], None]] = []

    # -- construction -------------------------------------------------------------

    @classmethod
    def create(
        cls, path: Path, *, capacity: int, session_tag: int, owner_token: int, base: int
    ) -> LogRing:
        """Create (or replace) a ring file whose logical offsets start at ``base``."""
        if capacity <= 0 or capacity % 4096:
            raise ValueError(f"ring capacity must be a positive multiple of 4096, got {capacity}")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, DATA_START + capacity)
            static = _STATIC.pack(RING_MAGIC, RING_VERSION, DATA_START, capacity, session_tag)
            os.pwrite(fd, static + struct.pack("<I", checksum(static)), 0)
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        ring = cls._map(path, fd, capacity, session_tag)
        ring.reset(base=base, owner_token=owner_token)
        return ring

    @classmethod
    def open(cls, path: Path) -> LogRing:
        """Map an existing ring file, verifying its static header."""
        fd = os.open(path, os.O_RDWR)
        try:
            head = os.pread(fd, 36, 0)
            size = os.fstat(fd).st_size
            if len(head) < 36:
                raise CorruptLogError(f"expected a {DATA_START}-byte ring header, found {size} bytes", path=str(path),
                                      offset=0)
            magic, version, data_start, capacity, tag = _STATIC.unpack(head[:32])
            if magic != RING_MAGIC:
                raise CorruptLogError(f"expected ring magic {RING_MAGIC!r}, found {magic!r}", path=str(path), offset=0)
            if checksum(head[:32]) != struct.unpack("<I", head[32:36])[0]:
                raise CorruptLogError("ring header checksum mismatch", path=str(path), offset=0)
            if version != RING_VERSION or data_start != DATA_START:
                raise CorruptLogError(
                    f"expected ring version {RING_VERSION} with data at {DATA_START}, "
                    f"found version {version} with data at {data_start}", path=str(path), offset=8)
            if size != DATA_START + capacity:
                raise CorruptLogError(
                    f"expected a ring file of {DATA_START + capacity} bytes, found {size}", path=str(path), offset=0)
        except BaseException:
            os.close(fd)
            raise
        ring = cls._map(path, fd, capacity, tag)
        ring.check_counters()
        return ring

    @classmethod
    def _map(cls, path: Path, fd: int, capacity: int, tag: int) -> LogRing:
        mm = mmap.mmap(fd, DATA_START + capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(path=path, fd=fd, mm=mm, capacity=capacity, session_tag=tag)

    def check_counters(self) -> None:
        """Raise CorruptLogError unless the counters are consistent (another process may have written them)."""
        b, c, w, k = self.base, self.consumed, self.written, self.committed
        if not (b <= c <= w and b <= k <= w and w - c <= self.capacity):
            raise CorruptLogError(
                f"expected ring counters base <= consumed <= written, committed <= written and "
                f"written - consumed <= capacity, found base={b} consumed={c} committed={k} written={w}",
                path=str(self.path), offset=64)

    def reset(self, *, base: int, owner_token: int) -> None:
        """Empty the ring: all counters at ``base``, owned by ``owner_token``."""
        w = self._words
        # Fence first: a stale writer checks the owner token before it stores.
        w[_OWNER_TOKEN] = w[_CHAIN_TOKEN] = owner_token
        w[_OWNER_PID] = os.getpid()
        w[_BASE] = w[_WRITTEN] = w[_COMMITTED] = w[_CONSUMED] = base
        w[_COMMITTED_EPOCH] = 0

    # -- counters -----------------------------------------------------------------

    def _get(self, i: int) -> int:
        return self._words[i]

    owner_token = property(lambda self: self._get(_OWNER_TOKEN))
    owner_pid = property(lambda self: self._get(_OWNER_PID))
    base = property(lambda self: self._get(_BASE))
    chain_token = property(lambda self: self._get(_CHAIN_TOKEN))
    written = property(lambda self: self._get(_WRITTEN))
    committed = property(lambda self: self._get(_COMMITTED))
    committed_epoch = property(lambda self: self._get(_COMMITTED_EPOCH))
    consumed = property(lambda self: self._get(_CONSUMED))

    def set_owner(self, token: int) -> None:
        self._words[_OWNER_PID] = os.getpid()
        self._words[_OWNER_TOKEN] = token

    def publish_written(self, end: int) -> None:
        self._words[_WRITTEN] = end

    def publish_commit(self, end: int, epoch: int) -> None:
        """Publish a COMMIT record ending at ``end``. Order matters: readers that
        see ``committed`` must also see ``written`` covering it."""
        self._words[_WRITTEN] = max(end, self.written)
        self._words[_COMMITTED_EPOCH] = epoch
        self._words[_COMMITTED] = end

    def publish_consumed(self, end: int) -> None:
        self._words[_CONSUMED] = end

    def free_space(self) -> int:
        return self.capacity - (self.written - self.consumed)

    # -- data ---------------------------------------------------------------------

    def write_at(self, logical: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Store ``data`` at a logical offset, wrapping around the data area."""
        if type(data) is bytes:
            n = len(data)
            pos = logical % self.capacity
            if pos + n <= self.capacity:
                self._bytes[pos:pos + n] = data
                return
        src = (np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray)
               else data.reshape(-1).view(np.uint8))
        n = src.size
        if n > self.capacity:
            raise LogFullError(f"expected at most {self.capacity} bytes per write into the ring, found {n}")
        pos = logical % self.capacity
        first = min(n, self.capacity - pos)
        self._data[pos:pos + first] = src[:first]
        if first < n:
            self._data[: n - first] = src[first:]

    def read(self, logical: int, n: int) -> bytes:
        """Copy ``n`` bytes from a logical offset, unwrapping."""
        if n > self.capacity:
            raise ValueError(f"cannot read {n} bytes from a ring of {self.capacity}")
        pos = logical % self.capacity
        first = min(n, self.capacity - pos)
        if first == n:
            return self._data[pos:pos + n].tobytes()
        return self._data[pos:].tobytes() + self._data[: n - first].tobytes()

    @property
    def data_view(self) -> memoryview:
        """The data area (byte ``i`` holds logical offsets ``x`` with ``x %
        capacity == i``), zero-copy, for readers that walk it in place; valid
        until ``close`` (a view of its own: releasing it leaves the ring's)."""
        return self._bytes[:]

    def views(self, logical: int, n: int) -> list[memoryview]:
        """Zero-copy views of ``n`` bytes from a logical offset (two if they wrap)."""
        pos = logical % self.capacity
        first = min(n, self.capacity - pos)
        out = [self._data[pos:pos + first].data]
        if first < n:
            out.append(self._data[: n - first].data)
        return out

    def wait_for_space(
        self, end: int, *, timeout: float, kick: Callable[[], None] | None = None,
        fenced: Callable[[], None] | None = None,
    ) -> None:
        """Block until bytes up to logical offset ``end`` fit (``end - consumed <=
        capacity``). ``kick`` wakes the flusher; ``fenced`` raises if the writer
        lost ownership meanwhile. Raises LogFullError after ``timeout`` seconds:
        the caller's epoch is then not committed."""
        if end - self.consumed <= self.capacity:
            return
        deadline = time.monotonic() + timeout
        delay = 50e-6
        while end - self.consumed > self.capacity:
            if kick is not None:
                kick()
            if fenced is not None:
                fenced()
            if time.monotonic() > deadline:
                raise LogFullError(
                    f"host log ring {self.path} stayed full for {timeout:.1f} s: needed bytes up to log offset "
                    f"{end}, the flusher has consumed up to {self.consumed} of {self.capacity}; is the flusher "
                    "stuck or the disk full?")
            time.sleep(delay)
            delay = min(delay * 2, 5e-3)

    @property
    def address(self) -> int:
        """Host address of the mapping (header first, data at ``DATA_START``)."""
        return int(self._data.ctypes.data) - DATA_START

    def fileno(self) -> int:
        """The ring file's descriptor (open while the ring is)."""
        return self._fd

    def close(self) -> None:
        if self._mm is None:
            return
        for fn in self.on_close:
            fn()
        self.on_close.clear()
        # Drop the views before closing the mapping (they pin its buffer).
        del self._data
        self._words.release()
        self._bytes.release()
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the OS unmaps at exit
            pass
        os.close(self._fd)
        self._mm = None  # type: ignore[assignment]

    def unlink(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
