"""The concordia CLI, run as a user would: a real subprocess per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from concordia_agents import SCHEMA_VERSION, ConcordiaError, ConfigurationError, Runtime, configure_logging
from concordia_agents._segments import list_segments
from gpu_runtime.records import HEADER_SIZE, RecordType, decode_header

ROOT = Path(__file__).resolve().parents[1]


def cli(home: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "CONCORDIA_HOME": str(home), **(env or {})}
    e.pop("CONCORDIA_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "concordia_cli", *args], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The error a failed command printed: exit status 1, exactly one line on stderr, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("concordia: error: "), r.stderr
    return r.stderr.strip()


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


def test_global_options_go_before_or_after_the_command(home: Path, tmp_path: Path):
    """`--home` works on either side of the command (a new user typed `concordia demo --home X`, which was
    refused), the one after the command winning; the environment's home (another, empty one) is not used."""
    other = tmp_path / "other-home"
    with Runtime.open(home=other, backend="host") as rt:
        s = rt.session("placed")
        s.register("kv", np.zeros((2, 8), np.float32), kind="kv")
        s.commit(rows={"kv": 1})
        s.close()
    Runtime.open(home=home, backend="host").close()  # the environment's home: no sessions
    before = cli(home, "--home", str(other), "sessions", "list").stdout
    after = cli(home, "sessions", "list", "--home", str(other)).stdout
    assert "placed" in before and before == after
    assert "placed" in cli(home, "--home", str(home), "sessions", "list", "--home", str(other)).stdout
    assert "placed" in cli(home, "sessions", "--home", str(other), "list").stdout  # between group and command
    assert cli(home, "sessions", "list").stdout.strip() == "no sessions"


def test_errors_are_one_line_without_traceback(home: Path):
    """An unknown session ID prints one clear line on stderr and exits 1."""
    Runtime.open(home=home, backend="host").close()
    r = cli(home, "sessions", "show", "nope", check=False)
    assert one_error_line(r) == "concordia: error: expected a session with ID 'nope' in the catalog, found none"


def test_doctor_prints_its_whole_report_and_exits_1_when_something_is_unusable(home: Path):
    """doctor reports every check, then exits 1 with one line naming what is unusable: the backend asked
    for, the catalog, the configuration."""
    r = cli(home, "--backend", "tpu", "doctor", check=False)
    assert "backend (tpu)" in r.stdout and "unavailable" in r.stdout and "catalog" in r.stdout
    assert "backend" in one_error_line(r)
    r = cli(home, "--catalog", "postgresql+psycopg://concordia@127.0.0.1:1/none", "doctor", check=False)
    assert "nvrtc" in r.stdout and "127.0.0.1:1/none: " in r.stdout and "catalog" in one_error_line(r)
    r = cli(home, "doctor", check=False, env={"CONCORDIA_LOG_LEVEL": "bogus"})
    assert "CONCORDIA_LOG_LEVEL" in r.stdout and "configuration" in one_error_line(r)
    assert cli(home, "doctor").returncode == 0


def test_doctor_reports_catalog_and_nvrtc(home: Path):
    """doctor names the backend, the NVRTC version (or why not) and the catalog schema."""
    Runtime.open(home=home, backend="host").close()
    out = cli(home, "doctor").stdout
    assert "backend (auto)" in out and "nvrtc" in out and f"(schema {SCHEMA_VERSION}, code {SCHEMA_VERSION})" in out


def test_gc_reports(home: Path):
    """gc --dry-run lists what gc would remove and what it keeps, with reasons, and removes nothing; gc
    removes only the provable orphan (a deleted session's directory) and keeps a directory it cannot prove."""
    with Runtime.open(home=home, backend="host") as rt:
        s = rt.session("gone")
        s.register("a", np.zeros(4096, np.uint8))
        s.commit()
        s.close()
        orphan = rt.session_dir("gone")
        rt.catalog.delete("gone")  # a delete that died between the catalog and the files
    stranger = home / "sessions" / "stranger-0000000000000000"
    stranger.mkdir()
    out = cli(home, "gc", "--dry-run").stdout
    assert f"would remove {orphan}: session 'gone' was deleted from the catalog" in out, out
    assert f"kept {stranger}: " in out and "nothing was removed" in out
    assert orphan.exists() and stranger.exists()
    out = cli(home, "gc").stdout
    assert f"removed {orphan}: session 'gone' was deleted from the catalog" in out, out
    assert f"kept {stranger}: " in out and "not provably orphaned" in out
    assert not orphan.exists() and stranger.exists()


