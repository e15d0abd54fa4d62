"""Rings kept mapped after their session ends (``concordia_agents/_warm_rings.py``): the next open in
the process reuses the mapping; a clean ring is kept under a private name, so no other process can
open it and nothing another owner uses is ever removed; a crash while rings are kept loses nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from concordia_agents import ConfigurationError, Runtime
from concordia_agents._log import kept_ring_files, ring_path
from gpu_runtime.records import session_tag

from .conftest import expire_lease

ROOT = Path(__file__).resolve().parents[1]


def _commit(rt: Runtime, sid: str, value: int) -> None:
    s = rt.session(sid)
    a = np.zeros(8192, np.uint8)
    s.register("a", a)
    a[:] = value
    s.commit({"v": value})
    s.close()


def _read(rt: Runtime, sid: str) -> tuple[int, int]:
    s = rt.resume(sid)
    try:
        return int(s.meta["v"]), int(s.regions["a"].array[0])
    finally:
        s.close()


def _kept(rt: Runtime) -> list[Path]:
    return [p for p, _, _ in kept_ring_files(rt.config)]


def test_reopen_in_the_process_reuses_the_mapping_and_runtime_close_removes_it(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        rfile = ring_path(rt.config, session_tag("w"))
        _commit(rt, "w", 7)
        # Kept under a private name: mapped, but no other process can find it at the session's path.
        assert not rfile.exists() and len(_kept(rt)) == 1 and rt._warm.nbytes == rt.config.ring_bytes
        assert _read(rt, "w") == (7, 7)
        assert rt._warm.hits == 1
        _commit(rt, "w", 9)  # resume + commit again on the kept mapping
        assert rt._warm.hits == 2 and _read(rt, "w") == (9, 9)
    assert not rfile.exists() and _kept(rt) == []  # the runtime's close removes it, as a clean close would have
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        assert _read(rt, "w") == (9, 9)


def test_no_budget_keeps_nothing(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host", warm_ring_bytes=0) as rt:
        _commit(rt, "w", 3)
        assert not ring_path(rt.config, session_tag("w")).exists() and _kept(rt) == [] and rt._warm.nbytes == 0
        assert _read(rt, "w") == (3, 3) and rt._warm.hits == 0


def test_budget_retires_the_least_recently_kept(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host", ring_bytes=1 << 20, max_record_bytes=65536,
                      warm_ring_bytes=2 << 20) as rt:
        for sid in ("a", "b", "c"):
            _commit(rt, sid, ord(sid))
        kept = sorted(p.name.split(".ring")[0] for p in _kept(rt))
        assert kept == sorted(ring_path(rt.config, session_tag(s)).name.split(".ring")[0] for s in "bc")
        assert rt._warm.nbytes == 2 << 20
        assert [_read(rt, sid) for sid in "abc"] == [(ord(s), ord(s)) for s in "abc"]


def test_another_process_opening_the_session_meanwhile_makes_its_own_ring(home: Path, catalog_url: str):
    """Another process (here another runtime that keeps nothing) opens the session while this one keeps
    its ring: it finds no ring at the path, makes one, commits and closes cleanly (removing it); this
    runtime's next open reuses its kept ring and reads the session as the other left it."""
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        _commit(rt, "w", 1)
        with Runtime.open(home=home, catalog_url=catalog_url, backend="host", warm_ring_bytes=0) as other:
            _commit(other, "w", 2)
        assert _read(rt, "w") == (2, 2) and rt._warm.hits == 1


def test_a_kept_ring_never_takes_the_place_of_another_owners_unflushed_ring(home: Path, catalog_url: str):
    """While this process keeps the session's ring, another process takes the session, commits an epoch
    that is only in its ring (its flusher parked) and dies by SIGKILL; this process then retires its
    kept ring and reopens the session: the other owner's epoch is there (its ring was drained)."""
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        _commit(rt, "w", 1)
        code = textwrap.dedent(f"""
            import os, signal
            from concordia_agents import Runtime
            rt = Runtime.open(home={str(home)!r}, catalog_url={catalog_url!r}, backend="host", flush_poll=3600.0,
                              warm_ring_bytes=0)
            s = rt.resume("w")
            s.regions["a"].array[:] = 2
            s.commit({{"v": 2}})
            print("committed", s.durable_epoch, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == -signal.SIGKILL and r.stdout.split() == ["committed", "1"], r.stderr
        assert ring_path(rt.config, session_tag("w")).exists()  # the dead owner's ring, holding epoch 2
        rt._warm.close()
        assert ring_path(rt.config, session_tag("w")).exists() and _kept(rt) == []
        expire_lease(catalog_url, "w")
        assert _read(rt, "w") == (2, 2)


def test_delete_drops_the_kept_ring(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        _commit(rt, "w", 4)
        rt.delete("w")
        assert not ring_path(rt.config, session_tag("w")).exists() and _kept(rt) == [] and rt._warm.nbytes == 0


def test_a_released_session_keeps_its_ring_file_in_place(home: Path, catalog_url: str):
    """A release (not a close) leaves the ring where the next owner finds it; only the mapping is kept."""
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        s = rt.session("r")
        a = np.zeros(8192, np.uint8)
        s.register("a", a)
        a[:] = 5
        s.commit({"v": 5})
        s.release()
        assert ring_path(rt.config, session_tag("r")).exists() and _kept(rt) == [] and rt._warm.nbytes
        assert _read(rt, "r") == (5, 5) and rt._warm.hits == 1


def test_a_cancelled_open_of_a_kept_ring_leaves_no_file(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        _commit(rt, "w", 6)
        s = rt.session("w")
        s.cancel()
    assert not ring_path(rt.config, session_tag("w")).exists() and _kept(rt) == []


def test_sigkill_while_a_ring_is_kept_loses_nothing_and_gc_removes_the_kept_file(home: Path):
    """A process keeps a closed session's ring and is SIGKILLed: its privately named file holds only
    flushed bytes; the next process resumes the session, and gc removes the file (its keeper is gone)."""
    code = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from concordia_agents import Runtime
        rt = Runtime.open(home={str(home)!r}, backend="host")
        s = rt.session("k")
        a = np.zeros(8192, np.uint8)
        s.register("a", a)
        a[:] = 42
        s.commit({{"v": 42}})
        s.close()
        print("kept", rt._warm.nbytes, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL and r.stdout.split() == ["kept", str(64 << 20)], r.stderr
    with Runtime.open(home=home, backend="host") as rt:
        (left,) = _kept(rt)
        assert _read(rt, "k") == (42, 42)
        assert left in [i.path for i in rt.gc(dry_run=True).removed] and left.exists()
        assert left in rt.gc().paths and not left.exists()


def test_a_negative_budget_is_refused(home: Path):
    with pytest.raises(ConfigurationError, match="warm_ring_bytes: expected >= 0"):
        Runtime.open(home=home, backend="host", warm_ring_bytes=-1)
