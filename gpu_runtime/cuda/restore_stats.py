"""Where a restore pipeline's time went (``restore.py``): the calling thread's
wall clock split into allocating, waiting for the reader threads, waiting for
the device, and its own work. Benchmarks report it (``restore_stats``), so a
slow restore says which side held it up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .spans import Span

__all__ = ["RestoreStats", "waited"]


@dataclass(slots=True)
class RestoreStats:
    """Where one pipeline run's time went, in seconds of the calling thread's
    wall clock: allocating buffers (pinned pool, staging, tables: first use or
    growth), blocked on the reader threads, blocked on the device (copies,
    sums, the final drain); the rest of ``total_s`` is the calling thread's
    own work (record tables, checksum finishing, scatter calls)."""

    bytes: int = 0  #: payload bytes restored
    records: int = 0
    spans: int = 0
    alloc_s: float = 0.0
    read_wait_s: float = 0.0
    device_wait_s: float = 0.0
    total_s: float = 0.0
    _start: float = field(default_factory=time.perf_counter, repr=False)

    @classmethod
    def of(cls, locs: Sequence[Any], groups: Sequence[Span]) -> RestoreStats:
        """A run's account, started now, of ``locs`` read in ``groups`` (spans)."""
        return cls(bytes=sum(loc.header.length for loc in locs), records=len(locs), spans=len(groups))

    def done(self) -> RestoreStats:
        self.total_s = time.perf_counter() - self._start
        return self

    def as_dict(self) -> dict[str, float]:
        own = self.total_s - self.alloc_s - self.read_wait_s - self.device_wait_s
        return {"bytes": self.bytes, "records": self.records, "spans": self.spans, "alloc_s": self.alloc_s,
                "read_wait_s": self.read_wait_s, "device_wait_s": self.device_wait_s, "own_s": own,
                "total_s": self.total_s, "GBps": self.bytes / self.total_s / 1e9 if self.total_s else 0.0}


def waited(stats: RestoreStats, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, its seconds added to ``stats.<name>``."""
    t = time.perf_counter()
    try:
        return fn(*args)
    finally:
        setattr(stats, name, getattr(stats, name) + time.perf_counter() - t)