def test_json_logs_carry_session_context(home: Path):
    """CONCORDIA_LOG_FORMAT=json gives one JSON object per log line, bound to the session."""
    code = ("from concordia_agents import Runtime\n"
            "rt = Runtime.open(backend='host')\n"
            "s = rt.session('logged'); s.close(); rt.close()\n")
    env = {**os.environ, "CONCORDIA_HOME": str(home), "CONCORDIA_LOG_FORMAT": "json", "CONCORDIA_LOG_LEVEL": "info"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]
    opened = [e for e in events if e.get("event") == "session opened"]
    assert opened and opened[0]["session"] == "logged" and opened[0]["level"] == "info"
    assert all("timestamp" in e for e in events)


def test_rm_of_a_parent_session_removes_its_task_sessions(home: Path):
    """`sessions rm` of a session removes the task sessions bound to it (ID#task:...) and their logs."""
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


def _many_segments(home: Path, epochs: int = 40) -> Path:
    """A closed session 'seg' whose log spans several segment files; returns its last segment file."""
    with Runtime.open(home=home, backend="host", segment_bytes=64 << 10, max_record_bytes=8192,
                      compact_bytes=0) as rt:
        s = rt.session("seg")
        a = np.zeros(16 * 4096, np.uint8)
        s.register("a", a)
        rng = np.random.default_rng(1)
        for e in range(1, epochs + 1):
            a[rng.integers(0, a.size, 8000)] = e  # ~8000 dirty bytes: most pages, every epoch
            s.commit({"e": e})
        s.close()
        files = [f.path for f in list_segments(rt.session_dir("seg"))[1]]
    assert len(files) >= 3
    return files[-1]


def test_sessions_recover_reads_every_payload(home: Path):
    """`sessions recover ID` (no flag) verifies data payloads too: a flipped byte in an early epoch's data,
    which opening the session would only find while restoring, is reported in one line (exit 1), and
    nothing is changed."""
    last = _many_segments(home)
    first = min(last.parent.glob("seg-*.log"))
    data = bytearray(first.read_bytes())
    pos = 64  # the first PAGES record (after the REGION record): a byte of its payload
    while decode_header(bytes(data[pos:pos + HEADER_SIZE])).type is not RecordType.PAGES:
        pos += decode_header(bytes(data[pos:pos + HEADER_SIZE])).size
    data[pos + HEADER_SIZE + 7] ^= 0x01
    first.write_bytes(bytes(data))
    before = first.read_bytes()
    r = cli(home, "sessions", "recover", "seg", check=False)
    err = one_error_line(r)
    assert "newest intact epoch is 0" in err and "payload checksum" in err, err
    assert first.read_bytes() == before
    with Runtime.open(home=home, backend="host") as rt:
        assert rt.info("seg").status == "closed"


def test_sessions_recover_checks_a_log_and_rolls_back_only_when_asked(home: Path):
    """`sessions recover ID` refuses a log that lost its last segment file in one line and changes nothing;
    `--allow-rollback` opens it at the newest intact epoch and says what was given up."""
    last = _many_segments(home)
    last.unlink()
    r = cli(home, "sessions", "recover", "seg", check=False)
    err = one_error_line(r)
    assert "recorded epoch 40 as durable" in err and last.name in err and "--allow-rollback" in err
    with Runtime.open(home=home, backend="host") as rt:
        assert rt.info("seg").status == "closed" and rt.info("seg").last_epoch == 40
    out = cli(home, "sessions", "recover", "seg", "--allow-rollback").stdout
    assert "the catalog had recorded epoch 40 as durable; gave up epochs" in out and last.name in out, out
    with Runtime.open(home=home, backend="host") as rt:
        info = rt.info("seg")
        assert info.status == "idle" and 0 < info.last_epoch < 40
    out = cli(home, "sessions", "recover", "seg").stdout
    assert f"log intact, newest epoch {info.last_epoch} in the segments" in out
    with Runtime.open(home=home, backend="host") as rt:
        s = rt.resume("seg")
        assert s.epoch == info.last_epoch and s.meta == {"e": info.last_epoch} and s.rollback is None
        s.close()


