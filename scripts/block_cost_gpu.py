"""Where the instrumentation's per-*block* time goes (a diagnostic): hand-written
entry and exit hooks around the one-thread-per-element 256 MiB float copy
(262 144 blocks of 256 threads, the shape of CuPy's elementwise kernels),
each paired against the plain copy with ``bench/bench_instrument_gpu.py``'s
ABBA protocol (median of per-pair ratios).

Entries (thread 0, then ``__syncthreads``), reading a launch slot that the
host filled with (gridid 7, admitted):

* ``vol``: ``ld.volatile.global.v2.u64`` of the slot (what the rewriter does);
* ``l1``: a weak ``ld.global.ca.v2.u64`` (may hit the SM's L1), falling back to
  the volatile load when it does not show the launch admitted;
* ``l1t``: ``l1`` plus a ticket ``atom.add`` on the block's sub-counter whose
  result is only used at the exit (does the block stall on it?).

Exits (``__syncthreads``, then thread 0): ``cur``: ``fence.acq_rel.gpu`` and a
returning ``atom.add`` on the block's sub-counter (what the rewriter does);
``relatom``: one ``atom.release.gpu.add``; ``fred``: fence and a non-returning
``red.add``; ``relred``: one ``red.release.gpu.add``; ``bar``: the barrier
alone; ``atom`` / ``red``: without fence (not correct; calibration only).

    python scripts/block_cost_gpu.py     # JSON to $OUT/block_cost_gpu.json, SASS of the hooks to $OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SRC = r"""
typedef unsigned long long u64; typedef unsigned int u32;
__constant__ u64 ctl;
#define SLOT 1024
#define SUBS 4096

