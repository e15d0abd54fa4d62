"""The session protocol on every backend, in the memory it serves, and every catalog: register,
commit, resume, ownership, fsync policies, compaction, delete and gc."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from concordia_agents import (
    ConcordiaError,
    ConfigurationError,
    MetaError,
    OwnershipError,
    RegionError,
    SessionClosedError,
    SessionNotFound,
)
from concordia_agents._log import ring_path
from concordia_agents._segments import base_chain, list_segments
from gpu_runtime.records import session_tag

from ..conftest import expire_lease


def _crash(session) -> None:
    """Drop a session as a dead process would: no flush, no close, lease kept."""
    session._abandon()


def test_commit_and_resume_restore_every_region(make_runtime, catalog_url, substrate):
    """Pages and kv regions, arrays and torch tensors (bf16), come back bit-exact with meta and
    lengths, in the memory the backend serves."""
    sub = substrate
    rt = make_runtime()
    s = rt.session("s1")
    rng = np.random.default_rng(0)
    pages = sub.array(rng.integers(0, 256, size=300_000, dtype=np.uint8))
    kv = sub.tensor(torch.zeros(2, 4, 64, 8, dtype=torch.bfloat16))
    table = sub.tensor(torch.arange(1000, dtype=torch.float32))
    s.register("pages", pages, page_size=4096)
    s.register("kv", kv, kind="kv", seq_axis=2)
    s.register("table", table)
    sub.put(kv, np.s_[:, :, :5], torch.randn(2, 4, 5, 8).to(torch.bfloat16))
    assert s.commit({"step": 1}, rows={"kv": (0, 5)}) == 1
    pages[123_456] ^= 0xFF
    table[7] = -1
    kv[:, :, 5:6] = 3.0
    assert s.commit({"step": 2}, rows={"kv": 6}) == 2
    want_pages, want_table, want_kv = sub.to_host(pages), sub.to_host(table), sub.to_host(kv)
    assert want_table[7] == -1 and (want_kv[:, :, 5] == 3.0).all()
    _crash(s)
    expire_lease(catalog_url, "s1")

    r = rt.resume("s1")
    assert (r.epoch, r.meta) == (2, {"step": 2})
    assert all(sub.serves(g.array) for g in r.regions.values())
    assert np.array_equal(sub.to_host(r.regions["pages"].array), want_pages)
    assert torch.equal(sub.to_host(r.regions["table"].array), want_table)
    got = r.regions["kv"]
    assert got.length == 6 and got.array.dtype == torch.bfloat16
    assert torch.equal(sub.to_host(got.array)[:, :, :6], want_kv[:, :, :6])


def test_resume_into_given_arrays(make_runtime, substrate):
    """resume(arrays=...) restores into the caller's arrays in place."""
    sub = substrate
    rt = make_runtime()
    s = rt.session("s1")
    a = sub.array(np.arange(10_000, dtype=np.int64))
    s.register("a", a)
    s.commit()
    s.close()
    target = sub.zeros(10_000, np.int64)
    r = rt.resume("s1", arrays={"a": target})
    assert r.regions["a"].array is target and np.array_equal(sub.to_host(target), np.arange(10_000))


def test_only_dirty_pages_are_logged(make_runtime, substrate):
    """After the first epoch, an epoch logs only the pages that changed."""
    rt = make_runtime()
    s = rt.session("s1")
    a = substrate.zeros(64 * 4096, np.uint8)
    s.register("a", a)
    s.commit()
    s.flush()
    before = sum(f.size for f in list_segments(rt.session_dir("s1"))[1])
    a[5 * 4096 + 10] = 1
    a[40 * 4096] = 2
    s.commit()
    s.flush()
    after = sum(f.size for f in list_segments(rt.session_dir("s1"))[1])
    assert 2 * 4096 <= after - before < 3 * 4096  # two pages plus framing


def test_epoch_larger_than_the_ring_flows_through(make_runtime, substrate):
    """An epoch several times the ring's size commits (the flusher drains it meanwhile)."""
    rt = make_runtime(ring_bytes=1 << 20, max_record_bytes=64 << 10)
    s = rt.session("s1")
    want = np.random.default_rng(1).integers(0, 256, size=5 << 20, dtype=np.uint8)
    s.register("a", substrate.array(want))
    assert s.commit() == 1
    s.close()
    assert np.array_equal(substrate.to_host(rt.resume("s1").regions["a"].array), want)


