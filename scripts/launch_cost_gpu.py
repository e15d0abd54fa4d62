"""Host cost of launching a kernel like the executor (a diagnostic): CuPy's
call with and without ``enable_cooperative_groups``, and the driver's
``cuLaunchCooperativeKernel`` / ``cuLaunchKernel`` through ``cuda.bindings``
with the argument block packed once. 8 blocks of 512 threads, a kernel that
returns at once; host time per launch call, median of 2000 after warm-up.

    python scripts/launch_cost_gpu.py
"""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import cupy
    import numpy as np
    from cuda.bindings import driver

    from bench.common import write_out

    src = r'''typedef unsigned long long u64;
    extern "C" __global__ void __launch_bounds__(512) k(u64* a, u64* b, u64* c, u64* d, u64 g) {
        if (g == 0xFFFFFFFFull && threadIdx.x == 0) a[0] = (u64)b + (u64)c + (u64)d;
    }'''
    from gpu_runtime.compiler import compile_cubin

    dev = cupy.cuda.Device()
    mod = cupy.cuda.function.Module()  # loaded as the executor's module is
    mod.load(compile_cubin(src, arch=f"sm_{dev.compute_capability}", name="launch_cost").cubin)
    fn = mod.get_function("k")
    bufs = [cupy.zeros(64, dtype=cupy.uint64) for _ in range(4)]
    stream = cupy.cuda.Stream(non_blocking=True)
    out: dict = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                 "driver": cupy.cuda.runtime.driverGetVersion(), "cupy": cupy.__version__}

    def timed(launch, n: int = 2000) -> float:
        for _ in range(100):
            launch()
        stream.synchronize()
        ts = []
        for i in range(n):
            t = time.perf_counter()
            launch()
            ts.append(time.perf_counter() - t)
            if i % 64 == 63:
                stream.synchronize()
        stream.synchronize()
        return statistics.median(ts) * 1e6

    args = (bufs[0], bufs[1], bufs[2], bufs[3], cupy.uint64(7))
    out["cupy_cooperative_us"] = timed(lambda: fn((8,), (512,), args, stream=stream, enable_cooperative_groups=True))
    out["cupy_plain_us"] = timed(lambda: fn((8,), (512,), args, stream=stream))

    # Driver API, arguments packed once: an array of pointers to the values.
    vals = [ctypes.c_uint64(int(b.data.ptr)) for b in bufs] + [ctypes.c_uint64(7)]
    ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
    func = driver.CUfunction(int(fn.ptr))
    hs = int(stream.ptr)
    addr = ctypes.addressof(ptrs)

    def drv_coop() -> None:
        (err,) = driver.cuLaunchCooperativeKernel(func, 8, 1, 1, 512, 1, 1, 0, hs, addr)
        assert err == driver.CUresult.CUDA_SUCCESS, err

    def drv_plain() -> None:
        (err,) = driver.cuLaunchKernel(func, 8, 1, 1, 512, 1, 1, 0, hs, addr, 0)
        assert err == driver.CUresult.CUDA_SUCCESS, err

    out["driver_cooperative_us"] = timed(drv_coop)
    out["driver_plain_us"] = timed(drv_plain)
    np.testing.assert_array_equal(bufs[0].get()[:1], [0])
    print(json.dumps(out))
    write_out("launch_cost_gpu", out, "cupy-cuda13x")


if __name__ == "__main__":
    main()
