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
  producer's default (enough blocks for a few words per thread);
* ``commit_block_reads`` and ``commit_ring_check``: the same with every
  block reading the ring's owner and consumed words itself (the producer
  before 2026-12-07), and with ``cnc_step_check`` reading them once a launch
  (``StepCommitter.ring_check``, which the other variants leave at its
  default: checked from 5 blocks on; ``ring_check_default`` records
  ``commit``'s). ``no_commit``'s epoch is a whole run long, so it has many
  blocks and launches the check; ``commit_all_sms`` too.

And, on a ring of its own that no flusher drains (the producer's ring
parameters pointed at it, so nothing reads what a probe build leaves out):

* ``bare_commit``: the full commit, every step (the flusher's share of
  ``commit`` is ``commit`` minus this);
* ``bare_no_ring_reads``, ``bare_no_sys_fences``, ``bare_no_body``,
  ``bare_no_rows``, ``bare_no_headers``: diagnostic builds of the kernel
  (``CNC_STEP_PROBE`` of ``kernels/step_commit.cu``), each leaving one part out
  (the reads of the ring's owner and consumed words: the check's where the
  producer launches it, else each block's, and the last block's owner reads
  before it publishes; the two system fences;
  the COMMIT body's formatting; the rows' payloads; the data records' headers):
  ``bare_commit`` minus each is what that part costs;
* ``bare_floor``: all five left out (a launch, the arrival count, the COMMIT
  header and the publishing stores).

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
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import versions, written

#: KV geometry (layers, kv heads, head dim) of the shapes bench_transformers_gpu.py builds
SHAPES = {"llama-3.2-1b": (16, 8, 64), "llama-3-8b": (32, 8, 128)}
PROMPT = 16
MAX_RECORD_BYTES = 4 << 20  #: the runtime's record size: rows of one record


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


def _timed_steps(stream: Any, length: Any, ids: Any, producer: Any, steps: int) -> float:
    """Milliseconds of ``steps`` steps on ``stream``, each the length's ``add_``
    and (with a producer) its launch, queued behind a sleep kernel."""
    import torch

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
    return float(start.elapsed_time(end))


#: StepCommitter.ring_check as the producer chose it, by (shape, batch)
ring_check_default: dict[tuple[str, int], bool] = {}


def _run(rt: Any, variant: str, shape: str, batch: int, steps: int, name: str) -> float:
    """Milliseconds of ``steps`` steps of ``variant`` (module docs)."""
    import torch

    s, _, _ = _session(rt, name, shape, batch, PROMPT + steps + 1)
    stream = torch.cuda.current_stream()
    length = torch.full((), PROMPT, dtype=torch.int64, device="cuda")
    ids = torch.randint(3, 30000, (batch, 1), device="cuda", dtype=torch.int64)
    # no_commit: one step past the run's end, the shortest epoch the producer never reaches (it checks at
    # arming that a whole epoch fits its record limit and half the ring)
    every = 1 if variant.startswith("commit") else steps + 1
    commits = s.step_commits(kv="kv", tokens="tokens", meta={"n_tokens": PROMPT}, length_key="n_tokens",
                             every=every, device=variant != "length_only")
    producer = commits.device
    try:
        commits.host_step(PROMPT, force=True)
        commits.arm(stream.cuda_stream)
        if variant == "commit_all_sms":
            producer.blocks = torch.cuda.get_device_properties(0).multi_processor_count
        if producer is not None:
            producer.ring_check = {"commit_block_reads": False, "commit_ring_check": True}.get(variant)
            if variant == "commit":
                ring_check_default[(shape, batch)] = producer.checks_ring
        ms = _timed_steps(stream, length, ids, producer, steps)
        state = commits.close()
        if variant.startswith("commit") and (state is None or state.commits != steps):
            raise RuntimeError(f"{variant}: expected {steps} epochs from the producer, found "
                               f"{None if state is None else state.commits}")
        return ms
    finally:
        commits.close()
        s.close()
        rt.delete(name)


#: the bare variants: CNC_STEP_PROBE masks (kernels/step_commit.cu)
PROBES = {"bare_commit": 0, "bare_no_ring_reads": 1, "bare_no_sys_fences": 2, "bare_no_body": 4, "bare_no_rows": 8,
          "bare_no_headers": 16, "bare_floor": 31}


def kv_row_bytes(shape: str, batch: int) -> int:
    """Bytes of one token's KV rows: bf16 keys and values of every layer."""
    layers, heads, dim = SHAPES[shape]
    return 2 * layers * batch * heads * dim * 2


def _step_bytes(shape: str, batch: int) -> int:
    """Log bytes of one step's epoch, with room for the headers and the COMMIT."""
    return kv_row_bytes(shape, batch) + 8 * batch + 8192


def _bare_ring(rt: Any, home: Path, capacity: int) -> tuple[Any, int]:
    """The ring the bare variants write (and nothing drains), page-locked and
    mapped as a session's ring is, and its header's device address. Each run
    writes from offset 0 and ``capacity`` holds a whole run's epochs, so
    nothing wraps or waits for room. It lives where sessions' rings do
    (``/dev/shm``): the CUDA driver refused to page-lock a ring file mapped
    from the disk-backed temporary directory (``cudaErrorInvalidValue``, H100,
    2026-12-07)."""
    from gpu_runtime.logring import LogRing, default_ring_dir

    path = default_ring_dir(home) / f"concordia-bench-bare-{os.getpid()}.ring"
    ring = LogRing.create(path, capacity=capacity, session_tag=7, owner_token=11, base=0)
    header, _ = rt.backend.commits.ring(ring)
    return ring, header


def _bare_run(rt: Any, variant: str, shape: str, batch: int, steps: int, name: str, bare: tuple[Any, int]) -> float:
    """Milliseconds of ``steps`` steps of a ``bare_*`` variant (module docs):
    the session's producer, built with the variant's probe mask, its ring
    parameters pointed at the bare ring; the session's own log is never
    handed over."""
    import torch

    from gpu_runtime.cuda import step_commit

    ring, header = bare
    s, _, _ = _session(rt, name, shape, batch, PROMPT + steps + 1)
    stream = torch.cuda.current_stream()
    length = torch.full((), PROMPT, dtype=torch.int64, device="cuda")
    ids = torch.randint(3, 30000, (batch, 1), device="cuda", dtype=torch.int64)
    commits = s.step_commits(kv="kv", tokens="tokens", meta={"n_tokens": PROMPT}, length_key="n_tokens", every=1)
    producer = commits.device
    try:
        # P_HEADER, P_CAPACITY, P_TAG, P_OWNER (step_commit.py PARAM_WORDS)
        producer._params[:4].set(np.array([header, ring.capacity, 7, 11], dtype=np.uint64))
        producer._fn, producer._check = step_commit._function(producer_arch(rt), PROBES[variant])
        producer.arm(stream.cuda_stream, position=0, epoch=1, committed=PROMPT)
        ms = _timed_steps(stream, length, ids, producer, steps)
        state = producer.state()
        if state.commits != steps or state.error is not None:
            raise RuntimeError(f"{variant}: expected {steps} epochs from the producer, found {state.commits} "
                               f"(error {state.error})")
        return ms
    finally:
        producer.disarm()
        commits.close()
        s.close()
        rt.delete(name)


def producer_arch(rt: Any) -> str:
    return str(rt.backend.executor.arch)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    for shape in args.shapes:  # no_commit arms an epoch of steps + 1 rows, which the producer must accept
        for batch in args.batches:
            records = -(-(args.steps + 1) // max(1, MAX_RECORD_BYTES // kv_row_bytes(shape, batch))) + 1
            if records > 64:
                p.error(f"--steps {args.steps}: {shape} batch {batch}'s no_commit epoch would be {records} records, "
                        "over the producer's 64 (CNC_STEP_MAX_RECORDS); give fewer steps")

    import torch

    from concordia_agents import Runtime

    variants = ("length_only", "no_commit", "commit", "commit_all_sms", "commit_block_reads", "commit_ring_check",
                *PROBES)
    result: dict[str, Any] = {"benchmark": "step_commit_gpu", "device": torch.cuda.get_device_name(0),
                              "versions": versions("cupy-cuda13x"), "steps": args.steps, "repeats": args.repeats,
                              "prompt_len": PROMPT, "queued_behind_sleep": True}
    most = max(_step_bytes(shape, batch) for shape in args.shapes for batch in args.batches)
    # no_commit's epoch (steps + 1 steps) must fit half the ring: 512 MiB for 8B batch 8 at 200 steps
    ring = max(256 << 20, 1 << (2 * (args.steps + 2) * most - 1).bit_length())
    result["ring_bytes"] = ring
    with written("step_commit_gpu", result), tempfile.TemporaryDirectory() as home, \
            Runtime.open(home=Path(home), backend="cupy", fsync="none", ring_bytes=ring,
                         segment_bytes=1 << 30, max_record_bytes=MAX_RECORD_BYTES, compact_bytes=0) as rt:
        n = 0
        bare = _bare_ring(rt, Path(home), -(-(args.steps + 1) * most // 4096) * 4096)
        try:
            for shape in args.shapes:
                for batch in args.batches:
                    runs: dict[str, list[float]] = {v: [] for v in variants}
                    for r in range(args.repeats + 1):  # round 0 warms up (module load, first allocations)
                        for v in variants[:: 1 if r % 2 == 0 else -1]:
                            n += 1
                            ms = (_bare_run(rt, v, shape, batch, args.steps, f"bench-{n}", bare) if v in PROBES
                                  else _run(rt, v, shape, batch, args.steps, f"bench-{n}"))
                            if r:
                                runs[v].append(ms)
                    base = statistics.median(runs["length_only"])
                    per_step = {v: (statistics.median(runs[v]) - base) * 1e3 / args.steps for v in variants[1:]}
                    parts = {v.removeprefix("bare_no_"): per_step["bare_commit"] - per_step[v]
                             for v in PROBES if v.startswith("bare_no_")}
                    row = {"us_per_step_over_baseline": per_step,
                           "commit_minus_no_commit_us": per_step["commit"] - per_step["no_commit"],
                           "flusher_share_us": per_step["commit"] - per_step["bare_commit"],
                           "block_reads_minus_check_us": per_step["commit_block_reads"] - per_step["commit_ring_check"],
                           "ring_check_default": ring_check_default.get((shape, batch)),
                           "part_cost_us": parts,
                           "baseline_us_per_step": base * 1e3 / args.steps, "runs_ms": runs}
                    result[f"{shape}_b{batch}"] = row
                    print(f"{shape} b{batch}", {k: round(v, 1) for k, v in per_step.items()},
                          "parts", {k: round(v, 1) for k, v in parts.items()}, flush=True)
        finally:
            bare[0].unlink()  # closed (unregistered) while the runtime's device is still open, then removed


if __name__ == "__main__":
    main()
