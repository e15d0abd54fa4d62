"""Rings kept mapped after their session ends (``concordia_agents/_warm_rings.py``): the next open in
the process reuses the mapping; nothing is removed that another owner uses or that holds bytes the
segments lack; a crash while rings are kept loses nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from concordia_agents import ConfigurationError, Runtime
from concordia_agents._log import ring_path
from gpu_runtime.records import session_tag

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


def test_reopen_in_the_process_reuses_the_mapping_and_runtime_close_removes_it(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        rfile = ring_path(rt.config, session_tag("w"))
        _commit(rt, "w", 7)
        assert rfile.exists() and rt._warm.nbytes == rt.config.ring_bytes  # kept, not removed
        assert _read(rt, "w") == (7, 7)
        assert rt._warm.hits == 1
        _commit(rt, "w", 9)  # resume + commit again on the kept mapping
        assert rt._warm.hits == 2 and _read(rt, "w") == (9, 9)
    assert not rfile.exists()  # the runtime's close retires it as a clean close would have
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        assert _read(rt, "w") == (9, 9)


def test_no_budget_keeps_nothing(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host", warm_ring_bytes=0) as rt:
        _commit(rt, "w", 3)
        assert not ring_path(rt.config, session_tag("w")).exists() and rt._warm.nbytes == 0
        assert _read(rt, "w") == (3, 3) and rt._warm.hits == 0


def test_budget_retires_the_least_recently_kept(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host", ring_bytes=1 << 20, max_record_bytes=65536,
                      warm_ring_bytes=2 << 20) as rt:
        for sid in ("a", "b", "c"):
            _commit(rt, sid, ord(sid))
        kept = {sid: ring_path(rt.config, session_tag(sid)).exists() for sid in "abc"}
        assert kept == {"a": False, "b": True, "c": True} and rt._warm.nbytes == 2 << 20
        assert [_read(rt, sid) for sid in "abc"] == [(ord(s), ord(s)) for s in "abc"]


def test_a_ring_replaced_by_another_owner_is_not_reused(home: Path, catalog_url: str):
    """Another process (here another runtime that keeps nothing) opens the session while this one keeps
    its ring, commits and closes cleanly, removing the file: this runtime's next open maps the new one."""
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        _commit(rt, "w", 1)
        with Runtime.open(home=home, catalog_url=catalog_url, backend="host", warm_ring_bytes=0) as other:
            _commit(other, "w", 2)
        assert not ring_path(rt.config, session_tag("w")).exists()
        assert _read(rt, "w") == (2, 2) and rt._warm.hits == 0


def test_retiring_never_removes_a_ring_another_owner_holds(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        rfile = ring_path(rt.config, session_tag("w"))
        _commit(rt, "w", 1)
        with Runtime.open(home=home, catalog_url=catalog_url, backend="host", warm_ring_bytes=0) as other:
            s = other.session("w")  # maps the same file and fences it with its own token
            a = s.restore("a").array
            a[:] = 5
            s.commit({"v": 5})
            rt._warm.close()  # this runtime retires its kept mapping while `other` owns the ring
            assert rfile.exists()
            a[:] = 6
            s.commit({"v": 6})  # still writing into the file that was not removed
            s.close()
        assert _read(rt, "w") == (6, 6)


def test_gc_leaves_kept_rings_to_the_process_and_another_process_gc_is_detected(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        rfile = ring_path(rt.config, session_tag("w"))
        _commit(rt, "w", 4)
        for dry_run in (True, False):
            report = rt.gc(dry_run=dry_run)
            assert rfile not in [i.path for i in report.removed] and rfile in [i.path for i in report.kept]
            assert rfile.exists()
        with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as other:  # another process's gc
            assert rfile in [i.path for i in other.gc().removed] and not rfile.exists()
        assert _read(rt, "w") == (4, 4) and rt._warm.hits == 0  # the stale mapping was not reused


def test_delete_drops_the_kept_ring(home: Path, catalog_url: str):
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        _commit(rt, "w", 4)
        rt.delete("w")
        assert not ring_path(rt.config, session_tag("w")).exists() and rt._warm.nbytes == 0


def test_sigkill_while_a_ring_is_kept_loses_nothing(home: Path):
    """A process keeps a closed session's ring and is SIGKILLed: the file it left holds nothing the
    segments lack; gc lists it as removable, and the next process resumes the session from it."""
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
        rfile = ring_path(rt.config, session_tag("k"))
        assert rfile.exists()
        assert rfile in [i.path for i in rt.gc(dry_run=True).removed]
        assert _read(rt, "k") == (42, 42)
    assert not rfile.exists()


def test_a_negative_budget_is_refused(home: Path):
    with pytest.raises(ConfigurationError, match="warm_ring_bytes: expected >= 0"):
        Runtime.open(home=home, backend="host", warm_ring_bytes=-1)
