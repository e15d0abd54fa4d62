"""LangGraph binding: the official conformance suite, storage once per version,
single-writer ownership (in-process and across real processes), task sessions,
a real SIGKILL inside an LLM node followed by a resume by session ID, and a SIGSTOPped
owner fenced after a takeover."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from operator import add
from pathlib import Path
from typing import Annotated, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from sqlalchemy import func, select

from concordia_agents import ConcordiaError, OwnershipError, Runtime, SessionNotFound
from integrations.langgraph import ConcordiaSaver, task_session_id, wrap
from integrations.langgraph._schema import BLOBS, CHECKPOINTS
from tests.conftest import expire_lease, freeze_between_catalog_writes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rt(home: Path, catalog_url: str):  # type: ignore[no-untyped-def]
    r = Runtime.open(home=home, catalog_url=catalog_url, backend="host")
    yield r
    r.close()


def test_conformance_suite_passes_all_81(home: Path, catalog_url: str):
    """langgraph-checkpoint-conformance: every base and extended test passes (81/81)."""
    from langgraph.checkpoint.conformance import checkpointer_test, validate

    @checkpointer_test(name="ConcordiaSaver")
    async def factory():  # type: ignore[no-untyped-def]
        r = Runtime.open(home=home / uuid.uuid4().hex[:8], catalog_url=catalog_url, backend="host")
        yield ConcordiaSaver(runtime=r)
        r.close()

    report = asyncio.run(validate(factory))
    results = {str(cap): r for cap, r in report.results.items()}
    failed = {name: r.tests_failed for name, r in results.items() if r.tests_failed}
    assert not failed, f"conformance failures: {failed}"
    assert all(r.detected and r.passed for r in results.values()), {n: r.passed for n, r in results.items()}
    assert sum(r.tests_passed for r in results.values()) == 81


class Chat(TypedDict):
    messages: Annotated[list[str], add]
    system: str
    turns: int


def _one_node(name: str, fn) -> StateGraph:  # type: ignore[no-untyped-def]
    b = StateGraph(Chat)
    b.add_node(name, fn)
    b.add_edge(START, name)
    b.add_edge(name, END)
    return b


def _chat_graph() -> StateGraph:
    def reply(state: Chat) -> dict:
        return {"messages": [f"reply {state['turns']}"], "turns": state["turns"] + 1}

    return _one_node("reply", reply)


def test_channel_values_are_stored_once_per_version(rt: Runtime):
    """A 30-turn conversation stores the unchanged `system` channel once, not once per step, and
    its whole history loads exactly as LangGraph's InMemorySaver gives it."""
    from langgraph.checkpoint.memory import InMemorySaver

    app = wrap(_chat_graph(), runtime=rt)
    ref = _chat_graph().compile(checkpointer=InMemorySaver())
    state: dict = {"messages": ["user 0"], "system": "be brief " * 100, "turns": 0}
    for turn in range(30):
        inp = {"messages": [f"user {turn}"]} if turn else state
        state = app.invoke(inp, session_id="chat")
        ref.invoke(inp, {"configurable": {"thread_id": "chat"}})
    assert state["turns"] == 30 and len(state["messages"]) == 60
    with rt.catalog.read() as s:
        per_channel = dict(s.execute(select(BLOBS.c.channel, func.count()).where(BLOBS.c.session_id == "chat")
                                     .group_by(BLOBS.c.channel)).all())
        checkpoints = s.execute(select(func.count()).select_from(CHECKPOINTS)
                                .where(CHECKPOINTS.c.session_id == "chat")).scalar_one()
    assert per_channel["system"] == 1, per_channel
    assert "turns" not in per_channel  # a small int rides inside each checkpoint instead of a blob row
    assert checkpoints >= 60  # input + step per turn: many checkpoints, one stored `system`
    ours = [(s.values, s.next, s.metadata["step"]) for s in app.get_state_history("chat")]
    theirs = [(s.values, s.next, s.metadata["step"])
              for s in ref.get_state_history({"configurable": {"thread_id": "chat"}})]
    assert ours == theirs