def test_flusher_polls_the_backend_and_survives_a_failing_poll(make_runtime, monkeypatch, substrate):
    """The flusher calls ``backend.poll()`` every flush_poll (the GPU backend
    relaunches an executor that parked with a task pending there); a poll that
    raises is logged and the flusher goes on making commits durable."""
    rt = make_runtime(flush_poll=0.005)
    calls: list[float] = []
    real = rt.backend.poll

    def poll() -> None:
        calls.append(time.monotonic())
        real()  # what the backend does there still happens
        raise RuntimeError("poll failed on purpose")

    monkeypatch.setattr(rt.backend, "poll", poll)
    s = rt.session("polled")
    a = substrate.array(np.arange(4096, dtype=np.uint8))
    s.register("a", a)
    s.commit()
    assert s.flush(timeout=10) == 1  # made durable by the flusher despite the failing polls
    deadline = time.monotonic() + 5
    while len(calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) >= 5, f"expected the flusher to poll the backend every 5 ms, saw {len(calls)} calls"
    s.close()


def test_bad_rows_and_kinds_are_refused(make_runtime, substrate):
    """Rows for a non-kv region or past the capacity raise RegionError; nothing is committed."""
    rt = make_runtime()
    s = rt.session("s1")
    s.register("p", substrate.zeros(16, np.uint8))
    s.register("kv", substrate.zeros((8, 4), np.float32), kind="kv")
    with pytest.raises(RegionError, match="not a registered kv region"):
        s.commit(rows={"p": (0, 1)})
    with pytest.raises(RegionError, match="within"):
        s.commit(rows={"kv": (0, 9)})
    assert s.epoch == 0
    with pytest.raises(RegionError, match="C-contiguous"):
        s.register("t", substrate.zeros((4, 4), np.float64)[:, ::2])


def test_meta_must_be_json(make_runtime):
    """Meta that is not JSON-serializable raises MetaError and commits nothing."""
    rt = make_runtime()
    s = rt.session("s1")
    with pytest.raises(MetaError, match="JSON-serializable"):
        s.commit(meta={"x": object()})
    assert s.epoch == 0


def test_unknown_session_and_backend(make_runtime):
    """resume() of an unknown ID raises SessionNotFound; an unknown backend ConfigurationError."""
    rt = make_runtime()
    with pytest.raises(SessionNotFound, match="nope"):
        rt.resume("nope")
    with pytest.raises(SessionNotFound):
        rt.delete("nope")
    with pytest.raises(ConfigurationError, match="found 'tpu'"):
        make_runtime(backend="tpu")


def test_second_owner_is_refused(make_runtime):
    """While a session is open, opening it again (same or other runtime) raises OwnershipError."""
    rt = make_runtime()
    s = rt.session("s1")
    with pytest.raises(OwnershipError, match="already open"):
        rt.session("s1")
    other = make_runtime()
    with pytest.raises(OwnershipError, match="no live owner"):
        other.session("s1")
    s.close()
    assert other.session("s1").token == 2


def test_takeover_fences_the_stale_owner(make_runtime, catalog_url, substrate):
    """After a takeover, the old owner's next commit raises OwnershipError; the new history wins."""
    rt1, rt2 = make_runtime(), make_runtime()
    s1 = rt1.session("s1")
    a = substrate.zeros(4096, np.uint8)
    s1.register("a", a)
    s1.commit({"by": 1})
    s1.flush()
    expire_lease(catalog_url, "s1")
    s2 = rt2.resume("s1")
    assert s2.token > s1.token
    a[0] = 9
    with pytest.raises(OwnershipError, match="fencing token"):
        s1.commit({"by": "stale"})
    s2.regions["a"].array[1] = 5
    s2.commit({"by": 2})
    s2.close()
    r = make_runtime().resume("s1")
    got = substrate.to_host(r.regions["a"].array)
    assert r.meta == {"by": 2} and got[0] == 0 and got[1] == 5


def test_closed_session_refuses_use(make_runtime):
    """A closed session raises SessionClosedError on commit."""
    rt = make_runtime()
    s = rt.session("s1")
    s.close()
    with pytest.raises(SessionClosedError):
        s.commit()


