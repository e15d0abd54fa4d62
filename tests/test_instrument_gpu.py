"""Instrumentation on the GPU: the corpus computes bit-identical results with the hooks,
the pause gate holds launches and times out with an error, completion counters equal
the launches, the executor waits on them, and quiesced commits land between launches."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.ptx_corpus import CORPUS, N

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=[False, True], ids=["slots", "single-block-fast-path"])
def ins(request):  # type: ignore[no-untyped-def]
    """Instrumentation enabled, without and with the single-block fast path (every
    test runs under both rewrites; kernels CuPy memoized in-process under the
    first keep its rewrite)."""
    import cupy  # noqa: F401

    from gpu_runtime.cuda import instrument

    instrument.enable(gate_timeout=10.0, single_block=request.param)
    yield instrument
    instrument.set_gate_timeout(10.0)
    instrument.disable()
    instrument.enable(single_block=True)  # back to the default for whatever runs next
    instrument.disable()


def _x() -> np.ndarray:
    return np.random.default_rng(5).uniform(0, 10000, N).astype(np.float32)


def _run(kernel, instrumented: bool, ins) -> np.ndarray:  # type: ignore[no-untyped-def]
    import cupy

    (ins.enable if instrumented else ins.disable)()
    try:
        opts = ("-std=c++17",)
        # A different source per variant: nothing CuPy memoizes can be shared between the two.
        mod = cupy.RawModule(code=kernel.source + ("// hooked\n" if instrumented else "// plain\n"), options=opts,
                             name_expressions=list(kernel.name_expressions) or None)
        fn = mod.get_function(kernel.entry)
        x = cupy.asarray(_x())
        y = cupy.zeros(kernel.out_size, dtype=kernel.out)
        fn(kernel.grid, kernel.block, (x, y, np.int32(N)), shared_mem=kernel.smem)
        cupy.cuda.runtime.deviceSynchronize()
        return cupy.asnumpy(y)
    finally:
        ins.enable()


@pytest.mark.parametrize("kernel", CORPUS, ids=[k.name for k in CORPUS])
def test_corpus_kernel_is_bit_identical_with_hooks(ins, kernel):
    """Each raw corpus kernel gives the same bytes with and without instrumentation, and its
    instrumented launch is counted (the hooks really ran)."""
    plain = _run(kernel, False, ins)
    before = dict(ins.stats()["kernels"])
    counts = {name: ins.completion_count(name) for name in before}
    hooked = _run(kernel, True, ins)
    assert plain.tobytes() == hooked.tobytes()
    after = ins.stats()["kernels"]
    ran = [n for n in after if ins.completion_count(n) > counts.get(n, 0)]
    assert ran, f"no instrumented entry of {kernel.name} counted a launch"


def _cupy_kernels():  # type: ignore[no-untyped-def]
    """CuPy-generated kernels: fresh ElementwiseKernel / ReductionKernel instances and a fused
    function, so each compiles (through CuPy's own code path) while the test runs."""
    import cupy

    def make(tag: str):  # type: ignore[no-untyped-def]
        # Kernel names differ per variant so CuPy's memoization cannot share a module between them.
        return {
            "ew_affine": cupy.ElementwiseKernel("float32 x", "float32 y", "y = 3.0f * x - 7.0f",
                                                f"cc_ew_affine_{tag}"),
            "ew_two_out": cupy.ElementwiseKernel("float32 x", "float32 a, int32 b",
                                                 "a = sqrtf(x); b = (int)x % 17", f"cc_ew_two_out_{tag}"),
            "ew_where": cupy.ElementwiseKernel("float32 x, float32 t", "float32 y", "y = x > t ? x : -x",
                                               f"cc_ew_where_{tag}"),
            "red_sumsq": cupy.ReductionKernel("float32 x", "float64 y", "(double)x * x", "a + b", "y = a", "0",
                                              f"cc_red_sumsq_{tag}"),
            "red_maxabs": cupy.ReductionKernel("float32 x", "float32 y", "fabsf(x)", "max(a, b)", "y = a", "0",
                                               f"cc_red_maxabs_{tag}"),
            "fused": cupy.fuse(kernel_name=f"cc_fused_{tag}")(lambda a, b: a * b + cupy.sin(a)),
        }

    def run(ks):  # type: ignore[no-untyped-def]
        x = cupy.asarray(_x())
        out = {"ew_affine": ks["ew_affine"](x)}
        a, b = ks["ew_two_out"](x)
        out["ew_two_out_a"], out["ew_two_out_b"] = a, b
        out["ew_where"] = ks["ew_where"](x, np.float32(5000))
        out["red_sumsq"] = ks["red_sumsq"](x.reshape(128, -1), axis=1)
        out["red_maxabs"] = ks["red_maxabs"](x - 5000)
        out["fused"] = ks["fused"](x, x[::-1].copy())
        cupy.cuda.runtime.deviceSynchronize()
        return {k: cupy.asnumpy(v) for k, v in out.items()}

    return make, run


def test_cupy_generated_kernels_are_bit_identical_with_hooks(ins):
    """Elementwise, reduction and fused kernels compiled by CuPy give identical bytes
    instrumented; the instrumented ones are counted as rewritten entries."""
    make, run = _cupy_kernels()
    # CuPy memoizes generated modules by source, per process: the hooked kernels get a
    # name per rewrite, or the second rewrite would reuse the first one's modules.
    tag = "hooked_sb" if ins.stats()["single_block"] else "hooked"
    ins.disable()
    plain = run(make("plain"))
    ins.enable()
    entries = ins.stats()["instrumented_entries"]
    hooked = run(make(tag))
    assert ins.stats()["instrumented_entries"] >= entries + 5
    for k in plain:
        assert plain[k].tobytes() == hooked[k].tobytes(), k
    names = ins.stats()["kernels"]
    assert any(f"cc_ew_affine_{tag}" in n for n in names) and any(f"cc_red_sumsq_{tag}" in n for n in names)
    assert not any("_plain" in n for n in names)


def test_ptx_file_and_cubin_bytes_paths(ins, tmp_path):
    """RawModule(path=...ptx) is instrumented (its launch is counted); a cubin is loaded as is and
    reported as a pass-through binary, not as covered."""
    import cupy

    from gpu_runtime.cuda.compiler import compile_cubin

    src = 'extern "C" __global__ void cc_from_file(float* y) { y[threadIdx.x] = threadIdx.x; }'
    ptx = compile_cubin(src, arch="sm_90", ptx=True).cubin.rstrip(b"\0 ")
    (tmp_path / "k.ptx").write_bytes(ptx)
    y = cupy.zeros(32, cupy.float32)
    before = ins.completion_count("cc_from_file")
    cupy.RawModule(path=str(tmp_path / "k.ptx")).get_function("cc_from_file")((1,), (32,), (y,))
    cupy.cuda.runtime.deviceSynchronize()
    assert ins.completion_count("cc_from_file") == before + 1
    assert np.array_equal(cupy.asnumpy(y), np.arange(32, dtype=np.float32))
    cubin = compile_cubin(src.replace("cc_from_file", "cc_cubin"), arch="sm_90").cubin
    passthrough = ins.stats()["passthrough_binaries"]
    mod = ins.load_module(cubin)
    assert ins.stats()["passthrough_binaries"] == passthrough + 1
    mod.get_function("cc_cubin")((1,), (32,), (y,))
    cupy.cuda.runtime.deviceSynchronize()
    assert ins.completion_count("cc_cubin") == 0


FLAG = 'extern "C" __global__ void cc_flag(int* y, int v) { if (threadIdx.x == 0) atomicAdd(&y[blockIdx.x], v); }'


def _peek(arr) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Read a device array on a non-blocking stream (the default stream would wait for a paused kernel)."""
    import cupy

    s = cupy.cuda.Stream(non_blocking=True)
    host = cupy.cuda.alloc_pinned_memory(arr.nbytes)
    out = np.frombuffer(host, arr.dtype, arr.size)
    cupy.cuda.runtime.memcpyAsync(out.ctypes.data, arr.data.ptr, arr.nbytes, cupy.cuda.runtime.memcpyDeviceToHost,
                                  s.ptr)
    s.synchronize()
    return out.copy()


def test_pause_gate_holds_a_launch_until_release_and_times_out_with_an_error(ins):
    """With the pause set, a launched kernel's body does not run (no side effect) until release;
    with a short gate timeout the launch runs after it and paused() raises GateTimeoutError."""
    import cupy

    fn = cupy.RawModule(code=FLAG).get_function("cc_flag")
    y, one = cupy.zeros(64, cupy.int32), cupy.zeros(1, cupy.int32)
    s, s1 = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    ins.hold()
    try:
        with s:
            fn((64,), (128,), (y, np.int32(1)))
        with s1:  # a one-block launch (the fast path's gate, where enabled)
            fn((1,), (128,), (one, np.int32(1)))
        time.sleep(0.3)
        assert _peek(y).sum() == 0 and _peek(one).sum() == 0, "a block ran its body while paused"
        assert ins.active_launches() == 0
    finally:
        ins.release()
    s.synchronize()
    s1.synchronize()
    assert np.array_equal(cupy.asnumpy(y), np.ones(64, np.int32)) and int(one[0]) == 1

    ins.set_gate_timeout(0.2)
    try:
        with pytest.raises(ins.GateTimeoutError, match="past the gate timeout"), ins.paused():
            with s:
                fn((64,), (128,), (y, np.int32(1)))
            time.sleep(0.6)
            assert _peek(y).sum() == 128  # it ran after the timeout instead of hanging
    finally:
        ins.set_gate_timeout(10.0)
    s.synchronize()


HAMMER = r"""
extern "C" __global__ void cc_hammer(unsigned long long* word, unsigned int* bad, unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        unsigned long long old = atomicAdd(word, 1ull);
        if ((old >> 32) > 1ull || (unsigned int)old > 1000000u) atomicOr(bad, 1u);
        atomicAdd(word, ~0ull);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"""


def test_host_pause_writes_and_device_admission_atomics_lose_nothing(ins):
    """The admission word holds the launch count (low half, device atomics) and the pause (high
    half, 4-byte host writes): while 135k threads add and remove themselves for 0.5 s, the host
    sets and clears the pause over and over. Every write reads back, no atomic saw a count
    (from before its own add) above the threads running or a pause other than 0/1, and the word
    ends at exactly 0."""
    import cupy

    from gpu_runtime.cuda.ptx import CTL_ADMIT, CTL_PAUSE

    ins.disable()  # the hammer itself must not pass a gate
    try:
        hammer = cupy.RawModule(code=HAMMER).get_function("cc_hammer")
    finally:
        ins.enable()
    bad = cupy.zeros(1, cupy.uint32)
    word = cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ins._ctl_ptr() + CTL_ADMIT, 8, ins._state().ctl), 0)
    s = cupy.cuda.Stream(non_blocking=True)
    done = cupy.cuda.Event()
    with s:
        hammer((132 * 4,), (256,), (word, bad, np.uint64(500_000_000)))
        done.record()
    toggles = 0
    try:
        while not done.done:
            ins.hold()
            assert ins._read(CTL_PAUSE, 4).view(np.uint32)[0] == 1
            ins.release()
            assert ins._read(CTL_PAUSE, 4).view(np.uint32)[0] == 0
            toggles += 1
    finally:
        ins.release()
    s.synchronize()
    assert toggles >= 100, f"expected the host to toggle the pause many times during the run, found {toggles}"
    assert int(bad[0]) == 0, "an atomic saw a corrupted admission word"
    assert int(ins._read(CTL_ADMIT, 8).view(np.uint64)[0]) == 0, "count or pause lost an update"


def test_completion_counters_equal_launches_and_the_executor_waits_on_them(ins):
    """10^4 launches of varied grid shapes on 5 streams — one of them 70 001 blocks, so its blocks count
    through the sub-counters and mostly find their slot in L1 — the counter ends at exactly 10^4, and a
    FENCE_WAIT task on the persistent executor for that value completes (no host sync)."""
    import cupy

    from gpu_runtime.backend import open_backend

    src = 'extern "C" __global__ void cc_tick(int* y) { atomicAdd(&y[blockIdx.x & 7], 1); }'
    fn = cupy.RawModule(code=src).get_function("cc_tick")
    y = cupy.zeros(8, cupy.int32)
    backend = open_backend("cupy")
    try:
        base = ins.completion_count("cc_tick")
        shapes = [((1,), (32,)), ((3,), (64,)), ((2, 2), (16, 2)), ((5,), (128,)), ((70_001,), (32,))]
        streams = [cupy.cuda.Stream(non_blocking=True) for _ in shapes]
        for i in range(10_000):
            k = i % len(shapes)
            with streams[k]:
                fn(shapes[k][0], shapes[k][1], (y,))
        c = ins.completion("cc_tick", launches=base + 10_000)
        ticket = c.wait_on(backend.executor, timeout=60)
        backend.executor.wait(ticket, timeout=60)
        assert c.done() and ins.completion_count("cc_tick") == base + 10_000
        threads = sum(int(np.prod(shapes[i % len(shapes)][0]) * np.prod(shapes[i % len(shapes)][1]))
                      for i in range(10_000))
        assert int(cupy.asnumpy(y).sum()) == threads  # every thread of every launch ran once
        for st in streams:
            st.synchronize()
        assert ins.active_launches() == 0
    finally:
        backend.close()


def test_stream_completion_orders_after_precompiled_work(ins):
    """stream_completion() covers work no hook sees (a cuBLAS GEMM): it is done only after it."""
    import cupy

    s = cupy.cuda.Stream(non_blocking=True)
    a = cupy.random.random((2048, 2048), dtype=cupy.float32)
    with s:
        for _ in range(20):
            a = a @ a / 2048
        c = ins.stream_completion(s)
    s.synchronize()
    assert c.done()


BUMP = r'''
extern "C" __global__ void cc_bump(int* y, int n, int v, long long spin) {
    if (threadIdx.x == 0) {  // hold the block for `spin` cycles: a launch takes a while, so commits land mid-storm
        long long t0 = clock64();
        while (clock64() - t0 < spin) { }
    }
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) y[i] = v;
}
'''


def test_quiesced_commits_land_between_launches(ins, tmp_path):
    """Launch storms overwrite a registered region with the launch number while commit(quiesce=True)
    runs mid-storm: every committed epoch holds one launch's complete output, never a mix."""
    import cupy

    from concordia_agents import Runtime

    fn = cupy.RawModule(code=BUMP).get_function("cc_bump")
    n = 1 << 20
    rt = Runtime.open(home=tmp_path, backend="cupy")
    try:
        s = rt.session("quiesce")
        y = cupy.zeros(n, cupy.int32)
        s.register("y", y)
        s.commit({"v": 0})
        s.close()
        stream = cupy.cuda.Stream(non_blocking=True)
        seen = []
        rng = np.random.default_rng(1)
        for rnd in range(6):
            s = rt.resume("quiesce")
            state = s.regions["y"].array
            values = np.unique(cupy.asnumpy(state))
            assert values.size == 1, f"round {rnd}: epoch {s.epoch} mixes launches {values[:8]}"
            seen.append(int(values[0]))
            start = (rnd + 1) * 1000
            with stream:
                for v in range(start, start + 200):
                    fn((264,), (256,), (state, np.int32(n), np.int32(v), np.int64(200_000)))
            time.sleep(float(rng.uniform(0.002, 0.012)))
            s.commit({"round": rnd}, quiesce=True)
            stream.synchronize()
            s.close()
        s = rt.resume("quiesce")
        values = np.unique(cupy.asnumpy(s.regions["y"].array))
        assert values.size == 1
        seen.append(int(values[0]))
        s.close()
        # each epoch is a launch boundary inside its storm (not the storm's end, not torn)
        assert all((r + 1) * 1000 <= v < (r + 1) * 1000 + 200 for r, v in enumerate(seen[1:])), seen
        assert any(v < (r + 1) * 1000 + 199 for r, v in enumerate(seen[1:])), f"no commit landed mid-storm: {seen}"
    finally:
        rt.close()


HELD = r"""
__device__ void cc_gid(unsigned long long* gid) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        unsigned long long g; asm volatile("mov.u64 %0, %%gridid;" : "=l"(g)); *gid = g;
    }
}
extern "C" __global__ void cc_hold(volatile int* flag, unsigned long long* gid) {
    cc_gid(gid);
    if (threadIdx.x == 0) { while (*flag == 0) { __nanosleep(1000); } }
}
extern "C" __global__ void cc_mark(int* out, unsigned long long* gid) {
    cc_gid(gid);
    if (threadIdx.x == 0) atomicAdd(out, 1);
}
extern "C" __global__ void cc_gid_only(unsigned long long* gid) { cc_gid(gid); }
"""


def test_a_launch_waits_while_its_slot_is_held_by_a_launch_1024_grid_ids_older(ins):
    """A launch's slot is its grid ID mod CTL_SLOT_COUNT: a two-block launch whose slot an older,
    still running two-block launch holds does not run its body until that one finishes, then runs
    once and is counted (the grid IDs in between are taken by uninstrumented launches)."""
    import cupy

    from gpu_runtime.cuda.ptx import CTL_SLOT_COUNT

    mod = cupy.RawModule(code=HELD)
    hold, mark = mod.get_function("cc_hold"), mod.get_function("cc_mark")
    ins.disable()
    try:
        gid_only = cupy.RawModule(code=HELD + "// plain\n").get_function("cc_gid_only")
    finally:
        ins.enable()
    flag, out = cupy.zeros(1, cupy.int32), cupy.zeros(1, cupy.int32)
    gids = cupy.zeros(3, cupy.uint64)
    s1, s2 = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    before = ins.completion_count("cc_mark")
    with s1:
        hold((2,), (32,), (flag, gids[0:1]))
    try:
        deadline = time.monotonic() + 10
        while (older := int(_peek(gids)[0])) == 0:
            assert time.monotonic() < deadline, "the holding launch never started"
            time.sleep(0.001)
        for _ in range(3 * CTL_SLOT_COUNT):  # take grid IDs until the next launch maps to the same slot
            with s2:
                gid_only((1,), (1,), (gids[1:2],))
            s2.synchronize()
            if (int(_peek(gids)[1]) + 1) % CTL_SLOT_COUNT == older % CTL_SLOT_COUNT:
                break
        with s2:
            mark((2,), (32,), (out, gids[2:3]))
        time.sleep(0.3)
        got = _peek(gids)
        if int(got[2]) % CTL_SLOT_COUNT != older % CTL_SLOT_COUNT and int(got[2]) != 0:
            pytest.fail(f"another launch took grid ID {int(got[1]) + 1}: the marked launch got {int(got[2])}")
        assert _peek(out).sum() == 0 and int(got[2]) == 0, "a launch ran while its slot was held"
    finally:
        # a copy on a third stream (s2 waits behind the held launch), not a kernel: no grid ID taken
        flag.set(np.ones(1, np.int32), stream=cupy.cuda.Stream(non_blocking=True))
    s1.synchronize()
    s2.synchronize()
    assert int(out[0]) == 2 and int(gids[2].get()) % CTL_SLOT_COUNT == older % CTL_SLOT_COUNT
    assert ins.completion_count("cc_mark") == before + 1 and ins.active_launches() == 0