def test_finished_thread_resumes_without_running_and_closes(rt: Runtime):
    """resume() of a finished thread returns its state, runs no node; the session is 'closed'."""
    runs: list[str] = []

    def node(state: Chat) -> dict:
        runs.append("reply")
        return {"turns": state["turns"] + 1}

    app = wrap(_one_node("reply", node), runtime=rt)
    out = app.invoke({"messages": [], "system": "", "turns": 0}, session_id="done")
    assert out["turns"] == 1 and runs == ["reply"]
    assert rt.info("done").status == "closed" and rt.info("done").labels["kind"] == "graph"
    assert app.resume("done") == out and runs == ["reply"]


def test_resume_of_unknown_session_raises_session_not_found(rt: Runtime):
    """resume('nope') raises SessionNotFound naming the ID; nothing is created."""
    app = wrap(_chat_graph(), runtime=rt)
    with pytest.raises(SessionNotFound, match="'nope'"):
        app.resume("nope")
    assert [i.id for i in rt.sessions()] == []


def test_second_live_owner_is_refused_before_any_node_runs(home: Path, catalog_url: str):
    """While one runtime owns a thread, another's resume raises OwnershipError and runs nothing."""
    runs: list[str] = []

    def node(state: Chat) -> dict:
        runs.append("n")
        return {"turns": state["turns"] + 1}

    b = _one_node("n", node)
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as a, \
            Runtime.open(home=home, catalog_url=catalog_url, backend="host") as other:
        app_a = wrap(b, runtime=a)
        app_a.invoke({"messages": [], "system": "", "turns": 0}, session_id="t")
        app_a.saver.acquire("t")  # A owns the thread (as during a long run)
        app_b = wrap(b, runtime=other)
        with pytest.raises(OwnershipError, match="no live owner"):
            app_b.resume("t")
        with pytest.raises(OwnershipError):
            app_b.invoke({"messages": ["x"]}, session_id="t")
        assert runs == ["n"]


def test_stale_owner_put_is_fenced_by_token(home: Path, catalog_url: str):
    """After a takeover, the old owner's put and put_writes raise OwnershipError; the new owner's stand."""
    from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as a, \
            Runtime.open(home=home, catalog_url=catalog_url, backend="host") as b:
        old, new = ConcordiaSaver(runtime=a), ConcordiaSaver(runtime=b)
        cfg = {"configurable": {"thread_id": "th", "checkpoint_ns": ""}}
        c1 = create_checkpoint(empty_checkpoint(), None, 1)
        stored = old.put(cfg, c1, {"step": 1}, {})
        assert old.runtime.held("th").token == 1
        expire_lease(catalog_url, "th")  # the old owner stalled past its lease
        taken = new.acquire("th")
        assert taken.token == 2
        with pytest.raises(OwnershipError, match="token 1"):
            old.put(stored, create_checkpoint(c1, None, 2), {"step": 2}, {})
        with pytest.raises(OwnershipError):
            old.put_writes(stored, [("ch", 1)], "task-1")
        new.put(stored, create_checkpoint(c1, None, 3), {"step": 3}, {})
        steps = [t.metadata["step"] for t in new.list({"configurable": {"thread_id": "th"}})]
        assert steps == [3, 1]
        assert new.get_tuple(stored).pending_writes == []


