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
import threading
import time
from dataclasses import dataclass
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
    RecordType,
    decode_header,
    encode_record,
    payload_sum,
)

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
from .errors import CorruptLogError, LogFullError, OwnershipError, SessionNotFound

__all__ = ["Rollback", "SessionLog", "ring_holds_unflushed", "ring_path", "session_dir_name"]

_COPY_CHUNK = 8 << 20


def session_dir_name(session_id: str, tag: int) -> str:
    """A filesystem-safe directory name that still shows the ID to a human."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in session_id)[:48]
    return f"{safe}-{tag:016x}"


def ring_path(config: RuntimeConfig, tag: int) -> Path:
    from gpu_runtime.logring import default_ring_dir

    home_tag = hashlib.blake2b(str(config.home.resolve()).encode(), digest_size=4).hexdigest()
    return (config.ring_dir or default_ring_dir(config.home)) / f"concordia-{home_tag}-{tag:016x}.ring"


@dataclass(frozen=True, slots=True)
class Rollback:
    """What an open with ``allow_rollback`` gave up: the catalog had recorded
    ``recorded_epoch`` as durable, the log held intact epochs up to ``epoch``."""

    recorded_epoch: int
    epoch: int
    missing: tuple[str, ...]  #: segment files the catalog lists that are gone
    damage: str | None  #: the first damaged record or gap the salvage stopped at
    skipped_ring_bytes: int = 0  #: bytes of the host ring after a damaged record

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
        self.state = FlushState(copied_epoch=epoch, copied_offset=ring.base, durable_epoch=epoch,
                                durable_offset=ring.base)
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
            kick=lambda: self.kick and self.kick(), fenced=self.check_writable)

    # -- 1. open ----------------------------------------------------------------

    @classmethod
    def open(cls, *, session_id: str, tag: int, token: int, directory: Path, config: RuntimeConfig,
             catalog: Catalog, allow_rollback: bool = False) -> tuple[SessionLog, LogIndex]:
        log = get_logger(session=session_id, token=token)
        make_private_dir(directory.parent)
        make_private_dir(directory)
        write_session_marker(directory, session_id, catalog.catalog_id)
        rpath = ring_path(config, tag)
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
            index = scan(directory, session_tag=tag, salvage=allow_rollback)
            rollback = _check_against_catalog(session_id, directory, index, catalog, allow_rollback, skipped_ring)
            segment = SegmentWriter.create(directory, new_header(session_tag=tag, token=token, base=index.end))
        except BaseException:
            if ring is not None:
                ring.close()
            raise
        created = False
        if ring is not None and ring.capacity != config.ring_bytes:
            ring.unlink()
            ring = None
        if ring is None:
            ring = LogRing.create(rpath, capacity=config.ring_bytes, session_tag=tag, owner_token=token,
                                  base=index.end)
            created = True
        else:
            ring.reset(base=index.end, owner_token=token)
        self = cls(session_id=session_id, tag=tag, token=token, directory=directory, ring=ring, segment=segment,
                   config=config, catalog=catalog, epoch=index.epoch)
        self.delta_bytes = index.delta_bytes
        self.ring_created = created
        if rollback is not None:
            self.rollback = rollback
            try:
                catalog.roll_back(session_id, token, epoch=index.epoch, offset=index.end,
                                  missing=list(rollback.missing))
            except BaseException:
                self.cancel()
                raise
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
        """``check_owner``, then raise what stopped the flusher (a full disk, a
        damaged ring record): a commit waiting for ring space gives up at the
        flusher's next failed pass instead of after the space timeout."""
        self.check_owner()
        if isinstance(self.error, (LogFullError, CorruptLogError)):
            raise self.error

    # -- 3. flushing ------------------------------------------------------------

    def flush_step(self, *, force_sync: bool = False) -> bool:
        """Copy new ring bytes to segments; returns True if anything moved.
        A disk error or a damaged ring record is kept in ``error`` (the next
        commit raises it) until a later pass gets through."""
        try:
            moved = self._flush_step(force_sync=force_sync)
        except (LogFullError, CorruptLogError) as e:
            self.error = e
            raise
        self.error = None
        return moved

    def _flush_step(self, *, force_sync: bool) -> bool:
        with self.lock:
            if self.closed or self.fenced is not None or self.ring.owner_token != self.token:
                return False
            committed_epoch = self.ring.committed_epoch
            committed = self.ring.committed
            written = self.ring.written
            consumed = self.ring.consumed
            moved = written > consumed
            while consumed < written:
                # Copy whole records only, so that a segment never ends inside a
                # record we vouched for (consumed) and never splits one in two.
                end = _verified_boundary(self.ring, self.tag, consumed, written,
                                         min(_COPY_CHUNK, self.config.segment_bytes))
                n = end - consumed
                if self.segment.size > SEGMENT_HEADER_SIZE and self.segment.size + n > self.config.segment_bytes:
                    self._roll(consumed)
                self.segment.append_all(self.ring.views(consumed, n))  # LogFullError leaves the ring untouched
                consumed = end
                self.delta_bytes += n
                # Bytes in the page cache survive a process crash, so the ring
                # may reuse them now; a host crash is what fsync is for.
                self.ring.publish_consumed(consumed)
            # written >= committed when sampled in this order, so the copy
            # above holds everything up to that COMMIT.
            if committed_epoch > self.state.copied_epoch:
                self.state.copied_epoch, self.state.copied_offset = committed_epoch, committed
            now = time.monotonic()
            policy = self.config.fsync
            want_sync = force_sync or (
                self.state.copied_epoch > self.state.durable_epoch
                and (policy == "every_commit" or (policy == "interval" and now - self.state.last_sync >= self.config.fsync_interval)))
            if want_sync:
                self.segment.sync()
                self.state.last_sync = now
                if self.state.copied_epoch > self.state.durable_epoch:
                    self.state.durable_epoch = self.state.copied_epoch
                    self.state.durable_offset = self.state.copied_offset
                self.durable.notify_all()
            if self.config.compact_bytes and self.delta_bytes > self.config.compact_bytes:
                self.compact()
            self._report(now, force=force_sync)
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


