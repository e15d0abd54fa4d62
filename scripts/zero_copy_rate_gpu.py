"""How fast SM stores reach mapped host memory, by grid size (a diagnostic).

Copies 256 MiB from device memory into mapped pinned host memory with a
grid-stride kernel of 16-byte stores (512 threads a block), optionally summing
the payload checksum on the way as the executor's handlers do, for grids of
1 to 132 blocks; beside it the copy engine's pinned D2H rate. Answers whether
the executor's staging rate is limited by the number of blocks that store
over PCIe (docs/gpu.md, staging). Prints GB/s and writes JSON to $OUT.

    python scripts/zero_copy_rate_gpu.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_SRC = r"""
typedef unsigned long long u64;
__device__ __forceinline__ u64 mix(u64 z) {
    z += 0x9E3779B97F4A7C15ull; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull; return z ^ (z >> 31);
}
extern "C" __global__ void __launch_bounds__(512) copy(const ulonglong2* src, ulonglong2* dst, u64 n, int sum,
                                                      u64* out) {
    u64 acc = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const ulonglong2 x = src[i];
        if (sum) acc += x.x * (mix(2 * i) | 1) + x.y * (mix(2 * i + 1) | 1);
        dst[i] = x;
    }
    if (sum && acc == 42) out[0] = acc;  // keeps the sum alive
}
"""


def main() -> None:
    import cupy

    from bench.common import write_out

    n = 256 << 20
    src = cupy.random.default_rng(1).integers(0, 2**63, n // 8, dtype=cupy.uint64)
    host = cupy.cuda.runtime.hostAlloc(n, cupy.cuda.runtime.hostAllocMapped)
    from cuda.bindings import runtime as cudart

    err, dptr = cudart.cudaHostGetDevicePointer(host, 0)
    assert err == cudart.cudaError_t.cudaSuccess, err
    fn = cupy.RawKernel(_SRC, "copy")
    out = cupy.zeros(1, cupy.uint64)
    stream = cupy.cuda.Stream(non_blocking=True)
    result: dict = {"diagnostic": "zero_copy_rate_gpu", "bytes": n,
                    "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "GBps": {}}

    def timed(run) -> float:  # type: ignore[no-untyped-def]
        ts = []
        for rep in range(5):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            if rep:
                ts.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return n / statistics.median(ts) / 1e9

    import mmap

    def shm_target(huge: bool) -> tuple[int, mmap.mmap, int]:
        """A /dev/shm file mapped and registered as the log ring is
        (``huge``: with MADV_HUGEPAGE asked for first)."""
        fd = os.open(f"/dev/shm/zcr-{os.getpid()}-{int(huge)}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, n)
        mm = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):
            mm.madvise(mmap.MADV_HUGEPAGE)
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        for off in range(0, n, 4096):
            mm[off] = 0  # populate
        cupy.cuda.runtime.hostRegister(addr, n, 2)
        err, dp = cudart.cudaHostGetDevicePointer(addr, 0)
        assert err == cudart.cudaError_t.cudaSuccess, err
        return addr, mm, int(dp)

    try:
        result["shmem_enabled"] = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text().strip()
    except OSError as e:
        result["shmem_enabled"] = str(e)
    print("shmem THP:", result["shmem_enabled"], flush=True)
    for huge in (False, True):
        addr, mm, dp = shm_target(huge)
        for blocks in (4, 8, 16, 32, 132):
            rate = timed(lambda: fn((blocks,), (512,), (src, cupy.uint64(dp), cupy.uint64(n // 16),
                                                       cupy.int32(1), out), stream=stream))
            key = f"shm{'_huge' if huge else ''}_sum_{blocks}"
            result["GBps"][key] = rate
            print(f"{key}: {rate:6.1f} GB/s", flush=True)
        cupy.cuda.runtime.hostUnregister(addr)
        del addr
        try:
            mm.close()
        except BufferError:
            pass
    result["copy_engine_d2h_GBps"] = timed(
        lambda: cupy.cuda.runtime.memcpyAsync(host, src.data.ptr, n, cupy.cuda.runtime.memcpyDeviceToHost, stream.ptr))
    for summed in (0, 1):
        for blocks in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 132):
            rate = timed(lambda: fn((blocks,), (512,), (src, cupy.uint64(int(dptr)), cupy.uint64(n // 16),
                                                       cupy.int32(summed), out), stream=stream))
            result["GBps"][f"{'sum' if summed else 'plain'}_{blocks}"] = rate
            print(f"{'sum' if summed else 'plain'} blocks {blocks:3d}: {rate:6.1f} GB/s", flush=True)
    print("copy engine D2H", round(result["copy_engine_d2h_GBps"], 1), "GB/s")
    cupy.cuda.runtime.freeHost(host)
    write_out("zero_copy_rate_gpu", result, "cupy-cuda13x")


if __name__ == "__main__":
    main()
