"""Child processes for crash and ownership tests (run as ``python -m tests._procs``).

Each subcommand prints one line per event to stdout, flushed, so the parent can
act on it (kill, stop, continue) at real moments. ``--backend`` and ``--memory``
name the conformance substrate (tests/conformance/substrate.py): the child
makes and changes its arrays there, so a device substrate's child commits
device arrays.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tests.conformance.substrate import Substrate

BIG = 64 << 20
KV_SHAPE = (2, 4, 4096, 16)  # [layers*2, heads, seq, dim], seq axis 2
TABLE = 1000


def fresh_state() -> dict[str, np.ndarray]:
    big = np.zeros(BIG, np.uint8)
    big[::4096] = 1  # something non-zero on every page
    return {"big": big, "kv": np.zeros(KV_SHAPE, np.float32), "table": np.zeros(TABLE, np.float64)}


def _assign(array: Any, index: Any, value: Any) -> None:
    array[index] = value


def mutate(state: dict[str, Any], seed: int, epoch: int, put: Callable[[Any, Any, Any], None] = _assign) -> None:
    """The deterministic change that epoch ``epoch`` commits (a pure function of
    seed, epoch and the state before it). ``put(array, index, value)`` writes
    NumPy values at NumPy indices (``Substrate.put`` for device arrays)."""
    rng = np.random.default_rng([seed, epoch])
    pos = rng.integers(0, BIG - 8, 32).tolist()
    vals = rng.integers(0, 256, 32, dtype=np.uint8).tolist()
    # big[pos] = vals; big[pos + 1] = big[pos] ^ 0x5A, resolved here to one value per
    # byte (later writes win, as NumPy assigns): a device scatter of repeated indices
    # keeps any one of their values.
    final = dict(zip(pos, vals, strict=True))
    first = dict(final)
    for p in pos:
        final[p + 1] = first[p] ^ 0x5A
    put(state["big"], np.fromiter(final, np.int64, len(final)), np.fromiter(final.values(), np.uint8, len(final)))
    put(state["kv"], np.s_[:, :, epoch - 1, :], rng.standard_normal((2, 4, 16)).astype(np.float32))
    state["table"][epoch % TABLE] += epoch


def open_or_create(rt, session_id: str, place):  # type: ignore[no-untyped-def]
    """Resume the crash session, or create it with fresh regions (``place`` puts
    each fresh NumPy array where the backend wants it). Returns (session, arrays)."""
    from concordia_agents import SessionNotFound

    try:
        s = rt.resume(session_id)
        return s, {name: s.regions[name].array for name in ("big", "kv", "table")}
    except SessionNotFound:
        s = rt.session(session_id)
    arrays = {name: place(a) for name, a in fresh_state().items()}
    s.register("big", arrays["big"])
    s.register("kv", arrays["kv"], kind="kv", seq_axis=2)
    s.register("table", arrays["table"])
    return s, arrays


def crash_child(args: argparse.Namespace) -> None:
    """Commit epoch after epoch of ``mutate`` on the substrate's arrays until killed."""
    from concordia_agents import Runtime

    sub = Substrate.of(args.backend, args.memory)
    rt = Runtime.open(home=args.home, catalog_url=args.catalog, backend=args.backend,
                      lease_ttl=args.ttl, compact_bytes=96 << 20)
    s, state = open_or_create(rt, args.session, sub.array)
    print(f"start {s.epoch}", flush=True)
    epoch = s.epoch
    while epoch < KV_SHAPE[2]:
        epoch += 1
        mutate(state, args.seed, epoch, sub.put)
        got = s.commit({"e": epoch}, rows={"kv": (epoch - 1, epoch)})
        assert got == epoch
        print(f"epoch {got}", flush=True)
    print("done", flush=True)
    time.sleep(3600)


def gpu_crash_child(args: argparse.Namespace) -> None:
    """crash_child with CuPy regions: the executor copies while the loop goes on."""
    import cupy

    from concordia_agents import Runtime

    rt = Runtime.open(home=args.home, catalog_url=args.catalog, backend="cupy", lease_ttl=args.ttl)
    s, dev = open_or_create(rt, args.session, cupy.asarray)
    state = {name: a.get() for name, a in dev.items()}
    print(f"start {s.epoch}", flush=True)
    epoch = s.epoch
    while epoch < KV_SHAPE[2]:
        epoch += 1
        mutate(state, args.seed, epoch)
        for name in ("big", "table"):
            dev[name].set(state[name])
        dev["kv"][:, :, epoch - 1, :] = cupy.asarray(state["kv"][:, :, epoch - 1, :])
        s.commit({"e": epoch}, rows={"kv": (epoch - 1, epoch)})  # returns once in the ring
        print(f"epoch {epoch}", flush=True)
    print("done", flush=True)
    time.sleep(3600)


def owner(args: argparse.Namespace) -> None:
    """Own a session, commit once, then wait for "commit" lines on stdin."""
    from concordia_agents import OwnershipError, Runtime

    rt = Runtime.open(home=args.home, catalog_url=args.catalog, backend=args.backend, lease_ttl=args.ttl)
    s = rt.session(args.session)
    a = Substrate.of(args.backend, args.memory).zeros(4096, np.uint8)
    s.register("a", a)
    s.commit({"by": "owner"})
    s.flush()
    print(f"ready {s.token}", flush=True)
    for line in sys.stdin:
        if line.strip() == "commit":
            a[0] += 1
            try:
                print(f"committed {s.commit({'by': 'owner-late'})}", flush=True)
            except OwnershipError as e:
                print(f"fenced {e}", flush=True)


def opener(args: argparse.Namespace) -> None:
    """Try to open (resume) a session; print what happened."""
    from concordia_agents import OwnershipError, Runtime

    rt = Runtime.open(home=args.home, catalog_url=args.catalog, backend=args.backend, lease_ttl=args.ttl)
    try:
        s = rt.resume(args.session)
    except OwnershipError as e:
        print(f"refused {e}", flush=True)
        return
    s.regions["a"].array[1] = 42
    print(f"opened {s.token} {s.epoch} {s.commit({'by': 'opener'})}", flush=True)
    s.close()
    rt.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["crash-child", "gpu-crash-child", "owner", "opener"])
    p.add_argument("--home", required=True)
    p.add_argument("--catalog", required=True)
    p.add_argument("--backend", default="host")
    p.add_argument("--memory", default=None, help="a Capability value; default: the first memory the backend serves")
    p.add_argument("--session", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttl", type=float, default=1.0)
    args = p.parse_args()
    {"crash-child": crash_child, "gpu-crash-child": gpu_crash_child, "owner": owner,
     "opener": opener}[args.cmd](args)


if __name__ == "__main__":
    main()
