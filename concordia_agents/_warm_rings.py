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

Protocol (``SessionLog`` calls ``keep`` and ``take`` under the session's lease):

* ``keep(ring, token, clean)`` when a session's log ends, instead of closing.
  ``clean`` (a clean close of a fully flushed ring, or a cancelled open of an
  empty ring, where the file would have been removed): the file is renamed to
  a private name (``<ring>.kept-<host>-<pid>``) while the lease is still held,
  so no other process can find it, open it and write into it; it holds
  nothing the segments lack. Not clean (a release): the file stays where it
  is (it may hold bytes the segments lack, which the next owner must drain)
  and only the mapping is kept.
* ``take(path)`` when a session opens, under the new lease: a clean kept ring
  is renamed back to ``path`` and handed out, unless a file exists there
  (another process opened the session meanwhile and made one, which the
  caller must read): then the kept one is removed. A kept ring that was not
  clean is handed out only if the file at ``path`` is still the one it maps
  (same inode). The caller checks the ring as a freshly mapped one (tag,
  owner fence, drain) and resets it.
* Past ``budget_bytes`` of kept capacity, the least recently kept rings are
  *retired*: closed (the backend unregisters them), and a clean one's private
  file removed, as the clean close would have done. ``close()`` (runtime
  close, and at interpreter exit) retires every kept ring; ``forget(path)``
  (session delete) one.

Invariants: a kept ring belongs to no open session of this process; nothing
writes to it until ``take`` hands it out; a privately named file is never read
by anyone (it holds only bytes the segments have), so removing it loses
nothing. A crash leaves privately named files behind: ``concordia gc`` removes
those whose process is gone. ``budget_bytes=0`` keeps nothing.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from gpu_runtime.logring import LogRing

from ._logging import get_logger
from ._owner import private_suffix

__all__ = ["WarmRings"]

_log = get_logger(component="warm_rings")


@dataclass(slots=True)
class _Kept:
    ring: LogRing
    inode: tuple[int, int]  #: (st_dev, st_ino) of the file when kept
    private: bool  #: renamed to a private name (kept clean): the file is removed when retired


class WarmRings:
    """Rings of ended sessions kept mapped, least recently kept out first past
    ``budget_bytes`` of ring capacity. Thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._kept: collections.OrderedDict[Path, _Kept] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  #: opens that found their ring kept here
        atexit.register(_close_at_exit, weakref.ref(self))  # no privately named file outlives the process

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(k.ring.capacity for k in self._kept.values())

    def keep(self, ring: LogRing, *, clean: bool) -> None:
        """Keep ``ring`` (its session ends; this runs under the session's lease)."""
        path = ring.path
        with self._lock:  # none in practice (an open takes its kept ring first); retired before the rename below
            old = self._kept.pop(path, None)  # would reuse its private name
        if old is not None:
            _retire(old.ring, unlink=old.private)
        if self.budget_bytes < ring.capacity:
            _retire(ring, unlink=clean)
            return
        try:
            st = os.fstat(ring.fileno())
            if clean:
                private = path.with_name(path.name + private_suffix())
                os.rename(path, private)
                ring.path = private
        except OSError as e:
            _log.warning("keeping a ring failed; closing it", path=str(path), error=str(e))
            _retire(ring, unlink=clean)
            return
        out: list[_Kept] = []
        with self._lock:
            self._kept[path] = _Kept(ring, (st.st_dev, st.st_ino), clean)
            total = sum(k.ring.capacity for k in self._kept.values())
            while self._kept and total > self.budget_bytes:
                _, k = self._kept.popitem(last=False)
                total -= k.ring.capacity
                out.append(k)
        for k in out:
            _retire(k.ring, unlink=k.private)

    def take(self, path: Path) -> tuple[LogRing, bool] | None:
        """The kept ring of ``path`` (see the module docs) and whether it was
        kept clean (no file was at ``path`` before: as a ring the open made), or None."""
        with self._lock:
            k = self._kept.pop(path, None)
        if k is None:
            return None
        try:
            if k.private:
                if os.path.lexists(path):  # another process made a ring there meanwhile: that one is read
                    _retire(k.ring, unlink=k.private)
                    return None
                os.rename(k.ring.path, path)
                k.ring.path = path
            elif _file_id(path) != k.inode:  # removed or replaced by another process
                _retire(k.ring, unlink=k.private)
                return None
        except OSError as e:
            _log.warning("taking a kept ring failed; the file is read instead", path=str(path), error=str(e))
            _retire(k.ring, unlink=k.private)
            return None
        self.hits += 1
        return k.ring, k.private

    def forget(self, path: Path) -> None:
        """Retire the kept ring of ``path`` (its session is being deleted)."""
        with self._lock:
            k = self._kept.pop(path, None)
        if k is not None:
            _retire(k.ring, unlink=k.private)

    def close(self) -> None:
        with self._lock:
            kept = list(self._kept.values())
            self._kept.clear()
        for k in kept:
            _retire(k.ring, unlink=k.private)


def _close_at_exit(ref: weakref.ref[WarmRings]) -> None:
    rings = ref()
    if rings is not None:
        rings.close()


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _retire(ring: LogRing, *, unlink: bool) -> None:
    """Close a ring, removing its file if ``unlink`` (a privately named kept
    ring; a clean one not kept at all, as the session's close would have)."""
    try:
        if unlink:
            ring.unlink()
        else:
            ring.close()
    except Exception as e:  # noqa: BLE001 -- closing a mapping (and unregistering it): nothing committed depends on it
        _log.warning("closing a kept ring failed", path=str(ring.path), error=str(e))