@pytest.mark.parametrize("kind", ["state", "worker"])
def test_resume_refuses_a_session_that_is_not_a_graph_thread(home: Path, kind: str):
    """`concordia resume` on a region session, or a session labelled another kind, exits 1 with one line
    naming the kind, and leaves its status, backend and labels as they were."""
    with Runtime.open(home=home, backend="host") as rt:
        if kind == "state":
            s = rt.session("other")
            s.register("a", np.zeros(4096, np.uint8))
            s.commit()
            s.close()
        else:
            rt.let_go(rt.hold("other", kind="lease", labels={"kind": "worker"}), closed=True)
        before = rt.info("other")
    r = cli(home, "resume", "other", "--app", "integrations.langgraph.demo_agent:make_app", check=False)
    assert f"is a {kind} session" in one_error_line(r) and "nothing was changed" in r.stderr
    with Runtime.open(home=home, backend="host") as rt:
        after = rt.info("other")
    assert (after.status, after.backend, after.labels, after.token) == \
        (before.status, before.backend, before.labels, before.token) == ("closed", before.backend, before.labels,
                                                                          before.token)


_GRAPH_MODULE = '''
from typing import TypedDict

from langgraph.graph import END, START, StateGraph

from integrations.langgraph import wrap


class State(TypedDict):
    n: int


def builder():
    g = StateGraph(State)
    g.add_node("inc", lambda s: {"n": s["n"] + 1})
    g.add_edge(START, "inc")
    g.add_edge("inc", END)
    return g


def no_arguments():
    return builder()


def with_runtime(runtime):
    return wrap(builder(), runtime=runtime)


def needs_a_model(model, runtime=None):
    return builder()
'''


def test_resume_calls_an_app_factory_by_its_signature(home: Path, tmp_path: Path):
    """--app factories are called with runtime= if they take it, with nothing if they take no argument;
    one that needs anything else is refused in one line naming the signature expected."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "tinygraph.py").write_text(_GRAPH_MODULE)
    sys.path.insert(0, str(tmp_path / "mods"))
    try:
        import tinygraph  # type: ignore[import-not-found]

        from integrations.langgraph import wrap

        with Runtime.open(home=home, backend="host") as rt:
            assert wrap(tinygraph.builder(), runtime=rt).invoke({"n": 1}, session_id="t1") == {"n": 2}
    finally:
        sys.path.remove(str(tmp_path / "mods"))
        sys.modules.pop("tinygraph", None)
    env = {"PYTHONPATH": str(tmp_path / "mods")}
    for factory in ("no_arguments", "with_runtime"):
        out = cli(home, "resume", "t1", "--app", f"tinygraph:{factory}", env=env).stdout
        assert "finished t1: closed" in out and "  n: 2" in out, out
    r = cli(home, "resume", "t1", "--app", "tinygraph:needs_a_model", env=env, check=False)
    err = one_error_line(r)
    assert "expected a graph, or a factory taking runtime= (or no arguments)" in err and "needs model" in err


def test_sessions_list_stops_quietly_when_its_reader_goes_away(home: Path):
    """`concordia sessions list | head -1` with more rows than a pipe holds prints no traceback."""
    with Runtime.open(home=home, backend="host") as rt:
        for n in range(200):  # ~90 KiB of rows, more than a 64 KiB pipe buffer
            rt.let_go(rt.hold(f"{n:03d}-" + "x" * 400))
    env = {**os.environ, "CONCORDIA_HOME": str(home)}
    env.pop("CONCORDIA_DEBUG", None)
    r = subprocess.run(f"{sys.executable} -m concordia_cli sessions list | head -1", shell=True, cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.stdout.startswith("SESSION") and r.stdout.count("\n") == 1
    assert r.stderr == ""


def test_sessions_list_never_cuts_an_id(home: Path):
    """The SESSION column is as wide as the longest ID: a 100-character ID and its task session print whole."""
    long_id = "thread-" + "0123456789" * 9 + "abc"
    with Runtime.open(home=home, backend="host") as rt:
        for sid in (long_id, long_id + "#task:generate-" + "y" * 60, "short"):
            rt.let_go(rt.hold(sid))
    lines = cli(home, "sessions", "list").stdout.splitlines()
    assert any(line.startswith(long_id + " ") for line in lines), lines
    assert any(line.startswith("  └ #task:generate-" + "y" * 60 + " ") for line in lines), lines
    col = lines[0].index(" KIND")  # the next column starts at the same place on every row
    assert [line[col:].split()[0] for line in lines] == ["KIND", "state", "task", "state"], lines


def test_a_missing_database_driver_is_one_line(home: Path, tmp_path: Path):
    """A postgresql+psycopg:// catalog without psycopg installed says how to install it, in one line."""
    fake = tmp_path / "nodriver" / "psycopg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named psycopg (hidden by this test)')\n")
    r = cli(home, "--catalog", "postgresql+psycopg://concordia@127.0.0.1/none", "sessions", "list", check=False,
            env={"PYTHONPATH": str(tmp_path / "nodriver")})
    assert "pip install 'concordia-agents[postgres]'" in one_error_line(r)


