"""The in-step producer alone (issue 17: where its cost per step goes).

``cnc_step_commit`` (``gpu_runtime/cuda/step_commit.py``) launched step after
step on synthetic kv and tokens regions of the Llama-3.2-1B and Llama-3-8B KV
shapes (bf16, a 16-token prompt committed first: a row's cost does not depend
on its position), with no model and no CUDA graph: each step is a
one-element ``add_`` on the length (as the last layer's cache write advances
it) and the producer's launch, on one stream, timed with CUDA events over
``--steps`` steps. The steps are queued behind a ~30 ms sleep kernel, so the
device runs them back to back and the host's launch rate does not show.
Variants, interleaved per round:

* ``length_only``: the ``add_`` alone (the baseline subtracted from the rest);
* ``no_commit``: the producer armed with ``every`` past the run's end, so each
  launch stores the step's tokens and returns (its launch and fixed reads);
* ``commit``: a commit every step (``every=1``), as ``durable_generate`` does;
* ``commit_all_sms``: the same with one block per SM instead of the
  producer's default (enough blocks for a few words per thread).

Reported per variant: µs per step over the baseline (median over rounds), and
``commit`` minus ``no_commit`` (what committing adds). In the profile of
2026-12-06 (``compiled_decode_gpu-20261206T171518Z.json``) the kernel took 48
µs per step at 1B batch 1 and 64 at batch 8, for 32 KiB and 256 KiB of rows:
latency, not bandwidth; this says which part. Each ``commit`` run checks that
the producer committed one epoch per step.

    python bench/bench_step_commit_gpu.py [--shapes ...] [--batches 1 8] [--steps 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import versions, written

#: KV geometry (layers, kv heads, head dim) of the shapes bench_transformers_gpu.py builds
SHAPES = {"llama-3.2-1b": (16, 8, 64), "llama-3-8b": (32, 8, 128)}
PROMPT = 16


def _session(rt: Any, name: str, shape: str, batch: int, max_len: int) -> tuple[Any, Any, Any]:
    """A session with the kv storage ``[2 * layers, batch, heads, max_len, dim]``
    and the tokens ``[batch, max_len]`` registered as ``durable_generate``
    registers them, the prompt's rows filled and committed."""
    import torch

    layers, heads, dim = SHAPES[shape]
    kv = torch.randn(2 * layers, batch, heads, max_len, dim, device="cuda").to(torch.bfloat16)
    tokens = torch.randint(3, 30000, (batch, max_len), device="cuda", dtype=torch.int64)
    s = rt.session(name)
    s.register("kv", kv, kind="kv", seq_axis=3)
    s.register("tokens", tokens, kind="kv", seq_axis=1)
    return s, kv, tokens


def _run(rt: Any, variant: str, shape: str, batch: int, steps: int, name: str) -> float:
    """Milliseconds of ``steps`` steps of ``variant`` (module docs)."""
    import torch

    s, _, _ = _session(rt, name, shape, batch, PROMPT + steps + 1)
    stream = torch.cuda.current_stream()
    length = torch.full((), PROMPT, dtype=torch.int64, device="cuda")
    ids = torch.randint(3, 30000, (batch, 1), device="cuda", dtype=torch.int64)
    every = 1 if variant.startswith("commit") else 10 * steps
    commits = s.step_commits(kv="kv", tokens="tokens", meta={"n_tokens": PROMPT}, length_key="n_tokens",
                             every=every, device=variant != "length_only")
    producer = commits.device
    try:
        commits.host_step(PROMPT, force=True)
        commits.arm(stream.cuda_stream)
        if variant == "commit_all_sms":
            producer.blocks = torch.cuda.get_device_properties(0).multi_processor_count
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # ~30 ms of device time while the host queues the steps
        start.record(stream)
        for _ in range(steps):
            length.add_(1)
            if producer is not None:
                producer.launch(stream.cuda_stream, length.data_ptr(), ids.data_ptr(), 1, ids.stride(0))
        end.record(stream)
        end.synchronize()
        ms = start.elapsed_time(end)
        state = commits.close()
        if variant.startswith("commit") and (state is None or state.commits != steps):
            raise RuntimeError(f"{variant}: expected {steps} epochs from the producer, found "
                               f"{None if state is None else state.commits}")
        return ms
    finally:
        commits.close()
        s.close()
        rt.delete(name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch

    from concordia_agents import Runtime

    variants = ("length_only", "no_commit", "commit", "commit_all_sms")
    result: dict[str, Any] = {"benchmark": "step_commit_gpu", "device": torch.cuda.get_device_name(0),
                              "versions": versions("cupy-cuda13x"), "steps": args.steps, "repeats": args.repeats,
                              "prompt_len": PROMPT, "queued_behind_sleep": True}
    with written("step_commit_gpu", result), tempfile.TemporaryDirectory() as home, \
            Runtime.open(home=Path(home), backend="cupy", fsync="none", ring_bytes=1 << 30,
                         segment_bytes=1 << 30, max_record_bytes=4 << 20, compact_bytes=0) as rt:
        n = 0
        for shape in args.shapes:
            for batch in args.batches:
                runs: dict[str, list[float]] = {v: [] for v in variants}
                for r in range(args.repeats + 1):  # round 0 warms up (module load, first allocations)
                    for v in variants[:: 1 if r % 2 == 0 else -1]:
                        n += 1
                        ms = _run(rt, v, shape, batch, args.steps, f"bench-{n}")
                        if r:
                            runs[v].append(ms)
                base = statistics.median(runs["length_only"])
                per_step = {v: (statistics.median(runs[v]) - base) * 1e3 / args.steps for v in variants[1:]}
                row = {"us_per_step_over_baseline": per_step,
                       "commit_minus_no_commit_us": per_step["commit"] - per_step["no_commit"],
                       "baseline_us_per_step": base * 1e3 / args.steps, "runs_ms": runs}
                result[f"{shape}_b{batch}"] = row
                print(f"{shape} b{batch}", {k: round(v, 1) for k, v in per_step.items()}, flush=True)


if __name__ == "__main__":
    main()
