"""The CuPy backend: checkpoints run in the persistent executor on the GPU.

Per commit (``commit_epoch``), in ring order:

1. A device-side fence on each caller stream (``cuStreamWriteValue64``) and a
   FENCE_WAIT task: the executor copies only after the work queued before the
   commit has finished; the host does not synchronize.
2. Per region: a REGION record the first time (built on the host, stored in the
   ring beyond ``written``); for kv regions a CHECKPOINT task gathering rows
   ``[t0, t1)`` into ROWS records at reserved log offsets; for pages regions a
   SCAN task (page hashes on the device, dirty bitmap into pinned memory), a
   host wait for it, then a CHECKPOINT task copying the dirty runs.
3. After each group of data records, an APPEND_LOG task publishes ``written``
   so the flusher can drain an epoch larger than the ring; the COMMIT record
   goes last and its APPEND_LOG publishes ``committed``.

``commit_epoch`` returns when everything is enqueued (kv-only epochs never
wait on the device; epochs with pages regions wait for the scan). The epoch is
visible in the ring once its APPEND_LOG task ran (``Session.wait_visible``).
Records are framed exactly as the host backend frames them, chunked the same
way, so replay, compaction and the flusher cannot tell the backends apart.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from .backend import Backend, BackendRegion, Capability, CheckpointTask
from .errors import RegionError
from .executor import Executor, Handler, PinnedBuffer, TaskKind, register_host_memory
from .host import plan_chunks
from .logring import DATA_START, LogRing
from .logwriter import LogWriter
from .records import RecordHeader, RecordType, encode_record, record_size
from .regions import RegionSpec, describe

__all__ = ["CupyBackend", "CupyRegion"]

_GROUP_BYTES = 16 << 20  # data bytes per CHECKPOINT task before `written` is published


def _device_ptr(array: Any) -> int:
    mod = type(array).__module__.split(".")[0]
    return int(array.data_ptr()) if mod == "torch" else int(array.data.ptr)


def _stream_of(array: Any) -> int:
    """The stream on which the caller's work on ``array`` is queued."""
    if type(array).__module__.split(".")[0] == "torch":
        import torch

        return int(torch.cuda.current_stream(array.device).cuda_stream)
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