def test_takeover_during_concurrent_writes_lets_no_stale_write_land(home: Path, catalog_url: str):
    """While 4 threads of owner A put checkpoints and writes as fast as they can, B takes the thread over:
    every write of A that returned is visible to B at once, each of A's threads then gets OwnershipError,
    and nothing of A's lands after the takeover."""
    import threading

    from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint
    from sqlalchemy import func, select

    from integrations.langgraph._schema import WRITES

    def stored(r: Runtime) -> tuple[list, int]:
        with r.catalog.read() as s:
            ids = s.execute(select(CHECKPOINTS.c.checkpoint_ns, CHECKPOINTS.c.checkpoint_id)
                            .where(CHECKPOINTS.c.session_id == "race")).all()
            writes = s.execute(select(func.count()).select_from(WRITES).where(WRITES.c.session_id == "race"))
            return sorted(ids), writes.scalar_one()

    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as a, \
            Runtime.open(home=home, catalog_url=catalog_url, backend="host") as b:
        old, new = ConcordiaSaver(runtime=a), ConcordiaSaver(runtime=b)
        old.acquire("race")
        stop, errors, fenced, done = threading.Event(), [], [], [0] * 4

        def writer(w: int) -> None:
            c = empty_checkpoint()
            while not stop.is_set():
                c = create_checkpoint(c, None, done[w])
                c["channel_values"], c["channel_versions"] = {"v": [w] * 50}, {"v": f"{w}.{done[w]}"}
                try:
                    cfg = old.put({"configurable": {"thread_id": "race", "checkpoint_ns": f"w{w}"}}, c,
                                  {"step": done[w]}, {"v": f"{w}.{done[w]}"})
                    old.put_writes(cfg, [("v", done[w])], "task")
                except OwnershipError:
                    fenced.append(w)
                    return
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return
                done[w] += 1

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        expire_lease(catalog_url, "race")  # A stalled past its lease (as far as the catalog knows)
        new.acquire("race")
        seen = stored(b)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        assert errors == [] and sorted(fenced) == [0, 1, 2, 3], (errors, fenced)
        # each thread's last put may have landed before the takeover and its put_writes not
        assert min(done) > 0 and sum(done) <= len(seen[0]) <= sum(done) + 4, (done, len(seen[0]))
        assert stored(b) == seen
        old.close()
        new.close()


def test_two_resume_writes_at_one_index_in_one_put_writes(rt: Runtime):
    """Two `__resume__` writes (one write index) in one put_writes, as LangGraph sends for a node with two
    interrupt() calls: accepted, and the last one is kept, as LangGraph's InMemorySaver keeps it."""
    from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint
    from langgraph.checkpoint.memory import InMemorySaver

    writes = [("__resume__", "yes"), ("answer", 1), ("__resume__", ["yes", "no"])]
    pending = {}
    for name, saver in (("concordia", ConcordiaSaver(runtime=rt)), ("memory", InMemorySaver())):
        cfg = {"configurable": {"thread_id": "two-interrupts", "checkpoint_ns": ""}}
        stored = saver.put(cfg, create_checkpoint(empty_checkpoint(), None, 1), {"step": 1}, {})
        saver.put_writes(stored, writes, "task-1")
        saver.put_writes(stored, [("__resume__", "again"), ("__resume__", ["again", "and again"])], "task-2")
        pending[name] = saver.get_tuple(stored).pending_writes
    assert pending["concordia"] == pending["memory"]
    assert sorted(pending["concordia"]) == [("task-1", "__resume__", ["yes", "no"]), ("task-1", "answer", 1),
                                            ("task-2", "__resume__", ["again", "and again"])]


def test_opening_and_writing_draw_nothing_from_uuid4(home: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch):
    """Runtime.open, ConcordiaSaver, put and put_writes never call uuid.uuid4, which callers (LangGraph's
    own tests) patch to get deterministic IDs."""
    from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

    calls: list[int] = []
    real = uuid.uuid4
    monkeypatch.setattr(uuid, "uuid4", lambda: calls.append(1) or real())
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as r:
        saver = ConcordiaSaver(runtime=r)
        stored = saver.put({"configurable": {"thread_id": "u", "checkpoint_ns": ""}},
                           create_checkpoint(empty_checkpoint(), None, 1), {"step": 1}, {})
        saver.put_writes(stored, [("ch", 1)], "task-1")
        assert saver.get_tuple(stored) is not None
        saver.close()
    assert calls == []


