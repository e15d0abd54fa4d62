"""Host A of the remote-storage tests (``python -m tests._remote_child``): a
runtime with a remote commits ``--remote`` epochs, waits until they are remote,
commits ``--local`` more and makes them durable on its disk only, prints
``READY <remote epoch> <last epoch>`` and waits to be SIGKILLed.

The state of epoch ``e`` is ``expected(e)``: the parent checks a resume on
another host against it, byte for byte.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

T = 512  #: KV rows (one per epoch)
KV = (2, T, 256)  #: [layers*2, seq, dim], seq axis 1
PAGES = 16 * 4096


def fresh() -> dict[str, np.ndarray]:
    return {"kv": np.zeros(KV, np.float32), "scratch": np.zeros(PAGES, np.uint8)}


def mutate(state: dict[str, np.ndarray], seed: int, epoch: int) -> None:
    """Epoch ``epoch``'s change: KV row ``epoch - 1`` and a few scratch bytes."""
    rng = np.random.default_rng([seed, epoch])
    state["kv"][:, epoch - 1] = rng.standard_normal((2, 256)).astype(np.float32)
    pos = rng.integers(0, PAGES, 8)
    state["scratch"][pos] = rng.integers(1, 256, 8, dtype=np.uint8)


def expected(seed: int, epoch: int) -> dict[str, np.ndarray]:
    state = fresh()
    for e in range(1, epoch + 1):
        mutate(state, seed, e)
    return state


def run(s, seed: int, first: int, n: int, state: dict[str, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    """Commit epochs ``first .. first + n - 1`` of ``mutate``."""
    for e in range(first, first + n):
        mutate(state, seed, e)
        s.commit(meta={"epoch": e}, rows={"kv": (e - 1, e)})


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("home", "ring-dir", "catalog", "remote", "endpoint", "session"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--remote-epochs", type=int, required=True)
    ap.add_argument("--local-epochs", type=int, default=0)
    ap.add_argument("--ttl", type=float, default=1.0)
    ap.add_argument("--segment-bytes", type=int, default=1 << 20)
    ap.add_argument("--compact-bytes", type=int, default=0)
    ap.add_argument("--compact-epochs", type=int, default=256)
    ap.add_argument("--then-commit", action="store_true",
                    help="after READY, wait for a line on stdin, then commit and upload more; print the outcome")
    a = ap.parse_args()

    from pathlib import Path

    from concordia_agents import Runtime

    rt = Runtime.open(home=a.home, catalog_url=a.catalog, backend="host", remote=a.remote, remote_endpoint=a.endpoint,
                      ring_dir=Path(a.ring_dir), lease_ttl=a.ttl, segment_bytes=a.segment_bytes,
                      max_record_bytes=64 << 10, compact_bytes=a.compact_bytes, compact_epochs=a.compact_epochs,
                      remote_interval=3600.0)
    s = rt.session(a.session, durability="remote")
    state = fresh()
    s.register("kv", state["kv"], kind="kv", seq_axis=1)
    s.register("scratch", state["scratch"], page_size=4096)
    run(s, a.seed, 1, a.remote_epochs, state)
    s.flush(level="remote", timeout=60)
    remote = s.durability().remote
    run(s, a.seed, a.remote_epochs + 1, a.local_epochs, state)
    s.flush(level="disk")
    # Disk only: with remote_interval an hour, the uploader seals the open segment
    # only when a flush(level="remote") asks, so these epochs never leave the host.
    print(f"READY {remote} {s.epoch}", flush=True)
    if a.then_commit:
        sys.stdin.readline()
        try:
            run(s, a.seed, s.epoch + 1, 20, state)
            s.flush(level="remote", timeout=10)
            print("WROTE", flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            print(f"REFUSED {type(e).__name__}: {e}", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
