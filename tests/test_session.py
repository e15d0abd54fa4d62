"""Session behaviour that is about host memory or the process environment, not the backend
protocol; the protocol tests every backend runs are in tests/conformance/test_session.py."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from concordia_agents import ConfigurationError, RegionError, Runtime
from gpu_runtime.errors import BackendUnavailableError


def test_register_into_incompatible_array_is_refused(make_runtime):
    """Restoring into an array of another dtype or shape raises RegionError naming both."""
    rt = make_runtime()
    s = rt.session("s1")
    s.register("a", np.zeros(100, np.float32))
    s.commit()
    s.close()
    s = rt.session("s1")
    with pytest.raises(RegionError, match="expected dtype float32, found float64"):
        s.register("a", np.zeros(100, np.float64))
    with pytest.raises(RegionError, match=r"expected shape \(100,\), found \(99,\)"):
        s.register("a", np.zeros(99, np.float32))


def test_cupy_backend_without_gpu_says_so():
    """Asking for the CuPy backend where it cannot run raises, never falls back silently."""
    from .conftest import BACKENDS

    if "cupy" in BACKENDS:
        pytest.skip("a GPU is present: the CuPy backend is available")
    from gpu_runtime.backend import open_backend

    with pytest.raises(BackendUnavailableError):
        open_backend("cupy")
    assert open_backend("auto").name == "host"


def test_runtime_defaults_come_from_environment(tmp_path, monkeypatch):
    """CONCORDIA_HOME and CONCORDIA_BACKEND set the defaults; a bad number is a ConfigurationError."""
    monkeypatch.setenv("CONCORDIA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("CONCORDIA_BACKEND", "host")
    with Runtime.open() as rt:
        assert rt.config.home == tmp_path / "h" and rt.backend.name == "host"
        assert rt.config.catalog_url == f"sqlite:///{tmp_path / 'h' / 'catalog.db'}"
    monkeypatch.setenv("CONCORDIA_RING_BYTES", "lots")
    with pytest.raises(ConfigurationError, match="CONCORDIA_RING_BYTES"):
        Runtime.open()


def test_flush_poll_comes_from_environment_and_must_be_positive(tmp_path, monkeypatch):
    """CONCORDIA_FLUSH_POLL_MS sets the flusher's period (an argument wins); 0 or less (a spinning flusher),
    NaN, infinity (its wait raises) or over an hour is a ConfigurationError naming the variable, the bounds and
    the value found."""
    monkeypatch.setenv("CONCORDIA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("CONCORDIA_BACKEND", "host")
    monkeypatch.setenv("CONCORDIA_FLUSH_POLL_MS", "250")
    with Runtime.open() as rt:
        assert rt.config.flush_poll == 0.25
    with Runtime.open(flush_poll=0.05) as rt:
        assert rt.config.flush_poll == 0.05
    for bad in ("0", "-5", "inf", "nan", "3600001"):
        monkeypatch.setenv("CONCORDIA_FLUSH_POLL_MS", bad)
        found = re.escape(repr(float(bad)))  # 0.0, -5.0, inf, nan, 3600001.0
        with pytest.raises(ConfigurationError, match=rf"CONCORDIA_FLUSH_POLL_MS.*at most 3600000 ms, found {found} ms"):
            Runtime.open()
    monkeypatch.delenv("CONCORDIA_FLUSH_POLL_MS")
    with pytest.raises(ConfigurationError, match=r"found 0\.0 ms"):
        Runtime.open(flush_poll=0.0)


def test_a_long_flush_period_keeps_the_backend_polled_and_a_forced_flush_still_durable(tmp_path):
    """With a flusher period of an hour, the backend is still polled every 10 ms or so (a CUDA executor parked
    with a task pending is relaunched there), no pass runs unasked, and session.flush() (which flushes in the
    caller's thread) still makes the epoch durable."""
    from gpu_runtime.host import HostBackend

    polls = []
    with Runtime.open(home=tmp_path / "h", backend="host", flush_poll=3600.0) as rt:
        assert isinstance(rt.backend, HostBackend)
        rt.backend.poll = lambda: polls.append(time.monotonic())  # type: ignore[method-assign]
        s = rt.session("s")
        s.register("a", np.arange(1024, dtype=np.float32))
        s.commit({"n": 1})
        time.sleep(0.5)
        assert len(polls) >= 10, f"expected the backend polled every ~10 ms for 0.5 s, found {len(polls)} polls"
        slog = rt._sessions["s"].log
        assert slog.state.copied_epoch == 0, "no pass should have run within the hour-long period"
        s.flush()
        assert slog.state.durable_epoch >= 1


def test_processes_opening_a_new_home_at_the_same_moment_all_succeed(tmp_path):
    """Ranks of a torchrun job open one fresh home at once: each open succeeds and they share one catalog
    (creating the home directory or the SQLite file raced: FileExistsError)."""
    import subprocess
    import sys
    import time

    script = ("import sys, time\nfrom concordia_agents import Runtime\nt = float(sys.argv[2])\n"
              "while time.time() < t: pass\nrt = Runtime.open(home=sys.argv[1], backend='host')\n"
              "print(rt.catalog.catalog_id)\nrt.close()\n")
    for attempt in range(4):
        home = tmp_path / f"h{attempt}"
        start = str(time.time() + 2.0)
        procs = [subprocess.Popen([sys.executable, "-c", script, str(home), start], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-600:] for _, err in outs]
        assert len({out.strip() for out, _ in outs}) == 1, "every process opened the same catalog"