def test_deleting_a_thread_session_deletes_its_checkpoints(rt: Runtime):
    """Runtime.delete of a graph thread (what `concordia sessions rm` does) removes its checkpoints,
    blobs and writes and no other thread's."""
    from sqlalchemy import func, select

    from integrations.langgraph._schema import WRITES

    saver = ConcordiaSaver(runtime=rt)
    for thread in ("gone", "kept"):
        stored = _three_steps(saver, thread)
        saver.put_writes(stored, [("messages", ["w"])], "task-1")
        saver.release(thread)
    rt.delete("gone")
    with rt.catalog.read() as s:
        left = {t.name: dict(s.execute(select(t.c.session_id, func.count()).group_by(t.c.session_id)).all())
                for t in (CHECKPOINTS, BLOBS, WRITES)}
    assert all(set(rows) == {"kept"} for rows in left.values()), left
    assert saver.get_tuple({"configurable": {"thread_id": "gone"}}) is None
    saver.close()


def _three_steps(saver: ConcordiaSaver, thread: str) -> RunnableConfig:
    """Three checkpoints of a chat-like state through the saver; the last one's config."""
    from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

    cfg: RunnableConfig = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    c = empty_checkpoint()
    for step in range(3):
        c = create_checkpoint(c, None, step)
        c["channel_values"] = {"messages": [f"m{i}" for i in range(step + 1)], "system": "s" * 500, "turns": step}
        new = {"messages": step + 1, "turns": step + 1, **({"system": 1} if step == 0 else {})}
        c["channel_versions"] = {"messages": step + 1, "system": 1, "turns": step + 1}
        cfg = saver.put(cfg, c, {"step": step}, new)
    return cfg


def test_version_1_tables_are_migrated_and_stay_readable(home: Path, catalog_url: str):
    """Graph tables of schema version 1 (a JSON copy of the versions, "empty" blob rows) are migrated
    to version 2 when a saver opens them: the old checkpoints load as they were stored, and the
    thread continues on top of them."""
    import time as _time

    from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
    from sqlalchemy import MetaData, Table, insert

    from integrations.langgraph import _schema

    serde = JsonPlusSerializer()
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as r:
        lease = r.hold("old")
        with r.catalog.write() as s:
            conn = s.connection()
            _schema.SCHEMA.create(conn)
            _schema.MIGRATIONS[0](conn)
            conn.execute(_schema.SCHEMA.insert().values(id=1, version=1, updated_at=_time.time()))
            tables = {n: Table(n, MetaData(), autoload_with=conn)
                      for n in ("concordia_lg_checkpoints", "concordia_lg_blobs", "concordia_lg_writes")}
            c = create_checkpoint(empty_checkpoint(), None, 1)
            c["channel_versions"] = {"messages": "2", "gone": "1"}
            ckpt = {k: v for k, v in c.items() if k != "channel_values"}
            conn.execute(insert(tables["concordia_lg_checkpoints"]).values(
                session_id="old", checkpoint_ns="", checkpoint_id=c["id"], parent_checkpoint_id=None,
                type="msgpack", checkpoint=serde.dumps_typed(ckpt)[1], metadata_type="msgpack",
                metadata=serde.dumps_typed({"step": 1})[1], channel_versions={"messages": "2", "gone": "1"},
                run_id=None, uses_delta=False, created_at=_time.time()))
            conn.execute(insert(tables["concordia_lg_blobs"]), [
                {"session_id": "old", "checkpoint_ns": "", "channel": "messages", "version": "2", "type": "msgpack",
                 "blob": serde.dumps_typed(["hello"])[1]},
                {"session_id": "old", "checkpoint_ns": "", "channel": "gone", "version": "1", "type": "empty",
                 "blob": None}])
            conn.execute(insert(tables["concordia_lg_writes"]).values(
                session_id="old", checkpoint_ns="", checkpoint_id=c["id"], task_id="t1", idx=0, channel="messages",
                type="msgpack", blob=serde.dumps_typed(["w"])[1], task_path=""))
        r.let_go(lease)

        saver = ConcordiaSaver(runtime=r)
        with r.catalog.read() as s:
            assert s.execute(select(_schema.SCHEMA.c.version)).scalar_one() == _schema.LG_SCHEMA_VERSION == 2
        cfg = {"configurable": {"thread_id": "old", "checkpoint_ns": ""}}
        old = saver.get_tuple(cfg)
        assert old.checkpoint["channel_values"] == {"messages": ["hello"]}
        assert old.checkpoint["channel_versions"] == {"messages": "2", "gone": "1"}
        assert old.metadata == {"step": 1} and old.pending_writes == [("t1", "messages", ["w"])]
        c2 = create_checkpoint(old.checkpoint, None, 2)
        c2["channel_values"] = {"messages": ["hello", "again"]}
        c2["channel_versions"] = {"messages": "3", "gone": "1"}
        saver.put(old.config, c2, {"step": 2}, {"messages": "3"})
        assert [t.checkpoint["channel_values"] for t in saver.list(cfg)] == [{"messages": ["hello", "again"]},
                                                                              {"messages": ["hello"]}]
        saver.prune(["old"], strategy="keep_latest")
        assert saver.get_tuple(cfg).checkpoint["channel_values"] == {"messages": ["hello", "again"]}
        saver.close()


