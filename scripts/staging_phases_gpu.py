"""Where the time of staging a fully dirty pages region goes (a diagnostic).

For a 256 MiB pages region rewritten before each commit, with an executor of
8 and of 132 blocks: the whole ``commit()``, the SCAN task alone (every page
marked dirty), and the commit split at the moment its scan wait returns
(before: fence, SCAN task, host wait; after: dirty runs on the host, the
CHECKPOINT tasks, the copy into the ring and the publish). Medians of 5.
Prints the phases and writes JSON to $OUT.

    python scripts/staging_phases_gpu.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import cupy

    from bench.common import write_out
    from concordia_agents import Runtime
    from gpu_runtime.executor import TaskKind

    n = 256 << 20
    out: dict = {"diagnostic": "staging_phases_gpu", "bytes": n,
                 "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for blocks in (8, 132):
        rt = Runtime.open(home=Path(tempfile.mkdtemp()), backend="cupy", fsync="none", ring_bytes=1 << 30,
                          max_record_bytes=4 << 20, compact_bytes=0, segment_bytes=1 << 30,
                          backend_options={"blocks": blocks})
        try:
            a = cupy.random.default_rng(3).integers(0, 255, n, dtype=cupy.uint8)
            s = rt.session("stage")
            s.register("a", a)
            s.commit()
            be, ex = rt.backend, rt.backend.executor
            region = s.regions["a"]._handle
            marks: list[float] = []
            wait = ex.wait

            def marked_wait(ticket: int, timeout: float = 30.0) -> None:
                wait(ticket, timeout)
                marks.append(time.perf_counter())

            scans, totals, before, after = [], [], [], []
            for rep in range(6):
                a[:] = cupy.random.default_rng(10 + rep).integers(0, 255, n, dtype=cupy.uint8)
                cupy.cuda.Device().synchronize()
                t = time.perf_counter()
                ex.wait(be._device_task(TaskKind.SCAN, region, [1]))
                scans.append(time.perf_counter() - t)
                region.force_full = True  # the scan moved the baseline: the commit copies every page
                a[:] = cupy.random.default_rng(20 + rep).integers(0, 255, n, dtype=cupy.uint8)
                cupy.cuda.Device().synchronize()
                marks.clear()
                ex.wait = marked_wait  # type: ignore[method-assign]
                t = time.perf_counter()
                s.commit()
                end = time.perf_counter()
                ex.wait = wait  # type: ignore[method-assign]
                if rep:
                    totals.append(end - t)
                    before.append(marks[0] - t)
                    after.append(end - marks[0])
            med = {k: statistics.median(v) * 1e3 for k, v in
                   (("scan_only_ms", scans[1:]), ("commit_ms", totals), ("to_scan_done_ms", before),
                    ("scan_done_to_visible_ms", after))}
            med["commit_GBps"] = n / med["commit_ms"] / 1e6
            med["after_scan_GBps"] = n / med["scan_done_to_visible_ms"] / 1e6
            out[f"blocks_{blocks}"] = med
            print(blocks, {k: round(v, 3) for k, v in med.items()}, flush=True)
            s.close()
        finally:
            rt.close()
    write_out("staging_phases_gpu", out, "cupy-cuda13x")


if __name__ == "__main__":
    main()