__device__ __forceinline__ u32 e_none(u64 c) { return 0; }
__device__ __forceinline__ u32 e_vol(u64 c) {
    u64 g, a;
    asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%2];" : "=l"(g), "=l"(a) : "l"(c + SLOT) : "memory");
    if (g != 7 || (a >> 32) == 0) asm volatile("trap;");
    return 0;
}
__device__ __forceinline__ u32 e_l1(u64 c) {
    u64 g, a;
    asm volatile("ld.global.ca.v2.u64 {%0, %1}, [%2];" : "=l"(g), "=l"(a) : "l"(c + SLOT) : "memory");
    if (g != 7 || (a >> 32) == 0) return e_vol(c);
    return 0;
}
__device__ __forceinline__ u32 e_l1t(u64 c) {
    e_l1(c);
    u32 t;
    u64 a = c + SUBS + 16384 + (blockIdx.x & 63) * 256;
    asm volatile("atom.global.add.u32 %0, [%1], 1;" : "=r"(t) : "l"(a) : "memory");
    return t;
}
__device__ __forceinline__ u64 sub(u64 c) { return c + SUBS + (blockIdx.x & 63) * 256; }
__device__ __forceinline__ void x_none(u64 c, u32 t) { }
__device__ __forceinline__ void x_bar(u64 c, u32 t) { __syncthreads(); if (t == 0xFFFFFFFFu) asm volatile("trap;"); }
__device__ __forceinline__ void x_cur(u64 c, u32 t) {
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 r;
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
        asm volatile("atom.global.add.u32 %0, [%1], 1;" : "=r"(r) : "l"(sub(c)) : "memory");
        if (r == 0xFFFFFFF0u || t == 0xFFFFFFFFu) asm volatile("trap;");
    }
}
__device__ __forceinline__ void x_relatom(u64 c, u32 t) {
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 r;
        asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;" : "=r"(r) : "l"(sub(c)) : "memory");
        if (r == 0xFFFFFFF0u || t == 0xFFFFFFFFu) asm volatile("trap;");
    }
}
__device__ __forceinline__ void x_atom(u64 c, u32 t) {
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 r;
        asm volatile("atom.global.add.u32 %0, [%1], 1;" : "=r"(r) : "l"(sub(c)) : "memory");
        if (r == 0xFFFFFFF0u || t == 0xFFFFFFFFu) asm volatile("trap;");
    }
}
__device__ __forceinline__ void x_fred(u64 c, u32 t) {
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
        asm volatile("red.global.add.u32 [%0], 1;" :: "l"(sub(c)) : "memory");
        if (t == 0xFFFFFFFFu) asm volatile("trap;");
    }
}
__device__ __forceinline__ void x_relred(u64 c, u32 t) {
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(sub(c)) : "memory");
        if (t == 0xFFFFFFFFu) asm volatile("trap;");
    }
}
__device__ __forceinline__ void x_red(u64 c, u32 t) {
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("red.global.add.u32 [%0], 1;" :: "l"(sub(c)) : "memory");
        if (t == 0xFFFFFFFFu) asm volatile("trap;");
    }
}
#define KERNEL(E, X) \
extern "C" __global__ void k_##E##_##X(const float* x, float* y, long n) { \
    u64 c = ctl; u32 t = 0; \
    if (c) { if (threadIdx.x == 0) t = e_##E(c); __syncthreads(); } \
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = x[i]; \
    if (c) x_##X(c, t); \
}
extern "C" __global__ void plain(const float* x, float* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = x[i];
}
KERNEL(none, none)
KERNEL(vol, none)
KERNEL(l1, none)
KERNEL(l1t, none)
KERNEL(none, bar)
KERNEL(none, cur)
KERNEL(none, relatom)
KERNEL(none, atom)
KERNEL(none, fred)
KERNEL(none, relred)
KERNEL(none, red)
KERNEL(vol, cur)
KERNEL(l1, cur)
KERNEL(l1, fred)
KERNEL(l1, relred)
KERNEL(l1t, relred)
KERNEL(l1t, bar)
"""
NAMES = ["k_none_none", "k_vol_none", "k_l1_none", "k_l1t_none", "k_none_bar", "k_none_cur", "k_none_relatom",
         "k_none_atom", "k_none_fred", "k_none_relred", "k_none_red", "k_vol_cur", "k_l1_cur", "k_l1_fred",
         "k_l1_relred", "k_l1t_relred", "k_l1t_bar"]


def main() -> None:
    import subprocess

    import cupy
    import numpy as np

    from bench.bench_instrument_gpu import COPY, kernel, paired
    from bench.common import write_out
    from gpu_runtime import instrument as ins
    from gpu_runtime.compiler import compile_cubin

    pairs = int(os.environ.get("PAIRS", "12"))
    mod = cupy.RawModule(code=SRC, options=("-arch=sm_90",))
    ctl = cupy.zeros(1 << 16, cupy.uint8)
    slot = np.zeros(2, np.uint64)
    slot[0], slot[1] = 7, 1 << 32
    ctl[1024:1040] = cupy.asarray(slot.view(np.uint8))
    mod.get_global("ctl").copy_from_host(np.array([ctl.data.ptr], np.uint64).ctypes.data, 8)
    n = 64 << 20
    x, y = cupy.random.random(n, dtype=cupy.float32), cupy.empty(n, cupy.float32)
    args, grid, block = (x, y, np.int64(n)), ((n + 255) // 256,), (256,)
    plain = mod.get_function("plain")
    fns = {name: mod.get_function(name) for name in NAMES}
    ins.enable()
    fns["rewriter_default"] = kernel(COPY, True, ins)
    ins.disable()
    res = {}
    for name, fn in fns.items():
        r = paired(plain, fn, grid, block, args, 20, pairs)
        res[name] = {"plain_ms": r["plain"] * 1e3, "hooked_ms": r["hooked"] * 1e3,
                     "overhead_pct": (r["ratio"] - 1) * 100}
        print(f"{name:20s} {r['plain'] * 1e3:7.4f} ms -> {r['hooked'] * 1e3:7.4f} ms  {100 * (r['ratio'] - 1):+6.1f} %",
              flush=True)
    assert bool((y == x).all())
    out = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
           "driver": cupy.cuda.runtime.driverGetVersion(), "pairs": pairs,
           "kernel": "256 MiB float copy, 262144 blocks x 256 threads", "results": res}
    write_out("block_cost_gpu", out, "cupy-cuda13x")
    dest = os.environ.get("OUT")
    if dest:
        cubin = compile_cubin(SRC, arch="sm_90").cubin
        Path(dest, "block_cost.cubin").write_bytes(cubin)
        sass = subprocess.run(["cuobjdump", "-sass", str(Path(dest, "block_cost.cubin"))], capture_output=True,
                              text=True).stdout
        Path(dest, "block_cost_sass.txt").write_text(sass)
        Path(dest, "block_cost.cubin").unlink()


if __name__ == "__main__":
    main()
