"""The CuPy backend: checkpoints run in the persistent executor on the GPU.

Per commit (``commit_epoch``), in ring order:

1. A device-side fence behind the caller streams' work (``cuStreamWriteValue64``
   on the one stream, or on a join stream that waits for each of several), which
   the first data task waits for: the executor copies only after the work queued
   before the commit has finished; the host does not synchronize.
2. Per region: a REGION record the first time (built on the host, stored in the
   ring beyond ``written``); for kv regions CHECKPOINT tasks gathering rows
   ``[t0, t1)`` into ROWS records at reserved log offsets; for pages regions a
   SCAN task (page hashes on the device, dirty bitmap into pinned memory), a
   host wait for it, then CHECKPOINT tasks copying the dirty runs. Groups of
   records are reserved one at a time and each is sent when the next has been
   planned; a send publishes ``written`` once a quarter of the ring is
   unpublished, so the flusher drains an epoch larger than the ring.
3. The COMMIT record goes last (built on the host); the last data task (or an
   APPEND_LOG task) publishes ``committed``.

With ``fused_pages=True`` (off by default: not yet run on a GPU), a pages
epoch of one described region (``_commit_pages_fused``) is one SCAN_COMMIT
task: the device scans, plans and copies the dirty runs' records into a span
the host reserved, makes the COMMIT and publishes; the host waits once and
gives back the unused tail. Records that do not fit the span fall back to the
path above, from the bitmap that task left.

The per-token path (``_commit_appends``: every region a described kv region
whose new rows fit one record) does less on the host: one reservation, the
COMMIT body stored in the ring, one task per region, the last of which — a
CHECKPOINT_COMMIT — makes the COMMIT header (checksum, CRC) on the device and
publishes the epoch.

``commit_epoch`` returns when everything is enqueued (kv-only epochs never
wait on the device; epochs with pages regions wait for the scan). The epoch is
visible in the ring once the task that publishes it ran (``Session.wait_visible``).
Records are framed exactly as the host backend frames them, chunked the same
way, so replay, compaction and the flusher cannot tell the backends apart.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from .backend import Backend, BackendRegion, Capability, CheckpointTask
from .errors import RegionError
from .executor import STOP, Executor, Handler, PinnedBuffer, TaskKind, register_host_memory
from .host import plan_chunks
from .logring import DATA_START, LogRing
from .logwriter import LogWriter
from .records import HEADER_SIZE, RecordHeader, RecordType, encode_record, record_size
from .regions import RegionSpec, describe
from .restore import DeviceVerifiedRestore, HostVerifiedRestore

__all__ = ["CupyBackend", "CupyRegion"]

_GROUP_BYTES = 16 << 20  # data bytes per CHECKPOINT task
_MAX_RECORDS_PER_TASK = 256  # CNC_MAX_RECORDS_PER_TASK in concordia.cuh
_RUNS_ARENA = 4 << 20  # pinned bytes for dirty-run tables (24 bytes a run)
_STAGING = 4 << 20
_SMALL_RUN = 256 << 10  # runs up to this size are copied by one block each
# COMMIT bodies up to this size may take the per-token path, whose header one
# block sums over PCIe; a larger body (big user meta) is summed on the host.
_SHORT_BODY = 64 << 10
# Data bytes a one-task pages epoch (SCAN_COMMIT) may write: its span is reserved
# before the device knows what is dirty, and the unused tail given back after.
_FUSED_SPAN = 1 << 20
_FUSED_SCRATCH_WORDS = 8 + 4 * _MAX_RECORDS_PER_TASK  # kernels/executor.cu, SCAN_COMMIT


def _device_ptr(array: Any) -> int:
    mod = type(array).__module__.split(".")[0]
    return int(array.data_ptr()) if mod == "torch" else int(array.data.ptr)


def _stream_writer() -> Any:
    """``cuStreamWriteValue64`` as a ctypes function (the commit's fence stage
    went from 3.9 to 3.3 us on the H100 host with it), or the cuda.bindings
    wrapper where the driver does not hand out the entry point. Same symbol
    version and stream semantics as cuda.bindings (legacy default stream)."""
    import ctypes

    from cuda.bindings import driver

    def wrapper(stream: int, addr: int, value: int, flags: int) -> int:
        (err,) = driver.cuStreamWriteValue64(stream, addr, value, flags)
        return int(err)

    try:
        err, pfn, status = driver.cuGetProcAddress(
            b"cuStreamWriteValue64", 12000, driver.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_LEGACY_STREAM)
        if err != driver.CUresult.CUDA_SUCCESS or not int(pfn):
            return wrapper
    except Exception:  # noqa: BLE001 - an older binding: the wrapper works everywhere
        return wrapper
    # PYFUNCTYPE keeps the GIL: the call takes about a microsecond, and letting
    # go of the GIL mid-commit hands it to the flusher thread for a whole flush.
    proto = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint)
    return proto(int(pfn))


def _current_stream_getter(array: Any) -> Callable[[], int]:
    """A function returning the handle of ``array``'s library's current stream
    on its device (made once per region: the commit path calls it every time)."""
    if type(array).__module__.split(".")[0] == "torch":
        import torch

        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # the cheap path (no Stream object)
        if raw is not None:
            return functools.partial(raw, array.device.index or 0)
        device = array.device
        return lambda: int(torch.cuda.current_stream(device).cuda_stream)
    import cupy

    return lambda: int(cupy.cuda.get_current_stream().ptr)


class CupyRegion(BackendRegion):
    def __init__(self, spec: RegionSpec, array: Any, *, index: int, handler: int, hashes: Any,
                 bitmap: PinnedBuffer | None) -> None:
        super().__init__(spec, array)
        self.index = index
        self.handler = handler
        # kv geometry, read on every commit (the spec's properties compute it each time)
        self.rows = spec.rows if spec.kind == "kv" else 0
        self.unit = spec.outer * spec.row_bytes if spec.kind == "kv" else 0
        self.plan_key: tuple[int, int] | None = None  #: (ring capacity, max record bytes) of ``plan``
        self.plan: tuple[int, int, int] = (1, 1, 0)  #: rows per record, rows per task, full record size
        self.hashes = hashes
        self.bitmap = bitmap
        self.current_stream = _current_stream_getter(array)  #: handle of the caller's current stream
        self.force_full = True  #: next scan marks every page dirty (first commit, after an abort)


class CupyBackend(Backend):
    name: ClassVar[str] = "cupy"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.DEVICE_MEMORY, Capability.PERSISTENT_EXECUTOR})

    @staticmethod
    def available() -> bool:
        try:
            import cupy
            from cuda.bindings import driver  # noqa: F401

            return cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:  # noqa: BLE001 - any failure means "not usable here"
            return False

    def __init__(self, *, blocks: int | None = None, idle_ms: float = 10.0, max_life_ms: float = 500.0,
                 fence_timeout_s: float = 10.0, fence_yield_ms: float = 2.0, restore_engine: str = "copy",
                 restore_span: int = 16 << 20, restore_depth: int = 8, restore_threads: int | None = None,
                 restore_verify: str = "device", fused_pages: bool = False) -> None:
        import os

        import cupy

        if restore_engine not in ("executor", "copy"):
            raise RegionError(f"restore_engine: expected 'executor' or 'copy', found {restore_engine!r}")
        self._restore_engine = restore_engine
        self._restore_span = restore_span
        self._restore_depth = max(2, restore_depth)
        self._restore_threads = restore_threads or max(1, min(8, (os.cpu_count() or 2) - 1))
        self._restore_buffers: list[PinnedBuffer] = []
        self._rstream: Any = None
        if restore_verify not in ("host", "device"):
            raise RegionError(f"restore_verify: expected 'host' or 'device', found {restore_verify!r}")
        self._cupy = cupy
        self.executor = Executor(blocks=blocks, idle_ms=idle_ms, max_life_ms=max_life_ms,
                                 fence_yield_ms=fence_yield_ms, fused_pages=fused_pages)
        # Measured on the H100 (4.3 GB at 32k tokens): 18 GB/s with the sums on the
        # device, 8-10 GB/s with the reader threads summing (docs/gpu.md).
        self._restorer: DeviceVerifiedRestore | HostVerifiedRestore = (
            DeviceVerifiedRestore(self) if restore_verify == "device" else HostVerifiedRestore(self))
        self._fence = cupy.zeros(1, dtype=cupy.uint64)
        self._fence_ptr = int(self._fence.data.ptr)
        self._write_value: Any = None  # cuStreamWriteValue64, resolved on first use
        self._join: Any = None  # stream that joins several caller streams for one fence
        self._join_events: list[Any] = []
        self._fence_value = 0
        self._fence_timeout_ns = int(fence_timeout_s * 1e9)
        self._rings: dict[int, tuple[int, int]] = {}
        # Pinned memory is allocated here, once: cudaHostAlloc/cudaFreeHost
        # synchronize the device, i.e. they would wait for the executor to park.
        self._runs = PinnedBuffer(_RUNS_ARENA)
        self._runs_pos = 0
        self._runs_last_ticket = -1
        self._staging: list[tuple[int, PinnedBuffer]] = [(-1, PinnedBuffer(_STAGING)) for _ in range(4)]
        self._lock = threading.Lock()
        self._fence_args: list[int] | None = None
        # fused_pages: one-region pages epochs as one SCAN_COMMIT task, compiled into
        # the executor only then. Off by default until its GPU test and benchmark
        # have run on the H100 (written 2026-11-27 without device time; compiled by
        # NVRTC in CI, its plan walk checked against the host chunking in a Python
        # mirror only). Setting the attribute False later takes the two-phase path
        # (a benchmark's baseline); True works only where the module has the task.
        self.fused_pages = fused_pages
        self._fused_scratch = cupy.zeros(_FUSED_SCRATCH_WORDS, dtype=cupy.uint64)
        self._fused_scratch_ptr = int(self._fused_scratch.data.ptr)
        self.fused_commits = 0  #: pages epochs committed by one SCAN_COMMIT task
        self.fused_fallbacks = 0  #: SCAN_COMMIT tasks whose records did not fit (two-phase path after)

    # -- regions ------------------------------------------------------------------

    def attach(self, spec: RegionSpec, array: Any) -> CupyRegion:
        info = describe(array)
        if not info.on_device:
            raise RegionError(f"region {spec.name!r}: the cupy backend serves GPU memory, found a host array; "
                              "open the runtime with backend='host' for host state")
        if spec.kind == "kv":
            if spec.row_bytes % 8:
                raise RegionError(f"region {spec.name!r}: the GPU handlers need rows of a multiple of 8 bytes, "
                                  f"found {spec.row_bytes}")
            handler = Handler("kv", spec.row_bytes)
            hashes, bitmap = None, None
        else:
            if spec.page_size % 16 or spec.nbytes % 16:
                raise RegionError(f"region {spec.name!r}: the GPU page scanner needs a page size and a region size "
                                  f"that are multiples of 16 bytes, found {spec.page_size} and {spec.nbytes}")
            handler = Handler("pages", spec.page_size)
            # The page hashes, then SCAN_COMMIT's device copy of the dirty bitmap
            # (u32 words): 8 bytes and one bit a page.
            hashes = self._cupy.zeros(spec.npages + -(-spec.npages // 64), dtype=self._cupy.uint64)
            bitmap = PinnedBuffer(4 * (-(-spec.npages // 32)))
        hid = self.executor.handler_id(handler)
        words = np.array([
            _device_ptr(array), spec.nbytes, spec.outer if spec.kind == "kv" else 0,
            spec.rows if spec.kind == "kv" else 0, spec.row_bytes if spec.kind == "kv" else 0,
            spec.page_size, spec.npages, _device_ptr(hashes) if hashes is not None else 0,
            bitmap.device_ptr if bitmap is not None else 0, spec.region_id,
        ], dtype=np.uint64)
        index = self.executor.set_region(None, words)
        return CupyRegion(spec, array, index=index, handler=hid, hashes=hashes, bitmap=bitmap)

    def _ring(self, ring: LogRing) -> tuple[int, int]:
        """Device addresses of a ring's header and data (registering it once)."""
        key = id(ring)
        if key not in self._rings:
            base = register_host_memory(ring.address, DATA_START + ring.capacity)
            self._rings[key] = (base, base + DATA_START)

            def unregister(addr: int = ring.address, key: int = key) -> None:
                self.executor.park()
                self._cupy.cuda.runtime.hostUnregister(addr)
                self._rings.pop(key, None)
                self.executor.ctl[STOP] = 0
                if self.executor.pending:
                    self.executor.ensure_running()

            ring.on_close.append(unregister)
        return self._rings[key]

    # -- commit -------------------------------------------------------------------

    def _fence_streams(self, tasks: Sequence[CheckpointTask]) -> list[int]:
        """Write the next fence value behind the work queued on the caller
        streams; returns the prologue args (fence word, value, timeout) for the
        first device task to wait on.

        One stream (the usual case): the value is written on it directly. Several:
        each gets an event, an internal join stream waits for all of them and
        writes the value, so it is reached only when every stream has reached
        its commit point (written on each stream, the first to arrive would
        release the executor early). The callers' streams gain no dependency."""
        streams = sorted({t.region.current_stream() for t in tasks})  # type: ignore[attr-defined]
        self._fence_value += 1
        target = streams[0]
        if len(streams) > 1:
            target = self._join_streams(streams)
        if self._write_value is None:
            self._write_value = _stream_writer()
        err = self._write_value(target, self._fence_ptr, self._fence_value, 0)
        if err:
            raise RegionError(f"cuStreamWriteValue64 on stream {target:#x} failed: CUresult {err}")
        return [self._fence_ptr, self._fence_value, self._fence_timeout_ns]

    def _join_streams(self, streams: Sequence[int]) -> int:
        """Make the join stream wait for the work queued so far on ``streams``;
        returns the join stream's handle."""
        from cuda.bindings import driver

        if self._join is None:
            self._join = self._cupy.cuda.Stream(non_blocking=True)
        while len(self._join_events) < len(streams):
            err, ev = driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
            if err != driver.CUresult.CUDA_SUCCESS:
                raise RegionError(f"cuEventCreate failed: {err}")
            self._join_events.append(ev)
        join = int(self._join.ptr)
        for s, ev in zip(streams, self._join_events, strict=False):
            # An event may be recorded again right away: the wait took its state.
            for err in (driver.cuEventRecord(ev, s)[0], driver.cuStreamWaitEvent(join, ev, 0)[0]):
                if err != driver.CUresult.CUDA_SUCCESS:
                    raise RegionError(f"joining stream {s:#x} for the commit fence failed: {err}")
        return join

    def _device_task(self, kind: int, region: CupyRegion, head: list[int], *, publish: tuple[int, int] = (0, 0)) -> int:
        """Enqueue a SCAN or CHECKPOINT task: ``head`` fills a0..a7; the pending
        fence (if any) becomes its prologue, ``publish`` (written, epoch) its epilogue."""
        args = head + [0] * (8 - len(head)) + (self._fence_args or [0, 0, 0]) + list(publish) + [region.index]
        self._fence_args = None
        return self.executor.enqueue(kind, args, handler=region.handler)

    def commit_epoch(self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask], body: bytes, *,
                     fence: bool = True) -> int:
        appends = self._appends(writer, tasks) if 0 < len(body) <= _SHORT_BODY else None
        if appends is not None:
            return self._commit_appends(writer, epoch, tasks, appends, body, fence)
        prescanned: CupyRegion | None = None
        if self.fused_pages and self.executor.fused_pages and len(tasks) == 1 and 0 < len(body) <= _SHORT_BODY:
            region = tasks[0].region
            assert isinstance(region, CupyRegion)
            # (pages per record must fit the task's 32-bit field: always, short of absurd record limits)
            if (region.spec.kind == "pages" and region.described and not region.force_full
                    and writer.max_record_bytes < region.spec.page_size << 32):
                end = self._commit_pages_fused(writer, epoch, tasks, body, fence)
                if end is not None:
                    return end
                prescanned, fence = region, False  # the fused task scanned it, behind the fence
        ring = writer.ring
        self._ring(ring)
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
        pending: list[tuple[CupyRegion, list[int], int]] = []  # (region, a0..a7, end offset)
        self._fence_args = self._fence_streams(tasks) if tasks and fence else None
        unpublished = 0
        filled = start  # log offset up to which every reservation is written or handed to the device

        def send(publish_last: tuple[int, int]) -> None:
            for i, (region, head, _end) in enumerate(pending):
                last = i == len(pending) - 1
                ticket = self._device_task(TaskKind.CHECKPOINT, region, head,
                                           publish=publish_last if last else (0, 0))
                if region.spec.kind == "pages":
                    self._runs_last_ticket = ticket
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
                groups: Iterable[tuple[list[int], int, int, int]] = ()
                if region.spec.kind == "pages":
                    scanned.append(region)
                    groups = self._pages(writer, epoch, region, scanned=region is prescanned)
                elif task.rows is not None:
                    groups = self._rows(writer, epoch, region, task.rows)
                for head, at, end, nrec in groups:
                    if pending:
                        drain = unpublished > ring.capacity // 4  # let the flusher drain a large epoch
                        send((pending[-1][2], 0) if drain else (0, 0))
                        if drain:
                            unpublished = 0
                    pending.append((region, head, end))
                    filled = end
                    n += nrec
                    unpublished += end - at
            rec = encode_record(RecordType.COMMIT, body, session_tag=writer.session_tag, epoch=epoch,
                                offset=start, aux=n)
            at = writer.reserve(len(rec))
            ring.write_at(at, rec)
            end = at + len(rec)
            if pending:
                send((end, epoch))
            else:
                self.executor.enqueue(TaskKind.APPEND_LOG, [self._ring(ring)[0], end, epoch])
        except BaseException:
            # The epoch is abandoned (ownership lost, the flusher stopped, ...), but
            # its reservations must not stay holes: a span reserved and never
            # written would stop the flusher for good once a later epoch publishes
            # past it. Groups already planned go to the device and are published
            # as an aborted attempt (no COMMIT names them: replay ignores them);
            # a reservation made but not planned is given back.
            try:
                if pending:
                    send((pending[-1][2], 0))
                if writer.position > filled:
                    writer.release(filled)
            except Exception:  # noqa: BLE001 - the executor itself failed; the original error says why
                pass
            self._fence_args = None
            for region in scanned:
                region.force_full = True  # the device baseline moved without a commit
            raise
        for task in tasks:
            task.region.described = True
        return end

    def _commit_pages_fused(self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask], body: bytes,
                            fence: bool) -> int | None:
        """A one-region pages epoch as one device task (SCAN_COMMIT): the device
        scans, plans the dirty runs' records (chunked as the host backend chunks
        them) into a span the host reserved, copies them, makes the COMMIT and
        publishes the epoch; the host waits for it and gives back the span's
        unused tail. Returns the log offset past the COMMIT, or None when the
        records did not fit the span (or were more than a task's record limit):
        then the region is scanned, nothing was written, the span is given back,
        and the caller goes on from the device's bitmap with the two-phase path. One host round trip
        instead of two, and no host work between the scan and the copy."""
        region = tasks[0].region
        assert isinstance(region, CupyRegion)
        ring = writer.ring
        _, data = self._ring(ring)
        nbody = len(body)
        span = min(_FUSED_SPAN, ring.capacity // 8) + record_size(nbody)
        per = plan_chunks(region.spec.page_size, writer.max_record_bytes)
        offset, words = self._arena_words(2 + -(-nbody // 8), "a fused commit's body")  # result, body
        words[:2] = 0
        words[2:] = np.frombuffer(body + bytes(-nbody % 8), dtype=np.uint64)
        result = self._runs.device_ptr + offset
        fence_args = self._fence_streams(tasks) if fence else [0, 0, 0]
        start = writer.reserve(span)
        try:
            ticket = self.executor.enqueue(
                TaskKind.SCAN_COMMIT,
                (data, ring.capacity, epoch, start, span, writer.session_tag, per | nbody << 32,
                 self._fused_scratch_ptr, *fence_args, result + 16, result, region.index),
                handler=region.handler)
        except BaseException:
            writer.release(start)  # not enqueued: nothing will fill the span
            raise
        self._runs_last_ticket = ticket
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

    def _appends(self, writer: LogWriter,
                 tasks: Sequence[CheckpointTask]) -> list[tuple[CupyRegion, int, int, int]] | None:
        """The epoch's data records if it is a small append — every region a
        described kv region whose new rows fit one record, all of them a small
        part of the ring — as (region, t0, t1, record size); else None (the
        general path). The per-token commit of decode is such an epoch."""
        out = []
        total = 0
        key = (writer.ring.capacity, writer.max_record_bytes)
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
            if not 0 <= t0 < t1 <= min(region.rows, 0xFFFFFFFF):
                return None  # the general path names the error (or takes rows past 32 bits)
            if region.plan_key != key:
                self._plan(region, writer)
            if t1 - t0 > region.plan[0]:
                return None
            size = record_size(region.unit * (t1 - t0))
            total += size
            out.append((region, t0, t1, size))
        return out if total <= min(_GROUP_BYTES, writer.ring.capacity // 4) else None

    def _commit_appends(self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask],
                        appends: list[tuple[CupyRegion, int, int, int]], body: bytes, fence: bool) -> int:
        """A small append epoch (``_appends``) with the least host work: one
        reservation, the COMMIT body stored in the ring, one CHECKPOINT task per
        region (the first waits on the stream fence) of which the last, a
        CHECKPOINT_COMMIT, also makes the COMMIT header on the device and
        publishes the epoch (the host computes no checksum). With no rows
        appended, an APPEND_LOG task makes the header. The log bytes equal
        the general path's."""
        ring = writer.ring
        header, data = self._ring(ring)
        cap, tag, nbody = ring.capacity, writer.session_tag, len(body)
        size = sum(a[3] for a in appends)
        start = writer.reserve(size + record_size(nbody))
        at = start + size  # the COMMIT record
        end = at + record_size(nbody)
        ring.write_at(at + HEADER_SIZE, body + bytes(-nbody % 8))  # zero padding: the device sums whole words
        enqueue = self.executor.enqueue
        if not appends:
            enqueue(TaskKind.APPEND_LOG, (header, end, epoch, at, nbody, start, 0, tag, cap))
            return end
        fence_args = self._fence_streams(tasks) if fence else (0, 0, 0)
        pos, last = start, len(appends) - 1
        for i, (region, t0, t1, rsize) in enumerate(appends):
            if i < last:
                enqueue(TaskKind.CHECKPOINT, (data, cap, epoch, t0, t1, region.plan[0], pos, tag, *fence_args,
                                              0, 0, region.index), handler=region.handler)
            else:
                enqueue(TaskKind.CHECKPOINT_COMMIT,
                        (data, cap, epoch, t0 | len(appends) << 32, t1 | (at - start) << 32,
                         region.plan[0] | nbody << 32, pos, tag, *fence_args, end, epoch, region.index),
                        handler=region.handler)
            fence_args = (0, 0, 0)
            pos += rsize
        return end

    def _plan(self, region: CupyRegion, writer: LogWriter) -> None:
        """Cache a kv region's record plan for this ring and record limit."""
        unit = region.unit
        per = plan_chunks(unit, writer.max_record_bytes)
        group_rows = max(per, (min(_GROUP_BYTES, writer.ring.capacity // 4) // (per * unit)) * per)
        region.plan = (per, min(group_rows, _MAX_RECORDS_PER_TASK * per), record_size(unit * per))
        region.plan_key = (writer.ring.capacity, writer.max_record_bytes)

    def _rows(self, writer: LogWriter, epoch: int, region: CupyRegion,
              rows: tuple[int, int]) -> Iterator[tuple[list[int], int, int, int]]:
        """CHECKPOINT arguments for rows ``[t0, t1)``: (a0..a7, log offset, end, records) per group,
        each reserved only when the caller asks for it (see ``commit_epoch``)."""
        t0, t1 = rows
        if not 0 <= t0 <= t1 <= region.rows:
            raise RegionError(f"region {region.spec.name!r}: expected a row range within [0, {region.rows}], "
                              f"found [{t0}, {t1})")
        if t0 == t1:
            return
        ring = writer.ring
        if region.plan_key != (ring.capacity, writer.max_record_bytes):
            self._plan(region, writer)
        per, group_rows, full = region.plan
        unit = region.unit
        data = self._ring(ring)[1]
        for g0 in range(t0, t1, group_rows):
            g1 = min(g0 + group_rows, t1)
            n = g1 - g0
            nrec = -(-n // per)
            size = (nrec - 1) * full + record_size(unit * (n - (nrec - 1) * per))
            at = writer.reserve(size)  # after the caller sent earlier groups: no deadlock on a full ring
            yield [data, ring.capacity, epoch, g0, g1, per, at, writer.session_tag], at, at + size, nrec

    def _pages(self, writer: LogWriter, epoch: int, region: CupyRegion, *,
               scanned: bool = False) -> Iterator[tuple[list[int], int, int, int]]:
        """SCAN on the device (waited for; not when ``scanned``: a SCAN_COMMIT that
        did not fit left its bitmap), then CHECKPOINT arguments for the dirty runs,
        one group at a time (each reserved only when the caller asks for it)."""
        spec = region.spec
        ex = self.executor
        if not scanned:
            ex.wait(self._device_task(TaskKind.SCAN, region, [int(region.force_full)]))
        region.force_full = False
        assert region.bitmap is not None
        bits = np.unpackbits(region.bitmap.array[: 4 * (-(-spec.npages // 32))], bitorder="little")[: spec.npages]
        idx = np.flatnonzero(bits)
        if idx.size == 0:
            return
        breaks = np.flatnonzero(np.diff(idx) != 1)
        starts = np.concatenate(([idx[0]], idx[breaks + 1]))
        ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
        per = plan_chunks(spec.page_size, writer.max_record_bytes)
        # Same chunking as the host backend: runs cut every `per` pages from their
        # start, the last page clipped to the region.
        pieces = [(q * spec.page_size, min(min(q + per, p1) * spec.page_size, spec.nbytes) - q * spec.page_size)
                  for p0, p1 in zip(starts.tolist(), ends.tolist(), strict=True) for q in range(p0, p1, per)]
        budget = min(_GROUP_BYTES, writer.ring.capacity // 4)
        _, data = self._ring(writer.ring)
        i = 0
        while i < len(pieces):
            group, size = [], 0
            while i < len(pieces) and len(group) < _MAX_RECORDS_PER_TASK and (
                    not group or size + record_size(pieces[i][1]) <= budget):
                group.append(pieces[i])
                size += record_size(pieces[i][1])
                i += 1
            at = writer.reserve(size)
            offset, table = self._run_table(len(group))
            pos = at
            for k, (off, length) in enumerate(group):
                table[k] = (off, length, pos)
                pos += record_size(length)
            small = int(max(length for _, length in group) <= _SMALL_RUN)
            yield ([data, writer.ring.capacity, epoch, self._runs.device_ptr + offset, len(group),
                    writer.session_tag, small], at, at + size, len(group))

    def _run_table(self, count: int) -> tuple[int, np.ndarray]:
        """Space for ``count`` run triples in the pinned arena (``_arena_words``)."""
        offset, words = self._arena_words(3 * count, f"a dirty-run table of {count} runs")
        return offset, words.reshape(count, 3)

    def _arena_words(self, n: int, what: str) -> tuple[int, np.ndarray]:
        """Byte offset and u64 view of ``n`` words of the pinned arena that
        device tasks read (run tables, a fused commit's body and result). When
        the arena wraps, wait until the task that last read it has run."""
        need = 8 * n
        if need > self._runs.nbytes // 2:
            raise RegionError(f"{what} exceeds half the {self._runs.nbytes}-byte arena")
        if self._runs_pos + need > self._runs.nbytes:
            if self._runs_last_ticket >= 0:
                self.executor.wait(self._runs_last_ticket)
            self._runs_pos = 0
        offset = self._runs_pos
        self._runs_pos += need
        return offset, self._runs.array[offset:offset + need].view(np.uint64)

    # -- recovery -------------------------------------------------------------------

    def apply(self, region: BackendRegion, header: RecordHeader, payload: memoryview) -> None:
        assert isinstance(region, CupyRegion)
        n = len(payload)
        buf = self._staging_buffer(n)
        buf.array[:n] = np.frombuffer(payload, np.uint8)
        ticket = self._recover(region, header, buf.device_ptr)
        with self._lock:
            self._staging.append((ticket, buf))

    def apply_records(self, region: BackendRegion, locs: Sequence[Any], reader: Any) -> None:
        """Restore pipeline (``gpu_runtime/restore.py``): reader threads ``pread``
        runs of adjacent records into pinned buffers; their checksums are summed
        on the GPU (``restore_verify="device"``, the default) or by the reader
        threads (``"host"``); verified records reach the region in log order by
        the copy engine (``restore_engine="copy"``) or as RECOVER tasks."""
        assert isinstance(region, CupyRegion)
        if len(locs) < 2:
            super().apply_records(region, locs, reader)
            return
        self._restorer.run(region, locs, reader)

    def _recover(self, region: CupyRegion, h: RecordHeader, src: int) -> int:
        """A RECOVER task applying the record whose payload is at device address
        ``src`` (mapped pinned or device memory); returns its ticket."""
        return self.executor.enqueue(TaskKind.RECOVER, [src, int(h.type), h.offset, h.aux, h.length] + [0] * 8
                                     + [region.index], handler=region.handler)

    def _copy_record(self, region: CupyRegion, h: RecordHeader, src: int, stream: Any, *,
                     from_device: bool = False) -> None:
        """One record to the device on the copy engine (``restore_engine="copy"``),
        from pinned host memory or (``from_device``) a device staging buffer."""
        spec, rt = region.spec, self._cupy.cuda.runtime
        base = _device_ptr(region.array)
        kind = rt.memcpyDeviceToDevice if from_device else rt.memcpyHostToDevice
        if h.type is RecordType.ROWS:
            width = h.aux * spec.row_bytes
            rt.memcpy2DAsync(base + h.offset * spec.row_bytes, spec.rows * spec.row_bytes, src, width, width,
                             spec.outer, kind, stream.ptr)
        else:
            rt.memcpyAsync(base + h.offset, src, h.length, kind, stream.ptr)

    def _restore_pool(self, need: int) -> list[PinnedBuffer]:
        """Pinned buffers of at least ``need`` bytes for the restore pipeline,
        allocated on first use and kept until close (pinning is slow)."""
        if not self._restore_buffers or self._restore_buffers[0].nbytes < need:
            for buf in self._restore_buffers:
                buf.close()
            self._restore_buffers = [PinnedBuffer(need) for _ in range(self._restore_depth)]
        return self._restore_buffers

    def _restore_stream(self) -> Any:
        if self._rstream is None:
            self._rstream = self._cupy.cuda.Stream(non_blocking=True)
        return self._rstream

    def _staging_buffer(self, n: int) -> PinnedBuffer:
        """A pinned buffer of at least ``n`` bytes that no queued task still reads
        (the pool rotates; a payload larger than a buffer gets its own)."""
        with self._lock:
            ticket, buf = self._staging.pop(0)
        if ticket >= 0:
            self.executor.wait(ticket)
        if buf.nbytes < n:
            self._staging.append((-1, buf))
            buf = PinnedBuffer(n)  # rare: records are at most max_record_bytes
        return buf

    def after_restore(self, region: BackendRegion) -> None:
        assert isinstance(region, CupyRegion)
        if region.spec.kind == "pages":
            t = self.executor.enqueue(TaskKind.SCAN, [1] + [0] * 12 + [region.index], handler=region.handler)
            self.executor.wait(t)  # hashes now describe the restored state
            region.force_full = False
        else:
            self.executor.wait(self.executor._tail - 1)
        region.described = True

    def wait_visible(self, writer: LogWriter, epoch: int, timeout: float = 30.0) -> None:
        self.wait_idle(timeout)  # the task publishing the epoch is the newest of its session

    @contextlib.contextmanager
    def resident(self, idle_ms: float, max_life_ms: float | None = None) -> Iterator[None]:
        """Keep the executor resident between commits less than ``idle_ms``
        apart, for at most ``max_life_ms`` at a time (default: the backend's
        ``max_life_ms``). With the default window (``idle_ms`` option, 10 ms) a
        decode step longer than it parks the executor and the next commit
        relaunches it, which cost about 0.1 ms of host time per token on the
        H100 host (docs/gpu.md). Meanwhile a device-wide synchronize or the
        first load of a kernel module waits until the executor parks: up to
        ``max_life_ms`` while commits keep coming. On exit the old windows are
        back and the executor parked, so nothing after the block waits for the
        long ones."""
        ex = self.executor
        old = (ex.idle_ms, ex.max_life_ms)
        new = (max(idle_ms, old[0]), old[1] if max_life_ms is None else max_life_ms)
        if new != old:
            ex.set_windows(*new)
        try:
            yield
        finally:
            if new != old:
                ex.set_windows(*old)

    def poll(self) -> None:
        self.executor.poll()

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until every enqueued task has run."""
        if self.executor._tail:
            self.executor.wait(self.executor._tail - 1, timeout)

    def describe(self) -> dict[str, Any]:
        import cupy

        d = super().describe()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        d.update(device=props["name"].decode(), blocks=self.executor.blocks, swaps=self.executor.swaps,
                 fused_pages_commits=self.fused_commits, fused_pages_fallbacks=self.fused_fallbacks,
                 handlers=[h.macro(i) for i, h in enumerate(self.executor.handlers)])
        return d

    def close(self) -> None:
        self.executor.close()
        with self._lock:
            for _, buf in self._staging:
                buf.close()
            self._staging = []
            self._runs.close()
            for buf in self._restore_buffers:
                buf.close()
            self._restore_buffers = []
            self._restorer.close()
            if self._join_events:
                from cuda.bindings import driver

                for ev in self._join_events:
                    driver.cuEventDestroy(ev)
                self._join_events = []
