"""The CuPy backend's commit paths: an epoch as device tasks writing the ring.

Every path writes the records the planner (``planner.py``) defines, framed as
``records.py`` frames them, so its log bytes equal the host backend's for the
same inputs (``tests/test_gpu.py`` and the conformance suite compare them).
``CommitPaths.commit`` picks one per epoch:

* **Per-token** (``_commit_appends``): every region a described kv region
  whose new rows fit one record, the COMMIT body at most 64 KiB. One
  reservation, the COMMIT body stored in the ring, one CHECKPOINT_KV task per
  region of which the last, a CHECKPOINT_COMMIT, makes the COMMIT header on
  the device (checksum, CRC) and publishes the epoch; with no rows appended,
  an APPEND_LOG task does. The host computes no checksum.
* **Fused pages** (``_commit_pages_fused``, backend option ``fused_pages``):
  a pages epoch of one described region is one SCAN_COMMIT task: the device
  scans, plans the dirty runs' records into a span the host reserved, copies
  them, makes the COMMIT and publishes; the host waits once and gives back the
  unused tail. Records that do not fit fall back to the general path, from
  the bitmap that task left.
* **General** (``_commit_general``): in ring order, a stream fence behind the
  callers' work (``fences.py``) that the first data task waits for; per
  region a REGION record the first time (built on the host, stored beyond
  ``written``); kv rows as CHECKPOINT_KV tasks; pages as a SCAN task (waited
  for: the dirty bitmap comes back in pinned memory), then CHECKPOINT_PAGES
  tasks over tables of dirty runs; the COMMIT record (built on the host)
  last, published by the last data task or an APPEND_LOG task. Groups of
  records are reserved one at a time and each is sent when the next has been
  planned; a send publishes ``written`` once a quarter of the ring is
  unpublished, so the flusher drains an epoch larger than the ring.

``commit`` returns when everything is enqueued (kv-only epochs never wait on
the device; epochs with pages regions wait for the scan). The epoch is visible
once the task that publishes it ran (``CupyBackend.wait_visible``). An epoch
abandoned midway (an exception) leaves no hole in the ring: planned groups go
to the device and are published as an aborted attempt (no COMMIT names them),
unplanned reservations are given back.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ..backend import CheckpointTask
from ..errors import RegionError
from ..logring import DATA_START, LogRing
from ..logwriter import LogWriter
from ..planner import Span, page_spans, pages_per_record, row_spans, runs_from_bits
from ..records import HEADER_SIZE, RecordType, encode_record, record_size
from .executor import STOP, Executor
from .fences import NO_FENCE, StreamFence
from .memory import PinnedArena, register_host_memory
from .region import GROUP_BYTES, MAX_RECORDS_PER_TASK, CupyRegion
from .tasks import LAYOUTS, TaskKind

__all__ = ["CommitPaths", "group_spans"]

_RUNS_ARENA = 4 << 20  # pinned bytes for dirty-run tables (24 bytes a run) and fused bodies
_SMALL_RUN = 256 << 10  # runs up to this size are copied by one block each
# COMMIT bodies up to this size may take the per-token path, whose header one
# block sums over PCIe; a larger body (big user meta) is summed on the host.
_SHORT_BODY = 64 << 10
# Data bytes a one-task pages epoch (SCAN_COMMIT) may write: its span is reserved
# before the device knows what is dirty, and the unused tail given back after.
_FUSED_SPAN = 1 << 20
_FUSED_SCRATCH_WORDS = 8 + 4 * MAX_RECORDS_PER_TASK  # kernels/executor.cu, SCAN_COMMIT

_KV = LAYOUTS["CHECKPOINT_KV"]
_KV_COMMIT = LAYOUTS["CHECKPOINT_COMMIT"]
_PAGES = LAYOUTS["CHECKPOINT_PAGES"]
_SCAN = LAYOUTS["SCAN"]
_SCAN_COMMIT = LAYOUTS["SCAN_COMMIT"]
_APPEND = LAYOUTS["APPEND_LOG"]

#: one device task of the general path before its fence and publish fields:
#: (layout, region, fields, log offset, end offset, records)
_Group = tuple[Any, CupyRegion, dict[str, int], int, int, int]


def group_spans(spans: Sequence[Span], budget: int, max_records: int) -> Iterator[list[Span]]:
    """Consecutive spans in groups (one device task each) of at most
    ``max_records`` records and ``budget`` log bytes (at least one record)."""
    i = 0
    while i < len(spans):
        group, size = [spans[i]], spans[i].size
        i += 1
        while i < len(spans) and len(group) < max_records and size + spans[i].size <= budget:
            group.append(spans[i])
            size += spans[i].size
            i += 1
        yield group


class CommitPaths:
    """The commit side of one CuPy backend: ring registrations, the stream
    fence, the pinned arena and the fused-pages scratch, and the three paths."""

    def __init__(self, executor: Executor, *, fence_timeout_s: float, fused_pages: bool) -> None:
        import cupy

        self._cupy = cupy
        self.executor = executor
        self.fence = StreamFence(fence_timeout_s)
        self._rings: dict[int, tuple[int, int]] = {}
        # prepare_ring's threads by ring: (thread, [device address or the error it met])
        self._preparing: dict[int, tuple[threading.Thread, list[Any]]] = {}
        self._prepare_lock = threading.Lock()
        #: registrations a commit took from prepare_ring's threads, and rings unregistered (tests check both)
        self.prepared_rings = self.unregistered = 0
        self.arena = PinnedArena(_RUNS_ARENA, executor.wait)
        # fused_pages: one-region pages epochs as one SCAN_COMMIT task, compiled into
        # the executor only then. Setting the attribute False later takes the
        # general path (a benchmark's baseline); True works only where the module
        # has the task.
        self.fused_pages = fused_pages
        self._fused_scratch = cupy.zeros(_FUSED_SCRATCH_WORDS, dtype=cupy.uint64)
        self._fused_scratch_ptr = int(self._fused_scratch.data.ptr)
        self.fused_commits = 0  #: pages epochs committed by one SCAN_COMMIT task
        self.fused_fallbacks = 0  #: SCAN_COMMIT tasks whose records did not fit (general path after)
        #: epochs committed by each path (tests check that the path they aim at ran)
        self.path_counts = {"per_token": 0, "fused_pages": 0, "general": 0}

    def ring(self, ring: LogRing) -> tuple[int, int]:
        """Device addresses of a ring's header and data (registering it once,
        or taking ``prepare_ring``'s registration; unregistered when the ring
        closes, with the executor parked)."""
        key = id(ring)
        if key not in self._rings:
            base = self._prepared(key)
            if base is None:
                base = register_host_memory(ring.address, DATA_START + ring.capacity)
            else:
                self.prepared_rings += 1
            self._rings[key] = (base, base + DATA_START)
            ring.on_close.append(functools.partial(self._unregister, ring.address, key))
        return self._rings[key]

    def prepare_ring(self, ring: LogRing) -> None:
        """Start page-locking ``ring`` on a thread of its own, so that its first
        commit (``ring``, which waits for the thread) finds it done: a new
        ring's page-locking ran at about 3.4 GB/s on the H100 host (0.15 s for
        512 MiB), inside a resume's first commit. If the ring closes before any
        commit, its close waits for the thread and unregisters what it
        registered. A failure here is left to ``ring``, which registers again
        and raises."""
        key = id(ring)
        with self._prepare_lock:
            if key in self._rings or key in self._preparing:
                return
            device = self.executor.device_id  # a new thread starts on device 0
            done: list[Any] = []

            def register() -> None:
                try:
                    self._cupy.cuda.runtime.setDevice(device)
                    done.append(register_host_memory(ring.address, DATA_START + ring.capacity))
                except Exception as e:  # noqa: BLE001 - ring() registers again and raises it there
                    done.append(e)

            thread = threading.Thread(target=register, name="concordia-ring-register", daemon=True)
            thread.start()  # recorded only once started: a failed start leaves the registration to ring()
            self._preparing[key] = (thread, done)

        def settle(addr: int = ring.address) -> None:  # closed before any commit took the registration
            if self._prepared(key) is not None:
                self._unregister(addr, key)

        ring.on_close.append(settle)

    def _prepared(self, key: int) -> int | None:
        """``prepare_ring``'s device address for ring ``key`` once its thread is
        done, or None (none started, or it failed)."""
        with self._prepare_lock:
            job = self._preparing.pop(key, None)
        if job is None:
            return None
        job[0].join()
        return int(job[1][0]) if job[1] and isinstance(job[1][0], int) else None

    def _unregister(self, addr: int, key: int) -> None:
        ex = self.executor
        ex.park()
        self._cupy.cuda.runtime.hostUnregister(addr)
        self.unregistered += 1
        self._rings.pop(key, None)
        ex.ctl[STOP] = 0
        if ex.pending:
            ex.ensure_running()

    def _fence_for(self, tasks: Sequence[CheckpointTask]) -> tuple[int, int, int]:
        return self.fence.behind([t.region.current_stream() for t in tasks])  # type: ignore[attr-defined]

    # -- choosing a path ------------------------------------------------------------

    def commit(self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask], body: bytes, *,
               fence: bool = True) -> int:
        """Write (enqueue) the epoch; return the log offset past its COMMIT."""
        appends = self._appends(writer, tasks) if 0 < len(body) <= _SHORT_BODY else None
        if appends is not None:
            end = self._commit_appends(writer, epoch, tasks, appends, body, fence)
            self.path_counts["per_token"] += 1
            return end
        prescanned: CupyRegion | None = None
        if self.fused_pages and self.executor.fused_pages and len(tasks) == 1 and 0 < len(body) <= _SHORT_BODY:
            region = tasks[0].region
            assert isinstance(region, CupyRegion)
            # (pages per record must fit the task's 32-bit field: always, short of absurd record limits)
            if (region.spec.kind == "pages" and region.described and not region.force_full
                    and writer.max_record_bytes < region.spec.page_size << 32):
                fused = self._commit_pages_fused(writer, epoch, region, body, tasks if fence else ())
                if fused is not None:
                    self.path_counts["fused_pages"] += 1
                    return fused
                prescanned, fence = region, False  # the fused task scanned it, behind the fence
        end = self._commit_general(writer, epoch, tasks, body, fence, prescanned)
        self.path_counts["general"] += 1
        return end

    # -- per-token path ---------------------------------------------------------------

    def _appends(self, writer: LogWriter,
                 tasks: Sequence[CheckpointTask]) -> list[tuple[CupyRegion, int, int, int]] | None:
        """The epoch's data records if it is a small append — every region a
        described kv region whose new rows fit one record, all of them a small
        part of the ring — as (region, t0, t1, record size); else None (the
        general path). The per-token commit of decode is such an epoch."""
        out = []
        total = 0
        cap, limit = writer.ring.capacity, writer.max_record_bytes
        for task in tasks:
            region = task.region
            assert isinstance(region, CupyRegion)
            if not region.unit or not region.described:
                return None  # pages regions, REGION records
            if task.rows is None:
                continue
            t0, t1 = task.rows
            if t0 == t1:
                continue
            if not 0 <= t0 < t1 <= region.rows:
                return None  # the general path names the error (attach refused rows past 32 bits)
            if t1 - t0 > region.kv_plan(cap, limit)[0]:
                return None
            size = record_size(region.unit * (t1 - t0))  # the planner's one record: Span.size
            total += size
            out.append((region, t0, t1, size))
        return out if total <= min(GROUP_BYTES, cap // 4) else None

    def _commit_appends(self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask],
                        appends: list[tuple[CupyRegion, int, int, int]], body: bytes, fence: bool) -> int:
        """A small append epoch (``_appends``) with the least host work (see
        the module docstring). The log bytes equal the general path's."""
        ring = writer.ring
        header, data = self.ring(ring)
        cap, tag, nbody = ring.capacity, writer.session_tag, len(body)
        size = sum(a[3] for a in appends)
        start = writer.reserve(size + record_size(nbody))
        at = start + size  # the COMMIT record
        end = at + record_size(nbody)
        ring.write_at(at + HEADER_SIZE, body + bytes(-nbody % 8))  # zero padding: the device sums whole words
        enqueue = self.executor.enqueue
        if not appends:
            enqueue(TaskKind.APPEND_LOG, _APPEND.pack(ring=header, written=end, epoch=epoch, commit_at=at,
                                                      body_len=nbody, epoch_start=start, nrecords=0, tag=tag,
                                                      capacity=cap))
            return end
        word, value, timeout = self._fence_for(tasks) if fence else NO_FENCE
        pos, last = start, len(appends) - 1
        for i, (region, t0, t1, rsize) in enumerate(appends):
            per = region.plan[0]  # kv_plan ran in _appends
            if i < last:
                enqueue(TaskKind.CHECKPOINT, _KV.pack(
                    data=data, capacity=cap, epoch=epoch, t0=t0, t1=t1, per=per, log0=pos, tag=tag,
                    fence_word=word, fence_value=value, fence_timeout_ns=timeout, region=region.index),
                    handler=region.handler)
            else:
                enqueue(TaskKind.CHECKPOINT_COMMIT, _KV_COMMIT.pack(
                    data=data, capacity=cap, epoch=epoch, t0=t0, t1=t1, per=per, log0=pos, tag=tag,
                    commit_records=len(appends), commit_offset=at - start, body_len=nbody,
                    fence_word=word, fence_value=value, fence_timeout_ns=timeout,
                    publish_written=end, publish_epoch=epoch, region=region.index), handler=region.handler)
            word, value, timeout = NO_FENCE
            pos += rsize
        return end

    # -- fused pages path -------------------------------------------------------------

    def _commit_pages_fused(self, writer: LogWriter, epoch: int, region: CupyRegion, body: bytes,
                            fenced: Sequence[CheckpointTask]) -> int | None:
        """A one-region pages epoch as one SCAN_COMMIT task (fenced behind the
        streams of ``fenced``, if any). Returns the log offset past the COMMIT,
        or None when the records did not fit the span (or were more than a
        task's record limit): then the region is scanned, nothing was written,
        the span is given back, and the caller goes on from the device's bitmap
        with the general path. One host round trip instead of two, and no host
        work between the scan and the copy."""
        ring = writer.ring
        _, data = self.ring(ring)
        nbody = len(body)
        span = min(_FUSED_SPAN, ring.capacity // 8) + record_size(nbody)
        per = pages_per_record(region.spec.page_size, writer.max_record_bytes)
        offset, words = self.arena.words(2 + -(-nbody // 8), "a fused commit's body")  # result, body
        words[:2] = 0
        words[2:] = np.frombuffer(body + bytes(-nbody % 8), dtype=np.uint64)
        result = self.arena.device_ptr + offset
        word, value, timeout = self._fence_for(fenced) if fenced else NO_FENCE
        start = writer.reserve(span)
        try:
            ticket = self.executor.enqueue(TaskKind.SCAN_COMMIT, _SCAN_COMMIT.pack(
                data=data, capacity=ring.capacity, epoch=epoch, log0=start, span=span, tag=writer.session_tag,
                per=per, body_len=nbody, scratch=self._fused_scratch_ptr, fence_word=word, fence_value=value,
                fence_timeout_ns=timeout, body=result + 16, result=result, region=region.index),
                handler=region.handler)
        except BaseException:
            writer.release(start)  # not enqueued: nothing will fill the span
            raise
        self.arena.last_reader = ticket
        try:
            self.executor.wait(ticket)
        except BaseException:
            region.force_full = True  # the device baseline may have moved without a commit
            raise
        status, end = int(words[0]), int(words[1])
        if status == 1:
            writer.release(end)
            self.fused_commits += 1
            return end
        if status != 2:
            region.force_full = True
            raise RegionError(f"region {region.spec.name!r}: the fused pages commit reported status {status} "
                              "(expected 1 = committed or 2 = did not fit)")
        writer.release(start)
        self.fused_fallbacks += 1
        return None

    # -- general path -----------------------------------------------------------------

    def _commit_general(self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask], body: bytes,
                        fence: bool, prescanned: CupyRegion | None) -> int:
        ring = writer.ring
        self.ring(ring)
        start = writer.position
        n = 0
        scanned: list[CupyRegion] = []
        # Each data group goes to the device when the next one has been planned
        # (the device copies while the host plans); the last waits in `pending`
        # so that it can also publish the COMMIT. A send publishes `written`
        # once more than a quarter of the ring is unpublished, and groups are
        # reserved one at a time, so an epoch larger than the ring streams
        # through it: while the next group waits for space, at most a quarter
        # of the ring is sent but unpublished and two groups (each at most a
        # quarter) are reserved but unsent.
        pending: list[_Group] = []
        fence_fields = self._fence_for(tasks) if tasks and fence else NO_FENCE
        unpublished = 0
        filled = start  # log offset up to which every reservation is written or handed to the device

        def send(publish_written: int, publish_epoch: int) -> None:
            nonlocal fence_fields
            for i, (layout, region, fields, _at, _end, _n) in enumerate(pending):
                last = i == len(pending) - 1
                word, value, timeout = fence_fields
                fence_fields = NO_FENCE  # only the first task waits
                ticket = self.executor.enqueue(TaskKind.CHECKPOINT, layout.pack(
                    **fields, fence_word=word, fence_value=value, fence_timeout_ns=timeout,
                    publish_written=publish_written if last else 0, publish_epoch=publish_epoch if last else 0,
                    region=region.index), handler=region.handler)
                if layout is _PAGES:
                    self.arena.last_reader = ticket
            pending.clear()

        try:
            for task in tasks:
                region = task.region
                assert isinstance(region, CupyRegion)
                if not region.described:
                    rec = encode_record(RecordType.REGION, region.spec.to_json(), session_tag=writer.session_tag,
                                        epoch=epoch, region=region.spec.region_id)
                    at = writer.reserve(len(rec))
                    ring.write_at(at, rec)
                    filled = at + len(rec)
                    n += 1
                groups: Iterable[_Group] = ()
                if region.spec.kind == "pages":
                    scanned.append(region)
                    if region is not prescanned:
                        fence_fields = self._scan(region, fence_fields)
                    groups = self._pages(writer, epoch, region)
                elif task.rows is not None:
                    groups = self._rows(writer, epoch, region, task.rows)
                for group in groups:
                    if pending:
                        drain = unpublished > ring.capacity // 4  # let the flusher drain a large epoch
                        send(pending[-1][4] if drain else 0, 0)
                        if drain:
                            unpublished = 0
                    pending.append(group)
                    filled = group[4]
                    n += group[5]
                    unpublished += group[4] - group[3]
            rec = encode_record(RecordType.COMMIT, body, session_tag=writer.session_tag, epoch=epoch,
                                offset=start, aux=n)
            at = writer.reserve(len(rec))
            ring.write_at(at, rec)
            end = at + len(rec)
            if pending:
                send(end, epoch)
            else:
                self.executor.enqueue(TaskKind.APPEND_LOG,
                                      _APPEND.pack(ring=self.ring(ring)[0], written=end, epoch=epoch))
        except BaseException:
            # The epoch is abandoned (ownership lost, the flusher stopped, ...), but
            # its reservations must not stay holes: a span reserved and never
            # written would stop the flusher for good once a later epoch publishes
            # past it. Groups already planned go to the device and are published
            # as an aborted attempt (no COMMIT names them: replay ignores them);
            # a reservation made but not planned is given back.
            try:
                if pending:
                    send(pending[-1][4], 0)
            except Exception:  # noqa: BLE001 - the executor itself failed; the original error says why
                pass
            try:
                if writer.position > filled:
                    writer.release(filled)
            except Exception:  # noqa: BLE001 - as above: the original error is the one to raise
                pass
            for region in scanned:
                region.force_full = True  # the device baseline moved without a commit
            raise
        for task in tasks:
            task.region.described = True
        return end

    def _rows(self, writer: LogWriter, epoch: int, region: CupyRegion, rows: tuple[int, int]) -> Iterator[_Group]:
        """CHECKPOINT_KV tasks for rows ``[t0, t1)``: the planner's records in
        groups, each reserved only when the caller asks for it (see
        ``_commit_general``). A task's records are the planner's by
        construction: the device cuts ``[g0, g1)`` every ``per`` rows from ``g0``
        and a group starts on a record boundary."""
        t0, t1 = rows
        if not 0 <= t0 <= t1 <= region.rows:
            raise RegionError(f"region {region.spec.name!r}: expected a row range within [0, {region.rows}], "
                              f"found [{t0}, {t1})")
        ring = writer.ring
        per, per_task, _ = region.kv_plan(ring.capacity, writer.max_record_bytes)
        data = self.ring(ring)[1]
        spans = row_spans(t0, t1, per, region.unit)
        for g in range(0, len(spans), per_task):
            group = spans[g:g + per_task]
            size = sum(s.size for s in group)
            at = writer.reserve(size)  # after the caller sent earlier groups: no deadlock on a full ring
            fields = dict(data=data, capacity=ring.capacity, epoch=epoch, t0=group[0].offset,
                          t1=group[-1].offset + group[-1].aux, per=per, log0=at, tag=writer.session_tag)
            yield _KV, region, fields, at, at + size, len(group)

    def _scan(self, region: CupyRegion, fence_fields: tuple[int, int, int]) -> tuple[int, int, int]:
        """SCAN a pages region on the device and wait for its dirty bitmap; the
        scan carries the pending fence. Returns the fence fields still pending
        (none: the scan waited)."""
        word, value, timeout = fence_fields
        ticket = self.executor.enqueue(TaskKind.SCAN, _SCAN.pack(
            all_dirty=int(region.force_full), fence_word=word, fence_value=value, fence_timeout_ns=timeout,
            region=region.index), handler=region.handler)
        self.executor.wait(ticket)
        region.force_full = False
        return NO_FENCE

    def _pages(self, writer: LogWriter, epoch: int, region: CupyRegion) -> Iterator[_Group]:
        """CHECKPOINT_PAGES tasks for the dirty runs of the bitmap the last scan
        left: the planner's records in groups, each reserved only when the
        caller asks for it."""
        spec = region.spec
        assert region.bitmap is not None
        bits = np.unpackbits(region.bitmap.array[: 4 * (-(-spec.npages // 32))], bitorder="little")[: spec.npages]
        spans = page_spans(runs_from_bits(bits), pages_per_record(spec.page_size, writer.max_record_bytes),
                           spec.page_size, spec.nbytes)
        budget = min(GROUP_BYTES, writer.ring.capacity // 4)
        _, data = self.ring(writer.ring)
        for group in group_spans(spans, budget, MAX_RECORDS_PER_TASK):
            size = sum(s.size for s in group)
            at = writer.reserve(size)
            offset, words = self.arena.words(3 * len(group), f"a dirty-run table of {len(group)} runs")
            table = words.reshape(len(group), 3)
            pos = at
            for k, s in enumerate(group):
                table[k] = (s.offset, s.length, pos)
                pos += s.size
            small = int(max(s.length for s in group) <= _SMALL_RUN)
            fields = dict(data=data, capacity=writer.ring.capacity, epoch=epoch,
                          runs=self.arena.device_ptr + offset, nruns=len(group), tag=writer.session_tag, small=small)
            yield _PAGES, region, fields, at, at + size, len(group)

    def close(self) -> None:
        self.arena.close()
        self.fence.close()
