"""The host backend: the backend protocol run by the CPU on host memory.

It writes exactly the records the GPU handlers write for the same inputs (same
framing, the planner's chunking (``planner.py``), same order), so the flusher, replay and compaction
cannot tell the two apart. It is what CI runs and what users without a GPU get.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from .backend import Backend, BackendRegion, Capability, CheckpointTask
from .errors import RegionError
from .logwriter import LogWriter
from .pagehash import dirty_runs, page_hashes
from .planner import page_spans, pages_per_record, row_spans, rows_per_record
from .records import RecordHeader, RecordType
from .regions import RegionSpec, describe, host_bytes

__all__ = ["HostBackend", "HostRegion"]


class HostRegion(BackendRegion):
    def __init__(self, spec: RegionSpec, array: Any) -> None:
        super().__init__(spec, array)
        self.bytes = host_bytes(array)
        # Page hashes of the last committed state; None until the first commit,
        # which therefore writes every page.
        self.hashes: np.ndarray | None = None

    def rows_view(self) -> np.ndarray:
        s = self.spec
        return self.bytes.reshape(s.outer, s.rows, s.row_bytes)


class HostBackend(Backend):
    name: ClassVar[str] = "host"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.HOST_MEMORY})

    def attach(self, spec: RegionSpec, array: Any) -> HostRegion:
        info = describe(array)
        if info.on_device:
            raise RegionError(
                f"region {spec.name!r}: the host backend serves host memory, found an array on {info.device}; "
                "open the runtime with backend='cupy' (or 'auto' on a GPU machine)")
        return HostRegion(spec, array)

    def commit_epoch(
        self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask], body: bytes, *, fence: bool = True
    ) -> int:
        # Host regions are copied synchronously by the caller's thread: nothing to fence.
        start = writer.position
        n = 0
        staged: list[tuple[HostRegion, np.ndarray]] = []
        for task in tasks:
            region = task.region
            assert isinstance(region, HostRegion)
            if not region.described:
                writer.append(RecordType.REGION, region.spec.to_json(), epoch=epoch, region=region.spec.region_id)
                n += 1
            if region.spec.kind == "pages":
                count, hashes = self._pages(writer, epoch, region)
                n += count
                staged.append((region, hashes))
            elif task.rows is not None:
                n += self._rows(writer, epoch, region, task.rows)
        end = writer.commit(epoch, body, epoch_start=start, nrecords=n)
        # Only a committed epoch moves the baseline: if anything above raised,
        # the next attempt rewrites the same pages.
        for region, hashes in staged:
            region.hashes = hashes
        for task in tasks:
            task.region.described = True
        return end

    def _pages(self, writer: LogWriter, epoch: int, region: HostRegion) -> tuple[int, np.ndarray]:
        spec = region.spec
        new = page_hashes(region.bytes, spec.page_size)
        if region.hashes is None:
            runs = [(0, spec.npages)] if spec.npages else []
        else:
            runs = dirty_runs(region.hashes, new)
        spans = page_spans(runs, pages_per_record(spec.page_size, writer.max_record_bytes), spec.page_size,
                           spec.nbytes)
        for s in spans:
            writer.append(RecordType.PAGES, region.bytes[s.offset:s.offset + s.length], epoch=epoch,
                          region=spec.region_id, offset=s.offset)
        return len(spans), new

    def _rows(self, writer: LogWriter, epoch: int, region: HostRegion, rows: tuple[int, int]) -> int:
        spec = region.spec
        t0, t1 = rows
        if not 0 <= t0 <= t1 <= spec.rows:
            raise RegionError(f"region {spec.name!r}: expected a row range within [0, {spec.rows}], found [{t0}, {t1})")
        view = region.rows_view()
        unit = spec.outer * spec.row_bytes
        spans = row_spans(t0, t1, rows_per_record(unit, writer.max_record_bytes), unit)
        for s in spans:
            block = np.ascontiguousarray(view[:, s.offset:s.offset + s.aux, :])  # the gather: [outer, rows, inner]
            writer.append(RecordType.ROWS, block, epoch=epoch, region=spec.region_id, offset=s.offset, aux=s.aux)
        return len(spans)

    def apply(self, region: BackendRegion, header: RecordHeader, payload: memoryview) -> None:
        assert isinstance(region, HostRegion)
        data = np.frombuffer(payload, dtype=np.uint8)
        spec = region.spec
        if header.type is RecordType.PAGES:
            region.bytes[header.offset:header.offset + header.length] = data
        elif header.type is RecordType.ROWS:
            view = region.rows_view()
            view[:, header.offset:header.offset + header.aux, :] = data.reshape(spec.outer, header.aux, spec.row_bytes)
        else:
            raise ValueError(f"apply() takes PAGES or ROWS records, found {header.type.name}")

    def after_restore(self, region: BackendRegion) -> None:
        assert isinstance(region, HostRegion)
        if region.spec.kind == "pages":
            region.hashes = page_hashes(region.bytes, region.spec.page_size)
        region.described = True
