"""Benchmark protocol shared by every script in bench/.

Fixed protocol: warm-up runs (discarded), then ``repeats`` timed runs; report
the median (and p10/p90); every result file names the device, the library
versions and the date, and every comparison is against a baseline measured in
the same run. Results are JSON under ``bench/results/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def versions(*dists: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for d in ("concordia-agents", "numpy", "torch", "sqlalchemy", *dists):
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def cpu_device() -> str:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def measure(fn: Callable[[], Any], *, warmup: int, repeats: int,
            setup: Callable[[], Any] | None = None) -> dict[str, float]:
    """Seconds per call: median, p10, p90, min over ``repeats`` timed calls
    (``setup``, when given, runs untimed before every call)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"median_s": statistics.median(times), "p10_s": q[0], "p90_s": q[-1], "min_s": times[0],
            "repeats": repeats, "warmup": warmup}


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **payload}
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    if os.environ.get("OUT"):  # the device tool brings back what is under $OUT
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return path



class _Terminated(BaseException):
    """SIGTERM (a ``timeout`` around the benchmark) arrived: a BaseException, so
    the sections' ``except Exception`` recording does not swallow it."""


@contextlib.contextmanager
def written(name: str, result: dict[str, Any]) -> Iterator[None]:
    """Write ``result`` when the block ends, also when it is cut short by
    SIGTERM: the sections measured so far are kept, and the file says
    ``"incomplete"``. A device run has a hard time limit; a benchmark of many
    sections should not lose the finished ones to it."""

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except _Terminated:
        result["incomplete"] = "terminated (SIGTERM) before every section ran"
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("wrote", write(name, result), flush=True)


class ResumeParts:
    """Times the parts of a resume inside a call (``conversation_generate``,
    ``durable_generate``; bench only: wraps the runtime's session open, the
    session's region registration and restore, and the CuPy backend's
    page-locking of a host ring): the fixed costs are the open, the
    registrations less the restores they contain and the ring's page-locking
    (at the first commit, or on ``ring_prepare``'s thread: then
    ``ring_wait_s`` is what the first commit waited for it); the restore rate
    is the payload bytes read over the restore time (device synchronized);
    ``pipeline`` is the restore pipeline's own account of the largest region
    (``RestoreStats``)."""

    def __init__(self) -> None:
        from concordia_agents import _runtime, _session
        from gpu_runtime.cuda import commit

        self.open_s = self.register_s = self.restore_s = self.ring_register_s = self.ring_wait_s = 0.0
        self.restore_bytes = 0
        self.pipeline: dict[str, float] = {}  # the largest region's pipeline run (RestoreStats), if one ran
        self._targets = [(_runtime.Runtime, "session"), (_session.Session, "register"),
                         (_session.Session, "_restore_into"), (commit, "register_host_memory"),
                         (commit.CommitPaths, "_prepared")]
        self._saved = [getattr(c, name) for c, name in self._targets]

    def __enter__(self) -> ResumeParts:
        import torch

        open_, register, restore_into, pin, prepared = self._saved
        parts = self
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def timed(fn: Any, field: str, *, synced: bool = False) -> Any:
            """``fn`` adding its seconds to ``parts.<field>`` (device synchronized around it if ``synced``)."""
            def wrapper(obj: Any, *a: Any, **kw: Any) -> Any:
                if synced:
                    sync()
                t = time.perf_counter()
                try:
                    return fn(obj, *a, **kw)
                finally:
                    if synced:
                        sync()
                    setattr(parts, field, getattr(parts, field) + time.perf_counter() - t)
            return wrapper

        session, reg, timed_restore, timed_pin = (timed(open_, "open_s"), timed(register, "register_s"),
                                                  timed(restore_into, "restore_s", synced=True),
                                                  timed(pin, "ring_register_s"))
        timed_wait = timed(prepared, "ring_wait_s")

        def restore(s: Any, region: Any) -> None:
            timed_restore(s, region)
            parts.restore_bytes += sum(loc.header.length for loc in s._index.records.get(region.spec.region_id, []))
            stats = getattr(s._services.backend, "restore_stats", None)  # the pipeline's own account (restore.py)
            if stats is not None and stats.bytes > parts.pipeline.get("bytes", 0):
                parts.pipeline = stats.as_dict()

        for (cls, name), fn in zip(self._targets, (session, reg, restore, timed_pin, timed_wait), strict=True):
            setattr(cls, name, fn)
        return self

    def __exit__(self, *exc: Any) -> None:
        for (cls, name), fn in zip(self._targets, self._saved, strict=True):
            setattr(cls, name, fn)

    def report(self) -> dict[str, Any]:
        return {"session_open_s": self.open_s, "register_less_restore_s": self.register_s - self.restore_s,
                "restore_s": self.restore_s, "restore_bytes": self.restore_bytes,
                "ring_register_s": self.ring_register_s, "ring_wait_s": self.ring_wait_s,
                "restore_GBps": self.restore_bytes / self.restore_s / 1e9 if self.restore_s else 0.0,
                "pipeline": self.pipeline}
