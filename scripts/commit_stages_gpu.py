"""Host cost of each stage of a KV commit on the CuPy backend (a diagnostic).

Times, each in its own warm loop: the JSON body, the COMMIT record, the stream
fence, one task enqueue (executor resident), a ring write, a reservation, the
whole ``commit_epoch`` and the whole ``Session.commit`` (with the flusher
polling every 10 ms, and with it polling every 10 s). One kv region of one
token per epoch, 8B-shaped (128 KiB), as in ``bench/bench_gpu.py``.
Prints p50s in microseconds and writes JSON to $OUT.

    python scripts/commit_stages_gpu.py [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def p50_us(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    ts = []
    for i in range(n):
        t = time.perf_counter_ns()
        fn(i)
        ts.append(time.perf_counter_ns() - t)
    return statistics.median(ts[n // 10:]) / 1e3


def in_context(rt, s, kv, pos, n: int) -> dict:  # type: ignore[no-untyped-def]
    """The bench's loop (a torch write of the row, the commit, a spin until the
    epoch is visible), with each stage of the commit timed by a wrapper."""
    import torch

    import gpu_runtime.cupy_backend as cb

    be = rt.backend
    spent: dict[str, list[int]] = {}
    saved: list[tuple[object, str, object]] = []

    def wrap(owner, name: str, label: str) -> None:  # type: ignore[no-untyped-def]
        fn = getattr(owner, name)
        saved.append((owner, name, owner.__dict__.get(name)))

        def timed(*a, **k):  # type: ignore[no-untyped-def]
            t = time.perf_counter_ns()
            try:
                return fn(*a, **k)
            finally:
                spent.setdefault(label, []).append(time.perf_counter_ns() - t)

        setattr(owner, name, timed)

    wrap(be, "commit_epoch", "commit_epoch")
    wrap(be, "_fence_streams", "fence_streams")
    wrap(be, "_rows", "rows")
    wrap(be, "_device_task", "device_task")
    wrap(be.executor, "enqueue", "enqueue")
    wrap(be.executor, "ensure_running", "ensure_running")
    wrap(cb, "encode_record", "encode_record")
    row = torch.randn(64, 8, 128, device="cuda").to(torch.bfloat16)
    totals, writes = [], []
    ring = s._log.ring
    for i in range(n):
        t = time.perf_counter_ns()
        kv[:, :, pos[0]] = row
        t0 = time.perf_counter_ns()
        pos[0] += 1
        e = s.commit(rows={"kv": pos[0]}, wait=False)
        totals.append(time.perf_counter_ns() - t0)
        writes.append(t0 - t)
        while ring.committed_epoch < e:
            pass
    for owner, name, old in saved:
        if old is None:
            delattr(owner, name)  # an instance attribute shadowing the method
        else:
            setattr(owner, name, old)
    skip = n // 10
    out = {"ctx_session_commit": statistics.median(totals[skip:]) / 1e3,
           "ctx_torch_row_write": statistics.median(writes[skip:]) / 1e3}
    for label, ts in spent.items():
        out["ctx_" + label] = statistics.median(ts[len(ts) // 10:]) / 1e3
    return out


def main() -> None:
    import torch

    from bench.common import write_out
    from concordia_agents import Runtime
    from gpu_runtime.backend import CheckpointTask
    from gpu_runtime.cupy_backend import _current_stream_getter
    from gpu_runtime.executor import TaskKind
    from gpu_runtime.records import RecordType, encode_record

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args()
    n = args.n
    out: dict = {"diagnostic": "commit_stages_gpu", "device": torch.cuda.get_device_name(0), "n": n,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tokens = 4 * n + 64
    for poll in (0.01, 10.0):
        home = Path(tempfile.mkdtemp())
        rt = Runtime.open(home=home, backend="cupy", fsync="none", ring_bytes=1 << 30, flush_poll=poll,
                          backend_options={"idle_ms": 200.0, "max_life_ms": 2000.0})
        try:
            kv = torch.zeros(64, 8, tokens, 128, dtype=torch.bfloat16, device="cuda")
            s = rt.session(f"k{poll}")
            s.register("kv", kv, kind="kv", seq_axis=2)
            s.commit()
            s.wait_visible()
            pos = [0]

            def commit(i: int) -> None:
                pos[0] += 1
                s.commit(rows={"kv": pos[0]}, wait=False)

            res = {"session_commit": p50_us(commit, n)}
            s.wait_visible()
            res.update(in_context(rt, s, kv, pos, n))
            if poll == 0.01:
                be, ex = rt.backend, rt.backend.executor
                writer = s._log.writer
                region = s.regions["kv"]._handle
                body = json.dumps({"lengths": {"kv": 5}, "meta": None}, sort_keys=True,
                                  separators=(",", ":")).encode()
                task = [CheckpointTask(region, (pos[0], pos[0] + 1))]
                res["json_body"] = p50_us(lambda i: json.dumps({"lengths": {"kv": i}, "meta": None}, sort_keys=True,
                                                               separators=(",", ":")).encode(), n)
                res["encode_commit_record"] = p50_us(lambda i: encode_record(
                    RecordType.COMMIT, body, session_tag=writer.session_tag, epoch=i + 1, offset=i, aux=1), n)
                current_stream = _current_stream_getter(kv)  # made once per region, as the commit path does
                res["stream_of"] = p50_us(lambda i: current_stream(), n)
                res["fence_streams"] = p50_us(lambda i: be._fence_streams(task), n)
                be._fence_args = None
                import cupy

                counter = cupy.zeros(1, cupy.uint64)  # a NOP adds 1 at a0 + 8 * a1
                nop = [int(counter.data.ptr)] + [0] * 13
                ex.wait(ex.enqueue(TaskKind.NOP, nop))
                res["enqueue_nop_14_args"] = p50_us(lambda i: ex.enqueue(TaskKind.NOP, nop), n)
                ex.wait(ex._tail - 1)
                ep = [s.epoch]

                def commit_epoch(i: int) -> None:
                    ep[0] += 1
                    pos[0] += 1
                    be.commit_epoch(writer, ep[0], [CheckpointTask(region, (pos[0] - 1, pos[0]))], body)

                # (epochs written behind the session's back: the session is not used afterwards)
                res["commit_epoch"] = p50_us(commit_epoch, n)
                be.wait_idle()
                rec = encode_record(RecordType.COMMIT, body, session_tag=writer.session_tag, epoch=1)

                def write(i: int) -> None:  # a whole record, reserved and stored (never replayed)
                    writer.ring.write_at(writer.reserve(len(rec)), rec)

                res["reserve_and_write_record"] = p50_us(write, n)
            out[f"flush_poll_{poll:g}s"] = res
            print(poll, {k: round(v, 2) for k, v in res.items()}, flush=True)
            s._abandon()
        finally:
            rt.close()
    write_out("commit_stages_gpu", out, "cupy-cuda13x")


if __name__ == "__main__":
    main()
