"""Real processes, real SIGKILL: crash recovery and ownership across processes, on every
backend; the children make their arrays in the substrate's memory (tests._procs)."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from concordia_agents import Runtime

from .._procs import fresh_state, mutate
from ..conftest import freeze_between_catalog_writes
from .substrate import Substrate

ROOT = Path(__file__).resolve().parents[2]


_children: list[Child] = []


@pytest.fixture(autouse=True)
def _reap_children():  # type: ignore[no-untyped-def]
    """No child may outlive its test (it would hold catalog locks into teardown)."""
    yield
    while _children:
        c = _children.pop()
        if c.proc.poll() is None:
            c.kill()


class Child:
    """A child process whose stdout lines arrive on a queue."""

    def __init__(self, *args: str, stdin: bool = False) -> None:
        _children.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests._procs", *args], cwd=ROOT, stdout=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def expect(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line
            if line == "<eof>":
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"child ended before {prefix!r}: {err[-3000:]}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def _args(cmd: str, home: Path, catalog_url: str, sub: Substrate, session: str, **kw: object) -> list[str]:
    out = [cmd, "--home", str(home), "--catalog", catalog_url, "--backend", sub.backend, "--memory", sub.memory.value,
           "--session", session]
    for k, v in kw.items():
        out += [f"--{k}", str(v)]
    return out


@pytest.mark.slow
def test_sigkill_mid_commit_stream_resumes_to_a_committed_epoch(home, catalog_url, substrate):
    """20 SIGKILLs at random moments of a commit loop: each resume restores exactly one
    committed epoch, never older than the last one reported, never torn or mixed."""
    sub = substrate
    rnd = random.Random(2606)
    model = fresh_state()
    model_epoch = 0
    seed = 11
    for it in range(20):
        child = Child(*_args("crash-child", home, catalog_url, sub, "crashy", seed=seed, ttl=0.5))
        start = int(child.expect("start").split()[1])
        assert start == model_epoch
        reported = start
        deadline = time.monotonic() + rnd.uniform(0.05, 1.2)
        while time.monotonic() < deadline:
            try:
                line = child.lines.get(timeout=max(0.001, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith("epoch"):
                reported = int(line.split()[1])
        child.kill()
        while not child.lines.empty():  # epochs reported before death count too
            line = child.lines.get()
            if line.startswith("epoch"):
                reported = int(line.split()[1])
        time.sleep(0.6)  # the 0.5 s lease expires for real

        with Runtime.open(home=home, catalog_url=catalog_url, backend=sub.backend) as rt:
            s = rt.resume("crashy")
            assert s.epoch >= reported, f"run {it}: resumed epoch {s.epoch} < reported {reported}"
            assert s.meta == {"e": s.epoch} or s.epoch == 0
            while model_epoch < s.epoch:
                model_epoch += 1
                mutate(model, seed, model_epoch)
            for name, expected in model.items():
                assert sub.serves(s.regions[name].array), f"run {it}: region {name} restored outside {sub.id}'s memory"
                got = sub.to_host(s.regions[name].array)
                if name == "kv":
                    assert s.regions["kv"].length == s.epoch
                    got, expected = got[:, :, : s.epoch], expected[:, :, : s.epoch]
                assert np.array_equal(got, expected), f"run {it}: region {name} differs at epoch {s.epoch}"
            s.close()
    assert model_epoch > 20  # the loop really committed through the kills


def test_two_processes_one_owner(home, catalog_url, substrate):
    """A second process is refused while the owner lives; after SIGKILL and lease
    expiry it resumes with a larger fencing token."""
    owner = Child(*_args("owner", home, catalog_url, substrate, "shared", ttl=1.0), stdin=True)
    token = int(owner.expect("ready").split()[1])
    second = Child(*_args("opener", home, catalog_url, substrate, "shared", ttl=1.0))
    assert second.expect("refused").startswith("refused")
    assert second.proc.wait(timeout=60) == 0
    owner.kill()
    time.sleep(1.2)
    third = Child(*_args("opener", home, catalog_url, substrate, "shared", ttl=1.0))
    _, new_token, epoch, committed = third.expect("opened").split()
    assert int(new_token) > token and (int(epoch), int(committed)) == (1, 2)
    assert third.proc.wait(timeout=60) == 0


def test_stale_owner_commit_is_rejected(home, catalog_url, substrate):
    """An owner frozen past its lease (SIGSTOP) is taken over; when it wakes, its
    commit raises OwnershipError and the new owner's history stands."""
    owner = Child(*_args("owner", home, catalog_url, substrate, "frozen", ttl=1.0), stdin=True)
    owner.expect("ready")
    freeze_between_catalog_writes(owner.proc.pid, catalog_url)
    try:
        time.sleep(1.2)
        taker = Child(*_args("opener", home, catalog_url, substrate, "frozen", ttl=1.0))
        assert taker.expect("opened").split()[3] == "2"
        assert taker.proc.wait(timeout=60) == 0  # closed: lease released
    finally:
        os.kill(owner.proc.pid, signal.SIGCONT)
    owner.send("commit")
    assert owner.expect("fenced").startswith("fenced")
    owner.kill()
    with Runtime.open(home=home, catalog_url=catalog_url, backend=substrate.backend) as rt:
        s = rt.resume("frozen")
        assert s.meta == {"by": "opener"} and s.epoch == 2
        a = substrate.to_host(s.regions["a"].array)
        assert a[0] == 0 and a[1] == 42
