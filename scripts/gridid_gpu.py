"""Is ``%gridid`` unique over time? (a diagnostic for the instrumentation's launch slots)

1. 20 000 launches on 5 streams (grids of 1, 3, 5 and 70 001 blocks) each record
   their ``%gridid``; reports how many distinct values there were, the largest
   repeat count and a sample of repeats.
2. The completion-counter workload of ``tests/test_instrument_gpu.py`` under
   the current rewrite, then a dump of every launch slot still in use (grid
   ID, finished sub-counters, admitted) and of non-zero sub-counters.

    python scripts/gridid_gpu.py     # JSON to $OUT/gridid_gpu.json
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REC = r"""
extern "C" __global__ void cc_rec(unsigned long long* out, int i) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned long long g; asm volatile("mov.u64 %0, %%gridid;" : "=l"(g)); out[i] = g;
    }
}
"""


def main() -> None:
    import cupy
    import numpy as np

    from bench.common import write_out
    from gpu_runtime import instrument as ins
    from gpu_runtime.ptx import CTL_SLOT_COUNT, CTL_SLOTS, CTL_SUBS

    out: dict = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    rec = cupy.RawModule(code=REC).get_function("cc_rec")
    n = 20_000
    ids = cupy.zeros(n, cupy.uint64)
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(5)]
    grids = [1, 3, 5, 70_001, 1]
    for i in range(n):
        with streams[i % 5]:
            rec((grids[i % 5],), (32,), (ids, np.int32(i)))
    cupy.cuda.runtime.deviceSynchronize()
    got = cupy.asnumpy(ids)
    counts = collections.Counter(got.tolist())
    repeats = {k: v for k, v in counts.items() if v > 1}
    out["gridid"] = {"launches": n, "distinct": len(counts), "max_repeat": max(counts.values()),
                     "first": [int(x) for x in got[:12]], "min": int(got.min()), "max": int(got.max()),
                     "repeated_sample": [[int(k), v, [int(j) for j in np.nonzero(got == k)[0][:6]]]
                                         for k, v in list(repeats.items())[:8]]}
    print(out["gridid"], flush=True)

    ins.enable(gate_timeout=10.0)
    src = 'extern "C" __global__ void cc_tick2(int* y) { atomicAdd(&y[blockIdx.x & 7], 1); }'
    fn = cupy.RawModule(code=src).get_function("cc_tick2")
    y = cupy.zeros(8, cupy.int32)
    shapes = [((1,), (32,)), ((3,), (64,)), ((2, 2), (16, 2)), ((5,), (128,)), ((70_001,), (32,))]
    for i in range(10_000):
        with streams[i % 5]:
            fn(shapes[i % 5][0], shapes[i % 5][1], (y,))
    cupy.cuda.runtime.deviceSynchronize()
    ctl = cupy.asnumpy(ins._state().ctl)
    slots = ctl[CTL_SLOTS:CTL_SLOTS + 16 * CTL_SLOT_COUNT].view(np.uint64).reshape(-1, 2)
    used = [[i, int(g), int(c) & 0xFFFFFFFF, int(c) >> 32] for i, (g, c) in enumerate(slots) if g]
    subs = ctl[CTL_SUBS:].view(np.uint32).reshape(CTL_SLOT_COUNT, 64, 64)[:, :, 0]
    nz = [[int(s), int(j), int(subs[s, j])] for s, j in zip(*np.nonzero(subs))][:40]
    out["workload"] = {"completions": ins.completion_count("cc_tick2"), "active": ins.active_launches(),
                       "slots_in_use": used[:40], "nonzero_sub_counters": nz,
                       "gate_timeouts": ins.gate_timeouts()}
    print(out["workload"], flush=True)
    write_out("gridid_gpu", out, "cupy-cuda13x")


if __name__ == "__main__":
    main()