class CupyRegion(BackendRegion):
    def __init__(self, spec: RegionSpec, array: Any, *, index: int, handler: int, hashes: Any,
                 bitmap: PinnedBuffer | None) -> None:
        super().__init__(spec, array)
        self.index = index
        self.handler = handler
        self.hashes = hashes
        self.bitmap = bitmap
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
                 fence_timeout_s: float = 10.0) -> None:
        import cupy

        self._cupy = cupy
        self.executor = Executor(blocks=blocks, idle_ms=idle_ms, max_life_ms=max_life_ms)
        self._fence = cupy.zeros(1, dtype=cupy.uint64)
        self._fence_value = 0
        self._fence_timeout_ns = int(fence_timeout_s * 1e9)
        self._rings: dict[int, tuple[int, int]] = {}
        self._inflight: list[tuple[int, PinnedBuffer]] = []
        self._staging: list[tuple[int, PinnedBuffer]] = []
        self._lock = threading.Lock()

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
            if spec.page_size % 16 or spec.nbytes % spec.page_size:
                raise RegionError(f"region {spec.name!r}: the GPU page scanner needs a page size that is a multiple "
                                  f"of 16 and divides the region ({spec.nbytes} bytes), found {spec.page_size}")
            handler = Handler("pages", spec.page_size)
            hashes = self._cupy.zeros(spec.npages, dtype=self._cupy.uint64)
            bitmap = PinnedBuffer(4 * (-(-spec.npages // 32)))
        hid = self.executor.handler_id(handler)
        words = np.array([
            _device_ptr(array), spec.nbytes, spec.outer if spec.kind == "kv" else 0,
            spec.rows if spec.kind == "kv" else 0, spec.row_bytes if spec.kind == "kv" else 0,
            spec.page_size, spec.npages, int(hashes.data.ptr) if hashes is not None else 0,
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
                self.executor.ctl[1] = 0  # un-stop
                if self.executor.pending:
                    self.executor.ensure_running()

            ring.on_close.append(unregister)
        return self._rings[key]

    # -- commit -------------------------------------------------------------------

    def _fence_streams(self, tasks: Sequence[CheckpointTask]) -> None:
        from cuda.bindings import driver

        streams = {_stream_of(t.region.array) for t in tasks}
        self._fence_value += 1
        for s in sorted(streams):
            (err,) = driver.cuStreamWriteValue64(s, int(self._fence.data.ptr), self._fence_value, 0)
            if err != driver.CUresult.CUDA_SUCCESS:
                raise RegionError(f"cuStreamWriteValue64 on stream {s:#x} failed: {err}")
        self.executor.enqueue(TaskKind.FENCE_WAIT,
                              [int(self._fence.data.ptr), self._fence_value, self._fence_timeout_ns])

    def _publish(self, words: int, written: int, epoch: int = 0) -> int:
        return self.executor.enqueue(TaskKind.APPEND_LOG, [words, written, epoch])

    def commit_epoch(self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask], body: bytes) -> int:
        ring = writer.ring
        words, data = self._ring(ring)
        self._reap()
        start = writer.position
        n = 0
        scanned: list[CupyRegion] = []
        try:
            if tasks:
                self._fence_streams(tasks)
            for task in tasks:
                region = task.region
                assert isinstance(region, CupyRegion)
                if not region.described:
                    rec = encode_record(RecordType.REGION, region.spec.to_json(), session_tag=writer.session_tag,
                                        epoch=epoch, region=region.spec.region_id)
                    at = writer.reserve(len(rec))
                    ring.write_at(at, rec)
                    self._publish(words, at + len(rec))
                    n += 1
                if region.spec.kind == "pages":
                    scanned.append(region)
                    n += self._pages(writer, words, data, epoch, region)
                elif task.rows is not None:
                    n += self._rows(writer, words, data, epoch, region, task.rows)
            rec = encode_record(RecordType.COMMIT, body, session_tag=writer.session_tag, epoch=epoch,
                                offset=start, aux=n)
            at = writer.reserve(len(rec))
            ring.write_at(at, rec)
            self._publish(words, at + len(rec), epoch)
        except BaseException:
            for region in scanned:
                region.force_full = True  # the device baseline moved without a commit
            raise
        for task in tasks:
            task.region.described = True
        return at + len(rec)

    def _rows(self, writer: LogWriter, words: int, data: int, epoch: int, region: CupyRegion,
              rows: tuple[int, int]) -> int:
        spec = region.spec
        t0, t1 = rows
        if not 0 <= t0 <= t1 <= spec.rows:
            raise RegionError(f"region {spec.name!r}: expected a row range within [0, {spec.rows}], found [{t0}, {t1})")
        if t0 == t1:
            return 0
        unit = spec.outer * spec.row_bytes
        per = plan_chunks(unit, writer.max_record_bytes)
        group_rows = max(per, (min(_GROUP_BYTES, writer.ring.capacity // 4) // (per * unit)) * per)
        n = 0
        for g0 in range(t0, t1, group_rows):
            g1 = min(g0 + group_rows, t1)
            nrec = -(-(g1 - g0) // per)
            size = sum(record_size(unit * min(per, g1 - (g0 + i * per))) for i in range(nrec))
            at = writer.reserve(size)
            self.executor.enqueue(TaskKind.CHECKPOINT, [data, writer.ring.capacity, epoch, g0, g1, per, at,
                                                        writer.session_tag, 0, 0, 0, 0, 0, region.index],
                                  handler=region.handler)
            self._publish(words, at + size)
            n += nrec
        return n

    def _pages(self, writer: LogWriter, words: int, data: int, epoch: int, region: CupyRegion) -> int:
        spec = region.spec
        ex = self.executor
        ticket = ex.enqueue(TaskKind.SCAN, [int(region.force_full)] + [0] * 12 + [region.index],
                            handler=region.handler)
        ex.wait(ticket)
        region.force_full = False
        assert region.bitmap is not None
        bits = np.unpackbits(region.bitmap.array[: 4 * (-(-spec.npages // 32))], bitorder="little")[: spec.npages]
        idx = np.flatnonzero(bits)
        if idx.size == 0:
            return 0
        breaks = np.flatnonzero(np.diff(idx) != 1)
        starts = np.concatenate(([idx[0]], idx[breaks + 1]))
        ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
        per = plan_chunks(spec.page_size, writer.max_record_bytes)
        pieces = [(q * spec.page_size, (min(q + per, p1) - q) * spec.page_size)
                  for p0, p1 in zip(starts.tolist(), ends.tolist(), strict=True) for q in range(p0, p1, per)]
        budget = min(_GROUP_BYTES, writer.ring.capacity // 4)
        n, i = 0, 0
        while i < len(pieces):
            group, size = [], 0
            while i < len(pieces) and (not group or size + record_size(pieces[i][1]) <= budget):
                group.append(pieces[i])
                size += record_size(pieces[i][1])
                i += 1
            at = writer.reserve(size)
            runs = PinnedBuffer(24 * len(group))
            table = runs.view(np.uint64)[: 3 * len(group)].reshape(-1, 3)
            pos = at
            for k, (off, length) in enumerate(group):
                table[k] = (off, length, pos)
                pos += record_size(length)
            ticket = ex.enqueue(TaskKind.CHECKPOINT, [data, writer.ring.capacity, epoch, runs.device_ptr, len(group),
                                                      writer.session_tag] + [0] * 7 + [region.index],
                                handler=region.handler)
            with self._lock:
                self._inflight.append((ticket, runs))
            self._publish(words, at + size)
            n += len(group)
        return n

    def _reap(self) -> None:
        head = self.executor.head
        with self._lock:
            keep = []
            for ticket, buf in self._inflight:
                if ticket < head:
                    buf.close()
                else:
                    keep.append((ticket, buf))
            self._inflight = keep

    # -- recovery -------------------------------------------------------------------

    def apply(self, region: BackendRegion, header: RecordHeader, payload: memoryview) -> None:
        assert isinstance(region, CupyRegion)
        n = len(payload)
        buf = self._staging_buffer(n)
        buf.array[:n] = np.frombuffer(payload, np.uint8)
        ticket = self.executor.enqueue(
            TaskKind.RECOVER, [buf.device_ptr, int(header.type), header.offset, header.aux, header.length]
            + [0] * 8 + [region.index], handler=region.handler)
        with self._lock:
            self._staging.append((ticket, buf))

    def _staging_buffer(self, n: int) -> PinnedBuffer:
        """A pinned buffer of at least ``n`` bytes that no queued task still reads."""
        with self._lock:
            pool = self._staging
            if len(pool) >= 4:
                ticket, buf = pool.pop(0)
                self.executor.wait(ticket)
                if buf.nbytes >= n:
                    return buf
                buf.close()
        return PinnedBuffer(max(n, 4 << 20))

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
        self.wait_idle(timeout)  # the epoch's APPEND_LOG is the newest task of its session

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until every enqueued task has run."""
        if self.executor._tail:
            self.executor.wait(self.executor._tail - 1, timeout)

    def describe(self) -> dict[str, Any]:
        import cupy

        d = super().describe()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        d.update(device=props["name"].decode(), blocks=self.executor.blocks, swaps=self.executor.swaps,
                 handlers=[h.macro(i) for i, h in enumerate(self.executor.handlers)])
        return d

    def close(self) -> None:
        self.executor.close()
        with self._lock:
            for _, buf in self._inflight + self._staging:
                buf.close()
            self._inflight, self._staging = [], []