def test_statuses(make_runtime, catalog_url, substrate):
    """sessions() derives running, crashed (lease expired without close) and closed."""
    rt = make_runtime()
    a, b, c = rt.session("a"), rt.session("b"), rt.session("c")
    for s in (a, b, c):
        s.register("x", substrate.zeros(16, np.uint8))
        s.commit()
        s.flush()
    c.close()
    _crash(b)
    expire_lease(catalog_url, "b")
    got = {i.id: (i.status, i.last_epoch) for i in rt.sessions()}
    assert got == {"a": ("running", 1), "b": ("crashed", 1), "c": ("closed", 1)}
    assert all(i.log_bytes > 0 for i in rt.sessions())


def test_delete_removes_files_and_rows(make_runtime, substrate):
    """delete() removes the catalog rows, the segments and the ring; gc() finds nothing left."""
    rt = make_runtime()
    s = rt.session("s1")
    s.register("x", substrate.zeros(16, np.uint8))
    s.commit()
    d = rt.session_dir("s1")
    assert d.exists()
    rt.delete("s1")
    assert not d.exists()
    assert [i.id for i in rt.sessions()] == []
    report = rt.gc()
    assert report.removed == [] and report.kept == []


def test_gc_removes_only_provably_orphaned_directories(make_runtime, substrate):
    """gc() removes a session directory the catalog no longer lists whose session.json names this
    catalog; one without a marker, or naming another catalog, is kept and reported. --dry-run
    lists without removing."""
    import json

    rt = make_runtime()
    s = rt.session("gone")
    s.register("x", substrate.zeros(16, np.uint8))
    s.commit()
    s.close()
    orphan = rt.session_dir("gone")
    rt.catalog.delete("gone")  # as if a delete died between the catalog and the files
    assert json.loads((orphan / "session.json").read_text())["catalog_id"] == rt.catalog.catalog_id
    stranger = rt.config.home / "sessions" / "ghost-0000000000000000"
    stranger.mkdir()
    foreign = rt.config.home / "sessions" / "other-0000000000000001"
    foreign.mkdir()
    (foreign / "session.json").write_text(json.dumps({"format": 1, "session_id": "other", "catalog_id": "f00"}))
    # The session's ring, kept mapped by this runtime after the close (warm_ring_bytes), is orphaned with it.
    ring = ring_path(rt.config, session_tag("gone"))
    expected = [orphan, ring] if ring.exists() else [orphan]
    dry = rt.gc(dry_run=True)
    assert [i.path for i in dry.removed] == expected and orphan.exists()
    assert {i.path for i in dry.kept} == {stranger, foreign}
    report = rt.gc()
    assert report.paths == expected and not orphan.exists() and not ring.exists()
    assert stranger.exists() and foreign.exists()


@pytest.mark.parametrize("policy", ["every_commit", "interval", "none"])
def test_every_fsync_policy_resumes(make_runtime, catalog_url, substrate, policy):
    """Under each fsync policy, a process crash loses no committed epoch (the ring survives)."""
    rt = make_runtime(fsync=policy)
    s = rt.session("s1")
    a = substrate.zeros(8192, np.uint8)
    s.register("a", a)
    for i in range(5):
        a[i] = i + 1
        s.commit({"i": i})
    want = substrate.to_host(a)
    assert want[:6].tolist() == [1, 2, 3, 4, 5, 0]
    _crash(s)
    expire_lease(catalog_url, "s1")
    r = make_runtime(fsync=policy).resume("s1")
    assert r.epoch == 5 and np.array_equal(substrate.to_host(r.regions["a"].array), want)


