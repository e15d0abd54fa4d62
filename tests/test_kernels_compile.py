"""Every kernel specialization compiles with NVRTC for sm_90 (no GPU needed),
its PTX assembles with nvJitLink, and compile errors are reported in full."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_runtime.cuda.compile_all import (
    OTHER_KERNELS,
    PROBE_BUILDS,
    VARIANTS,
    compile_everything,
    nvjitlink_assemble,
)
from gpu_runtime.cuda.compiler import KernelCompileError, compile_cubin, kernel_source


def test_every_specialization_compiles_for_sm90(tmp_path: Path):
    """The executor with each handler set (and, with pages handlers, with the SCAN_COMMIT task too)
    compiles to a cubin and, via PTX, links with nvJitLink; so do the other kernels and the in-step
    producer's diagnostic build."""
    report = compile_everything("sm_90", cache_dir=tmp_path)
    assert len(report) == len(VARIANTS) + len(OTHER_KERNELS) + len(PROBE_BUILDS)
    assert sum(r.get("fused_pages", False) for r in report) == 4  # the page-size sets and the all-handlers set
    for r in report:
        floor = 4_000 if r.get("kernel") else 10_000  # the checksum kernel is one small function
        assert r["cubin_bytes"] > floor and r["linked_bytes"] > floor, r
    assert [r["kernel"] for r in report if r.get("kernel")] == [
        *OTHER_KERNELS, *(f"{name} {' '.join(opts)}" for name, opts in PROBE_BUILDS)]
    probe = next(r for r in report if r.get("kernel", "").endswith("=31"))
    plain = next(r for r in report if r.get("kernel") == "step_commit.cu")
    assert probe["cubin_bytes"] != plain["cubin_bytes"]  # the probe macro reached the source


def test_cache_hit_and_corruption_is_a_miss(tmp_path: Path):
    """A second compile is served from the cache; a corrupted entry is recompiled."""
    src = kernel_source("executor.cu")
    first = compile_cubin(src, cache_dir=tmp_path)
    assert not first.cached
    again = compile_cubin(src, cache_dir=tmp_path)
    assert again.cached and again.cubin == first.cubin
    entry = next(tmp_path.glob("*.cubin"))
    raw = bytearray(entry.read_bytes())
    raw[-1] ^= 0xFF
    entry.write_bytes(bytes(raw))
    healed = compile_cubin(src, cache_dir=tmp_path)
    assert not healed.cached and healed.cubin == first.cubin


def test_compile_error_carries_source_options_and_log(tmp_path: Path):
    """Broken source raises KernelCompileError with NVRTC's log; dump() writes all three."""
    with pytest.raises(KernelCompileError) as e:
        compile_cubin('extern "C" __global__ void k() { undefined_thing(); }', cache_dir=tmp_path)
    assert "undefined_thing" in e.value.log and any("sm_90" in o for o in e.value.options)
    text = e.value.dump(tmp_path / "err.cu").read_text()
    assert "undefined_thing" in text and "options:" in text


def test_nvjitlink_rejects_invalid_ptx():
    """nvJitLink refuses PTX with an invalid instruction (so the check is real)."""
    bad = b".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry k() { frobnicate.u32 %r1; ret; }\n"
    from cuda.bindings.nvjitlink import nvJitLinkError

    with pytest.raises(nvJitLinkError, match="PTX_COMPILE"):
        nvjitlink_assemble(bad, "sm_90")


def test_device_layout_constants_match_the_python_side():
    """layout.cuh (included by concordia.cuh) spells out, for device code, layouts the Python side defines too (record
    header, ring header words, task kinds, executor states, per-task record limit): every value
    there equals its Python twin, so a change on one side only fails here, not on a GPU."""
    import re

    from gpu_runtime import logring, records
    from gpu_runtime.cuda import executor, tasks
    from gpu_runtime.cuda.region import MAX_RECORDS_PER_TASK

    assert '#include "layout.cuh"' in kernel_source("concordia.cuh")
    src = kernel_source("layout.cuh")
    defines = {m[1]: int(m[2], 0) for m in re.finditer(r"#define (CNC_\w+) (0x[0-9A-Fa-f]+|\d+)(?:u|ull)?\b", src)}
    generated = kernel_source("tasks.cuh")
    enum = generated[generated.index("enum CncTaskKind"):]
    kinds = {m[1]: int(m[2]) for m in re.finditer(r"CNC_T_(\w+) = (\d+)", enum[:enum.index("};")])}
    assert kinds == {k: v for k, v in vars(tasks.TaskKind).items() if not k.startswith("_")}
    assert '#include "tasks.cuh"' in src
    assert defines["CNC_REC_MAGIC"] == int.from_bytes(records.RECORD_MAGIC, "little")
    assert defines["CNC_REC_VERSION"] == records.RECORD_VERSION
    assert defines["CNC_REC_HEADER"] == records.HEADER_SIZE
    assert {t: defines[f"CNC_REC_{t}"] for t in ("PAGES", "ROWS", "COMMIT")} == {
        t: int(records.RecordType[t]) for t in ("PAGES", "ROWS", "COMMIT")}
    assert defines["CNC_RING_DATA_START"] == logring.DATA_START
    assert [defines[f"CNC_RING_{w}"] for w in ("OWNER_TOKEN", "WRITTEN", "COMMITTED", "COMMITTED_EPOCH",
                                                 "CONSUMED")] == [
        logring._OWNER_TOKEN, logring._WRITTEN, logring._COMMITTED, logring._COMMITTED_EPOCH, logring._CONSUMED]
    assert [defines[f"CNC_{s}"] for s in ("PARKED", "RUNNING", "PARKING", "LAUNCHED")] == [
        executor.PARKED, executor.RUNNING, executor.PARKING, executor.LAUNCHED]
    assert defines["CNC_MAX_RECORDS_PER_TASK"] == MAX_RECORDS_PER_TASK


def test_step_producer_words_match_the_python_side():
    """kernels/step_commit.cu's state and parameter words and limits equal step_commit.py's."""
    import re

    from gpu_runtime.cuda import step_commit

    src = kernel_source("step_commit.cu")
    d = {m[1]: int(m[2]) for m in re.finditer(r"#define ((?:S|P|CNC_STEP)_\w+) (\d+)", src)}
    assert [d[f"S_{n}"] for n in step_commit.STATE_WORDS] == list(range(len(step_commit.STATE_WORDS)))
    assert [d[f"P_{n}"] for n in step_commit.PARAM_WORDS] == list(range(len(step_commit.PARAM_WORDS)))
    assert (d["S_ACC"], d["P_TEMPLATE"]) == (step_commit._ACC, step_commit._P_TEMPLATE)
    assert d["P_TEMPLATE"] >= len(step_commit.PARAM_WORDS) and d["S_ACC"] >= len(step_commit.STATE_WORDS)
    assert (d["CNC_STEP_MAX_RECORDS"], d["CNC_STEP_MAX_BODY"]) == (step_commit.MAX_RECORDS, step_commit.MAX_BODY)
    # the places of the length (from P_SLOT_AT, the last named word) end before the template
    assert d["CNC_STEP_MAX_SLOTS"] == step_commit.MAX_SLOTS and step_commit.PARAM_WORDS[-1] == "SLOT_AT"
    assert d["P_SLOT_AT"] + step_commit.MAX_SLOTS <= d["P_TEMPLATE"]