def test_task_session_id_is_stable_when_a_failed_node_is_rerun(rt: Runtime):
    """A node that fails and is resumed gets the same task_session_id, and conversation_ids the thread
    and that ID; outside a node it raises."""
    from integrations.langgraph import conversation_ids

    seen: list[str] = []
    pairs: list[tuple[str, str]] = []

    def flaky(state: Chat, config: RunnableConfig) -> dict:
        seen.append(task_session_id(config))
        pairs.append(conversation_ids(config))
        if len(seen) == 1:
            raise RuntimeError("transient")
        return {"turns": 1}

    app = wrap(_one_node("flaky", flaky), runtime=rt)
    with pytest.raises(RuntimeError, match="transient"):
        app.invoke({"messages": [], "system": "", "turns": 0}, session_id="th2")
    assert rt.info("th2").status == "idle"
    assert app.resume("th2")["turns"] == 1
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0].startswith("th2#task:")
    assert pairs[0] == pairs[1] and pairs[0][0] == "th2" and pairs[0][1].startswith("th2#task:")
    with pytest.raises(ConcordiaError, match=r"inside a LangGraph node|running node"):
        task_session_id({"configurable": {"thread_id": "x"}})


def test_bad_input_gets_clear_errors(rt: Runtime):
    """Missing thread_id, a str to prune, an unknown prune strategy: named errors saying what was expected."""
    saver = ConcordiaSaver(runtime=rt)
    with pytest.raises(ConcordiaError, match=r"expected configurable\.thread_id"):
        saver.get_tuple({"configurable": {}})
    with pytest.raises(TypeError, match="sequence of thread IDs"):
        saver.prune("abc")
    with pytest.raises(ValueError, match="strategy"):
        saver.prune(["abc"], strategy="newest")
    with pytest.raises(ConcordiaError, match="StateGraph"):
        wrap(object(), runtime=rt)


# -- real processes ------------------------------------------------------------------------------


def _child(home: Path, catalog: str, *args: str, env: dict | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests._agent_child", *args, "--home", str(home),
                             "--catalog", catalog], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def _result(p: subprocess.Popen[str], timeout: float = 300) -> tuple[int, dict]:
    out, err = p.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return p.returncode, (json.loads(lines[-1]) if lines else {"stderr": err[-3000:]})


