"""The CuPy backend: checkpoints run in the persistent executor on the GPU.

The backend contract (``gpu_runtime/backend.py``) on top of this package's
parts, one concept per module:

* ``executor.py`` — the persistent kernel's host side (task ring, launches,
  parking, hot swap of handler specializations); ``tasks.py`` — the typed task
  layouts it carries; ``compiler.py`` — NVRTC with an on-disk cache.
* ``commit.py`` — the commit paths (per-token, fused pages, general), which
  write the planner's records (``gpu_runtime/planner.py``) byte for byte as
  the host backend does; ``fences.py`` — ordering a commit after the callers'
  streams; ``memory.py`` — pinned and registered memory.
* ``restore.py`` — the restore pipelines (``apply_records``).
* ``instrument.py`` / ``ptx.py`` — the module-load interposer (independent of
  this class).

Per-region state (operator-table index, handler, page hashes, dirty bitmap)
lives in ``region.py``'s ``CupyRegion``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from ..backend import Backend, BackendRegion, Capability, CheckpointTask
from ..errors import RegionError
from ..logring import LogRing
from ..logwriter import LogWriter
from ..records import RecordHeader
from ..regions import RegionSpec, describe
from .commit import CommitPaths
from .executor import Executor, Handler
from .memory import PinnedBuffer, device_ptr
from .region import CupyRegion
from .restore import DeviceVerifiedRestore, HostVerifiedRestore, RestoreOptions, RestoreResources, RestoreStats
from .step_commit import StepCommitter
from .tasks import LAYOUTS, TaskKind

__all__ = ["CupyBackend", "CupyRegion"]

_STAGING = 4 << 20  # pinned bytes per buffer of ``apply``'s rotating pool
_SCAN = LAYOUTS["SCAN"]


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
                 restore_span: int | None = None, restore_depth: int | None = None, restore_threads: int | None = None,
                 restore_verify: str = "device", restore_prepare: bool = True, restore_piece: int = 4 << 20,
                 ring_prepare: bool = False, fused_pages: bool = False) -> None:
        import cupy

        restore = RestoreOptions(engine=restore_engine, verify=restore_verify, span=restore_span,
                                 depth=restore_depth, threads=restore_threads,
                                 prepare=restore_prepare, piece=restore_piece)  # checked before any allocation
        self._cupy = cupy
        self.executor = Executor(blocks=blocks, idle_ms=idle_ms, max_life_ms=max_life_ms,
                                 fence_yield_ms=fence_yield_ms, fused_pages=fused_pages)
        self._restore = RestoreResources(self.executor, restore)
        # Measured on the H100 (4.3 GB at 32k tokens): 18 GB/s with the sums on the
        # device, 8-10 GB/s with the reader threads summing (docs/gpu.md).
        self._restorer: DeviceVerifiedRestore | HostVerifiedRestore = (
            DeviceVerifiedRestore(self._restore) if restore.verify == "device" else HostVerifiedRestore(self._restore))
        # Pinned memory is allocated here, once: cudaHostAlloc/cudaFreeHost
        # synchronize the device, i.e. they would wait for the executor to park.
        self.commits = CommitPaths(self.executor, fence_timeout_s=fence_timeout_s, fused_pages=fused_pages)
        self._staging: list[tuple[int, PinnedBuffer]] = [(-1, PinnedBuffer(_STAGING)) for _ in range(4)]
        self._lock = threading.Lock()
        self._ring_prepare = ring_prepare
        if restore.prepare:  # last: nothing after it can fail and leave its thread's buffers unowned
            self._restore.prepare()  # on a thread of its own: a first restore finds the pool made

    @property
    def fused_pages(self) -> bool:
        """One-region pages epochs as one SCAN_COMMIT task (``commit.py``);
        settable (False: the general path, a benchmark's baseline)."""
        return self.commits.fused_pages

    @fused_pages.setter
    def fused_pages(self, value: bool) -> None:
        self.commits.fused_pages = value

    @property
    def fused_commits(self) -> int:
        """Pages epochs committed by one SCAN_COMMIT task."""
        return self.commits.fused_commits

    @property
    def fused_fallbacks(self) -> int:
        """SCAN_COMMIT tasks whose records did not fit (the general path went on)."""
        return self.commits.fused_fallbacks

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
            if spec.rows > 0xFFFFFFFF:  # row indices travel in 32-bit task fields (tasks.py)
                raise RegionError(f"region {spec.name!r}: the GPU handlers take at most 2**32 - 1 rows along "
                                  f"the sequence axis, found {spec.rows}")
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
            device_ptr(array), spec.nbytes, spec.outer if spec.kind == "kv" else 0,
            spec.rows if spec.kind == "kv" else 0, spec.row_bytes if spec.kind == "kv" else 0,
            spec.page_size, spec.npages, device_ptr(hashes) if hashes is not None else 0,
            bitmap.device_ptr if bitmap is not None else 0, spec.region_id,
        ], dtype=np.uint64)
        index = self.executor.set_region(None, words)
        return CupyRegion(spec, array, index=index, handler=hid, hashes=hashes, bitmap=bitmap)

    # -- commit -------------------------------------------------------------------

    def commit_epoch(self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask], body: bytes, *,
                     fence: bool = True) -> int:
        """Enqueue the epoch on one of the commit paths (``commit.py``)."""
        return self.commits.commit(writer, epoch, tasks, body, fence=fence)

    def step_committer(self, writer: LogWriter, *, owner_token: int, kv: BackendRegion, tokens: BackendRegion,
                       template: bytes, slots: int, every: int, space_timeout_s: float) -> StepCommitter:
        """The in-step producer (``step_commit.py``) writing ``writer``'s ring."""
        assert isinstance(kv, CupyRegion) and isinstance(tokens, CupyRegion)
        header, _ = self.commits.ring(writer.ring)
        props = self._cupy.cuda.runtime.getDeviceProperties(self._cupy.cuda.Device().id)
        return StepCommitter(arch=self.executor.arch, sms=int(props["multiProcessorCount"]), ring=writer.ring,
                             ring_header=header, session_tag=writer.session_tag, owner_token=owner_token,
                             max_record_bytes=writer.max_record_bytes, kv=kv, tokens=tokens, template=template,
                             slots=slots, every=every, space_timeout_s=space_timeout_s)

    # -- recovery -------------------------------------------------------------------

    def apply(self, region: BackendRegion, header: RecordHeader, payload: memoryview) -> None:
        assert isinstance(region, CupyRegion)
        n = len(payload)
        buf = self._staging_buffer(n)
        buf.array[:n] = np.frombuffer(payload, np.uint8)
        ticket = self._restore.recover(region, header, buf.device_ptr)
        with self._lock:
            self._staging.append((ticket, buf))

    def apply_records(self, region: BackendRegion, locs: Sequence[Any], reader: Any) -> None:
        """Restore pipeline (``gpu_runtime/cuda/restore.py``): reader threads ``pread``
        runs of adjacent records into pinned buffers; their checksums are summed
        on the GPU (``restore_verify="device"``, the default) or by the reader
        threads (``"host"``); verified records reach the region in log order by
        the copy engine (``restore_engine="copy"``), as RECOVER tasks
        (``"executor"``) or by one scatter kernel launch a span (``"kernel"``)."""
        assert isinstance(region, CupyRegion)
        if len(locs) < 2:
            super().apply_records(region, locs, reader)
            return
        self._restorer.run(region, locs, reader)

    def prepare_ring(self, ring: LogRing) -> None:
        """Page-lock a newly opened ring on a thread of its own
        (``CommitPaths.prepare_ring``) when ``ring_prepare`` is on (off by
        default until measured on a GPU: the first commit page-locks it)."""
        if self._ring_prepare:
            self.commits.prepare_ring(ring)

    @property
    def restore_stats(self) -> RestoreStats | None:
        """Where the last pipelined restore's time went (``restore.py``); None
        before the first."""
        return self._restore.last

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
            t = self.executor.enqueue(TaskKind.SCAN, _SCAN.pack(all_dirty=1, region=region.index),
                                      handler=region.handler)
            self.executor.wait(t)  # hashes now describe the restored state
            region.force_full = False
        else:
            self.executor.wait_all()
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
        self.executor.wait_all(timeout)

    def describe(self) -> dict[str, Any]:
        import cupy

        d = super().describe()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        d.update(device=props["name"].decode(), blocks=self.executor.blocks, swaps=self.executor.swaps,
                 fused_pages_commits=self.fused_commits, fused_pages_fallbacks=self.fused_fallbacks,
                 commit_paths=dict(self.commits.path_counts),
                 handlers=[h.macro(i) for i, h in enumerate(self.executor.handlers)])
        return d

    def close(self) -> None:
        self.executor.close()
        with self._lock:
            for _, buf in self._staging:
                buf.close()
            self._staging = []
            self.commits.close()
            self._restore.close()
            self._restorer.close()
