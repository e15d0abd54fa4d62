"""A session's append log as seen by its owner: host ring + segment chain.

Protocol, in order, with who calls each step:

1. ``SessionLog.open`` (Session, on create or takeover): fence the ring with
   the new token, drain whatever the previous owner left in the ring into its
   own chain, scan the log (``_replay.scan``), start this owner's chain with an
   empty segment at the end of the last committed epoch (the handoff offset),
   and reset the ring to start there.
2. ``writer`` (the backend, on commit): records into the ring.
3. ``flush_step`` (the flusher thread, or ``flush`` on demand): ring →
   segment, fsync per policy, publish ``consumed``, roll segments, compact.
4. ``close`` (Session): a last flush with fsync; on a clean close the ring file
   is removed (its bytes are all in segments).
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
from gpu_runtime.records import RecordFlags, RecordType, encode_record

from ._catalog import Catalog, SegmentInfo
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
from .errors import CorruptLogError, LogFullError, OwnershipError

__all__ = ["SessionLog", "session_dir_name", "ring_path"]

_COPY_CHUNK = 8 << 20


def session_dir_name(session_id: str, tag: int) -> str:
    """A filesystem-safe directory name that still shows the ID to a human."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in session_id)[:48]
    return f"{safe}-{tag:016x}"


def ring_path(config: RuntimeConfig, tag: int) -> Path:
    from gpu_runtime.logring import default_ring_dir

    home_tag = hashlib.blake2b(str(config.home.resolve()).encode(), digest_size=4).hexdigest()
    return (config.ring_dir or default_ring_dir(config.home)) / f"concordia-{home_tag}-{tag:016x}.ring"


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
        self.kick: Any = None  #: set by the flusher: wakes it
        self.log = get_logger(session=session_id, token=token)
        self.writer = LogWriter(
            ring, session_tag=tag, max_record_bytes=config.max_record_bytes, space_timeout=config.space_timeout,
            kick=lambda: self.kick and self.kick(), fenced=self.check_owner)

    # -- 1. open ----------------------------------------------------------------

    @classmethod
    def open(cls, *, session_id: str, tag: int, token: int, directory: Path, config: RuntimeConfig,
             catalog: Catalog) -> tuple[SessionLog, LogIndex]:
        log = get_logger(session=session_id, token=token)
        directory.mkdir(parents=True, exist_ok=True)
        rpath = ring_path(config, tag)
        ring: LogRing | None = None
        if rpath.exists():
            ring = LogRing.open(rpath)
            if ring.session_tag != tag:
                raise CorruptLogError(f"expected ring of session tag {tag:016x}, found {ring.session_tag:016x}",
                                      path=str(rpath), offset=24)
            ring.set_owner(token)  # fences a stale writer on this host before we read
            _drain(ring, directory, tag, log)
        index = scan(directory, session_tag=tag)
        segment = SegmentWriter.create(directory, new_header(session_tag=tag, token=token, base=index.end))
        if ring is not None and ring.capacity != config.ring_bytes:
            ring.unlink()
            ring = None
        if ring is None:
            ring = LogRing.create(rpath, capacity=config.ring_bytes, session_tag=tag, owner_token=token,
                                  base=index.end)
        else:
            ring.reset(base=index.end, owner_token=token)
        self = cls(session_id=session_id, tag=tag, token=token, directory=directory, ring=ring, segment=segment,
                   config=config, catalog=catalog, epoch=index.epoch)
        self.delta_bytes = index.delta_bytes
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

    # -- 3. flushing ------------------------------------------------------------

    def flush_step(self, *, force_sync: bool = False) -> bool:
        """Copy new ring bytes to segments; returns True if anything moved."""
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
                end = _record_boundary(self.ring, consumed, written, min(_COPY_CHUNK, self.config.segment_bytes))
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
        with self.lock:
            if self.closed:
                return
            try:
                if self.fenced is None and self.ring.owner_token == self.token:
                    self.flush_step(force_sync=True)
                    if clean and self.ring.consumed == self.ring.written:
                        self.ring.unlink()
                        return
            finally:
                self.closed = True
                self.segment.close()
            self.ring.close()


def _record_boundary(ring: LogRing, start: int, limit: int, chunk: int) -> int:
    """The end of the last whole record in ``[start, limit)`` that keeps the span
    under ``chunk`` bytes (at least one record). ``limit`` is a record boundary."""
    from gpu_runtime.records import HEADER_SIZE, FramingError, checked_record_size

    pos = start
    while pos < limit:
        try:
            size = checked_record_size(ring.read(pos, HEADER_SIZE))
        except FramingError as e:
            raise CorruptLogError(f"host ring holds a bad record header at log offset {pos}: {e.reason}",
                                  path=str(ring.path), offset=pos) from None
        if pos + size > limit or (pos > start and pos + size - start > chunk):
            break
        pos += size
    if pos == start:
        raise CorruptLogError(f"host ring record at log offset {start} runs past the published end {limit}",
                              path=str(ring.path), offset=start)
    return pos


def _drain(ring: LogRing, directory: Path, tag: int, log: Any) -> None:
    """Move what a previous owner left in the ring into its own chain."""
    if ring.written <= ring.consumed:
        return
    chain = ring.chain_token
    _, deltas = list_segments(directory)
    mine = [f for f in deltas if f.token == chain]
    start = ring.consumed
    tail_end = -1
    if mine:
        tail = mine[-1]
        # What the dead flusher published as consumed was written whole; only the
        # bytes after it can be a torn append (restore verifies the rest).
        valid = valid_size(tail.path, session_tag=tag,
                           verify_from=max(0, ring.consumed - tail.base) + SEGMENT_HEADER_SIZE)
        tail_end = tail.base + valid - SEGMENT_HEADER_SIZE
        if valid != tail.size:
            # A torn append by the dead flusher. ``consumed`` never passes a
            # whole record, so the ring still holds every byte cut off here.
            with open(tail.path, "r+b") as f:
                f.truncate(valid)
                os.fsync(f.fileno())
        start = max(start, tail_end)
    if start < ring.base or start > ring.written:
        raise CorruptLogError(
            f"expected the ring to hold log offsets from {start}, found [{ring.base}, {ring.written})",
            path=str(ring.path), offset=80)
    if start == ring.written:
        return
    if mine and start == tail_end:
        seg = SegmentWriter.reopen(mine[-1].path, session_tag=tag)  # continue the dead flusher's segment
    else:
        seg = SegmentWriter.create(directory, new_header(session_tag=tag, token=chain, base=start))
    try:
        pos = start
        while pos < ring.written:
            n = min(_COPY_CHUNK, ring.written - pos)
            seg.append(ring.read(pos, n))
            pos += n
        seg.sync()
    finally:
        seg.close()
    ring.publish_consumed(ring.written)
    log.info("drained host ring of the previous owner", bytes=ring.written - start, chain=chain)


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