def _crash_agent(home: Path, catalog: str, session: str, crash_after: int) -> None:
    rc, res = _result(_child(home, catalog, "invoke", "--session", session, "--crash-after", str(crash_after)))
    assert rc == -signal.SIGKILL, res


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run of the demo agent (same model, same question)."""
    home = tmp_path_factory.mktemp("ref")
    rc, res = _result(_child(home, f"sqlite:///{home / 'c.db'}", "invoke", "--session", "ref"))
    assert rc == 0, res
    assert res["nodes"] == ["plan", "llm", "report"] and res["forwards"][0] > 1 and len(res["forwards"]) == 240
    return res


@pytest.mark.slow
def test_agent_killed_in_llm_node_resumes_without_reprefill(home: Path, catalog_url: str, reference: dict):
    """SIGKILL during the LLM node; app.resume in a new process finishes it: final state equals the
    uninterrupted run, plan does not run again, only the missing tokens are computed, one token at a time."""
    _crash_agent(home, catalog_url, "agent", crash_after=90)
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as r:
        assert r.info("agent").status == "crashed"  # the dead owner on this machine is recognized at once
        (task,) = r.catalog.list(prefix="agent#task:")
        assert task.status == "crashed"
    rc, res = _result(_child(home, catalog_url, "resume", "--session", "agent"))
    assert rc == 0, res
    assert res["state"] == reference["state"]
    assert res["nodes"] == ["llm", "report"]  # plan's writes were durable: it did not run again
    assert res["forwards"][0] == 1 and set(res["forwards"]) == {1}  # no re-prefill
    assert len(res["forwards"]) == 240 - 90  # exactly the missing tokens
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as r:
        assert r.info("agent").status == "closed"
        assert [t.status for t in r.catalog.list(prefix="agent#task:")] == ["closed"]


_TRACED_AGENT = """
from pathlib import Path

from integrations.langgraph.demo_agent import Trace, make_app as _make_app


def make_app(runtime):
    return _make_app(runtime, trace=Trace(path=Path({path!r})))
