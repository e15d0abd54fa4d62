"""The CuPy backend's restore pipelines (``CupyBackend.apply_records``), with
what they need: pinned buffers, a restore stream, and the two ways a verified
record reaches a region (a copy-engine copy or a RECOVER task).

Both read a region's records in spans of back-to-back records (at most
``restore_span`` bytes) with reader threads that ``pread`` straight into the
backend's pinned buffers, ``restore_depth`` spans in flight, and hand them to
the device in log order; they differ in where the checksums are summed. With
device sums a span is read as tasks of ``restore_piece`` bytes
(``spans.pieces``), so that a large span is read by several threads at once;
with host sums each span is one task (its sum runs along its read), so that
path keeps smaller spans and more of them in flight by default.

* ``DeviceVerifiedRestore`` (``restore_verify="device"``, the default). Per
  span, on the restore stream: copy the pinned span (unverified) to a device
  staging buffer; sum each record's whole payload words there
  (``kernels/verify.cu``); copy the sums back. The host adds the tail bytes,
  finalizes, compares with the headers (a span at a time, from the arrays
  ``span_tables`` made before the loop) and only then scatters the span from
  the staging buffer into the region: by the copy engine
  (``cudaMemcpy2DAsync`` device to device per ROWS record), the executor
  (RECOVER tasks) or one ``cnc_scatter_rows`` launch (``restore_engine=
  "kernel"``). The host's share per byte is one memory copy.
* ``HostVerifiedRestore`` (``"host"``): the reader threads sum each payload
  piece by piece as they read it; the verified span goes from the pinned
  buffer to the region. The host's share per byte is a copy and a sum.

Measured on the H100 machine (2026-12-06, 4.3 GB restored, 32k tokens of an
8B-shaped model, the defaults of then): about 18 GB/s with device sums
against 8-10 GB/s with host sums (docs/gpu.md).

Invariants (both): records reach a region in log order (the scatter kernel
copies a span's records at once only when none overlap: ``span_tables``); a
record whose checksum fails raises ``CorruptLogError`` before any byte of its
span reaches the region; a pinned buffer is refilled only after the device finished
reading it (and a staging buffer only after its scatter finished); a span
goes to the device only after every one of its reader tasks has landed, and
those tasks cover each payload byte once; when ``run`` returns or raises, no
read and no device operation still uses a buffer.

Each run leaves where its time went in ``RestoreResources.last``
(``RestoreStats``; the backend's ``restore_stats``), for benchmarks and logs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RegionError
from ..records import RecordHeader
from .memory import PinnedBuffer, device_ptr
from .restore_stats import RestoreStats, waited
from .span_tables import SCATTER_WORDS, SpanTables, first_bad, placement, span_tables
from .spans import Span, payload_at, pieces, read_pieces, read_span, spans
from .tasks import LAYOUTS, TaskKind

__all__ = ["DeviceVerifiedRestore", "HostVerifiedRestore", "RestoreOptions", "RestoreResources", "RestoreStats"]

_BLOCK = 256  # threads per block of cnc_payload_sums and cnc_scatter_rows (their __launch_bounds__)
_ROW_BLOCKS = 1024  # most blocks of cnc_scatter_rows a record (each copies every 1024th row)
_GRID_Y = 65535  # CUDA's limit on a grid's y dimension: records a launch


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    """The backend's restore options (docs/gpu.md, "Options")."""

    #: who scatters verified records: "copy" (the copy engine, a call per record), "executor" (RECOVER tasks)
    #: or "kernel" (device sums only: one cnc_scatter_rows launch a span; not the default until measured)
    engine: str = "copy"
    verify: str = "device"  #: where payloads are summed: "device" (kernels/verify.cu) or "host" (reader threads)
    # The device path's defaults since the H100 runs of 2026-12-07 19:25 and 19:33 (8B at 8k, 1.08 GB;
    # docs/gpu.md "Recovery"): 64 MiB spans read in 4 MiB pieces by 15 threads restored at 23-25 GB/s
    # where 16 MiB spans read whole by 8 threads (the earlier defaults) ran at 16-19 in the same runs. The
    # host path reads a span as one task, so it keeps the earlier 8 x 16 MiB (its last measured setting).
    span: int | None = None  #: bytes per pinned buffer (None: 64 MiB with device sums, 16 MiB with host sums)
    depth: int | None = None  #: pinned buffers in flight, at least 2 (None: 4 with device sums, 8 with host)
    #: bytes per reader task with device sums (0: one task per span): a span read in pieces on several threads
    #: lands sooner, so larger spans (fewer of the calling thread's per-span steps) need not wait longer
    piece: int = 4 << 20
    threads: int | None = None  #: reader threads (default min(15, cores - 1))
    #: allocate the pinned pool on a thread of its own when the backend is made (``prepare``): on since
    #: the H100 run of 2026-12-07, where a runtime's first 8k restore ran at 24.9 GB/s with it and 11.6
    #: without (the pool's page-locking was half of the restore; docs/gpu.md)
    prepare: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ("executor", "copy", "kernel"):
            raise RegionError(f"restore_engine: expected 'executor', 'copy' or 'kernel', found {self.engine!r}")
        if self.verify not in ("host", "device"):
            raise RegionError(f"restore_verify: expected 'host' or 'device', found {self.verify!r}")
        if self.engine == "kernel" and self.verify != "device":
            raise RegionError("restore_engine 'kernel' scatters from the device staging buffer, which only "
                              f"restore_verify 'device' fills: expected restore_verify 'device', found {self.verify!r}")
        if self.piece < 0:
            raise RegionError(f"restore_piece: expected 0 (a task per span) or a byte count, found {self.piece}")

    @property
    def span_bytes(self) -> int:
        return self.span or (64 << 20 if self.verify == "device" else 16 << 20)

    @property
    def buffers(self) -> int:
        return max(2, self.depth or (4 if self.verify == "device" else 8))

    @property
    def reader_threads(self) -> int:
        return self.threads or max(1, min(15, (os.cpu_count() or 2) - 1))


