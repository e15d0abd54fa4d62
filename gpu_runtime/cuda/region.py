"""The CuPy backend's handle on one registered region."""

from __future__ import annotations

from typing import Any

from ..backend import BackendRegion
from ..planner import rows_per_record
from ..records import record_size
from ..regions import RegionSpec
from .fences import current_stream_getter
from .memory import PinnedBuffer

__all__ = ["GROUP_BYTES", "MAX_RECORDS_PER_TASK", "CupyRegion"]

GROUP_BYTES = 16 << 20  #: data bytes per CHECKPOINT task
MAX_RECORDS_PER_TASK = 256  #: CNC_MAX_RECORDS_PER_TASK in kernels/concordia.cuh


class CupyRegion(BackendRegion):
    """A region in GPU memory: its operator-table entry (``index``), its
    handler specialization, and for pages regions the device page hashes and
    the pinned dirty bitmap the SCAN task writes."""

    def __init__(self, spec: RegionSpec, array: Any, *, index: int, handler: int, hashes: Any,
                 bitmap: PinnedBuffer | None) -> None:
        super().__init__(spec, array)
        self.index = index
        self.handler = handler
        # kv geometry, read on every commit (the spec's properties compute it each time)
        self.rows = spec.rows if spec.kind == "kv" else 0
        self.unit = spec.outer * spec.row_bytes if spec.kind == "kv" else 0
        self.plan_key: tuple[int, int] | None = None  #: (ring capacity, max record bytes) of ``plan``
        self.plan: tuple[int, int, int] = (1, 1, 0)  #: rows per record, records per task, full record size
        self.hashes = hashes
        self.bitmap = bitmap
        self.current_stream = current_stream_getter(array)  #: handle of the caller's current stream
        self.force_full = True  #: next scan marks every page dirty (first commit, after an abort)

    def kv_plan(self, capacity: int, max_record_bytes: int) -> tuple[int, int, int]:
        """(rows per record, records per CHECKPOINT task, full record size) of
        a kv region for a ring and record limit; cached, since the per-token
        path asks on every commit. Rows per record are the planner's; a task
        takes at most a quarter of the ring, ``GROUP_BYTES`` and
        ``MAX_RECORDS_PER_TASK`` records (at least one)."""
        key = (capacity, max_record_bytes)
        if self.plan_key != key:
            per = rows_per_record(self.unit, max_record_bytes)
            per_task = max(1, min(GROUP_BYTES, capacity // 4) // (per * self.unit))
            self.plan = (per, min(per_task, MAX_RECORDS_PER_TASK), record_size(self.unit * per))
            self.plan_key = key
        return self.plan
