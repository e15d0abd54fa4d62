"""The CuPy backend on a real GPU: executor, hot swap, self-parking, identical
logs on both backends, fences, and crash recovery. Skipped (with the reason)
where no CUDA GPU with CuPy is present."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from concordia_agents import Runtime
from concordia_agents._replay import scan
from gpu_runtime.records import session_tag

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def executor():  # type: ignore[no-untyped-def]
    from gpu_runtime.cuda.executor import Executor

    ex = Executor(nslots=4096, idle_ms=5, max_life_ms=300)
    yield ex
    ex.close()


def test_executor_round_trip(executor):
    """One NOP task runs once and its completion is seen by the host."""
    import cupy

    from gpu_runtime.cuda.tasks import TaskKind

    out = cupy.zeros(4, dtype=cupy.uint64)
    t = executor.enqueue(TaskKind.NOP, [int(out.data.ptr), 2])
    executor.wait(t, timeout=10)
    assert out.get().tolist() == [0, 0, 1, 0]


def test_hundred_thousand_tasks_wrap_around_exactly_once(executor):
    """10^5 tasks through a 4096-slot ring (24 wraps): each runs exactly once."""
    import cupy

    from gpu_runtime.cuda.tasks import TaskKind

    n = 100_000
    out = cupy.zeros(n, dtype=cupy.uint64)
    ptr = int(out.data.ptr)
    last = 0
    for i in range(n):
        last = executor.enqueue(TaskKind.NOP, [ptr, i])
    executor.wait(last, timeout=120)
    counts = out.get()
    assert counts.min() == 1 and counts.max() == 1


def test_hot_swap_under_load(executor):
    """Tasks enqueued before, during and after two hot swaps all run once, and
    the new handler serves a region afterwards."""
    import cupy

    from gpu_runtime.cuda.executor import Handler
    from gpu_runtime.cuda.tasks import TaskKind

    n = 20_000
    out = cupy.zeros(n, dtype=cupy.uint64)
    ptr = int(out.data.ptr)
    done = threading.Event()

    def produce() -> None:
        for i in range(n):
            executor.enqueue(TaskKind.NOP, [ptr, i])
        done.set()

    swaps = executor.swaps
    th = threading.Thread(target=produce)
    th.start()
    time.sleep(0.01)
    executor.handler_id(Handler("pages", 8192))
    executor.handler_id(Handler("kv", 24))
    th.join()
    executor.wait_all(timeout=120)
    assert executor.swaps == swaps + 2
    assert out.get().min() == 1 and out.get().max() == 1


def test_fence_wait_yields_then_runs_once(executor):
    """A FENCE_WAIT on a word not yet written parks the executor after the yield
    window instead of keeping it resident (what would write the word may need it
    gone); the next relaunch resumes the wait, which runs once, then the task
    behind it. Its timeout counts from the first wait, across yields."""
    import cupy

    from gpu_runtime.cuda.executor import PARKED, ExecutorError
    from gpu_runtime.cuda.tasks import TaskKind

    word = cupy.zeros(1, dtype=cupy.uint64)
    out = cupy.zeros(2, dtype=cupy.uint64)
    cupy.cuda.get_current_stream().synchronize()
    parks = executor.parks
    w = executor.enqueue(TaskKind.FENCE_WAIT, [int(word.data.ptr), 1, int(5e9)])
    n = executor.enqueue(TaskKind.NOP, [int(out.data.ptr), 0])
    time.sleep(0.2)  # nothing relaunches it meanwhile (no enqueue, no wait, no flusher here)
    assert executor.head == w, "the wait was retired before its word was written"
    assert executor.state == PARKED and executor.parks > parks, "the executor stayed resident while waiting"
    word.fill(1)
    cupy.cuda.get_current_stream().synchronize()
    executor.wait(n, timeout=10)
    assert out.get().tolist() == [1, 0]

    never = cupy.zeros(1, dtype=cupy.uint64)
    cupy.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    stuck = executor.enqueue(TaskKind.FENCE_WAIT, [int(never.data.ptr), 1, int(0.3e9)])
    with pytest.raises(ExecutorError, match="fence wait timed out"):
        executor.wait(stuck, timeout=10)
    assert time.perf_counter() - t0 < 5.0


def test_self_parking_unblocks_host_calls(tmp_path):
    """With the runtime active and its executor idle, device-wide syncs, cache
    release and loading a new CuPy kernel each return within 1 s."""
    import cupy
    import torch

    torch.ones(1, device="cuda").sum().item()  # frameworks initialized first
    with Runtime.open(home=tmp_path, backend="cupy") as rt:
        s = rt.session("park")
        x = cupy.zeros(1 << 20, dtype=cupy.uint8)
        s.register("x", x)
        s.commit()
        time.sleep(0.05)  # idle: the executor parks itself
        for name, fn in [
            ("torch.cuda.synchronize", torch.cuda.synchronize),
            ("torch.cuda.empty_cache", torch.cuda.empty_cache),
            ("new CuPy kernel", lambda: cupy.ElementwiseKernel("T x", "T y", f"y = x + {os.getpid()}",
                                                                 f"cnc_fresh_{time.time_ns()}")(x)),
            ("cupy device synchronize", cupy.cuda.Device().synchronize),
        ]:
            t = time.perf_counter()
            fn()
            assert time.perf_counter() - t < 1.0, name
        s.close()


def test_resident_keeps_the_executor_between_commits_then_parks(tmp_path):
    """Backend.resident (durable_generate's decode loop): commits 30 ms apart
    find the executor still running (with the default 10 ms window it has
    parked by then); after the block the windows are back and the executor
    parked, so a device synchronize returns at once; with a short maximum
    lifetime a synchronize inside the block waits for it, not for the idle
    window."""
    import cupy

    from gpu_runtime.cuda.executor import PARKED, RUNNING

    with Runtime.open(home=tmp_path, backend="cupy") as rt:
        be, ex = rt.backend, rt.backend.executor
        kv = cupy.zeros((2, 64, 8), cupy.float32)
        s = rt.session("resident")
        s.register("kv", kv, kind="kv", seq_axis=1)
        s.commit(rows={"kv": 1})
        time.sleep(0.03)
        assert ex.state == PARKED  # the default window
        with be.resident(300.0):
            s.commit(rows={"kv": 2})
            parks = ex.parks
            for n in range(3, 9):
                time.sleep(0.03)
                assert ex.state == RUNNING
                s.commit(rows={"kv": n})
            assert ex.parks == parks
        assert ex.idle_ms == 10.0 and ex.max_life_ms == 500.0 and ex.state == PARKED
        t = time.monotonic()
        cupy.cuda.Device().synchronize()
        assert time.monotonic() - t < 0.05
        # max_life_ms bounds the stay (what durable_generate relies on for a
        # kernel module loaded mid-generation): a synchronize right after a
        # commit waits for the 60 ms lifetime, not for the 300 ms idle window.
        with be.resident(300.0, max_life_ms=60.0):
            s.commit(rows={"kv": 9})
            t = time.monotonic()
            cupy.cuda.Device().synchronize()
            waited = time.monotonic() - t
        assert waited < 0.2, waited
        assert ex.idle_ms == 10.0 and ex.max_life_ms == 500.0
        assert s.epoch == 9
        s.close()


def test_commit_behind_a_first_kernel_load_does_not_deadlock(tmp_path):
    """A commit fenced behind the first launch of a lazily loaded kernel, issued
    while the executor is resident: the launch waits for no kernel to be
    resident, the executor for the fence behind it. The executor yields (parks
    with the task unretired) and is relaunched, so every epoch becomes visible.
    Measured on the H100: with ``fence_yield_ms=0`` (no yield) the same child
    hangs (each fence wait runs into its 10 s timeout, the executor never parks)."""
    proc = subprocess.run([sys.executable, "-m", "tests._lazy_load_child", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("visible")][-1]
    _, visible, _, epoch, _, seconds, _ = line.split()
    assert int(visible) == int(epoch) == 31
    assert float(seconds) < 10.0, line  # no fence wait ran into its timeout


def _log_digest(directory: Path, sid: str) -> list[tuple]:
    idx = scan(directory, session_tag=session_tag(sid))
    out = []
    for rid, locs in idx.records.items():
        for loc in locs:
            h = loc.header
            out.append((h.epoch, h.type.name, rid, h.offset, h.length, h.aux, h.payload_sum))
    return sorted(out)


def test_host_and_gpu_backends_write_the_same_log(tmp_path):
    """Identical inputs give identical data records (type, region, offset,
    length, payload checksum) on the host and CuPy backends."""
    import cupy

    rng = np.random.default_rng(0)
    pages = rng.integers(0, 256, 64 * 4096, dtype=np.uint8)
    kv = rng.standard_normal((4, 2, 256, 32)).astype(np.float32)
    digests = {}
    for backend in ("host", "cupy"):
        with Runtime.open(home=tmp_path / backend, backend=backend, max_record_bytes=16 << 10) as rt:
            s = rt.session("same")
            p = pages.copy() if backend == "host" else cupy.asarray(pages)
            k = kv.copy() if backend == "host" else cupy.asarray(kv)
            s.register("pages", p)
            s.register("kv", k, kind="kv", seq_axis=2)
            s.commit({"e": 1}, rows={"kv": 40})
            for e in range(2, 6):
                idx = np.random.default_rng(e).integers(0, p.size, 30)
                p[idx] = (e * 7) % 256
                s.commit({"e": e}, rows={"kv": 40 + 10 * e})
            s.flush()
            digests[backend] = _log_digest(rt.session_dir("same"), "same")
            s.close()
    assert digests["host"] == digests["cupy"]
    assert len(digests["host"]) > 10


def _log_records(directory: Path) -> list[tuple]:
    """Every record of a session's delta segments in log order, as raw bytes,
    except REGION records (their descriptor names the array library and
    device, which differ by backend): those as fields with the JSON decoded."""
    import json

    from concordia_agents._segments import SEGMENT_HEADER_SIZE, list_segments
    from gpu_runtime.records import HEADER_SIZE, RecordType, decode_header

    _, deltas = list_segments(directory)
    raw = b"".join(seg.path.read_bytes()[SEGMENT_HEADER_SIZE:] for seg in deltas)
    out: list[tuple] = []
    pos = 0
    while pos < len(raw):
        h = decode_header(raw[pos:pos + HEADER_SIZE])
        size = h.size
        if h.type is RecordType.REGION:
            spec = json.loads(raw[pos + HEADER_SIZE:pos + HEADER_SIZE + h.length])
            del spec["library"], spec["device"]
            out.append((h.epoch, h.region, spec))
        else:
            out.append((raw[pos:pos + size],))
        pos += size
    return out


def test_per_token_commits_write_the_host_backends_bytes(tmp_path):
    """The small-append path (one reservation, a task per region, the COMMIT
    header made on the device) writes byte for byte the log the host backend
    writes: bodies of every length mod 8, appends of one to three rows, epochs
    where one region appends nothing, a larger epoch and a 100 kB body in
    between that take the general path, and a ring that wraps around several
    times."""
    import cupy

    rng = np.random.default_rng(7)
    kv = rng.standard_normal((8, 2, 1600, 24)).astype(np.float32)  # 1536 bytes a row
    tokens = rng.integers(0, 50_000, (2, 1600))
    logs, epochs = {}, {}
    for backend in ("host", "cupy"):
        with Runtime.open(home=tmp_path / backend, backend=backend, ring_bytes=1 << 20,
                          max_record_bytes=16 << 10, fsync="none",
                          compact_epochs=0) as rt:  # compaction would fold the records compared
            s = rt.session("append")
            k = kv.copy() if backend == "host" else cupy.asarray(kv)
            t = tokens.copy() if backend == "host" else cupy.asarray(tokens)
            s.register("kv", k, kind="kv", seq_axis=2)
            s.register("tokens", t, kind="kv", seq_axis=1)
            n = 40
            s.commit({"prompt": n}, rows={"kv": n, "tokens": n})
            step = 0
            while n < 1590:
                step += 1
                grow = 30 if step == 200 else 1 + step % 3  # 30 rows: more than one record (10 rows)
                n = min(n + grow, 1600)
                rows = {"tokens": n} if step % 17 == 0 else {"kv": n, "tokens": n}
                pad = "x" * (100_000 if step == 300 else step % 11)  # 100 kB: a body for the general path
                s.commit({"step": step, "pad": pad}, rows=rows, wait=step % 50 == 0)
            s.flush()
            logs[backend], epochs[backend] = _log_records(rt.session_dir("append")), s.epoch
            s.close()
        index = scan(tmp_path / backend / "sessions" / os.listdir(tmp_path / backend / "sessions")[0],
                     session_tag=session_tag("append"))
        assert index.epoch == epochs[backend]
        assert index.meta == {"step": step, "pad": "x" * (step % 11)}
    assert epochs["host"] == epochs["cupy"] > 700
    assert sum(len(r[0]) for r in logs["host"] if len(r) == 1) > 2 << 20  # the 1 MiB ring wrapped around twice
    assert len(logs["cupy"]) == len(logs["host"])
    for i, (a, b) in enumerate(zip(logs["cupy"], logs["host"], strict=True)):
        assert a == b, f"record {i} differs"


@pytest.mark.parametrize(("nbytes", "ps"), [(64 * 4096, 4096), (64 * 4096 + 1024, 4096), (45 * 4096, 4096),
                                           (70_000 * 256 - 128, 256)])
def test_fused_pages_commits_write_the_host_backends_bytes(tmp_path, nbytes, ps):
    """Pages epochs of one region take one SCAN_COMMIT task (scan, records, COMMIT on the device) and
    write byte for byte the host backend's log: one dirty page, scattered pages, runs longer than a
    record (cut every 16 KiB), the first and the last (short) page, nothing dirty, bodies of every
    length mod 8, a 1 MiB ring that wraps around, and (256-byte pages) a bitmap of two tiles with a
    run across their boundary. Epochs whose records do not fit its span (128 KiB here) or exceed 256
    records fall back to the two-phase path from the same scan."""
    import cupy

    npages = -(-nbytes // ps)
    base = np.random.default_rng(11).integers(0, 256, nbytes, dtype=np.uint8)
    patterns = [[0], [npages - 1], [], list(range(5, 15)), [1, 2, 3, 40, 41, npages - 2, npages - 1],
                list(range(0, npages, 2)), list(range(npages)), [7]]
    if npages > 65_600:  # the device walks its bitmap 65 536 pages (one tile) at a time
        patterns += [list(range(65_500, 65_600)), [65_535, 65_536], [65_536], list(range(65_536 - 64, 65_536))]
    logs, counts = {}, {}
    for backend in ("host", "cupy"):
        with Runtime.open(home=tmp_path / backend, backend=backend, ring_bytes=1 << 20,
                          max_record_bytes=16 << 10, fsync="none",
                          backend_options={"fused_pages": True} if backend == "cupy" else {}) as rt:
            s = rt.session("pages")
            p = base.copy() if backend == "host" else cupy.asarray(base)
            s.register("p", p, page_size=ps)
            s.commit({"first": 1})
            for e in range(60):
                pages = patterns[e % len(patterns)] if e < 40 else \
                    sorted(np.random.default_rng(e).choice(npages, 1 + e % 33, replace=False).tolist())
                idx = np.asarray(pages, dtype=np.int64) * ps
                p[idx if backend == "host" else cupy.asarray(idx)] += 1 + e  # uint8: wraps
                s.commit({"e": e, "pad": "y" * (e % 9)})
            s.flush()
            logs[backend] = _log_records(rt.session_dir("pages"))
            if backend == "cupy":
                counts = {"fused": rt.backend.fused_commits, "fallback": rt.backend.fused_fallbacks}
            s.close()
    assert counts["fused"] >= 40 and counts["fallback"] >= 5, counts
    assert sum(len(r[0]) for r in logs["host"] if len(r) == 1) > 1 << 20  # the 1 MiB ring wrapped
    assert len(logs["cupy"]) == len(logs["host"])
    for i, (a, b) in enumerate(zip(logs["cupy"], logs["host"], strict=True)):
        assert a == b, f"record {i} differs"


def test_kv_epoch_larger_than_the_ring_streams_through_it(tmp_path):
    """One 4 MiB epoch of kv rows through a 1 MiB ring on the CuPy backend: its
    groups are reserved one at a time and `written` is published as they go,
    so the flusher drains the ring meanwhile (with every group reserved up
    front, as before, the commit waited for space until LogFullError). Then a
    second epoch, and the resumed rows are bit-exact."""
    import cupy

    kv = cupy.asarray(np.random.default_rng(3).standard_normal((8, 2, 1024, 64)).astype(np.float32))  # 4 KiB a row
    with Runtime.open(home=tmp_path, backend="cupy", ring_bytes=1 << 20, max_record_bytes=64 << 10,
                      space_timeout=20) as rt:
        s = rt.session("big")
        s.register("kv", kv, kind="kv", seq_axis=2)
        t = time.monotonic()
        s.commit({"n": 1000}, rows={"kv": 1000})
        s.commit({"n": 1024}, rows={"kv": 1024})
        s.flush()
        assert time.monotonic() - t < 15
        s.close()
    with Runtime.open(home=tmp_path, backend="cupy") as rt:
        r = rt.resume("big")
        got = r.regions["kv"]
        assert got.length == 1024 and r.meta == {"n": 1024}
        assert bool((got.array == kv).all())
        r.close()


def test_an_epoch_abandoned_between_reservations_leaves_no_hole(tmp_path):
    """A commit that raises after some of its epoch's groups were reserved (here the second reservation
    fails, as when the flusher stops while it waits for ring space) leaves no unfilled span in the ring:
    the planned groups are published as an aborted attempt, the rest given back. The same epoch then
    commits, the flusher copies everything (a hole would stop it for good: issue 15 review), and the
    session resumes bit-exact."""
    import cupy

    from concordia_agents import LogFullError

    kv = cupy.asarray(np.random.default_rng(4).standard_normal((8, 2, 1024, 64)).astype(np.float32))
    with Runtime.open(home=tmp_path, backend="cupy", ring_bytes=1 << 20, max_record_bytes=64 << 10,
                      space_timeout=20) as rt:
        s = rt.session("hole")
        s.register("kv", kv, kind="kv", seq_axis=2)
        s.commit({"n": 100}, rows={"kv": 100})
        writer = s._log.writer
        real, calls = writer.reserve, []

        def failing(size: int) -> int:
            calls.append(size)
            if len(calls) == 2:
                raise LogFullError("injected: the flusher stopped")
            return real(size)

        writer.reserve = failing  # type: ignore[method-assign]
        with pytest.raises(LogFullError, match="injected"):
            s.commit({"n": 700}, rows={"kv": 700})
        writer.reserve = real  # type: ignore[method-assign]
        assert len(calls) == 2 and s.epoch == 1
        s.commit({"n": 700}, rows={"kv": 700})
        s.commit({"n": 1024}, rows={"kv": 1024})
        assert s.flush(timeout=20) == 3
        s.close()
    with Runtime.open(home=tmp_path, backend="cupy") as rt:
        r = rt.resume("hole")
        got = r.regions["kv"]
        assert r.epoch == 3 and got.length == 1024 and r.meta == {"n": 1024}
        assert bool((got.array == kv).all())
        r.close()


def test_commit_fences_in_flight_torch_work(tmp_path):
    """A commit issued while torch work is still queued logs the values that work
    writes (the executor waits on a device fence; the host never synchronizes)."""
    import torch

    with Runtime.open(home=tmp_path, backend="cupy") as rt:
        s = rt.session("fence")
        kv = torch.zeros(2, 64, 1024, dtype=torch.float32, device="cuda")
        s.register("kv", kv, kind="kv", seq_axis=1)
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):
            a = torch.tanh(a @ a)  # ~milliseconds of queued work, values stay finite
        kv[:, :8] = a[:128, :1024].reshape(2, 64, 1024)[:, :8]
        s.commit(rows={"kv": 8}, wait=False)
        expected = kv[:, :8].cpu().numpy()
        s.flush()
        s._abandon()
    from .conftest import expire_lease

    expire_lease(f"sqlite:///{tmp_path / 'catalog.db'}", "fence")
    with Runtime.open(home=tmp_path, backend="cupy") as rt:
        r = rt.resume("fence")
        assert np.array_equal(r.regions["kv"].array[:, :8].cpu().numpy(), expected)
        r.close()


def test_commit_fence_waits_for_every_caller_stream(tmp_path):
    """A torch region on a torch stream and a CuPy region on a CuPy stream that
    is held by a kernel spinning on a host flag: the commit's epoch does not
    become visible while the CuPy stream is held (one fence word written on
    each stream would let the torch stream's fence release the executor), and
    once released it holds what the CuPy stream wrote after the hold."""
    import cupy
    import torch

    from gpu_runtime.cuda.memory import PinnedBuffer

    hold = cupy.RawKernel(r"""
    extern "C" __global__ void hold(volatile unsigned long long* flag, float* b) {
        while (flag[0] == 0) __nanosleep(1000);
        for (int i = threadIdx.x; i < 8 * 1024; i += blockDim.x) b[i] = 5.0f + i;
    }""", "hold")
    flag = PinnedBuffer(8)
    flag.view(np.uint64)[0] = 0
    try:
        with Runtime.open(home=tmp_path, backend="cupy") as rt:
            s = rt.session("streams")
            a = torch.zeros(64, 1024, dtype=torch.float32, device="cuda")
            b = cupy.zeros((64, 1024), dtype=cupy.float32)
            s.register("a", a, kind="kv", seq_axis=0)
            s.register("b", b, kind="kv", seq_axis=0)
            hold.compile()  # loaded now: a module load waits while a kernel is resident
            torch.cuda.synchronize()
            a_stream, b_stream = torch.cuda.Stream(), cupy.cuda.Stream(non_blocking=True)
            with torch.cuda.stream(a_stream), b_stream:
                hold((1,), (256,), (cupy.uint64(flag.device_ptr), b))
                a[:8] = 2
                epoch = s.commit(rows={"a": 8, "b": 8}, wait=False)
            a_stream.synchronize()
            time.sleep(0.3)
            visible_while_held = s._log.ring.committed_epoch >= epoch
            flag.view(np.uint64)[0] = 1
            b_stream.synchronize()
            s.flush()
            s._abandon()
            assert not visible_while_held, "the epoch was copied before the CuPy stream reached its commit point"
        from .conftest import expire_lease

        expire_lease(f"sqlite:///{tmp_path / 'catalog.db'}", "streams")
        with Runtime.open(home=tmp_path, backend="cupy") as rt:
            r = rt.resume("streams")
            assert (r.regions["a"].array[:8].cpu().numpy() == 2).all()
            assert np.array_equal(cupy.asnumpy(r.regions["b"].array[:8]).ravel(),
                                  5.0 + np.arange(8 * 1024, dtype=np.float32))
            r.close()
    finally:
        flag.view(np.uint64)[0] = 1  # never leave the kernel spinning
        cupy.cuda.Device().synchronize()
        flag.close()


def test_gpu_resume_is_bit_exact_for_torch_and_cupy(tmp_path):
    """torch (bf16) and CuPy regions on the GPU come back bit-exact on the GPU."""
    import cupy
    import torch

    from .conftest import expire_lease

    kv = torch.randn(32, 8, 512, 64, device="cuda").to(torch.bfloat16)
    table = cupy.random.default_rng(1).integers(0, 2**31, 1 << 20, dtype=cupy.int64)
    with Runtime.open(home=tmp_path, backend="cupy") as rt:
        s = rt.session("exact")
        s.register("kv", kv, kind="kv", seq_axis=2)
        s.register("table", table)
        s.commit(rows={"kv": 100})
        table[5] = -1
        s.commit(rows={"kv": 130})
        s._abandon()
    expire_lease(f"sqlite:///{tmp_path / 'catalog.db'}", "exact")
    with Runtime.open(home=tmp_path, backend="cupy") as rt:
        r = rt.resume("exact")
        got = r.regions["kv"]
        assert got.array.is_cuda and got.length == 130
        assert torch.equal(got.array[:, :, :130], kv[:, :, :130])
        assert bool((r.regions["table"].array == table).all())
        r.close()


@pytest.mark.parametrize(("engine", "verify", "piece"), [("executor", "host", 0), ("copy", "host", 0),
                                                        ("executor", "device", 0), ("copy", "device", 0),
                                                        ("copy", "device", 40 << 10), ("kernel", "device", 40 << 10)])
def test_pipelined_restore_is_bit_exact_and_checks_every_payload(tmp_path, engine, verify, piece):
    """Hundreds of ROWS and PAGES records restored through the pipeline (small
    spans, so buffers are refilled many times) come back bit-exact with each
    engine (copy calls, RECOVER tasks, the scatter kernel), with the pinned
    pool prepared while the log is opened or made at the first restore, and
    with spans read as 40 KiB reader tasks (records of up to 64 KiB cut
    across tasks); a flipped payload byte raises CorruptLogError naming the
    file."""
    import cupy
    import torch

    from concordia_agents import CorruptLogError
    from concordia_agents._segments import list_segments

    from .conftest import expire_lease

    kv = torch.randn(16, 4, 1024, 64, device="cuda").to(torch.bfloat16)
    pages = cupy.random.default_rng(2).integers(0, 2**31, 1 << 18, dtype=cupy.int64)
    opts = dict(backend="cupy", max_record_bytes=64 << 10, backend_options=dict(
        restore_engine=engine, restore_verify=verify, restore_span=256 << 10, restore_depth=3, restore_threads=4,
        restore_prepare=verify == "device", restore_piece=piece))
    with Runtime.open(home=tmp_path, **opts) as rt:
        s = rt.session("pipe")
        s.register("kv", kv, kind="kv", seq_axis=2)
        s.register("pages", pages)
        for t in range(0, 1000, 100):
            pages[t * 7:t * 7 + 3000] += 1
            s.commit(rows={"kv": t + 100})
        s.close()
    want_kv, want_pages = kv[:, :, :1000].clone(), pages.copy()
    with Runtime.open(home=tmp_path, **opts) as rt:
        r = rt.resume("pipe")
        got = r.regions["kv"]
        assert got.length == 1000 and torch.equal(got.array[:, :, :1000], want_kv)
        assert bool((r.regions["pages"].array == want_pages).all())
        res = rt.backend._restore  # the pool: prepared with the backend, or made by the first restore
        assert res.prepared_pools == (verify == "device") and res._preparing is None and len(res._buffers) == 3
        stats = rt.backend.restore_stats  # the last region's run: many records in several spans, time accounted
        assert stats is not None and stats.records >= 2 and stats.spans > 1 and stats.bytes > 0
        parts = stats.as_dict()
        assert parts["own_s"] >= 0 and parts["total_s"] >= parts["alloc_s"] + parts["read_wait_s"]
        r._abandon()
    expire_lease(f"sqlite:///{tmp_path / 'catalog.db'}", "pipe")
    seg = max((f.path for f in list_segments(rt.session_dir("pipe"))[1]), key=lambda q: q.stat().st_size)
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside some data record's payload (the file is almost all payload)
    seg.write_bytes(bytes(data))
    with Runtime.open(home=tmp_path, **opts) as rt, pytest.raises(CorruptLogError) as e:
        rt.resume("pipe")
    assert e.value.path is not None and Path(e.value.path).name == seg.name


def test_prepared_ring_and_pool_commit_and_resume_bit_exact(tmp_path):
    """With ``ring_prepare`` and ``restore_prepare`` on (rings page-locked, and the restore's pinned pool made,
    on threads of their own): a session opened and closed with no commit (its prepared registration is undone
    at close), then one committed twice, resumed bit-exact; each commit took its ring's registration from the
    thread, the restore its pool, every registration was undone and no thread is left behind."""
    import cupy

    opts = dict(backend="cupy", max_record_bytes=1 << 20,
                backend_options=dict(ring_prepare=True, restore_prepare=True))
    a = cupy.arange(1 << 22, dtype=cupy.int64)
    with Runtime.open(home=tmp_path, **opts) as rt:
        idle = rt.session("idle")
        idle.close()
        s = rt.session("p")
        s.register("a", a)
        s.commit()
        a[5:9] = 7
        s.commit()
        s.close()
    # Every ring is closed with its runtime (kept warm rings too): the committed session's prepared registration
    # was taken by its first commit, the idle one's undone at close, and both unregistered.
    paths = rt.backend.commits
    assert (paths.prepared_rings, paths.unregistered) == (1, 2) and not paths._preparing and not paths._rings
    with Runtime.open(home=tmp_path, **opts) as rt:
        r = rt.resume("p")
        assert bool((r.regions["a"].array == a).all())
        assert rt.backend._restore.prepared_pools == 1 and rt.backend._restore._preparing is None
        r.regions["a"].array[0] = -1
        r.commit()  # the resumed session's ring: its prepared registration taken by this first commit
        assert rt.backend.commits.prepared_rings == 1 and id(r._log.ring) in rt.backend.commits._rings
        r.close()
    paths = rt.backend.commits
    assert paths.unregistered == 1 and not paths._preparing and not paths._rings


def test_sigkill_during_gpu_commit_stream_resumes_bit_exact(tmp_path):
    """A child on the CuPy backend is SIGKILLed mid commit stream (executor busy
    copying); resume on the GPU restores exactly an epoch >= the last reported."""
    from tests._procs import mutate

    home = tmp_path / "home"
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    for it in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "tests._procs", "gpu-crash-child", "--home", str(home),
                                 "--catalog", url, "--backend", "cupy", "--session", "gpu-crash", "--seed", "3",
                                 "--ttl", "0.5"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        reported = 0
        assert proc.stdout is not None
        deadline = time.monotonic() + 2.0 + it
        for line in proc.stdout:
            if line.startswith("epoch"):
                reported = int(line.split()[1])
            if time.monotonic() > deadline and reported > 0:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.6)
        with Runtime.open(home=home, catalog_url=url, backend="cupy") as rt:
            s = rt.resume("gpu-crash")
            assert s.epoch >= reported
            from tests._procs import fresh_state

            model = fresh_state()
            for e in range(1, s.epoch + 1):
                mutate(model, 3, e)
            assert np.array_equal(s.regions["big"].array.get(), model["big"])
            assert np.array_equal(s.regions["table"].array.get(), model["table"])
            n = s.regions["kv"].length
            assert n == s.epoch and np.array_equal(s.regions["kv"].array[:, :, :n].get(), model["kv"][:, :, :n])
            s.close()


def test_compute_ops_run_in_the_executor(executor):
    """The elementwise COMPUTE tasks (fill, axpy, scale) give the same results as CuPy."""
    import cupy

    from gpu_runtime.cuda.tasks import TaskKind

    n = 1 << 20
    x = cupy.random.default_rng(4).standard_normal(n, dtype=cupy.float32)
    y = cupy.random.default_rng(5).standard_normal(n, dtype=cupy.float32)
    expected = 2.5 * x + y
    alpha = int(np.array(2.5, np.float32).view(np.uint32))
    executor.wait(executor.enqueue(TaskKind.COMPUTE, [1, n, alpha, int(x.data.ptr), int(y.data.ptr)]))
    assert bool(cupy.allclose(y, expected, rtol=0, atol=1e-6))
    executor.wait(executor.enqueue(TaskKind.COMPUTE, [2, n, int(np.array(0.5, np.float32).view(np.uint32)),
                                                      int(y.data.ptr)]))
    assert bool(cupy.allclose(y, expected * 0.5, rtol=0, atol=1e-6))
    u = cupy.zeros(n, dtype=cupy.uint32)
    executor.wait(executor.enqueue(TaskKind.COMPUTE, [0, n, int(u.data.ptr), 0xC0FFEE]))
    assert int((u == 0xC0FFEE).sum()) == n


def test_bad_task_kind_is_reported_not_hung(executor):
    """An unknown task kind raises ExecutorError naming the ticket; the executor keeps serving."""
    import cupy

    from gpu_runtime.cuda.executor import ExecutorError
    from gpu_runtime.cuda.tasks import TaskKind

    t = executor.enqueue(99)
    with pytest.raises(ExecutorError, match=f"task {t} failed: unknown task kind"):
        executor.wait(t, timeout=10)
    out = cupy.zeros(1, dtype=cupy.uint64)
    executor.wait(executor.enqueue(TaskKind.NOP, [int(out.data.ptr), 0]), timeout=10)
    assert int(out.get()[0]) == 1


def test_durable_generate_1b_bf16_resumes_token_identical(tmp_path):
    """Llama-3.2-1B-shaped bf16 model on the CuPy backend, deterministic mode: SIGKILLed
    right after an asynchronous commit (the executor still copying), the rerun equals
    the uninterrupted generation and starts with a one-token forward."""
    from tests.test_transformers import run_child

    flags = ("--backend", "cupy", "--device", "cuda", "--prompt-len", "300", "--new-tokens", "40")
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    ref = run_child(tmp_path / "ref", "llama-1b", *flags, env=env)
    assert run_child(tmp_path / "crash", "llama-1b", *flags, "--kill-after-tokens", "20", env=env) is None
    out = run_child(tmp_path / "crash", "llama-1b", *flags, env=env)
    assert out["tokens"] == ref["tokens"]
    assert out["forward_inputs"][0] == 1 and len(out["forward_inputs"]) == 20