def _verified_record(ring: LogRing, tag: int, pos: int, limit: int) -> int:
    """The size of the record at log offset ``pos`` of ``ring``, after checking
    its header, its session and its payload checksum, and that it ends by
    ``limit``; raises CorruptLogError naming the ring and offset otherwise."""
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
    views = ring.views(pos + HEADER_SIZE, header.length)
    body: Any = views[0] if len(views) == 1 else b"".join(bytes(v) for v in views)
    if payload_sum(body) != header.payload_sum:
        raise CorruptLogError(f"host ring record at log offset {pos} ({header.type.name}, epoch {header.epoch}) "
                              "fails its payload checksum", path=str(ring.path), offset=pos)
    return header.size


def _verified_boundary(ring: LogRing, tag: int, start: int, limit: int, chunk: int) -> int:
    """The end of the last whole, verified record in ``[start, limit)`` that keeps
    the span under ``chunk`` bytes (at least one record). ``limit`` is a record
    boundary. Raises CorruptLogError at a damaged first record: the flusher then
    copies nothing more and the next commit raises it."""
    pos = start
    while pos < limit:
        if pos > start:
            # Peek at the size only: a record that would not fit the chunk is verified next time.
            try:
                size = decode_header(ring.read(pos, HEADER_SIZE)).size
            except FramingError:
                break  # verified (and reported) when it is the first record of a span
            if pos + size - start > chunk:
                break
        pos += _verified_record(ring, tag, pos, limit)
    return pos


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
    end, pos, dropped = ring.written, start, 0
    while pos < end:
        try:
            pos += _verified_record(ring, tag, pos, end)
        except CorruptLogError as e:
            if not salvage:
                raise CorruptLogError(f"{e.reason}; resume with allow_rollback=True to continue from the newest intact "
                                      "epoch", path=str(ring.path), offset=pos) from e
            log.warning("host ring damaged; dropping its tail", offset=pos, bytes=end - pos, error=str(e))
            end, dropped = pos, end - pos
            break
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


def _check_against_catalog(session_id: str, directory: Path, index: LogIndex, catalog: Catalog,
                           allow_rollback: bool, skipped_ring: int) -> Rollback | None:
    """Refuse a log that holds less than the catalog recorded as durable (raise
    CorruptLogError naming the missing files and the epochs at stake), or,
    with ``allow_rollback``, describe what is given up. None: nothing is."""
    try:
        recorded = catalog.get(session_id).last_epoch
    except SessionNotFound:
        recorded = 0
    if index.epoch >= recorded and index.damage is None and not skipped_ring:
        return None
    present = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    missing = tuple(seg.name for seg in catalog.segments(session_id)
                    if seg.name not in present and (seg.kind == "base" or seg.end_offset > index.end))
    if not allow_rollback:
        what = f"missing segment file(s) {', '.join(missing)}" if missing else "a segment file lost or cut short"
        raise CorruptLogError(
            f"session {session_id!r}: the catalog recorded epoch {recorded} as durable, the log holds epochs up to "
            f"{index.epoch} ({what}); resuming would lose epochs {index.epoch + 1}..{recorded}. Restore the files, "
            "or resume with allow_rollback=True (concordia sessions recover ID --allow-rollback) to continue from "
            f"epoch {index.epoch}", path=str(directory / missing[0]) if missing else str(directory))
    return Rollback(recorded_epoch=max(recorded, index.epoch), epoch=index.epoch, missing=missing,
                    damage=str(index.damage) if index.damage is not None else None, skipped_ring_bytes=skipped_ring)


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