class RestoreResources:
    """What both pipelines (and the backend's one-record ``apply``) use: the
    executor, a pool of pinned buffers (allocated on first use, or ahead of
    it by ``prepare``, and kept until ``close``: pinning is slow, and freeing
    pinned memory synchronizes the device), a non-blocking restore stream,
    and the two scatter routes."""

    _RECOVER = LAYOUTS["RECOVER"]

    def __init__(self, executor: Any, options: RestoreOptions) -> None:
        import cupy

        self._cupy = cupy
        self.executor = executor
        self.options = options
        self.depth = options.buffers
        self._buffers: list[PinnedBuffer] = []
        self._stream: Any = None
        self.last: RestoreStats | None = None  #: the last pipeline run's (module docs)
        self._preparing: threading.Thread | None = None
        self._prepared: list[PinnedBuffer] = []
        self._pool_lock = threading.Lock()  # prepare, pool and close may be called from different threads
        self.prepared_pools = 0  #: pools taken from prepare's thread (tests check that path ran)

    def prepare(self) -> None:
        """Start allocating the pool at its usual size (``span`` bytes a buffer)
        on a thread of its own, unless it exists or is being made; ``pool``
        waits for the thread and takes its buffers. The backend calls this at
        its construction when ``restore_prepare`` is on, so that a process's
        first restore, which comes after the model's load, finds the pool made.
        Why: the pool's page-locking (then 8 x 16 MiB) falls inside a process's first
        restore; on the H100 (8B conversation at 8k, docs/gpu.md) restores that
        were the first of their runtime ran at 13.7 GB/s, and ones after an
        earlier restore in the same runtime at 25 GB/s. A failure here (no
        page-locked memory, no thread) is left to the restore, which allocates
        again and raises."""
        with self._pool_lock:
            if self._buffers or self._preparing is not None:
                return
            thread = threading.Thread(target=self._allocate_prepared, args=(self.executor.device_id,),
                                      name="concordia-restore-pool", daemon=True)
            thread.start()  # recorded only once started: a failed start leaves the allocation to pool()
            self._preparing = thread

    def _allocate_prepared(self, device: int) -> None:
        """``prepare``'s thread: the pool on the executor's device (page-locked
        memory is pinned for the context current where it is allocated, and a
        new thread starts on device 0)."""
        made: list[PinnedBuffer] = []
        try:
            self._cupy.cuda.runtime.setDevice(device)
            for _ in range(self.depth):
                made.append(PinnedBuffer(self.options.span_bytes))
        except Exception:  # noqa: BLE001 - the restore allocates again and reports it
            for buf in made:
                buf.close()
            made = []
        self._prepared = made

    def _adopt_prepared(self) -> None:
        """Wait for ``prepare``'s thread, if any, and take its buffers as the
        pool (the caller holds ``_pool_lock``)."""
        thread, self._preparing = self._preparing, None
        if thread is None:
            return
        thread.join()
        made, self._prepared = self._prepared, []
        if made and not self._buffers:
            self._buffers = made
        else:
            for buf in made:
                buf.close()

    def pool(self, need: int) -> list[PinnedBuffer]:
        """Pinned buffers of at least ``need`` bytes, ``depth`` of them (a span
        larger than ``span`` bytes replaces a prepared pool, paying its
        page-locking again)."""
        with self._pool_lock:
            before = self._buffers
            self._adopt_prepared()
            self.prepared_pools += self._buffers is not before
            if not self._buffers or self._buffers[0].nbytes < need:
                for buf in self._buffers:
                    buf.close()
                self._buffers = [PinnedBuffer(need) for _ in range(self.depth)]
            return self._buffers

    def stream(self) -> Any:
        if self._stream is None:
            self._stream = self._cupy.cuda.Stream(non_blocking=True)
        return self._stream

    def recover(self, region: Any, h: RecordHeader, src: int) -> int:
        """A RECOVER task applying the record whose payload is at device address
        ``src`` (mapped pinned or device memory); returns its ticket."""
        return self.executor.enqueue(
            TaskKind.RECOVER, self._RECOVER.pack(src=src, type=int(h.type), offset=h.offset, aux=h.aux,
                                                 length=h.length, region=region.index), handler=region.handler)

    def copy_record(self, region: Any, h: RecordHeader, src: int, stream: Any, *, from_device: bool = False) -> None:
        """One record to the device on the copy engine, from pinned host memory
        or (``from_device``) a device staging buffer."""
        rt = self._cupy.cuda.runtime
        at, width, pitch, rows = placement(region.spec, h)
        kind = rt.memcpyDeviceToDevice if from_device else rt.memcpyHostToDevice
        if rows != 1:  # a ROWS record: ``outer`` rows (0 in a region with an empty leading dimension: no copy)
            rt.memcpy2DAsync(device_ptr(region.array) + at, pitch, src, width, width, rows, kind, stream.ptr)
        else:
            rt.memcpyAsync(device_ptr(region.array) + at, src, width, kind, stream.ptr)

    def close(self) -> None:
        with self._pool_lock:
            self._adopt_prepared()
            for buf in self._buffers:
                buf.close()
            self._buffers = []


