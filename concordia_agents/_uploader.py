"""The uploader: copies sealed segments and base images of ``remote``-level
sessions into the object store, and fetches them back on a host that has none.

One thread per runtime (``Uploader.start``). For each attached session, a pass
(``_step``) does, in order:

1. **Seal** the open segment when it holds a committed epoch that is not yet
   remote and either ``remote_interval`` seconds have passed since the last
   seal or a ``flush(level="remote")`` waits (``SessionLog.seal``: fsync, roll).
2. **Upload** every sealed file not yet ``remote`` in the catalog, oldest chain
   first: the catalog row is made first (``uploading``), the file is hashed
   and goes up (verified by the server) in the upload worker process
   (``_upload_worker``: no byte of it through this process's GIL), then the
   row says ``remote`` with the size and SHA-256 of what was sent. Files the
   newest remote base image covers are not uploaded (compaction folded them).
3. **Advance** the remote epoch: the log made of the ``remote`` files alone is
   scanned (``_replay.scan(only=...)``, headers only), which is exactly what a
   host without local files restores; its epoch is recorded (only forward).
4. **Delete** remote objects the newest remote base image covers (compaction's
   rule, applied once that base is remote): row ``deleting``, object, row.

Every catalog write is fenced by the session's token: an owner that lost the
session (another host took over) stops uploading it at its next write. A
failed pass (the store unreachable, a server error after boto3's retries) is
kept as the session's ``error`` and retried after a backoff doubling from
``remote_retry`` to 30 s; commits go on locally meanwhile, and
``Session.durability()`` reports the lag.

A session that ends (close, release) stays attached until its files are all
remote (its last segment is sealed by the close), or the runtime closes.

``fetch`` (``SessionLog.open`` on a host with no local file of the session):
downloads the objects a restore needs (the newest remote base image and the
delta segments it does not cover), each verified against the catalog's size
and SHA-256 before it appears under its name, on four threads.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._catalog import Catalog
from ._catalog._objects import (
    ObjectInfo,
    begin_upload,
    finish_upload,
    forget_objects,
    mark_deleting,
    objects,
    record_remote,
)
from ._home import make_private_dir
from ._log import SessionLog
from ._logging import get_logger
from ._replay import last_commit, scan
from ._segments import (
    KIND_DELTA,
    SEGMENT_HEADER_SIZE,
    SegmentFile,
    base_chain,
    fsync_dir,
    list_segments,
    read_segment_header,
)
from ._store import ObjectStore, object_key
from ._upload_worker import UploadWorker
from .config import RuntimeConfig
from .errors import ConcordiaError, OwnershipError, RemoteStoreError

__all__ = ["Uploader", "covered_by", "newest_base"]

_MAX_BACKOFF = 30.0
_NICE = 10  #: the uploader thread's niceness (Linux: per thread, inherited by the threads it starts)


def covered_by(base: ObjectInfo | None, kind: str, token: int, base_offset: int, end: int,
               chain: Collection[int] = ()) -> bool:
    """Whether a file is history the base image ``base`` folded in (compaction's
    rule: older bases, except those of ``chain``, the offsets covered by the
    images a layer lies on; older owners' chains; and the base owner's
    segments that end at or before the offset it covers)."""
    if base is None:
        return False
    if kind == "base":
        return base_offset < base.base_offset and base_offset not in chain
    return token < base.token or end <= base.base_offset


def _object_end(o: ObjectInfo) -> int:
    """Log offset an object's file ends at (a base image: the offset it covers)."""
    return o.base_offset if o.kind == "base" else o.base_offset + o.bytes - SEGMENT_HEADER_SIZE


def _end(f: SegmentFile) -> int:
    return f.base if f.kind != KIND_DELTA else f.base + f.size - SEGMENT_HEADER_SIZE


