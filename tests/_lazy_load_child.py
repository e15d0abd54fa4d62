"""Child for the lazy-module-load test (``python -m tests._lazy_load_child HOME [YIELD_MS]``).

In a fresh process (so no cuBLAS kernel has been loaded yet): torch's context
is up, a commit leaves the executor resident, then the first matmul of the
process is launched on the caller's stream and commits are fenced behind it
without the host waiting. The matmul's lazily loaded module waits for no kernel
to be resident; the executor waits for the fence behind it. Prints
``visible <epoch> of <epoch>`` once every commit is in the log ring.
"""

from __future__ import annotations

import sys
import time


def main(home: str, fence_yield_ms: float = 2.0) -> None:
    import torch

    from concordia_agents import Runtime

    torch.zeros(1, device="cuda")  # the context is up; no other kernel has been loaded
    with Runtime.open(home=home, backend="cupy", ring_bytes=1 << 30,
                      backend_options={"fence_yield_ms": fence_yield_ms}) as rt:
        kv = torch.zeros(64, 1, 8, 2200, 128, dtype=torch.bfloat16, device="cuda")
        tokens = torch.zeros(1, 2200, dtype=torch.int64, device="cuda")
        s = rt.session("lazy")
        s.register("kv", kv, kind="kv", seq_axis=3)
        s.register("tokens", tokens, kind="kv", seq_axis=1)
        s.commit(rows={"kv": 2048, "tokens": 2048})  # 268 MB; the executor stays resident for its idle window
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)  # first uses from here on
        t = time.perf_counter()
        for pos in range(2048, 2048 + 30):
            _ = a @ a
            kv[:, :, :, pos] = 1
            tokens[:, pos] = 7
            s.commit(rows={"kv": pos + 1, "tokens": pos + 1}, wait=False)
        s.flush(timeout=60)
        print(f"visible {s._log.ring.committed_epoch} of {s.epoch} in {time.perf_counter() - t:.2f} s", flush=True)
        s.close()


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:3]))  # optional: the yield window (0: never yield)
