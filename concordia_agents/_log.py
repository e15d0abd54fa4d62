"""A session's append log as seen by its owner: host ring + segment chain.

Protocol, in order, with who calls each step:

1. ``SessionLog.open`` (Session, on create or takeover): fence the ring with
   the new token, drain whatever the previous owner left in the ring into its
   own chain, scan the log (``_replay.scan``), check it against what the
   catalog recorded as durable, start this owner's chain with an empty segment
   at the end of the last committed epoch (the handoff offset), and reset the
   ring to start there.
2. ``writer`` (the backend, on commit): records into the ring.
3. ``flush_step`` (the flusher thread, or ``flush`` on demand): ring →
   segment, fsync per policy, publish ``consumed``, roll segments, compact.
4. ``close`` (Session): a last flush with fsync; on a clean close the ring file
   is removed (its bytes are all in segments). ``cancel`` instead undoes an
   open that failed: the ring stays, this owner's empty segment goes.

What is verified: every record the flusher or the drain copies out of the ring
has its header checksum, its session and its payload checksum verified first,
so a damaged ring never reaches a segment (the flusher stops at the damage and
the next commit raises it); a log that holds fewer epochs than the catalog
recorded as durable (a lost segment file) is refused at open with the files
and epochs it would lose, unless the caller allows a rollback.

Parts in their own modules: the verified ring walks and the drain
(``_ring_verify.py``), the checks against the catalog and rollbacks
(``_log_check.py``), compaction's base images (``_base_image.py``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpu_runtime.logring import LogRing
from gpu_runtime.logwriter import LogWriter

from ._base_image import choose_layer, compaction_due, superseded, write_base_image
from ._catalog import Catalog, SegmentInfo
from ._home import make_private_dir, write_session_marker
from ._log_check import (
    LogCheck,
    Rollback,
    check_against_catalog,
    check_log,
    quarantine,
    set_aside_leftovers,
    with_missing,
)
from ._logging import get_logger
from ._names import session_dir_name
from ._replay import LogIndex, scan
from ._ring_verify import drain_ring, ring_holds_unflushed, verified_span
from ._segments import (
    KIND_DELTA,
    SEGMENT_HEADER_SIZE,
    SegmentWriter,
    fsync_dir,
    list_segments,
    new_header,
)
from ._warm_rings import WarmRings
from .config import RuntimeConfig
from .errors import CorruptLogError, LogFullError, OwnershipError, StorageError

__all__ = [
    "LogCheck",
    "Rollback",
    "SessionLog",
    "check_log",
    "kept_ring_files",
    "ring_files",
    "ring_holds_unflushed",
    "ring_path",
    "session_dir_name",
]

_COPY_CHUNK = 8 << 20


def ring_path(config: RuntimeConfig, tag: int) -> Path:
    from gpu_runtime.logring import default_ring_dir

    home_tag = hashlib.blake2b(str(config.home.resolve()).encode(), digest_size=4).hexdigest()
    return (config.ring_dir or default_ring_dir(config.home)) / f"concordia-{home_tag}-{tag:016x}.ring"


def _ring_names(config: RuntimeConfig) -> tuple[Path, str]:
    """The ring directory of this home and the prefix of its rings' names."""
    sample = ring_path(config, 0)
    return sample.parent, sample.name.rsplit("-", 1)[0] + "-"


def ring_files(config: RuntimeConfig) -> dict[int, Path]:
    """The ring files of this home (``ring_path``'s names), by session tag."""
    parent, prefix = _ring_names(config)
    found: dict[int, Path] = {}
    for p in parent.glob(prefix + "*.ring") if parent.is_dir() else ():
        try:
            found[int(p.name[len(prefix):-len(".ring")], 16)] = p
        except ValueError:
            pass  # not a name ring_path makes
    return found


def kept_ring_files(config: RuntimeConfig) -> list[tuple[Path, str, int]]:
    """Rings of this home kept under a private name (``_warm_rings``): path, host and PID of the keeper."""
    parent, prefix = _ring_names(config)
    found = []
    for p in parent.glob(prefix + "*.ring.kept-*") if parent.is_dir() else ():
        host, _, pid = p.name.rpartition(".kept-")[2].rpartition("-")
        if host and pid.isdigit():
            found.append((p, host, int(pid)))
    return sorted(found)


