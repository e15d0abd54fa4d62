"""``concordia demo --synthetic``: a real crash and a resume by session ID, in under a minute.

A worker process runs a simulated decode loop: every step appends one token's
K/V rows to a ``kv`` region and touches a few pages of a ``pages`` region
(a scheduler/scratch table), then commits an epoch. At a chosen step the worker
SIGKILLs itself. The parent then resumes the session by its ID, checks the
restored state bit for bit against a deterministic recomputation, and finishes
the loop, reporting what was restored and what had to be recomputed (nothing).

The workload is synthetic NumPy on purpose: it shows the runtime's protocol on
any machine. The agent demo (``_agent_demo``, plain ``concordia demo``) uses a
real model and graph. ``run_killed_worker`` runs either demo's worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from concordia_agents import ConcordiaError, Runtime

__all__ = ["run_demo", "run_killed_worker", "worker"]

LAYERS, HEADS, DIM, MAX_TOKENS = 8, 4, 64, 512
SCRATCH = 16 << 20


def _kv_rows(step: int) -> np.ndarray:
    rng = np.random.default_rng([2606, step])
    return rng.standard_normal((2 * LAYERS, HEADS, DIM)).astype(np.float32)


def _touch(scratch: np.ndarray, step: int) -> None:
    rng = np.random.default_rng([23521, step])
    idx = rng.integers(0, scratch.size, 8)
    scratch[idx] = (scratch[idx].astype(np.int64) + step) % 251


def _fresh() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((2 * LAYERS, HEADS, MAX_TOKENS, DIM), np.float32), np.zeros(SCRATCH, np.uint8)


def _step(kv: np.ndarray, scratch: np.ndarray, step: int) -> None:
    kv[:, :, step - 1, :] = _kv_rows(step)
    _touch(scratch, step)


def worker(home: str, catalog: str | None, session_id: str, crash_at: int, backend: str) -> None:
    """The crashing process (``concordia demo --worker``)."""
    rt = Runtime.open(home=home, catalog_url=catalog, backend=backend, lease_ttl=1.0)
    s = rt.session(session_id)
    kv, scratch = _fresh()
    s.register("kv", kv, kind="kv", seq_axis=2)
    s.register("scratch", scratch)
    for step in range(1, crash_at + 1):
        _step(kv, scratch, step)
        epoch = s.commit({"step": step}, rows={"kv": step})
        if step % 25 == 0:
            print(f"  worker: step {step:4d} committed as epoch {epoch}", flush=True)
    print(f"  worker: SIGKILL at step {crash_at} (no flush, no close)", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def run_killed_worker(home: Path, catalog: str | None, global_args: list[str], demo_args: list[str],
                      say: Callable[[str], Any]) -> None:
    """Run ``concordia [global_args] demo [demo_args]`` as a child process that
    must die by SIGKILL; relay its output. Raises ConcordiaError otherwise."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "concordia_cli", "--home", str(home), *global_args]
    if catalog:
        cmd += ["--catalog", catalog]
    proc = subprocess.run([*cmd, "demo", *demo_args], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        say(line)
    if proc.returncode != -signal.SIGKILL:
        raise ConcordiaError(f"demo worker exited with {proc.returncode}, expected SIGKILL: {proc.stderr[-2000:]}")
    say(f"   worker died by SIGKILL after {time.perf_counter() - t0:.1f} s")


def run_demo(*, home: Path, catalog: str | None, backend: str, crash_at: int = 300,
             total: int = 400, say: Callable[[str], Any] = print) -> dict[str, Any]:
    session_id = f"demo-{uuid.uuid4().hex[:8]}"
    say(f"Concordia demo: session {session_id!r}, home {home}")
    say(f"1. A worker process decodes {crash_at} steps, committing one epoch per step, then is SIGKILLed.")
    t0 = time.perf_counter()
    run_killed_worker(home, catalog, ["--backend", backend],
                      ["--worker", "--session", session_id, "--crash-at", str(crash_at)], say)

    say("2. Wait for its ownership lease to expire (1 s in the demo), then resume the session by ID.")
    time.sleep(1.1)
    with Runtime.open(home=home, catalog_url=catalog, backend=backend) as rt:
        info = rt.info(session_id)
        say(f"   catalog says: status={info.status}, durable epoch >= {info.last_epoch}")
        t1 = time.perf_counter()
        s = rt.resume(session_id)
        restore_s = time.perf_counter() - t1
        kv, scratch = s.regions["kv"].array, s.regions["scratch"].array
        step = s.meta["step"]
        say(f"   resumed at epoch {s.epoch} (step {step}) in {restore_s * 1000:.0f} ms; "
            f"kv length {s.regions['kv'].length}, {kv.nbytes + scratch.nbytes >> 20} MiB of state restored")

        say("3. Check the restored state bit for bit against a deterministic recomputation.")
        t2 = time.perf_counter()
        ref_kv, ref_scratch = _fresh()
        for i in range(1, step + 1):
            _step(ref_kv, ref_scratch, i)
        recompute_s = time.perf_counter() - t2
        ok = np.array_equal(kv[:, :, :step], ref_kv[:, :, :step]) and np.array_equal(scratch, ref_scratch)
        say(f"   bit-exact: {ok}")
        if not ok:
            raise ConcordiaError("restored state differs from the recomputation")

        say(f"4. Continue from step {step + 1} to {total}; nothing before step {step + 1} is recomputed.")
        for i in range(step + 1, total + 1):
            _step(kv, scratch, i)
            s.commit({"step": i}, rows={"kv": i})
        s.flush()
        done = rt.info(session_id)
        s.close()
        say(f"   finished at epoch {done.last_epoch}; log on disk {done.log_bytes / 2**20:.1f} MiB "
            f"in {len(rt.catalog.segments(session_id))} files under {rt.session_dir(session_id)}")
    summary = {"session": session_id, "crash_step": crash_at, "resumed_step": step, "restored": True,
               "bit_exact": ok, "restore_ms": restore_s * 1000, "steps_recomputed": 0,
               "replay_equivalent_s": recompute_s, "total_s": time.perf_counter() - t0}
    say(f"Saved: {step} steps survived the crash; 0 recomputed; restore took {restore_s * 1000:.0f} ms. "
        f"Inspect with: concordia sessions show {session_id}")
    return summary
