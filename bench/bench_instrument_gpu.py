"""Instrumentation overhead on the GPU: the pause gate and completion hook against
the same kernel uninstrumented, in the same run.

* empty kernel (1 block of 32 threads, no work): GPU time per launch of a
  batch of 2000 launches run back to back (queued behind a spinning kernel so
  the host's launch rate does not set the pace; CUDA events). Paired protocol:
  batches of the plain and the instrumented kernel alternate (ABBA order, 3
  warm-up launches before each), and the overhead is the median of the
  per-pair differences — the GPU's per-launch time drifts by several tenths
  of a microsecond between batches (clocks), more than the hooks cost, so two
  separate medians are not comparable. Also with the single-block fast path
  off (``enable(single_block=False)``, every launch through a launch slot).
* memory-bound kernel: a 256 MiB float copy, one thread per element (the
  shape CuPy's elementwise kernels use: 262144 blocks) and grid-stride
  (132 x 8 blocks); per-launch time, overhead in percent (median of the
  per-pair ratios).
* rewrite + load: parse, rewrite and load one module (RawModule from source,
  compile included) against loading it uninstrumented, medians over fresh
  sources (no cache hits).
* quiesced commit: ``Session.commit(quiesce=True)`` of a 4 MiB region against
  ``commit()`` (both wait for the copy), on an idle GPU and with a stream of
  instrumented launches (264 blocks, ~20 us each) queued behind it: the
  quiesce's cost and how long it holds new launches (the commit's duration).

    python bench/bench_instrument_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import measure, versions, write

EMPTY = 'extern "C" __global__ void {name}(int* y) {{ }}'
COPY = ('extern "C" __global__ void {name}(const float* x, float* y, long n) {{'
        ' long i = (long)blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = x[i]; }}')
COPY_STRIDE = ('extern "C" __global__ void {name}(const float* x, float* y, long n) {{'
               ' for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;'
               ' i += (long)blockDim.x * gridDim.x) y[i] = x[i]; }}')


_SPIN = ('extern "C" __global__ void cc_bench_spin(long long cycles) {'
         ' long long t = clock64(); while (clock64() - t < cycles) { } }')
_spin = None


def per_launch(fn, grid, block, args, launches: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median GPU seconds per launch over ``repeats`` batches of ``launches``.

    Each batch is queued behind a spinning kernel long enough for the host to
    enqueue it all, so the GPU runs the launches back to back and the events
    measure device time, not the host's launch rate."""
    import cupy

    global _spin
    if _spin is None:
        _spin = cupy.RawModule(code=_SPIN).get_function("cc_bench_spin")
    for _ in range(3):
        fn(grid, block, args)
    cupy.cuda.runtime.deviceSynchronize()
    out = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        _spin((1,), (1,), (np.int64(int(2e9 * 20e-6 * launches) + 20_000_000),))  # ~20 us of host time per launch
        start.record()
        for _ in range(launches):
            fn(grid, block, args)
        stop.record()
        stop.synchronize()
        out.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3 / launches)
    return statistics.median(out)


