"""Compiled durable decoding (issue 17): ms per decode step of transformers'
compiled path, plain (``model.generate(cache_implementation="static")``)
against durable (``durable_generate(..., cache_implementation="static")``,
a checkpoint every token by the in-step producer inside the CUDA graph).

Random bf16 weights in Llama-3.2-1B and Llama-3-8B shapes, 2k-token prompt,
batch 1 and 8, greedy, CuPy backend. A step's time is taken from whole calls:
``(t(long) - t(short)) / (long - short)`` for two numbers of new tokens, so
per-call costs (session open, prefill, the prompt's commit, the final flush,
CUDA graph recording for a new cache) cancel. Protocol: one warm-up call of
each variant and length (compilation), then ``--repeats`` rounds, variants
interleaved in alternating order; median over rounds, and the paired ratio
(durable over plain of the same round), median and range. Also: the HBM
roofline of a step (weight bytes over the measured device copy bandwidth)
and each variant's ratio to it; and the host work Concordia does per token in
the durable runs: the Python calls of the producer's launch against the
device's steps.

    python bench/bench_compiled_decode_gpu.py [--shapes ...] [--batches 1 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_transformers_gpu import RT_OPTIONS, SHAPES, build
from bench.common import versions, written


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s: a 2 GiB device-to-device copy
    (bytes read plus bytes written), median of 5."""
    a = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del a, b
    return 2 * (2 << 30) / statistics.median(times[1:])


def section(model: Any, batch: int, prompt_len: int, lengths: tuple[int, int], repeats: int) -> dict[str, Any]:
    from concordia_agents import Runtime
    from gpu_runtime.cuda import step_commit
    from integrations.transformers import durable_generate

    ids = torch.randint(3, 30000, (batch, prompt_len), generator=torch.Generator().manual_seed(5)).cuda()
    calls = {"launch": 0}
    launch = step_commit.StepCommitter.launch

    def counted(self: Any, *a: Any) -> None:
        calls["launch"] += 1
        launch(self, *a)

    step_commit.StepCommitter.launch = counted  # type: ignore[method-assign]
    steps_seen = []

    def plain(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, do_sample=False, cache_implementation="static")
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def durable(n: int) -> float:
        home = Path(tempfile.mkdtemp())
        rt = Runtime.open(home=home, **{**RT_OPTIONS, "ring_bytes": 3 << 30})
        events: list[Any] = []
        try:
            torch.cuda.synchronize()
            t = time.perf_counter()
            durable_generate(model, ids, "bench", runtime=rt, max_new_tokens=n, do_sample=False,
                             cache_implementation="static", on_event=events.append)
            torch.cuda.synchronize()
            took = time.perf_counter() - t
        finally:
            rt.close()
            shutil.rmtree(home, ignore_errors=True)
        steps_seen.append(events[-1].in_step_epochs)
        return took

    try:
        variants = {"plain": plain, "durable": durable}
        for fn in variants.values():  # warm-up: compile, record
            for n in lengths:
                fn(n)
        calls["launch"], steps_seen[:] = 0, []
        rounds: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                long_s = variants[name](lengths[1])
                short_s = variants[name](lengths[0])
                rounds[name].append((long_s - short_s) / (lengths[1] - lengths[0]) * 1e3)
    finally:
        step_commit.StepCommitter.launch = launch  # type: ignore[method-assign]
    ratios = [d / p for d, p in zip(rounds["durable"], rounds["plain"], strict=True)]
    return {
        "ms_per_step": {k: statistics.median(v) for k, v in rounds.items()},
        "rounds_ms": rounds,
        "durable_over_plain_paired": statistics.median(ratios),
        "paired_range": [min(ratios), max(ratios)],
        "host_launch_calls_per_timed_call": calls["launch"] / (2 * repeats),
        "device_epochs_per_timed_call": statistics.median(steps_seen) if steps_seen else None,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--lengths", nargs=2, type=int, default=[16, 80], help="new tokens of the short and long call")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.use_deterministic_algorithms(False)
    bw = copy_bandwidth()
    result: dict[str, Any] = {"benchmark": "compiled_decode_gpu", "device": torch.cuda.get_device_name(0),
                              "versions": versions("transformers", "cupy-cuda13x"), "prompt_len": args.prompt_len,
                              "lengths": args.lengths, "repeats": args.repeats, "copy_bandwidth_GBps": bw / 1e9,
                              "runtime_options": {**RT_OPTIONS, "ring_bytes": 3 << 30}}
    with written("compiled_decode_gpu", result):
        for shape in args.shapes:
            model = build(shape)
            weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            roofline_ms = weight_bytes / bw * 1e3
            for batch in args.batches:
                key = f"{shape}_b{batch}"
                try:
                    r = section(model, batch, args.prompt_len, tuple(args.lengths), args.repeats)
                    r["roofline_ms"] = roofline_ms
                    r["over_roofline"] = {k: v / roofline_ms for k, v in r["ms_per_step"].items()}
                    result[key] = r
                except Exception:  # noqa: BLE001 - record and go on
                    result[key] = {"error": traceback.format_exc()[-3000:]}
                print(key, json.dumps({k: v for k, v in result[key].items() if k != "rounds_ms"}), flush=True)
            del model
            torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