def _mark(ticket: int | None, stream: Any) -> Any:
    """What to wait for before a buffer is reused: the executor ticket that last
    reads it, or an event recorded now on ``stream`` (copy engine)."""
    if ticket is not None:
        return ticket
    import cupy

    ev = cupy.cuda.Event(block=False, disable_timing=True)
    ev.record(stream)
    return ev


def _settle(res: RestoreResources, busy: list[Any], i: int) -> None:
    """Wait until no device operation reads buffer ``i`` any more."""
    mark, busy[i] = busy[i], None
    if isinstance(mark, int):
        res.executor.wait(mark)
    elif mark is not None:
        mark.synchronize()


def _drain(res: RestoreResources, loads: Sequence[Future[None]], busy: list[Any], stats: RestoreStats) -> None:
    """On the way out (normal or not): cancel queued reads, let running ones
    finish, and wait for every device read of a buffer, so the pool can be reused."""
    for f in loads:
        f.cancel()
    for f in loads:
        if not f.cancelled():
            waited(stats, "read_wait_s", f.exception)
    for i in range(len(busy)):
        waited(stats, "device_wait_s", _settle, res, busy, i)


class DeviceVerifiedRestore:
    """Restores a region's records, checksums on the device; owned by one
    backend, one ``run`` at a time."""

    def __init__(self, res: RestoreResources) -> None:
        import cupy

        from .compiler import compile_cubin, kernel_source

        self._cupy = cupy
        self.res = res
        self._stage: list[Any] = []  # device staging buffers, one per pinned pool buffer
        self._sum_buffers: list[Any] = []
        self._most = 0
        # Loaded now, before the backend's executor first runs: a module load
        # waits while any kernel is resident.
        module = cupy.cuda.function.Module()
        module.load(compile_cubin(kernel_source("verify.cu"), arch=res.executor.arch, name="verify.cu").cubin)
        self._module = module
        self._sums_fn = module.get_function("cnc_payload_sums")
        self._scatter_fn = module.get_function("cnc_scatter_rows")

    # -- buffers --------------------------------------------------------------------

    def _staging(self, pool: list[Any]) -> list[Any]:
        """A device staging buffer per pinned pool buffer, of its size (kept;
        remade when the pool was)."""
        if len(self._stage) != len(pool) or self._stage[0].nbytes != pool[0].nbytes:
            self._stage = [self._cupy.empty(buf.nbytes, dtype=self._cupy.uint8) for buf in pool]
        return self._stage

    def _tables(self, depth: int, most: int) -> tuple[Any, Any, Any]:
        """Pinned tables, read by the kernels through the mapping, for at least
        ``most`` records a span in each of ``depth`` slots (a run indexes them
        with its own ``most``): the sums kernel's (payload offset, whole words),
        the sums it returns, and the scatter kernel's entries (kernel engine
        only, else None: page-locking synchronizes the device); kept and grown
        (a pinned free synchronizes the device too)."""
        if self._most < most:
            for buf in self._sum_buffers:
                buf.close()
            self._sum_buffers = [PinnedBuffer(depth * most * 16), PinnedBuffer(depth * most * 8)]
            if self.res.options.engine == "kernel":
                self._sum_buffers.append(PinnedBuffer(depth * most * 8 * SCATTER_WORDS))
            self._most = most
        scatters = self._sum_buffers[2] if len(self._sum_buffers) > 2 else None
        return self._sum_buffers[0], self._sum_buffers[1], scatters

    def close(self) -> None:
        for buf in self._sum_buffers:
            buf.close()
        self._stage, self._sum_buffers, self._most = [], [], 0

    def _scatter(self, region: Any, group: list[Any], t: SpanTables, src: int,
                 slot: tuple[np.ndarray, int] | None, busy: list[Any], i: int) -> None:
        """A verified span's records from its staging buffer (at device address
        ``src``) into the region: one RECOVER task each (executor engine; each
        ticket goes to ``busy[i]`` as it is queued, so that a failed enqueue
        still leaves the queued ones to be waited for), one copy call each
        (copy engine), or one scatter kernel launch a span reading its entries
        from its ``slot`` of the pinned scatter table (the slot's array and its
        mapped address; kernel engine, for a span whose records do not overlap,
        as one epoch's never do); the last two on the restore stream."""
        engine, stream = self.res.options.engine, self.res.stream()
        if slot is not None and t.disjoint:
            table, table_ptr = slot
            table[:SCATTER_WORDS * len(group)] = t.scatter(src, device_ptr(region.array)).reshape(-1)
            rows = max(1, min(_ROW_BLOCKS, int(t.places[:, 3].max())))
            for first in range(0, len(group), _GRID_Y):
                self._scatter_fn((rows, min(_GRID_Y, len(group) - first)), (_BLOCK,),
                                 (self._cupy.uint64(table_ptr + 8 * SCATTER_WORDS * first),), stream=stream)
            return
        for loc, at in zip(group, t.offsets.tolist(), strict=True):
            if engine == "executor":
                busy[i] = int(self.res.recover(region, loc.header, src + at))
            else:  # the copy engine, or overlapping records in log order on one stream
                self.res.copy_record(region, loc.header, src + at, stream, from_device=True)

    # -- run ----------------------------------------------------------------------------

    def run(self, region: Any, locs: Sequence[Any], reader: Any) -> None:
        """Restore ``locs`` (in log order) into ``region``."""
        groups = spans(locs, self.res.options.span_bytes)
        stats = self.res.last = RestoreStats.of(locs, groups)
        pool = waited(stats, "alloc_s", self.res.pool, max(n for _, _, n, _ in groups))
        try:
            with ThreadPoolExecutor(self.res.options.reader_threads) as threads:
                self._run(region, groups, pool, waited(stats, "alloc_s", self._staging, pool), reader, threads,
                          stats)
        finally:
            stats.done()

    def _run(self, region: Any, groups: list[Span], pool: list[Any], stage: list[Any], reader: Any,
             threads: ThreadPoolExecutor, stats: RestoreStats) -> None:
        cp, rt = self._cupy, self._cupy.cuda.runtime
        stream = self.res.stream()
        depth = len(pool)
        most = max(len(g) for _, _, _, g in groups)
        tables, host_sums, scatters = waited(stats, "alloc_s", self._tables, depth, most)
        dev_sums = waited(stats, "alloc_s", cp.zeros, (depth, most), cp.uint64)
        summed: list[Any] = [None] * depth  # event: span's copy, sums and sums' copy back are done
        busy: list[Any] = [None] * depth  # executor ticket / event: the staging buffer is still read
        span_t: list[SpanTables] = []

        def load(i: int, span: Span) -> list[Future[None]]:
            return [threads.submit(read_pieces, reader, pool[i], task)
                    for task in pieces(span, self.res.options.piece)]

        def landed(k: int) -> None:
            for f in loads[k]:
                f.result()
            del loads[k]  # only now: on a failed piece, _drain still waits for the span's other pieces

        def send(k: int) -> None:
            """Stage span k on the device and sum its records there."""
            i, t, (_, _, nbytes, group) = k % depth, span_t[k], groups[k]
            # the executor engine reads the staging buffer outside the stream's order
            waited(stats, "device_wait_s", _settle, self.res, busy, i)
            tables.view(np.uint64)[2 * most * i:2 * most * i + t.sums.size] = t.sums.reshape(-1)
            rt.memsetAsync(dev_sums[i].data.ptr, 0, 8 * most, stream.ptr)
            rt.memcpyAsync(stage[i].data.ptr, pool[i].ptr, nbytes, rt.memcpyHostToDevice, stream.ptr)
            per = max(1, min(64, -(-t.longest_words // (_BLOCK * 8))))
            for first in range(0, len(group), _GRID_Y):  # a span of many small records: launches of 65535
                self._sums_fn((per, min(_GRID_Y, len(group) - first)), (_BLOCK,),
                              (stage[i], cp.uint64(tables.device_ptr + 16 * (most * i + first)), dev_sums[i][first:]),
                              stream=stream)
            rt.memcpyAsync(host_sums.ptr + 8 * most * i, dev_sums[i].data.ptr, 8 * len(group),
                           rt.memcpyDeviceToHost, stream.ptr)
            summed[i] = _mark(None, stream)

        def check_and_scatter(k: int) -> None:
            i, t, group = k % depth, span_t[k], groups[k][3]
            waited(stats, "device_wait_s", summed[i].synchronize)
            bad = first_bad(t, host_sums.view(np.uint64)[most * i:most * i + len(group)], pool[i].array)
            if bad >= 0:
                reader.raise_corrupt(group[bad])
            slot = None
            if scatters is not None:  # the kernel engine: span k's slot of the scatter table
                at = SCATTER_WORDS * most * i
                slot = (scatters.view(np.uint64)[at:at + SCATTER_WORDS * most], scatters.device_ptr + 8 * at)
            self._scatter(region, group, t, stage[i].data.ptr, slot, busy, i)
            busy[i] = _mark(busy[i], stream)

        loads: dict[int, list[Future[None]]] = {}
        try:
            for k in range(min(depth, len(groups))):
                loads[k] = load(k, groups[k])
            # made while the first spans are read: the loop below has no step per record
            span_t.extend(span_tables(g, region.spec) for g in groups)
            for k in range(len(groups)):
                waited(stats, "read_wait_s", landed, k)
                send(k)
                if k:
                    check_and_scatter(k - 1)
                    # Span k - 1's pinned buffer was copied (its event was waited for): refill it.
                    nxt = k - 1 + depth
                    if nxt < len(groups):
                        loads[nxt] = load(nxt % depth, groups[nxt])
            check_and_scatter(len(groups) - 1)
        finally:
            _drain(self.res, [f for fs in loads.values() for f in fs], busy, stats)
            # no sum, copy or scatter still reads the tables or the pool
            waited(stats, "device_wait_s", stream.synchronize)


class HostVerifiedRestore:
    """Restores a region's records, checksums summed by the reader threads
    (``restore_verify="host"``); owned by one backend, one ``run`` at a time.

    Reader threads ``pread`` spans into the backend's pinned buffers, verifying
    each payload piece by piece as it arrives (NumPy releases the GIL); the
    calling thread hands verified spans to the device in log order, as copy-
    engine copies on the restore stream or as RECOVER tasks reading the mapped
    pinned buffer. A buffer is refilled only after the device finished reading
    it; a failed checksum raises before its span reaches the region."""

    def __init__(self, res: RestoreResources) -> None:
        self.res = res

    def close(self) -> None:
        """Nothing of its own to free (the pool and stream are the resources')."""

    def run(self, region: Any, locs: Sequence[Any], reader: Any) -> None:
        """Restore ``locs`` (in log order) into ``region``."""
        res = self.res
        groups = spans(locs, res.options.span_bytes)
        stats = res.last = RestoreStats.of(locs, groups)
        pool = waited(stats, "alloc_s", res.pool, max(n for _, _, n, _ in groups))
        try:
            self._run(region, groups, pool, reader, stats)
        finally:
            stats.done()

    def _run(self, region: Any, groups: list[Span], pool: list[Any], reader: Any, stats: RestoreStats) -> None:
        res = self.res
        copy = res.options.engine == "copy"
        stream = res.stream() if copy else None
        busy: list[Any] = [None] * len(pool)  # per buffer: executor ticket or CUDA event still reading it

        def load(i: int, span: Span) -> None:
            # One reader task per span: measured on the H100 host, one task per
            # record (15 threads busy instead of 7) restored 4 GiB slower.
            read_span(reader.read_verified, pool[i], span)

        depth = len(pool)
        loads: dict[int, Future[None]] = {}
        with ThreadPoolExecutor(res.options.reader_threads) as threads:
            try:
                for k in range(min(depth - 1, len(groups))):
                    loads[k] = threads.submit(load, k, groups[k])
                for k, (_, start, _, group) in enumerate(groups):
                    i = k % depth
                    # raises CorruptLogError before the device sees the span
                    waited(stats, "read_wait_s", loads.pop(k).result)
                    for loc in group:  # busy[i] is None here: its buffer was settled before this span's read
                        at = payload_at(loc, start)
                        if copy:
                            res.copy_record(region, loc.header, pool[i].ptr + at, stream)
                        else:  # each ticket kept as queued: after a failed enqueue _drain waits for the rest
                            busy[i] = res.recover(region, loc.header, pool[i].device_ptr + at)
                    busy[i] = _mark(busy[i], stream)
                    # Refill the buffer of span k - 1 (span k stays queued, so the
                    # device does not idle while we wait for it).
                    nxt = k + depth - 1
                    if nxt < len(groups):
                        waited(stats, "device_wait_s", _settle, res, busy, nxt % depth)
                        loads[nxt] = threads.submit(load, nxt % depth, groups[nxt])
            finally:
                _drain(res, list(loads.values()), busy, stats)  # no device read of a pool buffer outlives this call