def test_a_multi_line_error_prints_as_one_line(home: Path):
    """A database error whose text spans lines (psycopg's 'connection refused ... Is the server running')
    prints as one line."""
    r = cli(home, "--catalog", "postgresql+psycopg://concordia@127.0.0.1:1/none", "sessions", "list", check=False)
    assert "Connection refused" in one_error_line(r)


@pytest.mark.parametrize("command", [
    ("sessions", "list"), ("sessions", "show", "s"), ("sessions", "recover", "s"), ("sessions", "rm", "s"),
    ("gc",), ("gc", "--dry-run"), ("resume", "s", "--app", "integrations.langgraph.demo_agent:make_app")],
    ids=" ".join)
def test_commands_other_than_demo_create_no_home_or_catalog(tmp_path: Path, command: tuple[str, ...]):
    """A mistyped --home, or a catalog URL in a directory that does not exist, is reported in one line as
    not existing, and nothing is created there."""
    home = tmp_path / "home"
    home.mkdir()
    typo = tmp_path / "hoem"
    r = cli(home, "--home", str(typo), *command, check=False)
    assert "found no such directory; nothing was created" in one_error_line(r) and not typo.exists()
    catalog = tmp_path / "nodir" / "catalog.db"
    r = cli(home, "--catalog", f"sqlite:///{catalog}", *command, check=False)
    assert "nothing was created" in one_error_line(r) and not catalog.parent.exists()
    assert list(home.iterdir()) == []


def test_doctor_on_a_new_home_creates_nothing(tmp_path: Path):
    """doctor on a home that does not exist yet reports it (and the catalog) as not made yet, exits 0, and
    creates neither."""
    home = tmp_path / "new"
    out = cli(home, "doctor").stdout
    assert "does not exist yet" in out and "none yet" in out
    assert not home.exists()


def test_an_unknown_log_level_is_refused(home: Path):
    """CONCORDIA_LOG_LEVEL=bogus is a one-line configuration error naming the levels accepted, in the CLI
    and in configure_logging, instead of quietly logging at WARNING."""
    r = cli(home, "sessions", "list", check=False, env={"CONCORDIA_LOG_LEVEL": "bogus"})
    err = one_error_line(r)
    assert "CONCORDIA_LOG_LEVEL" in err and "'bogus'" in err and "warning, info, debug" in err
    with pytest.raises(ConfigurationError, match="expected one of critical, error, warning, info, debug"):
        configure_logging(level="bogus")
    assert cli(home, "doctor", env={"CONCORDIA_LOG_LEVEL": "DEBUG"}).returncode == 0


@pytest.mark.parametrize("bad", ["a\udc80b", "x" * 513], ids=["lone-surrogate", "513-chars"])
def test_an_id_no_catalog_can_store_is_one_line(home: Path, bad: str):
    """show and rm of an ID with a lone surrogate, or longer than 512 characters, print the ID check's line."""
    Runtime.open(home=home, backend="host").close()
    for action in ("show", "rm", "recover"):
        r = cli(home, "sessions", action, bad, check=False)
        assert "expected a session ID of 1..512 characters of valid Unicode without NUL" in one_error_line(r)


def test_a_nul_in_a_session_id_is_the_same_error_on_every_catalog(home: Path, catalog_url: str):
    """A NUL byte in a session ID raises the ID check's ConcordiaError on SQLite and PostgreSQL alike (a
    command line cannot carry NUL, so through the Python API)."""
    expected = "expected a session ID of 1..512 characters of valid Unicode without NUL, found 'a\\x00b'"
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        for call in (rt.info, rt.session, rt.resume, rt.hold):
            with pytest.raises(ConcordiaError) as e:
                call("a\x00b")
            assert str(e.value) == expected, call


def test_deleting_a_nul_id_is_the_same_error_on_every_catalog(home: Path, catalog_url: str):
    """rt.delete of an ID with a NUL raises the ID check's ConcordiaError on SQLite and PostgreSQL alike."""
    with (Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt,
          pytest.raises(ConcordiaError, match=r"expected a session ID of 1\.\.512 characters")):
        rt.delete("a\x00b")
