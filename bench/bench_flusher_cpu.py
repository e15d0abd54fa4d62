"""The flusher's host cost per epoch of a compiled decode (CPU, host backend).

On the GPU a compiled ``durable_generate`` commits from inside the step, so
the host's only per-token work is the runtime's flusher thread: every pass
walks the ring's new records (header checked, payload checksum verified) and
appends them to a segment file. That thread shares the GIL with
``generate``'s host-paced loop; at 1B batch 8 on an H100 a flusher waking
once a second instead of every 10 ms took the step from 1.057x plain to
1.033x (``compiled_decode_gpu-20261207T100234Z.json``, docs/gpu.md "The
flusher, timed"). This measures what a pass costs per epoch, and which parts
hold the GIL.

An epoch here is what the in-step producer writes per token (the same
records: ``StepCommits`` on the host backend writes byte-identical logs):
the KV rows of one token for ``--shape`` at ``--batch``, the token ids, a
COMMIT. Each timed run commits ``--epochs`` epochs with the flusher kept
away (an hour's period), then times one ``flush_step`` per
``--per-pass`` epochs, as the flusher would run them, with fsync off (the
benchmark's runtimes on the GPU run so too). Reported per epoch: wall and
thread CPU time of the passes, the time inside the record walk
(``verified_span``: header checks and payload checksums) and inside the
segment append, and the GIL-free share measured apart: how much a pure-Python
loop slows while another thread runs the payload checksum's ``einsum`` on a
256 KiB payload, and while it runs ``os.write`` of one (1.0: none).

    python bench/bench_flusher_cpu.py [--shape llama-3.2-1b] [--batch 8] [--epochs 300] [--per-pass 1 2 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_step_commit_gpu import SHAPES, kv_row_bytes
from bench.common import cpu_device, versions, write


def _timed_parts() -> tuple[dict[str, float], Callable[[], None]]:
    """Accumulate seconds spent in the flusher's record walk and segment
    append (module functions wrapped for the run); returns the totals and an
    undo."""
    import concordia_agents._log as log_module
    from concordia_agents._segments import SegmentWriter

    spent = {"walk_s": 0.0, "append_s": 0.0}
    walk, append = log_module.verified_span, SegmentWriter.append_all

    def timed_walk(*a: Any) -> Any:
        t = time.perf_counter()
        try:
            return walk(*a)
        finally:
            spent["walk_s"] += time.perf_counter() - t

    def timed_append(self: Any, *a: Any) -> Any:
        t = time.perf_counter()
        try:
            return append(self, *a)
        finally:
            spent["append_s"] += time.perf_counter() - t

    log_module.verified_span = timed_walk
    SegmentWriter.append_all = timed_append  # type: ignore[method-assign]

    def undo() -> None:
        log_module.verified_span = walk
        SegmentWriter.append_all = append  # type: ignore[method-assign]

    return spent, undo


def flush_run(shape: str, batch: int, epochs: int, per_pass: int) -> dict[str, float]:
    """One run: ``epochs`` epochs committed, flushed ``per_pass`` at a time; µs per epoch."""
    from concordia_agents import Runtime

    layers, heads, dim = SHAPES[shape]
    length = 16 + epochs + 1
    ring = max(64 << 20, 1 << (2 * epochs * kv_row_bytes(shape, batch)).bit_length())  # holds the run unflushed
    with tempfile.TemporaryDirectory() as home, \
            Runtime.open(home=Path(home), backend="host", fsync="none", flush_poll=3600.0, compact_bytes=0,
                         ring_bytes=ring, segment_bytes=1 << 30, max_record_bytes=4 << 20) as rt:
        s = rt.session("bench")
        s.register("kv", np.random.default_rng(0).random((2 * layers, batch, heads, length, dim), np.float32)
                   .astype(np.float16), kind="kv", seq_axis=3)
        s.register("tokens", np.random.default_rng(1).integers(3, 30000, (batch, length)), kind="kv", seq_axis=1)
        steps = s.step_commits(kv="kv", tokens="tokens", meta={"n_tokens": 16}, length_key="n_tokens", device=False)
        slog = rt._sessions["bench"].log  # the flusher's object for this session: timed here in its place
        steps.host_step(16, force=True)
        slog.flush_step()
        spent, undo = _timed_parts()
        wall = cpu = 0.0
        try:
            for first in range(17, 17 + epochs, per_pass):
                for n in range(first, min(first + per_pass, 17 + epochs)):
                    steps.host_step(n)
                t, c = time.perf_counter(), time.thread_time()
                slog.flush_step()
                wall += time.perf_counter() - t
                cpu += time.thread_time() - c
        finally:
            undo()
            steps.close()
        return {"wall_us": wall / epochs * 1e6, "cpu_us": cpu / epochs * 1e6,
                "walk_us": spent["walk_s"] / epochs * 1e6, "append_us": spent["append_s"] / epochs * 1e6}


def python_loop_slowdown(work: Callable[[], Any], seconds: float = 1.0) -> float:
    """How much slower a pure-Python loop counts while another thread repeats
    ``work`` (1.0: it never held the GIL), against the loop alone before and
    after."""

    def count(for_s: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < for_s:
            for _ in range(1000):
                n += 1
        return n / (time.perf_counter() - t0)

    alone = count(seconds)
    stop = threading.Event()

    def repeat() -> None:
        while not stop.is_set():
            work()

    thread = threading.Thread(target=repeat)
    thread.start()
    try:
        beside = count(seconds)
    finally:
        stop.set()
        thread.join()
    alone = (alone + count(seconds)) / 2
    return alone / beside


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--per-pass", type=int, nargs="+", default=[1, 2, 10])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.epochs < 1 or args.repeats < 1 or min(args.per_pass) < 1:
        p.error(f"expected --epochs, --repeats and --per-pass of at least 1, found {args.epochs}, {args.repeats}, "
                f"{args.per_pass}")

    from gpu_runtime.checksum import payload_sum

    row = kv_row_bytes(args.shape, args.batch)
    result: dict[str, Any] = {"benchmark": "flusher_cpu", "device": cpu_device(), "versions": versions(),
                              "shape": args.shape, "batch": args.batch, "kv_row_bytes": row, "epochs": args.epochs,
                              "repeats": args.repeats, "warmup": 1, "fsync": "none"}
    for per_pass in args.per_pass:
        flush_run(args.shape, args.batch, min(args.epochs, 50), per_pass)  # warm-up
        runs = [flush_run(args.shape, args.batch, args.epochs, per_pass) for _ in range(args.repeats)]
        row_out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        result[f"per_pass_{per_pass}"] = {**row_out, "runs": runs}
        print(f"{per_pass} epoch(s) a pass:", {k: round(v, 1) for k, v in row_out.items()}, "µs per epoch",
              flush=True)
    payload = np.random.default_rng(2).integers(0, 255, row, np.uint8).tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        fd = os.open(Path(tmp) / "sink", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            def write_once() -> None:
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, payload)

            result["python_loop_slowdown"] = {
                "payload_sum_of_a_row": python_loop_slowdown(lambda: payload_sum(payload)),
                "os_write_of_a_row": python_loop_slowdown(write_once),
                "python_only_baseline": python_loop_slowdown(lambda: sum(range(2000))),
            }
        finally:
            os.close(fd)
    print("a Python loop's slowdown beside another thread:",
          {k: round(v, 3) for k, v in result["python_loop_slowdown"].items()}, flush=True)
    print("wrote", write("flusher_cpu", result))


if __name__ == "__main__":
    main()