def paired(plain, hooked, grid, block, args, launches: int, pairs: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Alternating batches (ABBA) of ``plain`` and ``hooked``: the medians of
    each (seconds per launch) and of the per-pair difference and ratio."""
    a, b = [], []
    for i in range(pairs):
        order = ((plain, a), (hooked, b)) if i % 2 == 0 else ((hooked, b), (plain, a))
        for fn, sink in order:
            sink.append(per_launch(fn, grid, block, args, launches, 1))
    diffs = sorted(y - x for x, y in zip(a, b, strict=True))
    ratios = sorted(y / x for x, y in zip(a, b, strict=True))
    return {"plain": statistics.median(a), "hooked": statistics.median(b), "diff": statistics.median(diffs),
            "diff_p10": diffs[len(diffs) // 10], "diff_p90": diffs[(9 * len(diffs)) // 10],
            "ratio": statistics.median(ratios)}


def kernel(src: str, hooked: bool, ins):  # type: ignore[no-untyped-def]
    import cupy

    name = f"k_{uuid.uuid4().hex[:8]}"
    (ins.enable if hooked else ins.disable)()
    try:
        fn = cupy.RawModule(code=src.format(name=name)).get_function(name)
    finally:
        ins.enable()
    return fn


SPIN_WRITE = ('extern "C" __global__ void {name}(int* y, int n, int v, long long spin) {{'
              ' if (threadIdx.x == 0) {{ long long t0 = clock64(); while (clock64() - t0 < spin) {{ }} }}'
              ' __syncthreads();'
              ' for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) y[i] = v; }}')


def quiesce_figures(ins, quick: bool) -> dict:  # type: ignore[no-untyped-def]
    """commit(quiesce=True) against commit() on one 4 MiB region: idle, and
    with instrumented launches queued on a stream (the commit lands between two)."""
    import tempfile

    import cupy

    from concordia_agents import Runtime

    repeats = 5 if quick else 30
    n = 1 << 20
    rt = Runtime.open(home=tempfile.mkdtemp(prefix="cc-bench-quiesce-"), backend="cupy")
    try:
        s = rt.session("bench-quiesce")
        y = cupy.zeros(n, cupy.int32)
        s.register("y", y)
        s.commit({"v": 0})
        out = {"region_bytes": 4 * n,
               "commit_idle": measure(lambda: s.commit(None), warmup=3, repeats=repeats),
               "quiesced_commit_idle": measure(lambda: s.commit(None, quiesce=True), warmup=3, repeats=repeats)}
        fn = kernel(SPIN_WRITE, True, ins)
        stream = cupy.cuda.Stream(non_blocking=True)

        def storm() -> None:  # ~200 launches of ~20 us each queued, then 1 ms for them to start
            with stream:
                for v in range(200):
                    fn((264,), (256,), (y, np.int32(n), np.int32(v), np.int64(36_000)))
            time.sleep(1e-3)

        out["quiesced_commit_in_storm"] = measure(lambda: s.commit(None, quiesce=True), warmup=2,
                                                  repeats=repeats, setup=lambda: (stream.synchronize(), storm()))
        stream.synchronize()
        out["note"] = ("seconds per commit (waits for the copy); in_storm: instrumented launches of ~20 us are "
                       "queued and running when the commit starts, so it includes draining the admitted one")
        return out
    finally:
        rt.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    import cupy

    from gpu_runtime.cuda import instrument as ins

    launches, pairs = (300, 6) if args.quick else (2000, 30)
    ins.enable()
    results: dict[str, dict] = {}

    y = cupy.zeros(32, cupy.int32)
    plain_fn = kernel(EMPTY, False, ins)
    ins.enable(single_block=False)  # every launch through a launch slot (the general path)
    slot = paired(plain_fn, kernel(EMPTY, True, ins), (1,), (32,), (y,), launches, pairs)
    ins.enable(single_block=True)  # the default: one-block launches take the fast path (gpu_runtime/cuda/ptx.py)
    fast = paired(plain_fn, kernel(EMPTY, True, ins), (1,), (32,), (y,), launches, pairs)
    results["empty_kernel"] = {
        "plain_us": fast["plain"] * 1e6, "instrumented_us": fast["hooked"] * 1e6,
        "overhead_us_per_launch": fast["diff"] * 1e6, "overhead_us_p10_p90": [fast["diff_p10"] * 1e6,
                                                                              fast["diff_p90"] * 1e6],
        "goal_us": 1.0, "pairs": pairs,
        "slot_path_plain_us": slot["plain"] * 1e6, "slot_path_instrumented_us": slot["hooked"] * 1e6,
        "slot_path_overhead_us": slot["diff"] * 1e6}

    n = 64 << 20  # 256 MiB of float32
    x, out = cupy.random.random(n, dtype=cupy.float32), cupy.empty(n, cupy.float32)
    mb_launches = max(20, launches // 40)
    for label, src, grid, block in (("memory_bound_one_thread_per_element", COPY, ((n + 255) // 256,), (256,)),
                                    ("memory_bound_grid_stride", COPY_STRIDE, (132 * 8,), (256,))):
        r = paired(kernel(src, False, ins), kernel(src, True, ins), grid, block, (x, out, np.int64(n)),
                   mb_launches, pairs)
        results[label] = {"plain_ms": r["plain"] * 1e3, "instrumented_ms": r["hooked"] * 1e3,
                          "overhead_pct": (r["ratio"] - 1) * 100, "blocks": int(np.prod(grid)),
                          "bandwidth_gbs_plain": 2 * 4 * n / r["plain"] / 1e9, "goal_pct": 2.0, "pairs": pairs}

    loads: dict[str, list[float]] = {"plain": [], "instrumented": []}
    for i in range(3 if args.quick else 9):
        for hooked_ in (False, True):
            src = COPY_STRIDE.replace("y[i] = x[i]", f"y[i] = x[i] * {i + 2}.0f")
            t = time.perf_counter()
            kernel(src, hooked_, ins)
            cupy.cuda.runtime.deviceSynchronize()
            loads["instrumented" if hooked_ else "plain"].append(time.perf_counter() - t)
    results["compile_rewrite_load"] = {
        "plain_ms": statistics.median(loads["plain"]) * 1e3,
        "instrumented_ms": statistics.median(loads["instrumented"]) * 1e3,
        "note": "plain: NVRTC to cubin + load; instrumented: NVRTC to PTX + parse/rewrite + driver JIT + load"}
    t = time.perf_counter()
    from gpu_runtime.cuda.compiler import compile_cubin

    ptx = compile_cubin(COPY_STRIDE.format(name="k_rewrite"), arch="sm_90", ptx=True).cubin
    t = time.perf_counter()
    for _ in range(20):
        ins.rewrite(ptx)
    results["rewrite_only_ms"] = (time.perf_counter() - t) / 20 * 1e3

    results["quiesced_commit"] = quiesce_figures(ins, args.quick)

    props = cupy.cuda.runtime.getDeviceProperties(0)
    payload = {"benchmark": "instrument_gpu", "device": props["name"].decode(),
               "driver": cupy.cuda.runtime.driverGetVersion(), "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
               "versions": versions("cupy-cuda13x"), "launches": launches, "pairs": pairs, "results": results}
    path = write("instrument_gpu", payload)
    for k, v in results.items():
        print(k, v)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
