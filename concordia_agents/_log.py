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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gpu_runtime.host import HostBackend, HostRegion
from gpu_runtime.logring import LogRing
from gpu_runtime.logwriter import LogWriter
from gpu_runtime.records import (
    HEADER_SIZE,
    FramingError,
    RecordFlags,
    RecordHeader,
    RecordType,
    decode_header,
    encode_record,
    payload_sum,
)
from gpu_runtime.records import session_tag as session_tag_of

from ._catalog import Catalog, SegmentInfo
from ._home import make_private_dir, write_session_marker
from ._logging import get_logger
from ._replay import LogIndex, PayloadReader, scan, valid_size
from ._segments import (
    KIND_BASE,
    KIND_DELTA,
    SEGMENT_HEADER_SIZE,
    SegmentWriter,
    base_name,
    fsync_dir,
    list_segments,
    new_header,
)
from .config import RuntimeConfig
from .errors import CorruptLogError, LogFullError, OwnershipError, StorageError

__all__ = [
    "LogCheck",
    "Rollback",
    "SessionLog",
    "check_log",
    "ring_files",
    "ring_holds_unflushed",
    "ring_path",
    "session_dir_name",
]

_COPY_CHUNK = 8 << 20


def session_dir_name(session_id: str, tag: int) -> str:
    """A filesystem-safe directory name that still shows the ID to a human."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in session_id)[:48]
    return f"{safe}-{tag:016x}"


def ring_path(config: RuntimeConfig, tag: int) -> Path:
    from gpu_runtime.logring import default_ring_dir

    home_tag = hashlib.blake2b(str(config.home.resolve()).encode(), digest_size=4).hexdigest()
    return (config.ring_dir or default_ring_dir(config.home)) / f"concordia-{home_tag}-{tag:016x}.ring"


def ring_files(config: RuntimeConfig) -> dict[int, Path]:
    """The ring files of this home (``ring_path``'s names), by session tag."""
    sample = ring_path(config, 0)
    prefix = sample.name.rsplit("-", 1)[0] + "-"
    found: dict[int, Path] = {}
    for p in sample.parent.glob(prefix + "*.ring") if sample.parent.is_dir() else ():
        try:
            found[int(p.name[len(prefix):-len(".ring")], 16)] = p
        except ValueError:
            pass  # not a name ring_path makes
    return found


@dataclass(frozen=True, slots=True)
class Rollback:
    """What an open with ``allow_rollback`` gave up: the catalog had recorded
    ``recorded_epoch`` as durable, the log held intact epochs up to ``epoch``."""

    recorded_epoch: int
    epoch: int
    missing: tuple[str, ...]  #: segment files the catalog lists that are gone
    damage: str | None  #: the first damaged record or gap the salvage stopped at
    skipped_ring_bytes: int = 0  #: bytes of the host ring after a damaged record
    quarantined: tuple[str, ...] = ()  #: files moved to quarantine-<token>/ (kept, no longer history)

    def __str__(self) -> str:
        parts = [f"resumed at epoch {self.epoch}; the catalog had recorded epoch {self.recorded_epoch} as durable"]
        if self.recorded_epoch > self.epoch:
            parts.append(f"gave up epochs {self.epoch + 1}..{self.recorded_epoch}")
        if self.missing:
            parts.append(f"missing segment files: {', '.join(self.missing)}")
        if self.damage:
            parts.append(f"stopped at: {self.damage}")
        if self.skipped_ring_bytes:
            parts.append(f"dropped {self.skipped_ring_bytes} bytes of the host ring after a damaged record")
        if self.quarantined:
            parts.append(f"moved to quarantine: {', '.join(self.quarantined)}")
        return "; ".join(parts)


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
        self.rollback: Rollback | None = None  #: set by an open that rolled back
        self.ring_created = False  #: this open made the ring file (cancel removes it)
        self.kick: Any = None  #: set by the flusher: wakes it
        self.log = get_logger(session=session_id, token=token)
        self.writer = LogWriter(
            ring, session_tag=tag, max_record_bytes=config.max_record_bytes, space_timeout=config.space_timeout,
            kick=lambda: self.kick and self.kick(), fenced=self.check_owner, stalled=self.check_writable)

    # -- 1. open ----------------------------------------------------------------

    @classmethod
    def open(cls, *, session_id: str, tag: int, token: int, directory: Path, config: RuntimeConfig,
             catalog: Catalog, allow_rollback: bool = False, created: bool = False) -> tuple[SessionLog, LogIndex]:
        """See the module docstring (step 1). ``created``: the catalog row was
        made by this open, so nothing on disk can belong to this session yet;
        files found under its name (a deleted session's, left behind) are moved
        aside, never read into the new session."""
        log = get_logger(session=session_id, token=token)
        info = catalog.get(session_id)
        rpath = ring_path(config, tag)
        make_private_dir(directory.parent)
        if created:
            _set_aside_leftovers(directory, rpath, log)
        make_private_dir(directory)
        write_session_marker(directory, session_id, catalog.catalog_id, info.created_at)
        ring: LogRing | None = None
        skipped_ring = 0
        if rpath.exists():
            ring = LogRing.open(rpath)
            try:
                if ring.session_tag != tag:
                    raise CorruptLogError(f"expected ring of session tag {tag:016x}, found {ring.session_tag:016x}",
                                          path=str(rpath), offset=24)
                ring.set_owner(token)  # fences a stale writer on this host before we read
                skipped_ring = _drain(ring, directory, tag, log, salvage=allow_rollback)
            except BaseException:
                ring.close()
                raise
        try:
            try:
                index = scan(directory, session_tag=tag, salvage=allow_rollback)
            except CorruptLogError as e:
                raise _with_missing(e, session_id, directory, catalog, info.last_epoch) from e
            rollback = _check_against_catalog(session_id, directory, index, catalog, allow_rollback, skipped_ring,
                                              info.last_epoch)
            if rollback is not None:
                # What the rollback gives up is moved aside (kept, never deleted), before the
                # catalog records it: later scans must not meet a damaged base image again.
                rollback = replace(rollback, quarantined=_quarantine(directory, index, token))
                catalog.roll_back(session_id, token, epoch=index.epoch, offset=index.end,
                                  missing=list(rollback.missing + rollback.quarantined))
            segment = SegmentWriter.create(directory, new_header(session_tag=tag, token=token, base=index.end))
        except BaseException:
            if ring is not None:
                ring.close()
            raise
        ring_created = False
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
        self.ring_created = ring_created
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
        policy = self.config.fsync
        hold = force_sync or policy == "every_commit"
        moved = written > consumed
        damage: CorruptLogError | None = None
        chunk = min(_COPY_CHUNK, self.config.segment_bytes)
        while consumed < written:
            # Whole, verified records only: a segment never ends inside a record we
            # vouched for (consumed), never splits one, never holds a damaged one.
            try:
                end, commit = _verified_span(ring, self.tag, consumed, written, chunk)
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
        if (damage is None and self.config.compact_bytes and self.delta_bytes > self.config.compact_bytes
                and ring.written > ring.base):
            self.compact()
        self._report(now, force=force_sync)
        if damage is not None:
            raise damage
        return moved

    def _roll(self, at: int) -> None:
        if self.segment.size == SEGMENT_HEADER_SIZE and self.segment.header.base == at:
            return  # the current segment already starts here and is empty (its name would collide)
        self.segment.sync()
        self.segment.close()
        self.segment = SegmentWriter.create(self.dir, new_header(session_tag=self.tag, token=self.token, base=at))

    def _report(self, now: float, *, force: bool) -> None:
        """Record durable progress in the catalog, at most twice a second."""
        st = self.state
        if not force and (st.durable_epoch == st.reported_epoch or now - st.last_report < 0.5):
            return
        try:
            self.catalog.record_progress(
                self.session_id, self.token, epoch=st.durable_epoch, offset=st.durable_offset,
                log_bytes=self.log_bytes(), segments=self.segment_infos())
        except OwnershipError as e:
            self.fenced = str(e)
            raise
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
        """Fold the durable log into a base image and delete what it covers.

        Runs on the flusher thread with the lock held; the ring keeps taking
        commits meanwhile. Crash-safe: the base appears under its final name
        only when complete, and segments are deleted only after that."""
        with self.lock:
            self._roll(self.ring.consumed)
            index = scan(self.dir, session_tag=self.tag)
            if index.epoch == 0 or (index.base is not None and index.base_epoch == index.epoch):
                self.delta_bytes = 0
                return None
            path = write_base_image(self.dir, self.tag, self.token, index)
            removed = []
            bases, deltas = list_segments(self.dir)
            for f in bases:
                if f.path != path:
                    f.path.unlink(missing_ok=True)
                    removed.append(f.path.name)
            for f in deltas:
                # Older owners' chains end before this owner's handoff, which
                # the base covers; of our own chain, what the base covers.
                covered = f.base + f.size - SEGMENT_HEADER_SIZE <= index.end
                if f.path != self.segment.path and (f.token < self.token or covered):
                    f.path.unlink(missing_ok=True)
                    removed.append(f.path.name)
            fsync_dir(self.dir)
            self.delta_bytes = 0
            self.log.info("compacted", epoch=index.epoch, base=path.name, removed=len(removed))
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
                if unlink:
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
            if self.ring_created and empty:
                self.ring.unlink()
            else:
                self.ring.close()


@dataclass(frozen=True, slots=True)
class LogCheck:
    """What ``Runtime.verify`` found: the newest epoch whose records all verify,
    against the epoch the catalog recorded as durable."""

    session_id: str
    recorded_epoch: int
    epoch: int  #: newest intact epoch in the segments
    damage: str | None  #: the first damaged record or gap, if any
    missing: tuple[str, ...]  #: segment files the catalog lists that are gone
    ring_bytes: int  #: bytes a crashed owner left in the host ring (drained at the next open)
    ring_damage: str | None  #: the first damaged record among them, if any

    @property
    def ok(self) -> bool:
        """Nothing lost: an open would restore every recorded epoch."""
        return (self.damage is None and self.ring_damage is None and not self.missing
                and self.epoch >= self.recorded_epoch)

    def __str__(self) -> str:
        if self.ok:
            extra = f", and {self.ring_bytes} bytes in the host ring to drain" if self.ring_bytes else ""
            return (f"session {self.session_id!r}: log intact, newest epoch {self.epoch} in the segments{extra} "
                    f"(the catalog recorded epoch {self.recorded_epoch} as durable)")
        parts = [f"session {self.session_id!r}: the catalog recorded epoch {self.recorded_epoch} as durable, the "
                 f"newest intact epoch is {self.epoch}"]
        if self.missing:
            parts.append(f"missing segment file(s) {', '.join(self.missing)}")
        if self.damage:
            parts.append(f"damage: {self.damage}")
        if self.ring_damage:
            parts.append(f"host ring damage: {self.ring_damage}")
        parts.append("resume with allow_rollback=True (concordia sessions recover ID --allow-rollback) to continue "
                     f"from epoch {self.epoch}")
        return "; ".join(parts)


def check_log(session_id: str, directory: Path, catalog: Catalog, info: Any, rpath: Path) -> LogCheck:
    """Read-only: verify every record of a session's segments (a salvage scan)
    and what its ring holds past ``consumed``; compare with the catalog."""
    tag = session_tag_of(session_id)
    index = scan(directory, session_tag=tag, salvage=True)
    ring_bytes, ring_damage = 0, None
    if rpath.exists():
        try:
            ring = LogRing.open(rpath)
        except CorruptLogError as e:
            ring_damage = str(e)
        else:
            try:
                ring_bytes = ring.written - ring.consumed
                _, damage = _intact_end(ring, tag, ring.consumed, ring.written)
                ring_damage = None if damage is None else str(damage)
            finally:
                ring.close()
    return LogCheck(session_id=session_id, recorded_epoch=info.last_epoch, epoch=index.epoch,
                    damage=str(index.damage) if index.damage is not None else None,
                    missing=_missing_files(session_id, directory, catalog, index.end), ring_bytes=ring_bytes,
                    ring_damage=ring_damage)


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


def _checked_header(ring: LogRing, tag: int, pos: int, limit: int) -> RecordHeader:
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


def _check_payload(ring: LogRing, pos: int, header: RecordHeader) -> None:
    views = ring.views(pos + HEADER_SIZE, header.length)
    body: Any = views[0] if len(views) == 1 else b"".join(bytes(v) for v in views)
    if payload_sum(body) != header.payload_sum:
        raise CorruptLogError(f"host ring record at log offset {pos} ({header.type.name}, epoch {header.epoch}) "
                              "fails its payload checksum", path=str(ring.path), offset=pos)


def _intact_end(ring: LogRing, tag: int, start: int, end: int) -> tuple[int, CorruptLogError | None]:
    """Walk the records of ``[start, end)``, verifying each (header and payload):
    the end of the intact ones, and the error of the first damaged one (None if
    all are intact)."""
    pos = start
    while pos < end:
        try:
            header = _checked_header(ring, tag, pos, end)
            _check_payload(ring, pos, header)
        except CorruptLogError as e:
            return pos, e
        pos += header.size
    return pos, None


def _verified_span(ring: LogRing, tag: int, start: int, limit: int,
                   chunk: int) -> tuple[int, tuple[int, int] | None]:
    """``(end, commit)``: the end of the whole, verified records from ``start``
    that fit in ``chunk`` bytes (at least one) and stop before ``limit`` or the
    first damaged record, and ``(epoch, end)`` of the last COMMIT among them
    (None if none). Raises CorruptLogError only if the first record is damaged.
    Each header is decoded once."""
    pos, commit = start, None
    while pos < limit:
        try:
            header = _checked_header(ring, tag, pos, limit)
            if pos > start and pos + header.size - start > chunk:
                break  # verified as the first record of the next span
            _check_payload(ring, pos, header)
        except CorruptLogError:
            if pos == start:
                raise
            break  # copy the intact records before it; the next span starts at the damage and raises
        pos += header.size
        if header.type is RecordType.COMMIT:
            commit = (header.epoch, pos)
    return pos, commit


def _drain(ring: LogRing, directory: Path, tag: int, log: Any, *, salvage: bool = False) -> int:
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
    end, damage = _intact_end(ring, tag, start, ring.written)
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


def _missing_files(session_id: str, directory: Path, catalog: Catalog, end: int) -> tuple[str, ...]:
    """Segment files the catalog lists for the session that are gone (base images,
    and delta segments reaching past log offset ``end``)."""
    present = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    return tuple(seg.name for seg in catalog.segments(session_id)
                 if seg.name not in present and (seg.kind == "base" or seg.end_offset > end))


def _with_missing(e: CorruptLogError, session_id: str, directory: Path, catalog: Catalog,
                  recorded: int) -> CorruptLogError:
    """The scan's CorruptLogError, naming the files the catalog lists that are
    gone (a lost base image shows as an epoch gap) and how to go on."""
    missing = _missing_files(session_id, directory, catalog, 0)
    where = f"; missing segment file(s) {', '.join(missing)}" if missing else ""
    return CorruptLogError(
        f"session {session_id!r}: {e.reason}{where}; the catalog recorded epoch {recorded} as durable. Restore the "
        "files, or resume with allow_rollback=True (concordia sessions recover ID --allow-rollback) to continue "
        "from the newest intact epoch", path=str(directory / missing[0]) if missing else e.path,
        offset=None if missing else e.offset, orig=e)


def _check_against_catalog(session_id: str, directory: Path, index: LogIndex, catalog: Catalog,
                           allow_rollback: bool, skipped_ring: int, recorded: int) -> Rollback | None:
    """Refuse a log that holds less than the catalog recorded as durable (raise
    CorruptLogError naming the missing files and the epochs at stake), or,
    with ``allow_rollback``, describe what is given up. None: nothing is."""
    if index.epoch >= recorded and index.damage is None and not skipped_ring:
        return None
    missing = _missing_files(session_id, directory, catalog, index.end)
    if not allow_rollback:
        what = f"missing segment file(s) {', '.join(missing)}" if missing else "a segment file lost or cut short"
        raise CorruptLogError(
            f"session {session_id!r}: the catalog recorded epoch {recorded} as durable, the log holds epochs up to "
            f"{index.epoch} ({what}); resuming would lose epochs {index.epoch + 1}..{recorded}. Restore the files, "
            "or resume with allow_rollback=True (concordia sessions recover ID --allow-rollback) to continue from "
            f"epoch {index.epoch}", path=str(directory / missing[0]) if missing else str(directory))
    return Rollback(recorded_epoch=max(recorded, index.epoch), epoch=index.epoch, missing=missing,
                    damage=str(index.damage) if index.damage is not None else None, skipped_ring_bytes=skipped_ring)


def _quarantine(directory: Path, index: LogIndex, token: int) -> tuple[str, ...]:
    """Move what a rollback gives up out of the log, into ``quarantine-<token>/``
    (kept for inspection, invisible to scans): every base image other than the
    one the index starts from (a damaged one would stop every later scan), and
    the delta segments lying wholly past the new end of history. Segments that
    straddle it stay: scans read an older chain only up to a later handoff."""
    bases, deltas = list_segments(directory)
    doomed = [f.path for f in bases if f.path != index.base]
    doomed += [f.path for f in deltas if f.base >= index.end]
    if not doomed:
        return ()
    qdir = directory / f"quarantine-{token:010d}"
    make_private_dir(qdir)
    for p in doomed:
        os.replace(p, qdir / p.name)
    fsync_dir(qdir)
    fsync_dir(directory)
    return tuple(p.name for p in doomed)


def _set_aside_leftovers(directory: Path, rpath: Path, log: Any) -> None:
    """A session the catalog has just created owns no files yet. Files under its
    name are a deleted (or forgotten) session's: move its directory aside as
    ``<dir>.orphaned-<ns>`` (with its ring, if one is left) instead of reading
    them into the new session; ``gc`` keeps them (their marker names the old
    incarnation) for the user to inspect or delete."""
    if not directory.exists() and not rpath.exists():
        return
    aside = directory.with_name(f"{directory.name}.orphaned-{time.time_ns()}")
    if directory.exists():
        os.replace(directory, aside)
    else:
        make_private_dir(aside)
    if rpath.exists():
        shutil.move(str(rpath), str(aside / "ring.orphaned"))
    fsync_dir(directory.parent)
    log.warning("files of an earlier session with this ID set aside", moved_to=str(aside))


def write_base_image(directory: Path, tag: int, token: int, index: LogIndex) -> Path:
    """Materialize the state of ``index`` (on the host) and write it as a base image."""
    host = HostBackend()
    lengths = index.lengths
    tmp_name = f".base-{index.end:016x}.tmp{os.getpid()}"
    header = new_header(session_tag=tag, token=token, base=index.end, kind=KIND_BASE, epoch=index.epoch)
    w = SegmentWriter.create(directory, header, final_name=tmp_name)
    read = PayloadReader()
    try:
        n = 0
        for rid, spec in sorted(index.specs.items()):
            image = HostRegion(spec, np.zeros(spec.nbytes, dtype=np.uint8))
            for loc in index.records.get(rid, []):
                host.apply(image, loc.header, read(loc))
            w.append(encode_record(RecordType.REGION, spec.to_json(), session_tag=tag, epoch=index.epoch, region=rid))
            n += 1
            chunk = max(1, (1 << 20) // max(spec.page_size, 1))
            if spec.kind == "pages":
                step = chunk * spec.page_size
                for a in range(0, spec.nbytes, step):
                    w.append(encode_record(RecordType.PAGES, image.bytes[a:a + step], session_tag=tag,
                                           epoch=index.epoch, region=rid, offset=a))
                    n += 1
            else:
                length = int(lengths.get(spec.name, 0))
                per = max(1, (1 << 20) // max(spec.outer * spec.row_bytes, 1))
                view = image.rows_view()
                for r in range(0, length, per):
                    r1 = min(r + per, length)
                    w.append(encode_record(RecordType.ROWS, np.ascontiguousarray(view[:, r:r1, :]), session_tag=tag,
                                           epoch=index.epoch, region=rid, offset=r, aux=r1 - r))
                    n += 1
        w.append(encode_record(RecordType.COMMIT, json.dumps(index.body).encode(), session_tag=tag,
                               epoch=index.epoch, flags=RecordFlags.BASE, aux=n))
        w.sync()
    finally:
        read.close()
        w.close()
    final = directory / base_name(index.end)
    os.replace(directory / tmp_name, final)
    fsync_dir(directory)
    return final
