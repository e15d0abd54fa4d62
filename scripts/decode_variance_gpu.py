"""Why whole decode steps vary between runs (a diagnostic for issue 4's decode
benchmark): a Llama-3.2-1B-shaped bf16 model, batch 1, 2k-token prompt, 48 new
tokens; plain ``model.generate`` and ``durable_generate(checkpoint_every=1)``
alternate, under four process settings, interleaved over rounds:

* ``default``;
* ``gc_off``: the cyclic garbage collector disabled during each run (collected
  between runs, outside the clock);
* ``pinned``: the calling thread pinned to one core (threads the runtime made
  earlier keep the others);
* ``pinned_gc_off``: both.

Per run: the median step (bench/bench_transformers_gpu.py's ``Steps``); per
setting: the runs, their spread, and the median of the per-round ratios
durable / plain.

    python scripts/decode_variance_gpu.py [--rounds 8]   # JSON to $OUT/decode_variance_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from bench.bench_transformers_gpu import RT_OPTIONS, Steps, build, criteria
    from bench.common import write_out
    from concordia_agents import Runtime
    from integrations.transformers import durable_generate

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--new", type=int, default=48)
    args = p.parse_args()
    model = build("llama-3.2-1b")
    rt = Runtime.open(home=tempfile.mkdtemp(), **{**RT_OPTIONS, "ring_bytes": 1 << 30})
    ids = torch.randint(3, 1000, (1, 2048), device="cuda")
    mask = torch.ones_like(ids)
    all_cpus = sorted(os.sched_getaffinity(0))
    counter = [0]

    def plain() -> float:
        steps = Steps()
        model.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                       stopping_criteria=criteria(steps))
        return steps.step_ms()

    def durable() -> float:
        steps = Steps()
        counter[0] += 1
        sid = f"var-{counter[0]}"
        durable_generate(model, ids, sid, runtime=rt, attention_mask=mask, max_new_tokens=args.new,
                         do_sample=False, checkpoint_every=1, stopping_criteria=criteria(steps))
        rt.delete(sid)
        return steps.step_ms()

    settings = {"default": (False, False), "gc_off": (False, True), "pinned": (True, False),
                "pinned_gc_off": (True, True)}
    runs: dict[str, dict[str, list[float]]] = {s: {"plain": [], "durable": []} for s in settings}
    plain(), durable()  # warm-up
    try:
        for r in range(args.rounds):
            for name, (pin, gc_off) in settings.items():
                os.sched_setaffinity(0, {all_cpus[-1]} if pin else set(all_cpus))
                order = (("plain", plain), ("durable", durable))
                for label, fn in (order if r % 2 == 0 else order[::-1]):
                    gc.collect()
                    if gc_off:
                        gc.disable()
                    try:
                        runs[name][label].append(fn())
                    finally:
                        gc.enable()
            print(f"round {r}: " + ", ".join(f"{n} {v['plain'][-1]:.2f}/{v['durable'][-1]:.2f}"
                                           for n, v in runs.items()), flush=True)
    finally:
        os.sched_setaffinity(0, set(all_cpus))
        rt.close()
    summary = {}
    for name, v in runs.items():
        ratios = [d / p_ for p_, d in zip(v["plain"], v["durable"], strict=True)]
        summary[name] = {"plain_median_ms": statistics.median(v["plain"]),
                         "durable_median_ms": statistics.median(v["durable"]),
                         "plain_spread": max(v["plain"]) / min(v["plain"]),
                         "durable_spread": max(v["durable"]) / min(v["durable"]),
                         "median_ratio": statistics.median(ratios), "ratios": ratios}
        print(name, {k: (round(x, 4) if isinstance(x, float) else x) for k, x in summary[name].items()
                     if k != "ratios"})
    write_out("decode_variance_gpu", {"device": torch.cuda.get_device_name(0), "cpus": len(all_cpus),
                                      "rounds": args.rounds, "new_tokens": args.new, "summary": summary,
                                      "runs": runs}, "transformers", "cupy-cuda13x")


if __name__ == "__main__":
    main()
