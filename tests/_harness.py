"""Builds tests/cuda/plan_harness.cpp: the device's planning and task accessors
(``gpu_runtime/cuda/kernels/plan.cuh``, ``tasks.cuh``) compiled as host C++ and
loaded with ctypes. Tests that use it skip, with the reason, where no C++
compiler exists (CI's machine has g++)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from gpu_runtime.cuda.compiler import kernels_dir
from gpu_runtime.cuda.tasks import LAYOUTS, accessor

HERE = Path(__file__).parent
_built: dict[Path, ctypes.CDLL] = {}


def task_fields_source() -> str:
    """The body of ``cnc_test_task_fields``: every accessor, in LAYOUTS order."""
    lines = ["u64 cnc_test_task_fields(const u64* words, u64* out) {", "    CncTask t = {};",
             "    for (int i = 0; i < 14; ++i) t.a[i] = words[i];", "    u64 i = 0;"]
    for lay in LAYOUTS.values():
        lines += [f"    out[i++] = {accessor(lay, f)}(t);" for f in lay.fields]
    lines += ["    return i;", "}"]
    return "\n".join(lines) + "\n"


def harness(tmp_dir: Path) -> ctypes.CDLL:
    """The compiled harness (built once per directory)."""
    if tmp_dir in _built:
        return _built[tmp_dir]
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++/c++/clang++) on this machine to build the host planning harness")
    (tmp_dir / "task_fields.inc").write_text(task_fields_source())
    lib = tmp_dir / "plan_harness.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{kernels_dir()}",
                    f"-I{tmp_dir}", str(HERE / "cuda" / "plan_harness.cpp"), "-o", str(lib)],
                   check=True, capture_output=True, text=True)
    dll = ctypes.CDLL(str(lib))
    u64, p64 = ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)
    dll.cnc_test_rows.argtypes = [u64, u64, u64, u64, u64, u64, p64]
    dll.cnc_test_rows.restype = u64
    dll.cnc_test_pages.argtypes = [u64, u64, p64, u64, u64, u64, u64, p64, p64]
    dll.cnc_test_pages.restype = ctypes.c_int
    dll.cnc_test_task_fields.argtypes = [p64, p64]
    dll.cnc_test_task_fields.restype = u64
    _built[tmp_dir] = dll
    return dll
