"""Where ``durable_generate``'s per-token commit spends its host time (a
diagnostic for issue 4): a Llama-3.2-1B-shaped bf16 model, batch 1, 2k-token
prompt, 48 new tokens, CuPy backend. Inside each checkpoint: the token copy
(a torch op), the meta update, ``Session.commit`` and, within it, the
backend's ``commit_epoch`` and its stream fence. Three settings, interleaved:
``default``; ``switch_0.2ms`` (``sys.setswitchinterval(2e-4)``: how long the
caller can wait for the GIL held by another thread); ``poll_1s`` (a runtime
whose flusher polls every second instead of every 10 ms).

    python scripts/checkpointer_phases_gpu.py [--rounds 3]   # JSON to $OUT/checkpointer_phases_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    import integrations.transformers as it
    from bench.bench_transformers_gpu import RT_OPTIONS, Steps, _timed, build, criteria
    from bench.common import write_out
    from concordia_agents import Runtime

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = build("llama-3.2-1b")
    opts = {**RT_OPTIONS, "ring_bytes": 1 << 30}
    rts = {"default": Runtime.open(home=tempfile.mkdtemp(), **opts),
           "poll_1s": Runtime.open(home=tempfile.mkdtemp(), **opts, flush_poll=1.0)}
    ids = torch.randint(3, 1000, (1, 2048), device="cuda")
    mask = torch.ones_like(ids)
    spent: dict[str, list[float]] = {}  # seconds per call, by phase
    last_meta: list[dict] = [{}]

    def note(label: str, t: float) -> float:
        now = time.perf_counter()
        spent.setdefault(label, []).append(now - t)
        return now

    def commit(self, input_ids, *, done=False):  # type: ignore[no-untyped-def]
        # _Checkpointer.commit (greedy decoding: no RNG copies), split into timed phases
        t = t0 = time.perf_counter()
        n = input_ids.shape[1]
        self.tokens.narrow(1, self.committed, n - self.committed).copy_(
            input_ids.narrow(1, self.committed, n - self.committed))
        t = note("token_copy", t)
        self.meta.update(n_tokens=n, done=done)
        meta, rows = dict(self.meta), {"kv": self.cache.length, "tokens": n}
        t = note("meta", t)
        self.session.commit(meta, rows=rows, wait=not self.tokens.is_cuda)
        note("session_commit", t)
        note("checkpoint", t0)
        last_meta[0] = meta
        self.committed = n

    it._Checkpointer.commit = commit

    results: dict[str, dict[str, list[float]]] = {}
    counter = [0]

    def run(setting: str) -> None:
        rt = rts["poll_1s" if setting == "poll_1s" else "default"]
        old = sys.getswitchinterval()
        if setting == "switch_0.2ms":
            sys.setswitchinterval(2e-4)
        spent.clear()
        steps = Steps()
        counter[0] += 1
        try:
            with contextlib.ExitStack() as stack:
                for name in ("commit_epoch", "_fence_streams"):
                    stack.enter_context(_timed(rt.backend, name, spent.setdefault(name, []), each=True))
                it.durable_generate(model, ids, f"ph-{counter[0]}", runtime=rt, attention_mask=mask,
                                    max_new_tokens=48, do_sample=False, stopping_criteria=criteria(steps))
        finally:
            sys.setswitchinterval(old)
        rt.delete(f"ph-{counter[0]}")
        r = results.setdefault(setting, {})
        r.setdefault("step_ms", []).append(steps.step_ms())
        for label, ts in spent.items():
            r.setdefault(label + "_us", []).append(statistics.median(ts[1:-1] or ts) * 1e6)

    run("default")  # warm-up
    results.clear()
    try:
        for _ in range(args.rounds):
            for setting in ("default", "switch_0.2ms", "poll_1s"):
                run(setting)
    finally:
        for rt in rts.values():
            rt.close()
    summary = {s: {k: statistics.median(v) for k, v in r.items()} for s, r in results.items()}
    for s, r in summary.items():
        print(s, {k: round(v, 2) for k, v in r.items()})
    write_out("checkpointer_phases_gpu", {"device": torch.cuda.get_device_name(0), "rounds": args.rounds,
                                          "body_bytes": len(json.dumps(last_meta[0])), "summary": summary,
                                          "runs": results}, "transformers", "cupy-cuda13x")


if __name__ == "__main__":
    main()
