"""Where the instrumentation's per-launch time goes (a diagnostic): hand-written
entry and exit hooks for a one-block empty kernel, each timed as
``bench/bench_instrument_gpu.py`` times launches (2000 back to back behind a
spinning kernel, CUDA events, median of 7), three rounds interleaved.

Entries (thread 0, then ``__syncthreads``):

* ``ctl_g`` / ``ctl_c``: load the control-block address from a ``__device__``
  (what the rewriter does) or a ``__constant__`` variable, branch on it;
* ``sc``: the current admission — ``red.add`` active, ``fence.sc.gpu``,
  ``ld.volatile`` pause;
* ``atom``: one returning ``atom.add`` on a word that holds the pause bit and
  the active count together (admission in one round trip);
* ``ld``: ``ld.volatile`` pause alone (a lower bound for any gate).

Exits: ``fence2``: ``__syncthreads``, thread 0 ``fence.acq_rel.gpu`` and two
``red.add`` (the current single-block exit); ``rel1``: one ``red.release.gpu``
on the combined word and one relaxed ``red`` (completion); ``nofence``: the two
``red`` without a fence (not correct; calibration only).

    python scripts/hook_cost_gpu.py     # JSON to $OUT/hook_cost_gpu.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SRC = r"""
typedef unsigned long long u64; typedef unsigned int u32;
__device__ u64 ctl_g;
__constant__ u64 ctl_c;
#define PAUSE 8
#define WORD 256
#define COMPL 512
#define ACTIVE 64

__device__ __forceinline__ void e_sc(u64 c) {
    u32 sm; asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    u64 act = c + ACTIVE + 4 * (sm & 63);
    asm volatile("red.global.add.u32 [%0], 1;" :: "l"(act) : "memory");
    asm volatile("fence.sc.gpu;" ::: "memory");
    u32 p; asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(p) : "l"(c + PAUSE) : "memory");
    if (p) asm volatile("trap;");
}
__device__ __forceinline__ void e_atom(u64 c) {
    u32 old; asm volatile("atom.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(c + WORD) : "memory");
    if (old & 0x80000000u) asm volatile("trap;");
}
__device__ __forceinline__ void e_ld(u64 c) {
    u32 p; asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(p) : "l"(c + PAUSE) : "memory");
    if (p) asm volatile("trap;");
}
__device__ __forceinline__ void x_fence2(u64 c) {
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
        asm volatile("red.global.add.u64 [%0], 1;" :: "l"(c + COMPL) : "memory");
        asm volatile("red.global.add.u32 [%0], -1;" :: "l"(c + ACTIVE) : "memory");
    }
}
__device__ __forceinline__ void x_rel1(u64 c) {
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("red.global.add.u64 [%0], 1;" :: "l"(c + COMPL) : "memory");
        asm volatile("red.release.gpu.global.add.u32 [%0], -1;" :: "l"(c + WORD) : "memory");
    }
}
__device__ __forceinline__ void x_nofence(u64 c) {
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("red.global.add.u64 [%0], 1;" :: "l"(c + COMPL) : "memory");
        asm volatile("red.global.add.u32 [%0], -1;" :: "l"(c + ACTIVE) : "memory");
    }
}
#define KERNEL(name, CTL, ENTRY, EXIT) \
extern "C" __global__ void name(u32* y) { \
    u64 c = CTL; \
    if (c) { if (threadIdx.x == 0) ENTRY(c); __syncthreads(); } \
    if (c) EXIT(c); \
}
__device__ __forceinline__ void none(u64) {}
extern "C" __global__ void plain(u32* y) { }
KERNEL(g_none, ctl_g, none, none)
KERNEL(c_none, ctl_c, none, none)
KERNEL(g_sc, ctl_g, e_sc, none)
KERNEL(g_atom, ctl_g, e_atom, none)
KERNEL(c_atom, ctl_c, e_atom, none)
KERNEL(g_ld, ctl_g, e_ld, none)
KERNEL(g_x_fence2, ctl_g, none, x_fence2)
KERNEL(g_x_nofence, ctl_g, none, x_nofence)
KERNEL(g_sc_fence2, ctl_g, e_sc, x_fence2)
KERNEL(g_atom_fence2, ctl_g, e_atom, x_fence2)
KERNEL(g_atom_rel1, ctl_g, e_atom, x_rel1)
KERNEL(c_atom_rel1, ctl_c, e_atom, x_rel1)
KERNEL(c_atom_nofence, ctl_c, e_atom, x_nofence)
"""
NAMES = ["plain", "g_none", "c_none", "g_sc", "g_atom", "c_atom", "g_ld", "g_x_fence2", "g_x_nofence",
         "g_sc_fence2", "g_atom_fence2", "g_atom_rel1", "c_atom_rel1", "c_atom_nofence"]


def main() -> None:
    import cupy
    import numpy as np

    from bench.bench_instrument_gpu import EMPTY, kernel, per_launch
    from bench.common import write_out
    from gpu_runtime import instrument as ins

    mod = cupy.RawModule(code=SRC)
    ctl = cupy.zeros(4096, cupy.uint8)
    for var in ("ctl_g", "ctl_c"):
        mod.get_global(var).copy_from_host(np.array([ctl.data.ptr], np.uint64).ctypes.data, 8)
    fns = {n: mod.get_function(n) for n in NAMES}
    y = cupy.zeros(32, cupy.uint32)
    ins.enable()
    fns["rewriter_default"] = kernel(EMPTY, True, ins)
    ins.enable(single_block=True)
    fns["rewriter_single_block"] = kernel(EMPTY, True, ins)
    ins.disable()
    rounds: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(3):
        for n, fn in fns.items():
            rounds[n].append(per_launch(fn, (1,), (32,), (y,), 2000, 7) * 1e6)
    med = {n: statistics.median(v) for n, v in rounds.items()}
    out = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
           "driver": cupy.cuda.runtime.driverGetVersion(), "unit": "us per launch, 1 block x 32 threads",
           "median_of_rounds": med, "over_plain": {n: v - med["plain"] for n, v in med.items()}, "rounds": rounds}
    try:
        from cuda.bindings import driver

        attr = getattr(driver.CUdevice_attribute, "CU_DEVICE_ATTRIBUTE_ATOMIC_REDUCTION_SUPPORTED", None)
        out["atomic_reduction_memop_attr"] = (None if attr is None
                                              else driver.cuDeviceGetAttribute(attr, 0)[1])
        out["driver_api"] = driver.cuDriverGetVersion()[1]
    except Exception as exc:  # noqa: BLE001 - a diagnostic: report what failed
        out["atomic_reduction_memop_attr"] = repr(exc)
    write_out("hook_cost_gpu", out, "cupy-cuda13x")
    for n, v in med.items():
        print(f"{n:24s} {v:6.3f} us  (+{v - med['plain']:.3f})")
    print({k: out[k] for k in out if k.startswith(("atomic", "driver"))})


if __name__ == "__main__":
    main()