def test_compaction_bounds_the_log_and_keeps_state(make_runtime, catalog_url, substrate):
    """Past the threshold the log is folded into a base image; resume still restores exactly."""
    sub = substrate
    rt = make_runtime(compact_bytes=256 << 10, segment_bytes=128 << 10, max_record_bytes=16 << 10)
    s = rt.session("s1")
    a = sub.zeros(64 << 10, np.uint8)
    kv = sub.zeros((2, 200, 16), np.float32)
    s.register("a", a)
    s.register("kv", kv, kind="kv", seq_axis=1)
    rng = np.random.default_rng(3)
    for i in range(120):
        values = rng.integers(0, 256, 50)  # drawn before the positions, as `a[pos] = values` evaluates them
        sub.put(a, rng.integers(0, 64 << 10, 50), values)
        kv[:, i] = i
        s.commit({"i": i}, rows={"kv": i + 1})
        if i % 10 == 0:
            s.flush()
    s.flush()
    bases, deltas = list_segments(rt.session_dir("s1"))
    names = [f.path.name for f in bases]  # one full base image, or one with the layers lying on it
    assert names and sorted(base_chain(names[-1], names) or []) == sorted(names)
    total = sum(f.size for f in bases + deltas)
    assert total < 120 * (4096 * 8)  # far below the uncompacted delta volume
    want_a, want_kv = sub.to_host(a), sub.to_host(kv)
    _crash(s)
    expire_lease(catalog_url, "s1")
    r = make_runtime().resume("s1")
    assert r.epoch == 120 and r.meta == {"i": 119}
    assert np.array_equal(sub.to_host(r.regions["a"].array), want_a)
    assert r.regions["kv"].length == 120
    assert np.array_equal(sub.to_host(r.regions["kv"].array)[:, :120], want_kv[:, :120])


def test_reopening_a_log_past_the_compaction_threshold_compacts_cleanly(make_runtime, catalog_url, substrate):
    """A session reopened with more uncompacted log than its threshold compacts at the first flush
    (the fresh, empty chain segment is not rolled onto its own name) and keeps its state."""
    a = substrate.zeros(64 << 10, np.uint8)
    s = make_runtime(compact_bytes=0).session("big")
    s.register("a", a)
    for i in range(40):
        a[i * 1000:(i + 1) * 1000] = i + 1
        s.commit({"i": i})
    s.close()
    want = substrate.to_host(a)
    rt = make_runtime(compact_bytes=16 << 10)
    r = rt.resume("big")
    r.flush()
    r.commit({"i": 40})
    r.flush()
    bases, _ = list_segments(rt.session_dir("big"))
    assert len(bases) == 1 and r._log.error is None
    assert np.array_equal(substrate.to_host(r.regions["a"].array), want) and r.meta == {"i": 40}


def test_repeated_takeovers_keep_one_history(make_runtime, catalog_url, substrate):
    """Five crash/resume rounds in a row leave one linear history of epochs."""
    a = substrate.zeros(4096 * 6, np.uint8)
    rt = make_runtime()
    s = rt.session("s1")
    s.register("a", a)
    expected = np.zeros(4096 * 6, np.uint8)
    for round_ in range(5):
        for j in range(3):
            s.regions["a"].array[round_ * 4096 + j] = round_ * 10 + j
            expected[round_ * 4096 + j] = round_ * 10 + j
            s.commit({"round": round_, "j": j})
        s.regions["a"].array[-1] = 255  # written but never committed: must not survive
        _crash(s)
        expire_lease(catalog_url, "s1")
        s = make_runtime().resume("s1")
        assert s.epoch == 3 * (round_ + 1) and s.token == round_ + 2
        assert np.array_equal(substrate.to_host(s.regions["a"].array), expected)


def test_register_after_resume_keeps_unregistered_regions(make_runtime, substrate):
    """Regions logged but not re-registered keep their state across later epochs."""
    rt = make_runtime()
    s = rt.session("s1")
    x, y = substrate.array(np.full(128, 7, np.uint8)), substrate.array(np.full(128, 9, np.uint8))
    s.register("x", x)
    s.register("y", y)
    s.commit()
    s.close()
    s = rt.session("s1")
    s.register("x", substrate.zeros(128, np.uint8))
    s.regions["x"].array[:] = 1
    s.commit()
    s.close()
    r = rt.resume("s1")
    assert (substrate.to_host(r.regions["x"].array) == 1).all()
    assert (substrate.to_host(r.regions["y"].array) == 9).all()


def test_session_id_validation(make_runtime):
    """An empty or non-string session ID raises ConcordiaError."""
    rt = make_runtime()
    with pytest.raises(ConcordiaError, match="session ID"):
        rt.session("")


def test_quiesced_commit_without_instrumentation_is_refused(make_runtime, substrate):
    """commit(quiesce=True) without gpu_runtime.cuda.instrument enabled raises ConfigurationError, commits nothing."""
    s = make_runtime().session("q")
    s.register("a", substrate.zeros(4096, np.uint8))
    with pytest.raises(ConfigurationError, match="instrumentation to be enabled"):
        s.commit({"x": 1}, quiesce=True)
    assert s.epoch == 0
