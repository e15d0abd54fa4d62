"""Nothing a command or a failure does may lose or silently roll back committed state (issue 15).

Each test names the defect it covers: a wrong catalog and gc (1), lost segment files (2), a damaged
host ring (3), a failed resume (4), a full disk (5), file modes (6)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from concordia_agents import (
    CatalogMismatchError,
    ConcordiaError,
    CorruptLogError,
    LogFullError,
    RegionError,
    Runtime,
)
from concordia_agents._log import ring_path
from concordia_agents._segments import list_segments
from gpu_runtime.logring import DATA_START, LogRing
from gpu_runtime.records import HEADER_SIZE, RecordType, decode_header, session_tag

ROOT = Path(__file__).resolve().parents[1]


def _cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **(env or {})}
    e.pop("CONCORDIA_DEBUG", None)
    e.pop("CONCORDIA_CATALOG_URL", None)
    return subprocess.run([sys.executable, "-m", "concordia_cli", "--home", str(home), *args], cwd=ROOT,
                          env=e, capture_output=True, text=True, timeout=300)


def _make_sessions(rt: Runtime, ids: list[str], epochs: int = 3) -> None:
    for sid in ids:
        s = rt.session(sid)
        a = np.zeros(4096, np.uint8)
        s.register("a", a)
        for e in range(1, epochs + 1):
            a[e] = e
            s.commit({"e": e})
        s.close()


def _tree(home: Path) -> dict[str, int]:
    return {str(p.relative_to(home)): p.stat().st_size for p in sorted(home.rglob("*")) if p.is_file()}


# -- 1. gc with a wrong catalog ------------------------------------------------------------------------------


def test_gc_with_a_typo_in_the_catalog_url_deletes_nothing(home: Path, tmp_path: Path):
    """(1) `concordia --catalog <typo> gc` on a home that belongs to another catalog is refused with an
    error naming both catalogs; it creates no catalog and removes no session directory."""
    with Runtime.open(home=home, backend="host") as rt:
        _make_sessions(rt, ["a", "b"])
    before = _tree(home)
    typo = tmp_path / "typo.db"
    r = _cli(home, "--catalog", f"sqlite:///{typo}", "gc")
    assert r.returncode == 1, r.stdout
    assert r.stderr.count("\n") == 1 and "catalog.db" in r.stderr and "typo.db" in r.stderr, r.stderr
    assert not typo.exists()
    assert _tree(home) == before
    with Runtime.open(home=home, backend="host") as rt:  # the right catalog still sees both
        assert sorted(i.id for i in rt.sessions()) == ["a", "b"]


@pytest.mark.postgres
def test_a_postgres_home_opened_without_its_url_is_refused(home: Path, pg_url: str):
    """(1) A home whose catalog is PostgreSQL, opened once without CONCORDIA_CATALOG_URL (the default
    SQLite catalog in the home), raises CatalogMismatchError and creates no catalog.db; gc removes nothing."""
    with Runtime.open(home=home, catalog_url=pg_url, backend="host") as rt:
        _make_sessions(rt, ["p1", "p2"])
    before = _tree(home)
    with pytest.raises(CatalogMismatchError, match="belongs to catalog postgresql"):
        Runtime.open(home=home, backend="host")
    assert not (home / "catalog.db").exists()
    r = _cli(home, "gc")
    assert r.returncode == 1 and "belongs to catalog postgresql" in r.stderr
    assert _tree(home) == before
    with Runtime.open(home=home, catalog_url=pg_url, backend="host") as rt:
        assert rt.gc().removed == []


def test_a_home_without_a_marker_is_not_adopted_by_a_catalog_that_knows_none_of_its_sessions(
        home: Path, tmp_path: Path):
    """(1) A home made before homes named their catalog (no marker) is refused by a catalog that knows
    none of its session directories, and adopted by one that knows them."""
    with Runtime.open(home=home, backend="host") as rt:
        _make_sessions(rt, ["old"])
    (home / "concordia-home.json").unlink()
    with pytest.raises(CatalogMismatchError, match="knows none of them"):
        Runtime.open(home=home, catalog_url=f"sqlite:///{tmp_path / 'other.db'}", backend="host")
    with Runtime.open(home=home, backend="host") as rt:
        assert [i.id for i in rt.sessions()] == ["old"]
    assert (home / "concordia-home.json").exists()


def test_an_unmarked_home_is_not_bound_to_a_typo_catalog(home: Path, tmp_path: Path):
    """(1, review) A home made before markers existed whose sessions are all graph threads (no session
    directory) but which has its own catalog.db is refused by another catalog, and the typo's catalog
    file that this open made is removed again."""
    with Runtime.open(home=home, backend="host") as rt:
        rt.let_go(rt.hold("thread", kind="langgraph", labels={"kind": "graph"}))
    (home / "concordia-home.json").unlink()
    typo = tmp_path / "typo.db"
    with pytest.raises(CatalogMismatchError, match="has its own catalog"):
        Runtime.open(home=home, catalog_url=f"sqlite:///{typo}", backend="host")
    assert not typo.exists() and not (home / "concordia-home.json").exists()
    with Runtime.open(home=home, backend="host") as rt:
        assert [i.id for i in rt.sessions()] == ["thread"]


def test_gc_dry_run_writes_nothing_to_the_catalog(home: Path):
    """(1, review) `gc(dry_run=True)` judging a closed session's leftover ring takes no lease: the session's
    fencing token and status are as before, and the ring is still there."""
    with Runtime.open(home=home, backend="host", flush_poll=3600.0) as rt:
        s = rt.session("r")
        s.register("a", np.zeros(4096, np.uint8))
        s.commit()
        s.close()
        rfile = ring_path(rt.config, session_tag("r"))
        LogRing.create(rfile, capacity=1 << 20, session_tag=session_tag("r"), owner_token=1, base=0).close()
        before = rt.info("r")
        report = rt.gc(dry_run=True)
        assert [i.path for i in report.removed] == [rfile] and rfile.exists()
        after = rt.info("r")
        assert (after.token, after.status, after.owner) == (before.token, before.status, before.owner)


def test_gc_dry_run_lists_and_keeps(home: Path):
    """(1) `concordia gc --dry-run` lists what gc would remove and removes nothing."""
    with Runtime.open(home=home, backend="host") as rt:
        _make_sessions(rt, ["x"])
        d = rt.session_dir("x")
        rt.catalog.delete("x")  # a delete that died between the catalog and the files
    r = _cli(home, "gc", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert d.name in r.stdout and d.exists()


# -- 2. lost segment files -------------------------------------------------------------------------------------


def _many_segments(home: Path, catalog_url: str, epochs: int = 40) -> list[np.ndarray]:
    """A closed session 'seg' whose log spans several segment files; the state after each epoch."""
    states = [np.zeros(16 * 4096, np.uint8)]
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host", segment_bytes=64 << 10,
                      max_record_bytes=8192, compact_bytes=0) as rt:
        s = rt.session("seg")
        a = np.zeros(16 * 4096, np.uint8)
        s.register("a", a)
        rng = np.random.default_rng(1)
        for e in range(1, epochs + 1):
            a[rng.integers(0, a.size, 8000)] = e
            s.commit({"e": e})
            states.append(a.copy())
        s.close()
        assert rt.info("seg").last_epoch == epochs
    return states


@pytest.mark.parametrize("which", ["all", "last"])
def test_missing_segments_are_refused_not_rolled_back(home: Path, catalog_url: str, which: str):
    """(2) With segment files gone, resume raises CorruptLogError naming a missing file and the epochs it
    would lose instead of returning an older (or empty) state; the session is left as it was."""
    states = _many_segments(home, catalog_url)
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        files = [f.path for f in list_segments(rt.session_dir("seg"))[1]]
        assert len(files) >= 3
        gone = files if which == "all" else files[-1:]
        for f in gone:
            f.unlink()
        with pytest.raises(CorruptLogError, match=r"recorded epoch 40 as durable.*lose epochs") as e:
            rt.resume("seg")
        assert e.value.path is not None and Path(e.value.path).name == gone[0].name
        assert rt.info("seg").status == "closed" and rt.info("seg").last_epoch == 40
        # Asked for explicitly: the newest intact epoch, and what was given up.
        s = rt.resume("seg", allow_rollback=True)
        assert s.rollback is not None and s.rollback.recorded_epoch == 40 and s.rollback.epoch == s.epoch < 40
        assert gone[-1].name in s.rollback.missing and "gave up epochs" in str(s.rollback)
        if s.epoch:
            assert np.array_equal(s.regions["a"].array, states[s.epoch])
        s.regions.get("a") or s.register("a", np.zeros(16 * 4096, np.uint8))
        kept = s.epoch
        s.commit({"e": "after"})
        s.close()
        s = rt.resume("seg")  # the catalog now agrees with the log
        assert s.epoch == kept + 1 and s.rollback is None
        s.close()


# -- 3. a damaged host ring -------------------------------------------------------------------------------------

_RING_CHILD = """
import sys, time, numpy as np
from concordia_agents import Runtime
home, url = sys.argv[1], sys.argv[2]
rt = Runtime.open(home=home, catalog_url=url, backend="host", flush_poll=3600.0, compact_bytes=0)
s = rt.session("r")
a = np.zeros(8 * 4096, np.uint8)
s.register("a", a)
for e in range(1, 21):
    a[e * 1000] = e
    s.commit({"e": e})
    if e == 10:
        s.flush()   # epochs 1..10 in segments; 11..20 only in the host ring (the flusher never polls)