@dataclass(slots=True)
class _Entry:
    """One attached session (its log while open; after it ends, its files)."""

    log: SessionLog
    open: bool = True
    remote_epoch: int = 0
    remote_offset: int = 0
    last_seal: float = field(default_factory=time.monotonic)
    error: BaseException | None = None
    retry_at: float = 0.0
    backoff: float = 0.0
    want: int = 0  #: an epoch a flush(level="remote") waits for
    remote_end: int | None = None  #: log offset where this owner's contiguous remote chain ends (None: unknown)
    last_listing: tuple[str, ...] = ()  #: the session's files at the end of the last whole pass


class Uploader:
    def __init__(self, store: ObjectStore, worker: UploadWorker, catalog: Catalog, config: RuntimeConfig) -> None:
        self.store = store
        self.worker = worker
        self.catalog = catalog
        self.config = config
        self.log = get_logger(component="uploader")
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  #: notified after every pass
        self._pass_lock = threading.Lock()  #: held through a pass over one session (``forget`` waits for it)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="concordia-uploader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def key(self, session_dir: Path, name: str) -> str:
        return object_key(self.store.location, self.catalog.catalog_id, session_dir.name, name)

    # -- sessions -------------------------------------------------------------------

    def attach(self, log: SessionLog, *, remote_epoch: int, remote_offset: int) -> None:
        with self._lock:
            self._entries[log.session_id] = _Entry(log, remote_epoch=remote_epoch, remote_offset=remote_offset)
        self._wake.set()

    def ended(self, session_id: str, token: int) -> None:
        """The session's log closed: upload what is left, then let it go."""
        with self._lock:
            e = self._entries.get(session_id)
            if e is not None and e.log.token == token:
                e.open = False
        self._wake.set()

    def forget(self, session_id: str) -> None:
        """Stop uploading a session now (it is being deleted), waiting for a pass
        in progress on it: no object of it is sent after this returns."""
        with self._pass_lock, self._lock:
            self._entries.pop(session_id, None)
            self._done.notify_all()

    def status(self, session_id: str) -> tuple[int, BaseException | None] | None:
        """``(remote epoch, last error)`` of an attached session (None: not attached)."""
        with self._lock:
            e = self._entries.get(session_id)
            return None if e is None else (e.remote_epoch, e.error)

    def wait_remote(self, session_id: str, epoch: int, timeout: float) -> int:
        """Seal and upload until ``epoch`` is remote; returns the remote epoch.
        RemoteStoreError after ``timeout`` seconds, naming the lag and the last
        failure."""
        deadline = time.monotonic() + timeout
        with self._lock:
            e = self._entries.get(session_id)
            if e is None:
                raise RemoteStoreError(f"session {session_id!r} is not uploaded to a remote (its level is not "
                                       "'remote', or the runtime has no remote)")
            e.want = max(e.want, epoch)
            e.retry_at = 0.0  # a waiter asks now, not after the backoff
            self._wake.set()
            while e.remote_epoch < epoch:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    why = f"; last failure: {e.error}" if e.error is not None else ""
                    raise RemoteStoreError(f"session {session_id!r}: epoch {epoch} not remote after {timeout:.1f} s "
                                           f"(remote epoch {e.remote_epoch}, {epoch - e.remote_epoch} behind){why}",
                                           orig=e.error)
                if isinstance(e.error, OwnershipError):
                    raise e.error
                self._done.wait(min(left, 0.1))
                self._wake.set()
            return e.remote_epoch

    def drain(self, timeout: float) -> list[str]:
        """Wait until every ended session's files are remote (runtime close);
        returns the sessions still behind."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                behind = [sid for sid, e in self._entries.items() if not e.open]
                # Stop early only when the store has failed every one of them for a while
                # (backoff of 4 s: five attempts over ~8 s), not at one transient error.
                failing = all(self._entries[sid].backoff >= 4.0 for sid in behind)
                if not behind or failing or time.monotonic() > deadline or not self._thread.is_alive():
                    return behind
                self._wake.set()
                self._done.wait(0.1)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.worker.close()

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        # Below the committing threads: uploads are background work, and on a
        # machine with few cores their hashing and HTTP must not delay a commit.
        # Threads boto3 starts from here (multipart parts) inherit the niceness.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
            pass
        while not self._stop.is_set():
            self._wake.wait(min(0.5, self.config.remote_interval / 2))
            self._wake.clear()
            with self._lock:
                entries = list(self._entries.items())
            for sid, e in entries:
                if self._stop.is_set():
                    break
                if time.monotonic() < e.retry_at:
                    continue
                try:
                    with self._pass_lock:
                        if self._entries.get(sid) is not e:
                            continue  # forgotten meanwhile (a delete)
                        finished = self._step(e)
                    e.error, e.backoff = None, 0.0
                except OwnershipError as err:
                    self.log.warning("remote upload stopped: the session was taken over", session=sid,
                                     error=str(err))
                    e.error = err
                    finished = True
                except (ConcordiaError, OSError) as err:
                    if e.error is None or str(err) != str(e.error):
                        self.log.warning("remote upload failed; commits go on locally, retrying", session=sid,
                                         error=str(err))
                    e.error = err
                    e.backoff = min(_MAX_BACKOFF, max(self.config.remote_retry, e.backoff * 2))
                    e.retry_at = time.monotonic() + e.backoff
                    finished = False
                except Exception as err:  # the thread must survive and say why
                    self.log.exception("uploader error", session=sid)
                    e.error = err
                    e.retry_at = time.monotonic() + _MAX_BACKOFF
                    finished = False
                with self._lock:
                    if finished and not e.open and self._entries.get(sid) is e:
                        del self._entries[sid]
                    self._done.notify_all()

    def _step(self, e: _Entry) -> bool:
        """One pass over a session (see the module docs); True when an ended
        session has nothing left to upload."""
        slog = e.log
        # Read once: an end that comes during this pass is the next pass's. Ended
        # means the log is closed too: its last segment is whole, and uploaded here.
        ended = not e.open and slog.closed
        if not ended and not slog.closed:
            committed = slog.state.copied_epoch
            due = time.monotonic() - e.last_seal >= self.config.remote_interval
            if committed > e.remote_epoch and (due or e.want > e.remote_epoch):
                slog.seal()
                e.last_seal = time.monotonic()
        bases, deltas = list_segments(slog.dir)
        # The open segment, read *after* the listing (under the log's lock, where
        # the flusher rolls): a roll in between leaves the listing without the new
        # open segment, never with it under an older "current" name.
        with slog.lock:
            current = None if slog.closed else slog.segment.path
        listing = (*(f.path.name for f in bases + deltas), current.name if current else "")
        if listing == e.last_listing and not ended and e.error is None and e.remote_end is not None:
            return False  # no file sealed since the last whole pass: no catalog read either
        rows = {o.name: o for o in objects(self.catalog, slog.session_id)}
        newest, chain = newest_base(rows.values())
        # A layer goes up only with its chain (here or remote): one whose parent was lost to a crash during
        # compaction's deletions would be of no use there, yet look newer than every whole chain
        have = {f.path.name for f in bases} | {n for n, o in rows.items() if o.kind == "base" and o.state == "remote"}
        uploaded: list[SegmentFile] = []
        for f in bases + deltas:  # bases by offset, then chains oldest first
            row = rows.get(f.path.name)
            if f.path == current or (row is not None and row.state == "deleting"):
                continue
            if row is not None and row.state == "remote" and row.bytes == f.size:
                continue  # uploaded, and not grown since (a resume's drain may append to a sealed file)
            kind = "delta" if f.kind == KIND_DELTA else "base"  # a layer is a base image to the store
            if covered_by(newest, kind, f.token, f.base, _end(f), chain):
                continue
            if kind == "base" and base_chain(f.path.name, have) is None:
                continue
            if self._upload(slog, f, kind):  # raises on failure: the pass stops, the order holds
                uploaded.append(f)
        if uploaded or e.remote_end is None:
            rows = {o.name: o for o in objects(self.catalog, slog.session_id)}
            self._advance(e, rows, uploaded)
            self._delete_covered(e, rows)
        e.last_listing = listing
        return ended  # an ended session whose every file went up in this pass

    def _upload(self, slog: SessionLog, f: SegmentFile, kind: str) -> bool:
        try:
            size = f.path.stat().st_size
            # A base image's owner token is in its header (its name has none): the
            # deletion rule (covered_by) needs it.
            token = read_segment_header(f.path, session_tag=slog.tag).token if kind == "base" else f.token
        except FileNotFoundError:
            return False  # compaction folded it into a base image meanwhile
        info = ObjectInfo(slog.session_id, f.path.name, self.key(slog.dir, f.path.name), kind, token, f.base,
                          "uploading", size, "")
        begin_upload(self.catalog, slog.token, info)
        t0 = time.perf_counter()
        try:
            # hashed and sent by the worker process: the bytes it read are the bytes it sent
            size, digest = self.worker.put(info.key, f.path)
        except FileNotFoundError:
            return False
        finish_upload(self.catalog, slog.session_id, slog.token, info.name, size=size, sha256=digest)
        self.log.info("uploaded", session=slog.session_id, object=info.name, bytes=size,
                      seconds=round(time.perf_counter() - t0, 3))
        return True

    def _advance(self, e: _Entry, rows: dict[str, ObjectInfo], uploaded: list[SegmentFile]) -> None:
        """Move the remote epoch forward. Usually the files just uploaded continue
        this owner's chain right where the remote prefix ended (``remote_end``):
        the remote epoch is then the last COMMIT in them (``last_commit``: one
        walk of their record headers). Anything else (the first pass, an older
        owner's files, a base image) takes a scan of every remote file."""
        slog = e.log
        step = None
        if e.remote_end is not None and uploaded and all(f.kind == KIND_DELTA for f in uploaded):
            end, step = e.remote_end, (e.remote_epoch, e.remote_offset)
            for f in uploaded:
                if f.token != slog.token or f.base != end:
                    step = None
                    break
                found = slog.sealed_commits.pop(f.path.name, None) or last_commit(f.path, session_tag=slog.tag)
                end = _end(f)
                if found is not None:
                    step = found
            if step is not None:
                e.remote_end = end
        if step is None:
            step = self._rescan(e, rows)
            if step is None:
                return
        epoch, offset = step
        if epoch > e.remote_epoch:
            record_remote(self.catalog, slog.session_id, slog.token, epoch=epoch, offset=offset)
            with self._lock:
                e.remote_epoch, e.remote_offset = epoch, offset
            self.log.info("remote", session=slog.session_id, epoch=epoch)

    def _rescan(self, e: _Entry, rows: dict[str, ObjectInfo]) -> tuple[int, int] | None:
        """The log of the remote files alone, scanned as a host without local files
        would (``scan(only=...)``); sets ``remote_end`` to the end of this owner's
        remote chain (its handoff if none of it is remote yet)."""
        slog = e.log
        names = {o.name for o in needed_objects(rows.values())}
        with slog.lock:  # compaction deletes local files under this lock
            index = scan(slog.dir, session_tag=slog.tag, only=names) if names else None
            mine = [f for f in list_segments(slog.dir)[1] if f.token == slog.token]
        remote_mine = [f for f in mine if f.path.name in names]
        if remote_mine:
            e.remote_end = _end(remote_mine[-1])
        elif mine and mine[0].base == (index.end if index is not None else 0):
            e.remote_end = mine[0].base  # the remote holds everything before this owner's handoff
        else:
            e.remote_end = None
        return None if index is None else (index.epoch, index.end)

    def _delete_covered(self, e: _Entry, rows: dict[str, ObjectInfo]) -> None:
        slog = e.log
        base, chain = newest_base(rows.values())
        gone = [o for o in rows.values() if o is not base and o.state != "deleting"
                and covered_by(base, o.kind, o.token, o.base_offset, _object_end(o), chain)]
        gone += [o for o in rows.values() if o.state == "deleting"]
        if not gone:
            return
        mark_deleting(self.catalog, slog.session_id, slog.token, [o.name for o in gone])
        for o in gone:
            self.store.delete(o.key)
        forget_objects(self.catalog, slog.session_id, [o.name for o in gone])
        self.log.info("remote objects compacted away", session=slog.session_id, removed=len(gone))

    # -- fetch (a host with none of the session's files) --------------------------------

    def fetch(self, session_id: str, directory: Path) -> int:
        """Download what a restore needs and ``directory`` lacks; returns the bytes fetched."""
        from gpu_runtime.records import session_tag

        return fetch_objects(self.store, self.catalog, session_id, directory, session_tag(session_id))


def newest_base(rows: Any) -> tuple[ObjectInfo | None, frozenset[int]]:
    """The newest ``remote`` base image whose whole chain is remote (a layer is
    of no use without the images it lies on), and the offsets its chain's
    older images cover (kept with it)."""
    bases = {o.name: o for o in rows if o.kind == "base" and o.state == "remote"}
    for o in sorted(bases.values(), key=lambda o: o.base_offset, reverse=True):
        chain = base_chain(o.name, bases.keys())
        if chain is not None:
            return o, frozenset(bases[n].base_offset for n in chain[1:])
    return None, frozenset()


def needed_objects(rows: Any) -> list[ObjectInfo]:
    """The ``remote`` objects a restore from the store alone reads: the newest
    remote base image with its chain and the files it does not cover (what
    ``fetch_objects`` downloads, and what the remote epoch is computed from)."""
    remote = [o for o in rows if o.state == "remote"]
    base, chain = newest_base(remote)
    if base is None:
        return [o for o in remote if o.kind != "base"]  # a base image without its whole chain is of no use
    return [o for o in remote if o is base or (o.base_offset in chain if o.kind == "base" else not covered_by(
        base, o.kind, o.token, o.base_offset, _object_end(o), chain))]


#: present while a fetch moves files into a session directory; found at the next
#: open, it means the last fetch died between renames (its files are re-fetched)
FETCH_MARKER = ".fetch-incomplete"


def fetch_objects(store: ObjectStore, catalog: Catalog, session_id: str, directory: Path, session_tag: int) -> int:
    """See :meth:`Uploader.fetch`: download the needed objects this host lacks
    (all of them on a host that never had the session; the newer ones on a host
    whose files another host's owner has since extended). Objects a local base
    image covers are not fetched."""
    need = needed_objects(objects(catalog, session_id))
    marker = directory / FETCH_MARKER
    if marker.exists():  # the files an interrupted fetch moved in are copies of remote objects: take them again
        for o in need:
            (directory / o.name).unlink(missing_ok=True)
    bases, _ = list_segments(directory)
    if bases:
        local = read_segment_header(bases[-1].path, session_tag=session_tag)
        mine = ObjectInfo(session_id, bases[-1].path.name, "", "base", local.token, local.base, "remote", 0, "")
        # the local image's chain, from the images here or in the store (an interrupted fetch's were unlinked)
        held = {o.name: o.base_offset for o in need if o.kind == "base"} | {f.path.name: f.base for f in bases}
        kept = frozenset(held[n] for n in (base_chain(mine.name, held.keys()) or [])[1:])
        need = [o for o in need if not covered_by(mine, o.kind, o.token, o.base_offset, _object_end(o), kept)]
    missing = [o for o in need if not (directory / o.name).exists()]
    if not missing:
        marker.unlink(missing_ok=True)
        return 0
    log = get_logger(session=session_id)
    t0 = time.perf_counter()
    # Downloaded into a staging directory, then moved in under the marker: a fetch
    # that fails leaves nothing, one that dies while moving is redone at the next open.
    staging = directory / f".fetch-{os.getpid()}"
    make_private_dir(staging)
    try:
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="concordia-fetch") as pool:
            futures = [pool.submit(store.get_file, o.key, staging / o.name, sha256=o.sha256, size=o.bytes)
                       for o in missing]
            for fut in futures:
                fut.result()
        marker.touch(mode=0o600)
        fsync_dir(directory)
        for o in missing:
            os.replace(staging / o.name, directory / o.name)
        fsync_dir(directory)
        marker.unlink()
        fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total = sum(o.bytes for o in missing)
    log.info("fetched from remote", objects=len(missing), bytes=total, seconds=round(time.perf_counter() - t0, 3))
    return total
