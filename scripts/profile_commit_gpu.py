"""Where the host time of a per-token commit goes (a diagnostic, not a benchmark).

Registers the regions ``durable_generate`` registers for a Llama-3-8B-shaped
model (one kv tensor ``[64, batch, 8, max_len, 128]`` bf16 and a token buffer),
then commits one token at a time with ``wait=False`` as the checkpointer does,
with the caller's gap between commits set to 0 (the executor stays resident)
or to a decode step's length (it parks and is relaunched). Prints the host time
per ``commit()`` (p50/p99) and a cProfile of each case; writes JSON to $OUT.

    python scripts/profile_commit_gpu.py [--batch 1] [--steps 300]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import faulthandler

    import torch

    from concordia_agents import Runtime

    faulthandler.dump_traceback_later(90, exit=True)  # a hang shows where it is

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--idle-ms", type=float, default=10.0, help="the executor's idle window (backend option)")
    args = p.parse_args()
    max_len = 2048 + 2 * args.steps + 64
    from bench.common import versions, write_out

    out: dict = {"benchmark": "profile_commit_gpu (diagnostic)", "device": torch.cuda.get_device_name(0),
                 "versions": versions("cupy-cuda13x"), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "batch": args.batch, "steps": args.steps, "idle_ms": args.idle_ms}
    # The caller's kernels are loaded before the executor first runs: with lazy
    # module loading, a first use while it is resident waits for it to park, and
    # a fenced commit behind that launch holds it resident (see docs/gpu.md).
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    _ = a @ a
    scratch = torch.zeros(64, args.batch, 8, 4, 128, dtype=torch.bfloat16, device="cuda")
    scratch[:, :, :, 1] = 1
    torch.zeros(args.batch, 4, dtype=torch.int64, device="cuda")[:, 1] = 7
    torch.cuda.synchronize()
    home = Path(tempfile.mkdtemp())
    rt = Runtime.open(home=home, backend="cupy", ring_bytes=1 << 30,
                      backend_options={"idle_ms": args.idle_ms, "max_life_ms": max(500.0, 100 * args.idle_ms)})
    try:
        for gap_ms in (0.0, 15.0):
            kv = torch.zeros(64, args.batch, 8, max_len, 128, dtype=torch.bfloat16, device="cuda")
            tokens = torch.zeros(args.batch, max_len, dtype=torch.int64, device="cuda")
            s = rt.session(f"p{int(gap_ms)}")
            s.register("kv", kv, kind="kv", seq_axis=3)
            s.register("tokens", tokens, kind="kv", seq_axis=1)
            meta = {"fingerprint": {k: "0" * 64 for k in ("model", "prompt", "args")}, "prompt_len": 2048}
            s.commit(dict(meta, n_tokens=2048), rows={"kv": 2048, "tokens": 2048})
            s.wait_visible()
            print(f"gap {gap_ms} ms: prompt epoch visible", flush=True)
            pos = 2048
            times = []
            prof = cProfile.Profile()
            for i in range(args.steps):
                _ = a @ a  # the caller's work in flight on its stream, as in decode
                kv[:, :, :, pos] = 1
                tokens[:, pos] = 7
                pos += 1
                if gap_ms:
                    time.sleep(gap_ms / 1e3)
                if i == 20:
                    prof.enable()
                t = time.perf_counter()
                s.commit(dict(meta, n_tokens=pos, done=False), rows={"kv": pos, "tokens": pos}, wait=False)
                if i >= 20:
                    times.append(time.perf_counter() - t)
                if i % 50 == 0:
                    ex = rt.backend.executor
                    print(f"  step {i}: tail {ex._tail} head {ex.head} state {ex.state} parks {ex.parks} "
                          f"visible epoch {s._log.ring.committed_epoch} of {s.epoch}", flush=True)
            prof.disable()
            try:
                s.flush(timeout=20)
            except Exception:
                import traceback

                traceback.print_exc()
                ex = rt.backend.executor
                print(f"tail {ex._tail} head {ex.head} state {ex.state} parks {ex.parks} "
                      f"visible epoch {s._log.ring.committed_epoch} of {s.epoch}", flush=True)
                os._exit(3)
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(22)
            times.sort()
            key = f"gap_{gap_ms:g}ms"
            out[key] = {"commit_host_us_p50": statistics.median(times) * 1e6,
                        "commit_host_us_p99": times[int(len(times) * 0.99)] * 1e6,
                        "executor_parks": rt.backend.executor.parks, "profile": buf.getvalue()[-6000:]}
            print(key, {k: v for k, v in out[key].items() if k != "profile"}, flush=True)
            print(out[key]["profile"], flush=True)
            s.close()
    finally:
        rt.close()
    write_out(f"profile_commit_gpu-idle{args.idle_ms:g}", out)


if __name__ == "__main__":
    main()
