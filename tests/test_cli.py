"""The concordia CLI, run as a user would: a real subprocess per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONCORDIA_HOME": str(home)}
    env.pop("CONCORDIA_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "concordia_agents.cli", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.mark.slow
def test_agent_demo_runs_the_story_in_under_a_minute(home: Path):
    """`concordia demo` kills an agent in its LLM node, resumes it by ID with no re-prefill, matches the
    uninterrupted run, and says what was saved — in under a minute."""
    t = time.monotonic()
    r = cli(home, "demo")
    took = time.monotonic() - t
    assert "worker died by SIGKILL" in r.stdout
    assert "nodes run now ['llm', 'report'] (plan was not re-run); 140 forward passes, the first with 1 token" \
        in r.stdout
    assert "reused 100 generated tokens" in r.stdout
    assert "final state equal to the uninterrupted run: True" in r.stdout
    assert "Saved: 5 graph checkpoints" in r.stdout
    assert took < 60, f"the demo took {took:.1f} s"
    listed = {i["id"]: i for i in json.loads(cli(home, "sessions", "list", "--json").stdout)}
    threads = [i for i in listed.values() if i["kind"] == "graph"]
    assert len(threads) == 2 and all(i["status"] == "closed" for i in threads)  # resumed + reference
    tasks = [i for i in listed.values() if i["parent"]]
    assert len(tasks) == 2 and all(i["parent"] in listed and i["last_epoch"] == 242 for i in tasks)


@pytest.mark.slow
def test_synthetic_demo_crashes_and_resumes(home: Path):
    """`concordia demo --synthetic` kills a worker with SIGKILL, resumes bit-exact, and recomputes nothing."""
    r = cli(home, "demo", "--synthetic", "--crash-at", "120")
    assert "worker died by SIGKILL" in r.stdout
    assert "resumed at epoch 120 (step 120)" in r.stdout
    assert "bit-exact: True" in r.stdout and "0 recomputed" in r.stdout
    listed = json.loads(cli(home, "sessions", "list", "--json").stdout)
    assert len(listed) == 1 and listed[0]["status"] == "closed" and listed[0]["last_epoch"] == 400


def test_sessions_show_and_rm(home: Path):
    """show prints a session's regions and files; rm deletes it; list then shows none."""
    from concordia_agents import Runtime

    import numpy as np

    with Runtime.open(home=home, backend="host") as rt:
        s = rt.session("cli-1")
        s.register("kv", np.zeros((4, 16), np.float32), kind="kv")
        s.commit(rows={"kv": 2})
        s.close()
    out = cli(home, "sessions", "show", "cli-1").stdout
    assert "status      closed" in out and "region      kv: kv float32[4, 16]" in out and "file        seg-" in out
    assert "cli-1" in cli(home, "sessions", "list").stdout
    assert "deleted session cli-1" in cli(home, "sessions", "rm", "cli-1").stdout
    assert cli(home, "sessions", "list").stdout.strip() == "no sessions"


def test_errors_are_one_line_without_traceback(home: Path):
    """An unknown session ID prints one clear line on stderr and exits 1."""
    r = cli(home, "sessions", "show", "nope", check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == "concordia: error: expected a session with ID 'nope' in the catalog, found none"
    assert "Traceback" not in r.stderr
    r = cli(home, "--backend", "tpu", "doctor", check=False)
    assert r.returncode == 0 and "unavailable" in r.stdout  # doctor reports, never crashes


def test_doctor_reports_catalog_and_nvrtc(home: Path):
    """doctor names the backend, the NVRTC version (or why not) and the catalog schema."""
    out = cli(home, "doctor").stdout
    assert "backend (auto)" in out and "nvrtc" in out and "(schema 1, code 1)" in out


def test_gc_reports(home: Path):
    """gc removes an orphaned session directory and says so."""
    (home / "sessions" / "ghost-0000000000000000").mkdir(parents=True)
    out = cli(home, "gc").stdout
    assert "ghost-0000000000000000" in out and "gc: 1 item(s) removed" in out


def test_json_logs_carry_session_context(home: Path):
    """CONCORDIA_LOG_FORMAT=json gives one JSON object per log line, bound to the session."""
    code = ("from concordia_agents import Runtime\n"
            "rt = Runtime.open(backend='host')\n"
            "s = rt.session('logged'); s.close(); rt.close()\n")
    env = {**os.environ, "CONCORDIA_HOME": str(home), "CONCORDIA_LOG_FORMAT": "json", "CONCORDIA_LOG_LEVEL": "info"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]
    opened = [e for e in events if e.get("event") == "session opened"]
    assert opened and opened[0]["session"] == "logged" and opened[0]["level"] == "info"
    assert all("timestamp" in e for e in events)


def test_rm_of_a_parent_session_removes_its_task_sessions(home: Path):
    """`sessions rm` of a session removes the task sessions bound to it (ID#task:...) and their logs."""
    from concordia_agents import Runtime

    import numpy as np

    with Runtime.open(home=home, backend="host") as rt:
        for sid in ("parent", "parent#task:a", "parent#task:b", "other"):
            s = rt.session(sid)
            s.register("kv", np.zeros((4, 16), np.float32), kind="kv")
            s.commit(rows={"kv": 2})
            s.close()
        task_dir = rt.session_dir("parent#task:a")
    assert task_dir.exists()
    assert "deleted session parent" in cli(home, "sessions", "rm", "parent").stdout
    listed = json.loads(cli(home, "sessions", "list", "--json").stdout)
    assert [i["id"] for i in listed] == ["other"] and not task_dir.exists()