print("ready", flush=True)
time.sleep(3600)
"""


def _crash_with_ring_tail(home: Path, catalog_url: str) -> Path:
    """Run the child above, SIGKILL it, return its ring (epochs 11..20 unflushed)."""
    p = subprocess.Popen([sys.executable, "-c", _RING_CHILD, str(home), catalog_url], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host", create=False) as rt:
        return ring_path(rt.config, session_tag("r"))


def _flip_payload_of_epoch(ring_file: Path, epoch: int) -> None:
    ring = LogRing.open(ring_file)
    try:
        pos = ring.consumed
        while pos < ring.written:
            h = decode_header(ring.read(pos, HEADER_SIZE))
            if h.epoch == epoch and h.type is RecordType.PAGES:
                at = DATA_START + (pos + HEADER_SIZE + 5) % ring.capacity
                with open(ring_file, "r+b") as f:
                    f.seek(at)
                    b = f.read(1)
                    f.seek(at)
                    f.write(bytes([b[0] ^ 0x10]))
                return
            pos += h.size
    finally:
        ring.close()
    raise AssertionError(f"no PAGES record of epoch {epoch} in the ring")


def _ring_data(ring_file: Path) -> str:
    return hashlib.sha256(ring_file.read_bytes()[DATA_START:]).hexdigest()


def test_a_damaged_ring_is_never_copied_and_can_be_salvaged(home: Path, catalog_url: str):
    """(3) A record of a dead owner's ring that fails its checksum is not copied into a segment: resume
    raises CorruptLogError naming the ring and changes neither the ring's data nor the segments; resume
    with allow_rollback brings back the newest intact epoch (14) and reports the dropped ring bytes."""
    rfile = _crash_with_ring_tail(home, catalog_url)
    _flip_payload_of_epoch(rfile, 15)
    ring_before = _ring_data(rfile)
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        segs_before = _tree(rt.session_dir("r"))
        with pytest.raises(CorruptLogError, match="fails its payload checksum") as e:
            rt.resume("r")
        assert e.value.path == str(rfile)
        assert _ring_data(rfile) == ring_before and _tree(rt.session_dir("r")) == segs_before
        assert rt.info("r").status == "crashed"
        s = rt.resume("r", allow_rollback=True)
        assert s.epoch == 14 and s.meta == {"e": 14}
        want = np.zeros(8 * 4096, np.uint8)
        want[[e * 1000 for e in range(1, 15)]] = range(1, 15)
        assert np.array_equal(s.regions["a"].array, want)
        assert s.rollback is not None and s.rollback.skipped_ring_bytes > 0
        s.close()


def test_the_flusher_refuses_a_damaged_ring_record_and_the_next_commit_says_so(home: Path):
    """(3) A ring record damaged while its owner runs is not appended: flush() raises CorruptLogError,
    the segments hold no byte of that epoch, and the next commit raises instead of writing."""
    with Runtime.open(home=home, backend="host", flush_poll=3600.0) as rt:
        s = rt.session("live")
        a = np.zeros(4 * 4096, np.uint8)
        s.register("a", a)
        for e in range(1, 4):
            a[e] = e
            s.commit({"e": e})
        s.flush()
        a[100] = 9
        s.commit({"e": 4})
        rfile = ring_path(rt.config, session_tag("live"))
        _flip_payload_of_epoch(rfile, 4)
        size_before = sum(f.path.stat().st_size for f in list_segments(rt.session_dir("live"))[1])
        with pytest.raises(CorruptLogError, match="fails its payload checksum"):
            s.flush(timeout=2)
        assert sum(f.path.stat().st_size for f in list_segments(rt.session_dir("live"))[1]) == size_before
        with pytest.raises(CorruptLogError, match="epoch 5 not committed"):
            s.commit({"e": 5})
        s._abandon()


def test_an_epoch_abandoned_between_reservations_leaves_the_log_usable(home: Path):
    """(3, review) A commit that raises between two reservations of its epoch (the flusher stopped while it
    waited for space) leaves the ring without holes: the same epoch commits next, the flusher copies
    everything, and the session resumes exactly. The GPU variant is in test_gpu.py."""
    from .conftest import failing_reservation

    with Runtime.open(home=home, backend="host", ring_bytes=1 << 20, max_record_bytes=64 << 10) as rt:
        s = rt.session("hole")
        kv = np.random.default_rng(4).standard_normal((8, 2, 1024, 64)).astype(np.float32)
        s.register("kv", kv, kind="kv", seq_axis=2)
        s.commit({"n": 100}, rows={"kv": 100})
        with failing_reservation(s._log.writer, 2, LogFullError("injected: the flusher stopped")) as calls:
            with pytest.raises(LogFullError, match="injected"):
                s.commit({"n": 700}, rows={"kv": 700})
        assert len(calls) == 2 and s.epoch == 1
        s.commit({"n": 700}, rows={"kv": 700})
        assert s.flush(timeout=20) == 2
        s.close()
        r = rt.resume("hole")
        assert r.epoch == 2 and r.regions["kv"].length == 700
        assert np.array_equal(r.regions["kv"].array[:, :, :700], kv[:, :, :700])
        r.close()


# -- 4. a failed resume ----------------------------------------------------------------------------------------


def _snapshot(rt: Runtime, sid: str) -> tuple[object, ...]:
    info = rt.info(sid)
    rfile = ring_path(rt.config, session_tag(sid))
    ring = _ring_data(rfile) if rfile.exists() else None
    return info.status, info.backend, info.last_epoch, info.labels, ring, _tree(rt.session_dir(sid))


@pytest.mark.parametrize("found", ["closed", "crashed"])
def test_a_failed_resume_leaves_the_session_as_it_found_it(home: Path, catalog_url: str, found: str):
    """(4) A resume that fails (RegionError: arrays that do not fit; CorruptLogError: a damaged data record)
    leaves status, backend, labels, ring and segment files as they were, and the lease free."""
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host", flush_poll=3600.0) as rt:
        s = rt.session("f")
        a = np.zeros(4 * 4096, np.uint8)
        s.register("a", a)
        for e in range(1, 4):
            a[e] = e
            s.commit({"e": e})
        if found == "closed":
            s.close()
        else:
            s.flush()
            s.commit({"e": 4})  # left in the ring
            s._abandon()
            from .conftest import expire_lease

            expire_lease(catalog_url, "f")
        before = _snapshot(rt, "f")
        assert before[0] == found
        with pytest.raises(RegionError):
            rt.resume("f", {"a": np.zeros(7, np.uint8)})
        assert _snapshot(rt, "f") == before
        seg = list_segments(rt.session_dir("f"))[1][0].path
        data = bytearray(seg.read_bytes())
        first = 64 + decode_header(data[64:128]).size  # the REGION record, then epoch 1's PAGES record
        data[first + HEADER_SIZE + 1] ^= 0xFF
        seg.write_bytes(bytes(data))
        before = _snapshot(rt, "f")
        with pytest.raises(CorruptLogError):
            rt.resume("f")
        assert _snapshot(rt, "f") == before
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as other:
        other.session("f").close()  # the lease is free for another process at once


def test_a_graph_lease_on_a_region_session_is_refused_and_relabels_nothing(home: Path, catalog_url: str):
    """(4) Taking a bare (graph thread) lease on a session that holds a region log raises a ConcordiaError
    and leaves its kind, backend and status untouched (what `concordia resume` on it used to do)."""
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        _make_sessions(rt, ["state"])
        before = rt.info("state")
        with pytest.raises(ConcordiaError, match="holds a region log"):
            rt.hold("state", kind="langgraph", labels={"kind": "graph"})
        after = rt.info("state")
        assert (after.status, after.backend, after.labels) == (before.status, before.backend, before.labels)


def test_a_region_log_on_a_graph_thread_is_refused(home: Path, catalog_url: str):
    """(4) The mirror case: opening a bare lease (a graph thread made by hold) as a region session raises
    a ConcordiaError and gives it no directory, ring or segment; its labels stay."""
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        rt.let_go(rt.hold("thread", kind="langgraph", labels={"kind": "graph"}))
        before = rt.info("thread")
        with pytest.raises(ConcordiaError, match="bare lease"):
            rt.session("thread")
        after = rt.info("thread")
        assert (after.status, after.backend, after.labels) == (before.status, before.backend, before.labels)
        assert not rt.session_dir("thread").exists()
        assert not ring_path(rt.config, session_tag("thread")).exists()


# -- 5. a full disk ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 3 MiB filesystem (tmpfs), so writes fail with ENOSPC for real."""
    mnt = tmp_path / "disk"
    mnt.mkdir(mode=0o700)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_reaches_the_committer_within_a_flush_period(small_disk: Path, tmp_path: Path):
    """(5) Once the flusher hits ENOSPC, the next commit raises LogFullError at once (not after the 60 s
    ring wait); every epoch committed before is flushed after space is freed and resumes bit-exact."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    opts = dict(home=small_disk, catalog_url=url, backend="host", ring_bytes=16 << 20, max_record_bytes=64 << 10,
                compact_bytes=0, ring_dir=tmp_path / "shm")  # space_timeout stays at its default, 60 s
    rt = Runtime.open(**opts)
    s = rt.session("big")
    a = np.zeros(512 << 10, np.uint8)
    s.register("a", a)
    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    with pytest.raises(LogFullError, match="No space left on device") as e:
        for _ in range(40):
            a[:] = rng.integers(0, 256, a.size, dtype=np.uint8)  # every page dirty: 512 KiB per epoch
            s.commit({"epoch": s.epoch + 1})
            time.sleep(0.03)  # three flush periods: the flusher has tried each epoch before the next
    took = time.monotonic() - t0
    assert took < 10, f"the error took {took:.1f} s to reach the committer"
    assert f"epoch {s.epoch + 1} not committed" in str(e.value)
    last = s.epoch
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert s.flush(timeout=30) == last
    a[:] = 7
    assert s.commit({"epoch": last + 1}) == last + 1  # the same session goes on
    s.flush()
    expected = a.copy()
    s._abandon()
    from .conftest import expire_lease

    expire_lease(url, "big")
    with Runtime.open(**opts) as rt2:
        r = rt2.resume("big")
        assert r.epoch == last + 1 and r.meta == {"epoch": last + 1}
        assert np.array_equal(r.regions["a"].array, expected)
        r.close()
    rt.close()


# -- 6. file modes ---------------------------------------------------------------------------------------------


def test_every_file_concordia_writes_is_private(tmp_path: Path):
    """(6) With umask 0, every directory Concordia creates is 0700 and every file 0600: home, catalog
    (and its WAL files), session directories, segments, base images, markers, rings; a home that others
    may read is made private."""
    home = tmp_path / "home"
    rings = tmp_path / "rings"
    old = os.umask(0)
    try:
        with Runtime.open(home=home, backend="host", ring_dir=rings, compact_bytes=32 << 10) as rt:
            s = rt.session("private")
            a = np.zeros(64 << 10, np.uint8)
            s.register("a", a)
            for e in range(1, 6):
                a[:] = e
                s.commit({"e": e})
            s.flush()
            time.sleep(0.2)
            assert any(p.name.startswith("base-") for p in rt.session_dir("private").iterdir())  # compacted
            ring = ring_path(rt.config, session_tag("private"))
            assert ring.stat().st_mode & 0o777 == 0o600
            s._abandon()
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o755)
        Runtime.open(home=loose, backend="host").close()
        assert loose.stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)
    seen = 0
    for p in [home, *home.rglob("*"), rings, *rings.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p}: {oct(mode)}"
        seen += 1
    assert seen >= 8


# -- review of the first version -------------------------------------------------------------------------------


def test_a_rollback_past_a_damaged_base_image_keeps_later_work(home: Path, catalog_url: str):
    """A salvage that stops at a damaged base image moves it to quarantine (kept), so the epochs committed
    after the rollback resume normally; the damaged base never stops a scan again."""
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host", compact_bytes=16 << 10) as rt:
        s = rt.session("b")
        a = np.zeros(8 * 4096, np.uint8)
        s.register("a", a)
        for e in range(1, 6):
            a[:] = e
            s.commit({"e": e})
        s.flush()
        s.close()
        d = rt.session_dir("b")
        base = next(d.glob("base-*.img"))
        data = bytearray(base.read_bytes())
        data[200] ^= 0xFF
        base.write_bytes(bytes(data))
        with pytest.raises(CorruptLogError, match="allow_rollback"):
            rt.resume("b")
        s = rt.resume("b", allow_rollback=True)
        assert s.rollback is not None and base.name in s.rollback.quarantined and not base.exists()
        a2 = np.zeros(8 * 4096, np.uint8)
        if "a" in s.regions:
            a2 = s.regions["a"].array
        else:
            s.register("a", a2)
        for e in range(1, 4):
            a2[:] = 100 + e
            s.commit({"after": e})
        s.close()
        r = rt.resume("b")  # no rollback needed: history goes on from the salvage
        assert r.rollback is None and r.meta == {"after": 3} and int(r.regions["a"].array[0]) == 103
        r.close()
        assert (d / f"quarantine-{s.token:010d}" / base.name).exists()


def test_the_flusher_copies_the_intact_epochs_before_a_damaged_one(home: Path):
    """Epochs committed before a damaged ring record are appended, fsynced and reported before the flusher
    raises (not left in /dev/shm only)."""
    with Runtime.open(home=home, backend="host", flush_poll=3600.0) as rt:
        s = rt.session("prefix")
        a = np.zeros(4 * 4096, np.uint8)
        s.register("a", a)
        s.commit({"e": 1})
        s.flush()
        for e in range(2, 7):
            a[e] = e
            s.commit({"e": e})
        _flip_payload_of_epoch(ring_path(rt.config, session_tag("prefix")), 6)
        with pytest.raises(CorruptLogError):
            s.flush(timeout=2)
        assert s.durable_epoch == 5 and rt.info("prefix").last_epoch == 5
        s._abandon()


def test_a_failing_disk_other_than_full_reaches_the_committer_and_loses_nothing(home: Path, monkeypatch):
    """An fsync that fails with EIO (not ENOSPC) stops the flusher: the next commit raises StorageError; the
    bytes whose fsync failed are written again from the ring once the disk works, and the session resumes
    with every committed epoch."""
    import errno

    from concordia_agents import StorageError
    from concordia_agents._segments import SegmentWriter

    real_sync = SegmentWriter.sync
    with Runtime.open(home=home, backend="host", flush_poll=3600.0) as rt:
        s = rt.session("eio")
        a = np.zeros(4 * 4096, np.uint8)
        s.register("a", a)
        s.commit({"e": 1})
        s.flush()

        def broken(self: SegmentWriter) -> None:
            raise StorageError("injected", orig=OSError(errno.EIO, "Input/output error"))

        monkeypatch.setattr(SegmentWriter, "sync", broken)
        a[7] = 2
        s.commit({"e": 2})
        with pytest.raises(StorageError):
            s.flush(timeout=2)
        with pytest.raises(StorageError, match="epoch 3 not committed"):
            s.commit({"e": 3})
        assert s.durable_epoch == 1
        monkeypatch.setattr(SegmentWriter, "sync", real_sync)
        assert s.flush(timeout=5) == 2
        a[8] = 3
        assert s.commit({"e": 3}) == 3
        s.close()
        r = rt.resume("eio")
        assert r.epoch == 3 and r.meta == {"e": 3}
        assert np.array_equal(r.regions["a"].array, a)
        r.close()


def test_a_reused_id_does_not_inherit_a_deleted_sessions_files(home: Path):
    """A session created under the ID of a deleted one whose files were left behind starts empty: the old
    files are set aside (kept), and gc removes them because the catalog recorded that incarnation's
    deletion."""
    with Runtime.open(home=home, backend="host") as rt:
        s = rt.session("x")
        s.register("secret", np.full(4096, 7, np.uint8))
        s.commit({"owner": "alice"})
        s.close()
        rt.catalog.delete("x")  # a delete that died before removing the files
        s = rt.session("x")
        assert s.epoch == 0 and s.recorded == {} and s.meta is None
        s.close()
        aside = [d for d in (home / "sessions").iterdir() if ".orphaned-" in d.name]
        assert len(aside) == 1
        report = rt.gc()
        assert report.paths == aside and not aside[0].exists()
        assert rt.resume("x").epoch == 0


def test_gc_after_a_catalog_restore_keeps_sessions_it_forgot(home: Path):
    """A catalog restored from a backup forgets sessions made after it; gc must not take their directories
    for deleted ones (no tombstone of theirs): they are kept and reported."""
    import shutil as sh

    with Runtime.open(home=home, backend="host") as rt:
        _make_sessions(rt, ["old"])
    sh.copy(home / "catalog.db", home / "backup.db")
    with Runtime.open(home=home, backend="host") as rt:
        _make_sessions(rt, ["today"])
        today = rt.session_dir("today")
    for suffix in ("", "-wal", "-shm"):
        (home / f"catalog.db{suffix}").unlink(missing_ok=True)
    sh.copy(home / "backup.db", home / "catalog.db")
    with Runtime.open(home=home, backend="host") as rt:
        report = rt.gc()
        assert report.removed == [] and today in [i.path for i in report.kept] and today.exists()


def test_a_failed_resume_does_not_leave_a_heartbeat_able_lease(home: Path, catalog_url: str):
    """After a failed resume of a crashed session, the lease names its dead owner again: a heartbeat of the
    failed resumer (one in flight when it gave the session back) cannot revive it."""
    from .conftest import expire_lease

    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        s = rt.session("hb")
        s.register("a", np.zeros(4096, np.uint8))
        s.commit()
        old_owner = rt.owner
        s._abandon()
    expire_lease(catalog_url, "hb")
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        with pytest.raises(RegionError):
            rt.resume("hb", {"a": np.zeros(3, np.uint8)})
        info = rt.info("hb")
        assert info.status == "crashed" and info.owner == old_owner
        assert not rt.catalog.heartbeat("hb", info.token, 30.0, owner=rt.owner)
        assert rt.info("hb").status == "crashed"


def test_a_failed_resume_of_a_crashed_owner_keeps_its_ring_epochs(home: Path, catalog_url: str):
    """A resume that fails after draining a dead owner's ring (wrong arrays) loses nothing: the next
    resume restores every epoch the ring held."""
    rfile = _crash_with_ring_tail(home, catalog_url)
    assert rfile.exists()
    with Runtime.open(home=home, catalog_url=catalog_url, backend="host") as rt:
        with pytest.raises(RegionError):
            rt.resume("r", {"a": np.zeros(3, np.uint8)})
        assert rt.info("r").status == "crashed" and rfile.exists()
        s = rt.resume("r")
        assert s.epoch == 20 and s.meta == {"e": 20}
        s.close()


def test_a_cancelled_open_does_not_compact(home: Path):
    """An open given back by cancel leaves the files as they were, even when the log is past the
    compaction threshold (compaction waits for this owner's first commit)."""
    with Runtime.open(home=home, backend="host", compact_bytes=0) as rt:
        s = rt.session("c")
        a = np.zeros(8 * 4096, np.uint8)
        s.register("a", a)
        for e in range(1, 6):
            a[:] = e
            s.commit({"e": e})
        s.close()
        files = _tree(rt.session_dir("c"))
    with Runtime.open(home=home, backend="host", compact_bytes=16 << 10, flush_poll=0.001) as rt:
        s = rt.session("c")
        time.sleep(0.1)  # many flusher passes
        s.cancel()
        assert _tree(rt.session_dir("c")) == files


# -- commit bodies decoded at open -----------------------------------------------------------------------------


def _rewrite_commit_body(seg: Path, which: int, body: bytes) -> None:
    """Replace the payload of the ``which``-th COMMIT record of ``seg`` (same length) by ``body``,
    with valid checksums: damage no checksum can see, as a writer bug would make."""
    from concordia_agents._segments import SEGMENT_HEADER_SIZE
    from gpu_runtime.checksum import payload_sum
    from gpu_runtime.records import encode_header

    raw = bytearray(seg.read_bytes())
    pos, commits = SEGMENT_HEADER_SIZE, []
    while pos < len(raw):
        h = decode_header(raw[pos:pos + HEADER_SIZE])
        if h.type is RecordType.COMMIT:
            commits.append((pos, h))
        pos += h.size
    pos, h = commits[which]
    body = body.ljust(h.length)[:h.length]
    raw[pos:pos + HEADER_SIZE] = encode_header(RecordType.COMMIT, session_tag=h.session_tag, epoch=h.epoch,
                                               region=h.region, flags=h.flags, offset=h.offset, length=h.length,
                                               aux=h.aux, payload_sum=payload_sum(body))
    raw[pos + HEADER_SIZE:pos + HEADER_SIZE + h.length] = body
    seg.write_bytes(bytes(raw))


def _three_epochs(home: Path) -> Path:
    with Runtime.open(home=home, backend="host", warm_ring_bytes=0) as rt:
        s = rt.session("b")
        a = np.zeros(4096, np.uint8)
        s.register("a", a)
        for v in (1, 2, 3):
            a[:] = v
            s.commit({"v": v})
        s.close()
        (seg,) = [f.path for f in list_segments(rt.session_dir("b"))[1]]
    return seg


def test_an_undecodable_newest_commit_body_is_refused(home: Path):
    """The scan decodes only the newest COMMIT body (a log of per-token commits holds thousands): one
    that is not JSON, its checksums valid, raises CorruptLogError naming the file and offset."""
    seg = _three_epochs(home)
    _rewrite_commit_body(seg, -1, b"\xff not json")
    with Runtime.open(home=home, backend="host") as rt, pytest.raises(CorruptLogError, match="no valid body"):
        rt.resume("b")


def test_older_commit_bodies_are_not_decoded(home: Path):
    """An older COMMIT body is never used (the newest epoch's meta and lengths are): its checksum is still
    verified, but it is not decoded, so the session opens at its newest epoch."""
    seg = _three_epochs(home)
    _rewrite_commit_body(seg, 1, b"\xff not json")
    with Runtime.open(home=home, backend="host") as rt:
        s = rt.resume("b")
        assert s.epoch == 3 and s.meta == {"v": 3} and int(s.regions["a"].array[0]) == 3
        s.close()
