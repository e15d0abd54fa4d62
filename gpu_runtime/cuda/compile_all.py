"""Compile every kernel and handler specialization Concordia ships, without a GPU.

    python -m gpu_runtime.cuda.compile_all [--arch sm_90]

Specializations: the executor with no handlers, each kv row size of the
common model shapes (head dim 64/128/256 in fp16/bf16/fp32; 8-byte minimum)
and each supported page size, alone and all together in one module (the
operator table after several hot swaps); then the other kernels (the
restore checksum kernel, the in-step producer). Each is compiled to a cubin by
NVRTC, and to PTX that nvJitLink assembles for the same architecture. Exits
non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import sys
import time

from .compiler import compile_cubin, kernel_source
from .executor import DEFAULT_BLOCK, Handler, module_options

__all__ = ["OTHER_KERNELS", "SPECIALIZATIONS", "VARIANTS", "compile_everything"]

KV_ROW_BYTES = (8, 24, 64, 128, 256, 512, 1024)
PAGE_SIZES = (4096, 16384, 65536)
#: kernels outside the executor, each one module without specializations
OTHER_KERNELS = ("verify.cu", "step_commit.cu")
#: diagnostic builds (kernel, options): the in-step producer with every part a probe can leave out
#: left out (step_commit.cu's CNC_STEP_PROBE; bench/bench_step_commit_gpu.py builds each part alone)
PROBE_BUILDS = (("step_commit.cu", ("-DCNC_STEP_PROBE=31",)),)
SPECIALIZATIONS: list[list[Handler]] = (
    [[]]
    + [[Handler("kv", rb)] for rb in KV_ROW_BYTES]
    + [[Handler("pages", ps)] for ps in PAGE_SIZES]
    + [[Handler("kv", rb) for rb in KV_ROW_BYTES] + [Handler("pages", ps) for ps in PAGE_SIZES]]
)
#: every module the runtime can build: each specialization as the backend builds it by
#: default, and those with pages handlers also with the SCAN_COMMIT task (fused_pages=True)
VARIANTS: list[tuple[list[Handler], bool]] = (
    [(hs, False) for hs in SPECIALIZATIONS]
    + [(hs, True) for hs in SPECIALIZATIONS if any(h.kind == "pages" for h in hs)]
)


def nvjitlink_assemble(ptx: bytes, arch: str) -> bytes:
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch={arch}", "-O3"])
    try:
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, ptx, len(ptx), "executor.ptx")
        nvjitlink.complete(handle)
        size = nvjitlink.get_linked_cubin_size(handle)
        out = bytearray(size)
        nvjitlink.get_linked_cubin(handle, out)
        return bytes(out)
    finally:
        nvjitlink.destroy(handle)


def _build(src: str, opts: tuple[str, ...], arch: str, name: str, cache_dir) -> dict:  # type: ignore[no-untyped-def]
    """One module to a cubin and to PTX that nvJitLink assembles: sizes and seconds."""
    t = time.perf_counter()
    cubin = compile_cubin(src, options=opts, arch=arch, name=name, cache_dir=cache_dir).cubin
    ptx = compile_cubin(src, options=opts, arch=arch, name=name, cache_dir=cache_dir, ptx=True).cubin
    linked = nvjitlink_assemble(ptx, arch)
    return {"cubin_bytes": len(cubin), "ptx_bytes": len(ptx), "linked_bytes": len(linked),
            "seconds": time.perf_counter() - t}


def compile_everything(arch: str = "sm_90", *, cache_dir=None) -> list[dict]:  # type: ignore[no-untyped-def]
    src = kernel_source("executor.cu")
    report = []
    for handlers, fused in VARIANTS:
        built = _build(src, module_options(handlers, DEFAULT_BLOCK, fused_pages=fused), arch, "kernel.cu", cache_dir)
        report.append({"handlers": [h.macro(i) for i, h in enumerate(handlers)], "fused_pages": fused, **built})
    for name in OTHER_KERNELS:
        report.append({"handlers": [], "kernel": name, **_build(kernel_source(name), (), arch, name, cache_dir)})
    for name, opts in PROBE_BUILDS:
        report.append({"handlers": [], "kernel": f"{name} {' '.join(opts)}",
                       **_build(kernel_source(name), opts, arch, name, cache_dir)})
    return report


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="sm_90")
    args = p.parse_args()
    for r in compile_everything(args.arch):
        what = r.get("kernel") or (" ".join(r["handlers"]) or "(no handlers)") + (
            " + SCAN_COMMIT" if r.get("fused_pages") else "")
        sys.stdout.write(f"ok {r['cubin_bytes']:7d} B cubin, {r['linked_bytes']:7d} B via PTX+nvJitLink, "
                         f"{r['seconds']:.1f} s: {what}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