@dataclass(slots=True)
class FlushState:
    copied_epoch: int = 0  #: newest epoch whose COMMIT is in a segment (maybe not fsynced)
    copied_offset: int = 0  #: log offset past that COMMIT
    durable_epoch: int = 0  #: newest epoch fsynced
    durable_offset: int = 0
    last_sync: float = 0.0
    last_report: float = 0.0
    reported_epoch: int = -1


class SessionLog:
    def __init__(self, *, session_id: str, tag: int, token: int, directory: Path, ring: LogRing,
                 segment: SegmentWriter, config: RuntimeConfig, catalog: Catalog, epoch: int) -> None:
        self.session_id = session_id
        self.tag = tag
        self.token = token
        self.dir = directory
        self.ring = ring
        self.segment = segment
        self.config = config
        self.catalog = catalog
        self.lock = threading.RLock()  # flusher vs. flush()/close()
        self.durable = threading.Condition(self.lock)
        # reported_epoch=epoch: an open reports nothing until this owner flushes something
        self.state = FlushState(copied_epoch=epoch, copied_offset=ring.base, durable_epoch=epoch,
                                durable_offset=ring.base, reported_epoch=epoch)
        self.fenced: str | None = None  #: why this owner lost the session
        self.closed = False
        self.error: BaseException | None = None  #: last flusher error (e.g. disk full)
        self.delta_bytes = 0
        self.base_epoch = 0  #: epoch of the newest base image (compaction's epoch trigger counts from it)
        self.rollback: Rollback | None = None  #: set by an open that rolled back
        self._reported_segments: dict[str, SegmentInfo] = {}  #: segment rows as last recorded in the catalog
        #: sealed segment name -> (epoch, log offset past it) of the newest COMMIT up to its end (``_roll``)
        self.sealed_commits: dict[str, tuple[int, int]] = {}
        self.ring_created = False  #: this open made the ring file (cancel removes it)
        self.warm: WarmRings | None = None  #: where the ring is kept when the log ends (set by ``open``)
        self.kick: Any = None  #: set by the flusher: wakes it
        #: durability level: "local" leaves fsync to the kernel (the ring survives the process), else per config
        self.level = "disk"
        self.log = get_logger(session=session_id, token=token)
        self.writer = LogWriter(
            ring, session_tag=tag, max_record_bytes=config.max_record_bytes, space_timeout=config.space_timeout,
            kick=lambda: self.kick and self.kick(), fenced=self.check_owner, stalled=self.check_writable)

    # -- 1. open ----------------------------------------------------------------

    @classmethod
    def open(cls, *, session_id: str, tag: int, token: int, directory: Path, config: RuntimeConfig,
             catalog: Catalog, allow_rollback: bool = False, created: bool = False,
             fetch: Callable[[str, Path], int] | None = None,
             warm: WarmRings | None = None) -> tuple[SessionLog, LogIndex]:
        """See the module docstring (step 1). ``created``: the catalog row was
        made by this open, so nothing on disk can belong to this session yet;
        files found under its name (a deleted session's, left behind) are moved
        aside, never read into the new session. ``fetch``: the runtime has a
        remote; ``fetch(session_id, directory)`` first downloads the remote
        objects a restore needs that this host lacks (all of them on a host that
        never had the session), and the open goes on as if they had been
        written here. ``warm``: the runtime's kept rings (``_warm_rings``): the
        ring is taken from there if this process kept it, and kept there again
        when the log ends."""
        log = get_logger(session=session_id, token=token)
        info = catalog.get(session_id)
        rpath = ring_path(config, tag)
        make_private_dir(directory.parent)
        if created:
            set_aside_leftovers(directory, rpath, log)
        make_private_dir(directory)
        if fetch is not None and not created:
            fetched = fetch(session_id, directory)
            if fetched:
                log.info("log fetched from the remote", bytes=fetched)
        write_session_marker(directory, session_id, catalog.catalog_id, info.created_at)
        skipped_ring = 0
        # A ring this process kept mapped after the session's last end (_warm_rings), else the file's. One
        # kept clean was at no path meanwhile: as a ring this open made (a cancel removes it if still empty).
        taken = warm.take(rpath) if warm is not None else None
        ring, ring_created = taken if taken is not None else (None, False)
        if ring is None and rpath.exists():
            ring = LogRing.open(rpath)
        if ring is not None:
            try:
                ring.check_counters()
                if ring.session_tag != tag:
                    raise CorruptLogError(f"expected ring of session tag {tag:016x}, found {ring.session_tag:016x}",
                                          path=str(rpath), offset=24)
                ring.set_owner(token)  # fences a stale writer on this host before we read
                skipped_ring = drain_ring(ring, directory, tag, log, salvage=allow_rollback)
            except BaseException:
                ring.close()
                raise
        try:
            try:
                index = scan(directory, session_tag=tag, salvage=allow_rollback)
            except CorruptLogError as e:
                raise with_missing(e, session_id, directory, catalog, info.last_epoch) from e
            rollback = check_against_catalog(session_id, directory, index, catalog, allow_rollback, skipped_ring,
                                              info.last_epoch)
            if rollback is not None:
                # What the rollback gives up is moved aside (kept, never deleted), before the
                # catalog records it: later scans must not meet a damaged base image again.
                rollback = replace(rollback, quarantined=quarantine(directory, index, token))
                catalog.roll_back(session_id, token, epoch=index.epoch, offset=index.end,
                                  missing=list(rollback.missing + rollback.quarantined))
            segment = SegmentWriter.create(directory, new_header(session_tag=tag, token=token, base=index.end))
        except BaseException:
            if ring is not None:
                ring.close()
            raise
        if ring is not None and ring.capacity != config.ring_bytes:
            ring.unlink()
            ring = None
        if ring is None:
            ring = LogRing.create(rpath, capacity=config.ring_bytes, session_tag=tag, owner_token=token,
                                  base=index.end)
            ring_created = True
        else:
            ring.reset(base=index.end, owner_token=token)
        self = cls(session_id=session_id, tag=tag, token=token, directory=directory, ring=ring, segment=segment,
                   config=config, catalog=catalog, epoch=index.epoch)
        self.delta_bytes = index.delta_bytes
        self.base_epoch = index.base_epoch
        self.ring_created = ring_created
        self.warm = warm
        if rollback is not None:
            self.rollback = rollback
            log.warning("session resumed with a rollback", detail=str(rollback))
        log.info("log opened", epoch=index.epoch, log_offset=index.end, base=str(index.base) if index.base else None)
        return self, index

    # -- 2. owner checks --------------------------------------------------------

    def check_owner(self) -> None:
        """Raise OwnershipError if another owner took over (memory reads only:
        safe on the commit path)."""
        if self.fenced is None and self.ring.owner_token != self.token:
            self.fenced = (f"the host ring now belongs to fencing token {self.ring.owner_token} "
                           f"(this process holds {self.token})")
        if self.fenced is not None:
            raise OwnershipError(f"session {self.session_id!r}: lost ownership: {self.fenced}")

    def check_writable(self) -> None:
        """Raise what stopped the flusher (a full or failing disk, a damaged ring
        record). Called by a commit before it reserves anything, and while a
        reservation waits for ring space (``LogWriter``'s ``stalled``): such a
        commit gives up at the flusher's next failed pass instead of after the
        space timeout."""
        if isinstance(self.error, (LogFullError, StorageError, CorruptLogError)):
            raise self.error

    # -- 3. flushing ------------------------------------------------------------

    def flush_step(self, *, force_sync: bool = False) -> bool:
        """Copy new ring bytes to segments; returns True if anything moved.

        Every record is verified before it is appended; the pass copies, fsyncs
        and reports the intact records before a damaged one, then raises. Under
        ``every_commit`` (and a forced flush) the ring keeps bytes until they are
        fsynced: if the fsync fails, the kernel may have dropped them, so the
        segment is cut back and they are written again from the ring. A disk
        error or a damaged record is kept in ``error`` (the next commit raises
        it) until a later pass gets through."""
        with self.lock:
            try:
                moved = self._flush_step(force_sync=force_sync)
            except (LogFullError, StorageError, CorruptLogError) as e:
                self.error = e
                raise
            self.error = None
            return moved

    def _flush_step(self, *, force_sync: bool) -> bool:
        if self.closed or self.fenced is not None or self.ring.owner_token != self.token:
            return False
        ring, st = self.ring, self.state
        written, consumed = ring.written, ring.consumed
        policy = "none" if self.level == "local" else self.config.fsync
        hold = force_sync or policy == "every_commit"
        moved = written > consumed
        damage: CorruptLogError | None = None
        chunk = min(_COPY_CHUNK, self.config.segment_bytes)
        while consumed < written:
            # Whole, verified records only: a segment never ends inside a record we
            # vouched for (consumed), never splits one, never holds a damaged one.
            try:
                end, commit = verified_span(ring, self.tag, consumed, written, chunk)
            except CorruptLogError as e:
                damage = e
                break
            n = end - consumed
            if self.segment.size > SEGMENT_HEADER_SIZE and self.segment.size + n > self.config.segment_bytes:
                self._roll(consumed)  # fsyncs the segment it closes
                if hold:
                    ring.publish_consumed(consumed)
            self.segment.append_all(ring.views(consumed, n))  # a failed append is cut back, the ring untouched
            consumed = end
            self.delta_bytes += n
            if commit is not None and commit[0] > st.copied_epoch:
                st.copied_epoch, st.copied_offset = commit
            if not hold:
                # Bytes in the page cache survive a process crash, so the ring may
                # reuse them now; a host crash is what fsync is for.
                ring.publish_consumed(consumed)
        now = time.monotonic()
        want_sync = force_sync or (hold and consumed > ring.consumed) or (
            st.copied_epoch > st.durable_epoch
            and (policy == "every_commit"
                 or (policy == "interval" and now - st.last_sync >= self.config.fsync_interval)))
        if want_sync:
            try:
                self.segment.sync()
            except (StorageError, LogFullError):
                # Cut back to what the ring no longer holds; the rest is copied again.
                keep = SEGMENT_HEADER_SIZE + max(0, ring.consumed - self.segment.header.base)
                try:
                    self.segment.truncate(min(keep, self.segment.size))
                except (StorageError, LogFullError):
                    pass  # the next pass cannot append either; the error below says why
                raise
            st.last_sync = now
            if hold:
                ring.publish_consumed(consumed)
            if st.copied_epoch > st.durable_epoch:
                st.durable_epoch, st.durable_offset = st.copied_epoch, st.copied_offset
            self.durable.notify_all()
        # Compaction rewrites the log: only once this owner has committed (an open
        # that is cancelled must leave the files as it found them).
        if damage is None and ring.written > ring.base and compaction_due(
                self.config, self.delta_bytes, self.state.copied_epoch - self.base_epoch):
            self.compact()
        self._report(now, force=force_sync)
        if damage is not None:
            raise damage
        return moved

    def seal(self) -> None:
        """Flush with fsync and start a new segment, so that every committed
        epoch lies in sealed files (the uploader's step 1). Nothing happens to
        an empty segment."""
        with self.lock:
            if self.closed or self.fenced is not None or self.ring.owner_token != self.token:
                return  # taken over: rolling here would leave a segment at the new owner's offset
            self.flush_step(force_sync=True)
            if self.segment.size > SEGMENT_HEADER_SIZE:
                # No catalog report here: the flusher's next one (within 0.5 s) records
                # the new segment; the uploader goes by the files themselves.
                self._roll(self.ring.consumed)

    def _roll(self, at: int) -> None:
        if self.segment.size == SEGMENT_HEADER_SIZE and self.segment.header.base == at:
            return  # the current segment already starts here and is empty (its name would collide)
        self.segment.sync()
        self.segment.close()
        # The newest COMMIT copied so far lies wholly in the segment just sealed
        # (records are copied in order, whole): the uploader reads it from here
        # instead of walking the file's records.
        if self.level == "remote" and self.state.copied_epoch:  # only the uploader reads (and pops) it
            self.sealed_commits[self.segment.path.name] = (self.state.copied_epoch, self.state.copied_offset)
        self.segment = SegmentWriter.create(self.dir, new_header(session_tag=self.tag, token=self.token, base=at))

    def _report(self, now: float, *, force: bool) -> None:
        """Record durable progress in the catalog, at most twice a second."""
        st = self.state
        if not force and (st.durable_epoch == st.reported_epoch or now - st.last_report < 0.5):
            return
        infos = self.segment_infos()
        # Only the rows that changed: a forced report (every flush()) of a session
        # with many segments (a remote one seals every few seconds) must not
        # rewrite every row each time.
        changed = [i for i in infos if self._reported_segments.get(i.name) != i]
        try:
            self.catalog.record_progress(
                self.session_id, self.token, epoch=st.durable_epoch, offset=st.durable_offset,
                log_bytes=sum(i.bytes for i in infos), segments=changed)
        except OwnershipError as e:
            self.fenced = str(e)
            raise
        self._reported_segments = {i.name: i for i in infos}
        st.last_report, st.reported_epoch = now, st.durable_epoch

    def segment_infos(self) -> list[SegmentInfo]:
        bases, deltas = list_segments(self.dir)
        out = []
        for f in bases + deltas:
            size = f.size
            end = f.base + size - SEGMENT_HEADER_SIZE if f.kind == KIND_DELTA else f.base
            out.append(SegmentInfo(f.path.name, f.token, "delta" if f.kind == KIND_DELTA else "base",
                                   f.base, end, size, f.path != self.segment.path))
        return out

    def log_bytes(self) -> int:
        bases, deltas = list_segments(self.dir)
        return sum(f.size for f in bases + deltas)

    def wait_durable(self, epoch: int, timeout: float) -> int:
        """Force a flush with fsync and wait until ``epoch`` is on disk."""
        deadline = time.monotonic() + timeout
        with self.durable:
            while True:
                self.check_owner()
                self.flush_step(force_sync=True)
                if self.state.durable_epoch >= epoch:
                    return self.state.durable_epoch
                if time.monotonic() > deadline:
                    raise LogFullError(f"session {self.session_id!r}: epoch {epoch} not durable after {timeout:.1f} s "
                                       f"(durable: {self.state.durable_epoch})")
                self.durable.wait(0.01)

    # -- compaction ---------------------------------------------------------------

    def compact(self) -> Path | None:
        """Fold the durable log into a base image (a layer on the current one
        where ``choose_layer`` says so) and delete what it covers. Runs on the
        flusher thread with the lock held; the ring keeps taking commits
        meanwhile. Crash-safe: the base appears under its final name only when
        complete, and segments (and base images the new one's chain does not
        hold) are deleted only after that."""
        with self.lock:
            self._roll(self.ring.consumed)
            index = scan(self.dir, session_tag=self.tag)
            if index.epoch == 0 or (index.base is not None and index.base_epoch == index.epoch):
                self.delta_bytes = 0
                self.base_epoch = index.epoch
                return None
            layer = choose_layer(index)
            path = write_base_image(self.dir, self.tag, self.token, index, layer=layer)
            removed = []
            for p in superseded(self.dir, path, index, layer=layer, token=self.token, current=self.segment.path):
                p.unlink(missing_ok=True)
                removed.append(p.name)
            fsync_dir(self.dir)
            self.delta_bytes = 0
            self.base_epoch = index.epoch
            self.log.info("compacted", epoch=index.epoch, base=path.name, layer=layer, removed=len(removed))
            try:
                self.catalog.record_progress(self.session_id, self.token, epoch=self.state.durable_epoch,
                                             offset=self.state.durable_offset, log_bytes=self.log_bytes(),
                                             segments=self.segment_infos(), removed=removed)
                self.catalog.prune_epochs(self.session_id, below=index.epoch)
            except OwnershipError as e:
                self.fenced = str(e)
            return path

    # -- 4. close ---------------------------------------------------------------

    def close(self, *, clean: bool) -> None:
        """A last flush with fsync, then close; on a clean close of a fully
        flushed ring the ring file is removed. If the last flush fails (a full
        disk, a damaged record) the error is raised and the ring file stays:
        it holds the epochs the segments lack."""
        with self.lock:
            if self.closed:
                return
            unlink = False
            try:
                if self.fenced is None and self.ring.owner_token == self.token:
                    self.flush_step(force_sync=True)
                    unlink = clean and self.ring.consumed == self.ring.written
            finally:
                self.closed = True
                self.segment.close()
                if self.warm is not None:
                    self.warm.keep(self.ring, clean=unlink)
                elif unlink:
                    self.ring.unlink()
                else:
                    self.ring.close()

    def cancel(self) -> None:
        """Undo this open (it failed before anything was committed): close
        without flushing or unlinking the ring, remove this owner's segment if
        it is still empty, and the ring file if this open made it and nothing
        was written to it. What the open drained from an older owner's ring
        stays in that owner's segments (moved, not lost)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.segment.close()
            empty = self.ring.written == self.ring.base
            try:
                if self.segment.size <= SEGMENT_HEADER_SIZE and self.segment.path.stat().st_size <= SEGMENT_HEADER_SIZE:
                    self.segment.path.unlink()
                    fsync_dir(self.dir)
            except FileNotFoundError:
                pass
            if self.warm is not None:
                self.warm.keep(self.ring, clean=self.ring_created and empty)
            elif self.ring_created and empty:
                self.ring.unlink()
            else:
                self.ring.close()


