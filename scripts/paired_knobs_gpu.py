"""What a per-token checkpoint costs a decode step beyond its host time (a
diagnostic for issue 4): Llama-3.2-1B-shaped bf16, batch 1, 2k-token prompt,
``durable_generate(checkpoint_every=2)`` runs of 160 tokens, the paired
overhead of bench/bench_transformers_gpu.py (median step with a commit over
median step without, minus one) under four settings, interleaved:

* ``life_50ms``: the executor's decode windows of 50 ms idle / 50 ms lifetime
  (``durable_generate``'s until 2026-11-27 21:43), the flusher polling every 10 ms;
* ``life_<N>ms``: a lifetime of ``--life-ms`` (default 1 s: the executor
  relaunched every ~30 tokens instead of every ~4);
* ``poll_1s``: the flusher polling every second;
* ``life_<N>ms_poll_1s``: both.

Also per run: the host time of each commit (median) and the executor's parks.

    python scripts/paired_knobs_gpu.py [--rounds 4]   # JSON to $OUT/paired_knobs_gpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    import integrations.transformers as it
    from bench.bench_transformers_gpu import RT_OPTIONS, Steps, _timed, build, criteria, paired_commit_ms
    from bench.common import write_out
    from concordia_agents import Runtime

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new", type=int, default=160)
    p.add_argument("--life-ms", type=float, default=1000.0, help="the longer lifetime tried")
    p.add_argument("--no-poll", action="store_true", help="skip the settings with a 1 s flusher poll")
    args = p.parse_args()
    model = build("llama-3.2-1b")
    opts = {**RT_OPTIONS, "ring_bytes": 1 << 30}
    rts = {"poll_10ms": Runtime.open(home=tempfile.mkdtemp(), **opts),
           "poll_1s": Runtime.open(home=tempfile.mkdtemp(), **opts, flush_poll=1.0)}
    ids = torch.randint(3, 1000, (1, 2048), device="cuda")
    mask = torch.ones_like(ids)
    long = f"life_{args.life_ms:g}ms"
    settings = {"life_50ms": (50.0, "poll_10ms"), long: (args.life_ms, "poll_10ms")}
    if not args.no_poll:
        settings.update({"poll_1s": (50.0, "poll_1s"), f"{long}_poll_1s": (args.life_ms, "poll_1s")})
    results: dict[str, dict[str, list[float]]] = {s: {} for s in settings}
    counter = [0]
    saved = it._DECODE_MAX_LIFE_MS

    def run(setting: str) -> None:
        life, rt_name = settings[setting]
        rt = rts[rt_name]
        it._DECODE_MAX_LIFE_MS = life
        counter[0] += 1
        steps, spent, starts = Steps(), [], []
        parks = rt.backend.executor.parks
        with _timed(it._Checkpointer, "commit", spent, each=True, starts=starts):
            it.durable_generate(model, ids, f"kn-{counter[0]}", runtime=rt, attention_mask=mask,
                                max_new_tokens=args.new, do_sample=False, checkpoint_every=2,
                                stopping_criteria=criteria(steps))
        parks = rt.backend.executor.parks - parks
        rt.delete(f"kn-{counter[0]}")
        cost, base = paired_commit_ms(steps.times, starts[1:-1])
        r = results[setting]
        for k, v in (("paired_overhead", cost / base), ("paired_cost_ms", cost), ("step_ms", base),
                     ("commit_host_ms", statistics.median(spent[1:-1]) * 1e3), ("parks", float(parks))):
            r.setdefault(k, []).append(v)

    run("life_50ms")  # warm-up
    results = {s: {} for s in settings}
    try:
        for r in range(args.rounds):
            for setting in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
                run(setting)
    finally:
        it._DECODE_MAX_LIFE_MS = saved
        for rt in rts.values():
            rt.close()
    summary = {s: {k: statistics.median(v) for k, v in r.items()} for s, r in results.items()}
    for s, r in summary.items():
        print(s, {k: round(v, 4) for k, v in r.items()}, "runs:",
              [round(x, 4) for x in results[s]["paired_overhead"]])
    write_out("paired_knobs_gpu", {"device": torch.cuda.get_device_name(0), "rounds": args.rounds,
                                   "new_tokens": args.new, "summary": summary, "runs": results},
              "transformers", "cupy-cuda13x")


if __name__ == "__main__":
    main()