"""


@pytest.mark.slow
def test_cli_resume_finishes_a_crashed_agent(home: Path, tmp_path: Path, reference: dict):
    """`concordia resume ID --app module:factory` finishes a crashed agent with the uninterrupted result."""
    catalog = f"sqlite:///{home / 'c.db'}"
    _crash_agent(home, catalog, "cli-agent", crash_after=50)
    trace = home / "trace.json"
    # The demo agent, keeping what ran in `trace`, as a factory --app can name.
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "traced_agent.py").write_text(_TRACED_AGENT.format(path=str(trace)))
    r = subprocess.run([sys.executable, "-m", "concordia_cli", "--home", str(home), "--catalog", catalog,
                        "resume", "cli-agent", "--app", "traced_agent:make_app"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           filter(None, [str(tmp_path / "mods"), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 0, r.stderr
    assert "finished cli-agent: closed" in r.stdout and reference["state"]["report"] in r.stdout
    ran = json.loads(trace.read_text())
    assert ran["nodes"] == ["llm", "report"] and ran["forwards"][0] == 1 and len(ran["forwards"]) == 190
    listing = subprocess.run([sys.executable, "-m", "concordia_cli", "--home", str(home), "--catalog",
                              catalog, "sessions", "list"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             check=False)
    lines = listing.stdout.splitlines()
    thread_line = next(i for i, line in enumerate(lines) if line.startswith("cli-agent "))
    assert "graph" in lines[thread_line] and "closed" in lines[thread_line]
    assert lines[thread_line + 1].lstrip().startswith("└ #task:") and "closed" in lines[thread_line + 1]


@pytest.mark.slow
def test_concurrent_resume_exactly_one_runs_no_fork(home: Path, catalog_url: str, reference: dict):
    """Two processes resume one crashed thread at the same instant: one finishes it, the other gets
    OwnershipError having run nothing, and the checkpoint chain does not fork."""
    _crash_agent(home, catalog_url, "race", crash_after=20)
    go = home / "go"
    procs = [_child(home, catalog_url, "resume", "--session", "race", "--go-file", str(go)) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    results = [_result(p) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 3], results
    winner = next(res for rc, res in results if rc == 0)
    loser = next(res for rc, res in results if rc == 3)
    assert winner["state"] == reference["state"]
    assert loser["nodes"] == [] and loser["forwards"] == [] and "no live owner" in loser["ownership_error"]
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as r, r.catalog.read() as s:
        rows = s.execute(select(CHECKPOINTS.c.checkpoint_id, CHECKPOINTS.c.parent_checkpoint_id).where(
            CHECKPOINTS.c.session_id == "race", CHECKPOINTS.c.checkpoint_ns == "")).all()
    parents = [p for _, p in rows]
    assert len(parents) == len(set(parents)), "two checkpoints share a parent: the chain forked"
    assert len(rows) == 5  # input, plan, llm, report steps + the initial: one linear chain


@pytest.mark.slow
def test_delete_thread_removes_its_generation_sessions(home: Path):
    """delete_thread removes the thread's checkpoints, its session and its task sessions' logs."""
    catalog = f"sqlite:///{home / 'c.db'}"
    _crash_agent(home, catalog, "gone", crash_after=10)
    with Runtime.open(home=home, catalog_url=catalog, backend="host") as r:
        saver = ConcordiaSaver(runtime=r)
        (task,) = r.catalog.list(prefix="gone#task:")
        task_dir = r.session_dir(task.id)
        assert task_dir.exists()
        saver.delete_thread("gone")
        assert r.sessions() == [] and not task_dir.exists()
        assert saver.get_tuple({"configurable": {"thread_id": "gone"}}) is None


def test_saver_is_thread_safe_under_concurrent_writers(rt: Runtime):
    """8 threads putting checkpoints and writes into 4 graph threads at once: every write lands,
    each thread's chain is intact, and one lease per graph thread was taken."""
    import threading

    from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

    saver = ConcordiaSaver(runtime=rt)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            tid = f"t{w % 4}"
            ns = f"w{w}"
            parent = None
            for i in range(25):
                cfg = {"configurable": {"thread_id": tid, "checkpoint_ns": ns, **({"checkpoint_id": parent} if parent
                                                                                  else {})}}
                c = create_checkpoint(empty_checkpoint(), None, i)
                c["channel_values"] = {"v": [w, i]}
                c["channel_versions"] = {"v": i + 1}
                stored = saver.put(cfg, c, {"step": i, "w": w}, {"v": i + 1})
                saver.put_writes(stored, [("v", i), ("x", -i)], f"task-{w}-{i}")
                parent = stored["configurable"]["checkpoint_id"]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for w in range(8):
        tups = list(saver.list({"configurable": {"thread_id": f"t{w % 4}", "checkpoint_ns": f"w{w}"}}))
        assert [t.metadata["step"] for t in tups] == list(range(24, -1, -1))
        assert all(t.checkpoint["channel_values"] == {"v": [w, t.metadata["step"]]} for t in tups)
        assert all(len(t.pending_writes) == 2 for t in tups)
        assert all(t.parent_config["configurable"]["checkpoint_id"] == p.checkpoint["id"]
                   for t, p in itertools.pairwise(tups))
    assert sorted(i.id for i in rt.sessions()) == ["t0", "t1", "t2", "t3"]
    assert all(rt.held(f"t{k}") is not None for k in range(4))
    saver.close()  # lets the leases it took go (the runtime is the caller's and stays open)
    assert all(rt.held(f"t{k}") is None and rt.info(f"t{k}").status == "idle" for k in range(4))


@pytest.mark.postgres
def test_postgres_fast_path_survives_a_server_side_disconnect(pg_url: str, home: Path):
    """The one-statement PostgreSQL write path retries once on a connection the server closed:
    after pg_terminate_backend of its pooled connections, the next put still lands."""
    from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint
    from sqlalchemy import create_engine, text

    with Runtime.open(home=home, catalog_url=pg_url, backend="host") as r:
        saver = ConcordiaSaver(runtime=r)
        cfg = {"configurable": {"thread_id": "pgx", "checkpoint_ns": ""}}
        stored = saver.put(cfg, create_checkpoint(empty_checkpoint(), None, 1), {"step": 1}, {})
        admin = create_engine(pg_url)
        with admin.begin() as c:
            killed = c.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                    "WHERE application_name = 'concordia-langgraph'")).scalar_one()
        admin.dispose()
        assert killed >= 1
        saver.put(stored, create_checkpoint(empty_checkpoint(), None, 2), {"step": 2}, {})
        assert [t.metadata["step"] for t in saver.list({"configurable": {"thread_id": "pgx"}})] == [2, 1]
        saver.close()


