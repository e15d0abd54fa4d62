"""Host log rings kept mapped after their session ends in this process.

Why: a session's open maps its ring file (``ring_bytes`` in ``/dev/shm``) and
the CuPy backend page-locks the mapping for the device (``cudaHostRegister``)
on the first commit; the end of the session unmaps it (unregistering first)
and a clean close removes the file. A conversation reopens its session on
every call (``conversation_generate``), so each call paid for a new ring file,
its pages faulted in and pinned, and the unregistration: measured on the GPU
as most of a turn's time to first token. Keeping the ring's mapping (and with
it the backend's registration, which lives until the ring's ``close``) makes
the next open of the same session in this process find it ready.

Protocol (``SessionLog`` calls both, under its own locks):

* ``keep(ring, token, clean)`` when a session's log ends, instead of closing
  (``clean``: a clean close of a fully flushed ring, which would have removed
  the file). The ring file stays where it is. Past ``budget_bytes`` the least
  recently kept rings are *retired*: closed (the backend unregisters them) and
  their file removed if ``clean``, the file is still this mapping's (same
  inode), still owned by ``token`` and still fully flushed; that is exactly
  what the clean close would have done, later.
* ``take(path)`` when a session opens: the kept mapping of ``path``, if the
  file there is still the one it maps (another process or ``concordia gc`` may
  have removed or replaced it while it was kept: then the mapping is retired
  and None returned). The caller checks it as a freshly mapped ring (tag,
  owner fence, drain) and resets it.
* ``close()`` (runtime close): retire every kept ring.

Invariants: a kept ring belongs to no open session of this process; nothing
in this process writes to it until ``take`` hands it out. Kept rings hold
flushed data only or what a released session left (as any ring file would):
a crash while they are kept leaves their files in ``/dev/shm``, and the next
open of their session reuses them, or ``concordia gc`` removes those of closed
sessions whose bytes are all in segments (gc in the keeping process leaves
kept rings alone; removed by another process, a kept ring is detected at
``take`` by its inode). ``budget_bytes=0`` keeps nothing
(the behaviour before this module).
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from gpu_runtime.logring import LogRing

from ._logging import get_logger

__all__ = ["WarmRings"]

_log = get_logger(component="warm_rings")


@dataclass(slots=True)
class _Kept:
    ring: LogRing
    inode: tuple[int, int]  #: (st_dev, st_ino) of the file when kept
    token: int  #: the owner token of the session that kept it
    clean: bool  #: kept by a clean close of a flushed ring: the file is removed when retired


class WarmRings:
    """Rings of ended sessions kept mapped, least recently kept out first past
    ``budget_bytes`` of ring capacity. Thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._kept: collections.OrderedDict[Path, _Kept] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  #: opens that found their ring kept here

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(k.ring.capacity for k in self._kept.values())

    def paths(self) -> frozenset[Path]:
        """The ring files kept now: those whose file is still the kept mapping's
        (one removed or replaced by another process is not)."""
        with self._lock:
            kept = list(self._kept.items())
        return frozenset(path for path, k in kept if _file_id(path) == k.inode)

    def keep(self, ring: LogRing, *, token: int, clean: bool) -> None:
        try:
            st = os.fstat(ring.fileno())
        except OSError:
            _retire(_Kept(ring, (-1, -1), token, False))
            return
        out: list[_Kept] = []
        with self._lock:
            old = self._kept.pop(ring.path, None)
            if old is not None and old.ring is not ring:
                out.append(old)
            self._kept[ring.path] = _Kept(ring, (st.st_dev, st.st_ino), token, clean)
            total = sum(k.ring.capacity for k in self._kept.values())
            while self._kept and total > self.budget_bytes:
                _, k = self._kept.popitem(last=False)
                total -= k.ring.capacity
                out.append(k)
        for k in out:
            _retire(k)

    def take(self, path: Path) -> LogRing | None:
        with self._lock:
            k = self._kept.pop(path, None)
        if k is None:
            return None
        if _file_id(path) != k.inode:
            k.clean = False  # the file is not this mapping's any more: close only
            _retire(k)
            return None
        self.hits += 1
        return k.ring

    def forget(self, path: Path) -> None:
        """Close the kept mapping of ``path`` (its session is being deleted; the caller removes the file)."""
        with self._lock:
            k = self._kept.pop(path, None)
        if k is not None:
            k.clean = False
            _retire(k)

    def close(self) -> None:
        with self._lock:
            kept = list(self._kept.values())
            self._kept.clear()
        for k in kept:
            _retire(k)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _retire(k: _Kept) -> None:
    """Close a kept ring; remove its file only where the clean close would have
    (see the module docstring), never a file another owner now uses."""
    ring = k.ring
    remove = (k.clean and _file_id(ring.path) == k.inode and ring.owner_token == k.token
              and ring.consumed == ring.written)
    try:
        if remove:
            ring.unlink()
        else:
            ring.close()
    except Exception as e:  # noqa: BLE001 -- closing a mapping (and unregistering it): nothing committed depends on it
        _log.warning("closing a kept ring failed", path=str(ring.path), error=str(e))
