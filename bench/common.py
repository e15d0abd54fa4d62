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