@pytest.mark.slow
def test_stopped_owner_is_fenced_after_a_takeover(home: Path, catalog_url: str, tmp_path: Path):
    """A real owner process SIGSTOPped mid-generation (between catalog writes) loses its lease; another
    process resumes and finishes the thread; when the stopped one continues, its next write raises OwnershipError and
    the thread keeps the new owner's single, unforked history."""
    trace = tmp_path / "a.json"
    env = {"CONCORDIA_LEASE_TTL": "1.0"}
    a = _child(home, catalog_url, "invoke", "--session", "stop", "--new-tokens", "800", "--trace", str(trace),
               env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if len(json.loads(trace.read_text())["forwards"]) >= 20:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    freeze_between_catalog_writes(a.pid, catalog_url)
    try:
        ran = json.loads(trace.read_text())
        assert ran["nodes"] == ["plan", "llm"] and len(ran["forwards"]) < 800, ran
        time.sleep(1.5)  # the stopped owner's leases expire (it is alive, so only expiry frees them)
        rc, res = _result(_child(home, catalog_url, "resume", "--session", "stop", "--new-tokens", "800"))
        assert rc == 0, res
        assert res["nodes"] == ["llm", "report"] and res["forwards"][0] == 1
    finally:
        os.kill(a.pid, signal.SIGCONT)
    rc_a, res_a = _result(a)
    assert rc_a == 3 and "ownership" in json.dumps(res_a).lower(), res_a
    rc, ref = _result(_child(home, catalog_url, "invoke", "--session", "stop-ref", "--new-tokens", "800"))
    assert rc == 0 and res["state"] == ref["state"]
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as r, r.catalog.read() as s:
        rows = s.execute(select(CHECKPOINTS.c.parent_checkpoint_id).where(
            CHECKPOINTS.c.session_id == "stop", CHECKPOINTS.c.checkpoint_ns == "")).all()
    parents = [p for (p,) in rows]
    assert len(parents) == len(set(parents)) == 5


def test_async_runs_take_and_release_the_lease_like_the_sync_ones(rt: Runtime):
    """ainvoke runs and closes the thread; aresume of the finished thread runs nothing; astream of a
    new thread streams the step and closes it too; aresume of an unknown ID raises SessionNotFound."""
    runs: list[str] = []

    def node(state: Chat) -> dict:
        runs.append("n")
        return {"turns": state["turns"] + 1}

    app = wrap(_one_node("n", node), runtime=rt)

    async def scenario() -> None:
        out = await app.ainvoke({"messages": [], "system": "", "turns": 0}, session_id="a1")
        assert out["turns"] == 1 and rt.info("a1").status == "closed" and rt.held("a1") is None
        assert await app.aresume("a1") == out and runs == ["n"]
        chunks = [c async for c in app.astream({"messages": [], "system": "", "turns": 5}, session_id="a2")]
        assert chunks and rt.info("a2").status == "closed" and runs == ["n", "n"]
        with pytest.raises(SessionNotFound):
            await app.aresume("nope")

    asyncio.run(scenario())


def test_the_binding_works_on_sqlite_without_the_postgres_driver(tmp_path):
    """`pip install concordia-agents` (no postgres extra) has no psycopg: the LangGraph binding imports and
    a graph runs on the SQLite catalog all the same (the PostgreSQL writer imports psycopg only when used)."""
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from typing import TypedDict\n"
        "from langgraph.graph import END, START, StateGraph\n"
        "from concordia_agents import Runtime\n"
        "from integrations.langgraph import wrap\n"
        "class S(TypedDict):\n    n: int\n"
        "b = StateGraph(S); b.add_node('inc', lambda s: {'n': s['n'] + 1})\n"
        "b.add_edge(START, 'inc'); b.add_edge('inc', END)\n"
        f"rt = Runtime.open(home={str(tmp_path)!r}, backend='host')\n"
        "print(wrap(b, runtime=rt).invoke({'n': 1}, session_id='t')['n']); rt.close()\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "2"
