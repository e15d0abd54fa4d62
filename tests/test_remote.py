"""Remote storage: sessions resumed on another host from a real S3-compatible
server (moto's, a subprocess on 127.0.0.1) and the shared catalog (SQLite file
and, with CONCORDIA_TEST_POSTGRES_URL, PostgreSQL).

Two "hosts" are two runtimes with separate homes and ring directories that
share only the catalog URL and the bucket. Host A runs in a child process
(``tests._remote_child``) and is SIGKILLed; its home and rings are deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from concordia_agents import (
    ConfigurationError,
    CorruptLogError,
    RemoteStoreError,
    Runtime,
)
from concordia_agents._segments import base_chain
from tests._remote_child import expected, fresh, mutate
from tests._s3 import CREDENTIALS, Relay, S3Server, free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _credentials(monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def bucket(s3) -> str:
    name = f"cnc-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def _host(tmp_path: Path, name: str, catalog_url: str, bucket: str, endpoint: str, **kw) -> Runtime:
    options = {"lease_ttl": 1.0, "segment_bytes": 1 << 20, "max_record_bytes": 64 << 10, **kw}
    return Runtime.open(home=tmp_path / name, catalog_url=catalog_url, backend="host", remote=f"s3://{bucket}/p",
                        remote_endpoint=endpoint, ring_dir=tmp_path / f"rings-{name}", **options)


def _host_a(tmp_path: Path, catalog_url: str, bucket: str, endpoint: str, session: str, *, remote_epochs: int,
            local_epochs: int, **extra: int) -> tuple[int, int]:
    """Host A in a child: commit, upload, commit more to disk only; SIGKILL; its
    home and rings deleted. Returns (remote epoch, last epoch) it reported."""
    cmd = [sys.executable, "-m", "tests._remote_child", "--home", str(tmp_path / "a"), "--ring-dir",
           str(tmp_path / "rings-a"), "--catalog", catalog_url, "--remote", f"s3://{bucket}/p", "--endpoint",
           endpoint, "--session", session, "--remote-epochs", str(remote_epochs), "--local-epochs", str(local_epochs)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **CREDENTIALS})
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        m = re.fullmatch(r"READY (\d+) (\d+)\n", line)
        assert m, f"host A: expected READY, found {line!r}; stderr:\n{child.stderr.read()[-3000:]}"  # type: ignore[union-attr]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "rings-a")
    time.sleep(1.2)  # host A's lease (1 s) runs out: nobody heart-beats it any more
    return int(m.group(1)), int(m.group(2))


def _assert_state(s, seed: int, epoch: int) -> None:  # type: ignore[no-untyped-def]
    want = expected(seed, epoch)
    assert s.epoch == epoch and s.meta == {"epoch": epoch}
    for name, arr in want.items():
        got = np.asarray(s.regions[name].array)
        assert got.tobytes() == arr.tobytes(), f"region {name!r} differs from the state of epoch {epoch}"


def _session_files(rt: Runtime, sid: str) -> list[str]:
    d = rt.session_dir(sid)
    return sorted(p.name for p in d.iterdir() if p.name.startswith(("seg-", "base-"))) if d.is_dir() else []


def test_host_lost_resume_from_remote_is_bit_exact_and_the_chain_goes_on(tmp_path, catalog_url, s3, bucket):
    """Host A uploads 40 epochs, fsyncs 7 more locally, is SIGKILLed and its disk is gone. Host B is refused
    without allow_rollback (the catalog recorded 47 as durable, naming the lost files), then resumes at epoch
    40 byte for byte, commits 3 more and uploads them; host C then resumes at 43 with no rollback."""
    remote, last = _host_a(tmp_path, catalog_url, bucket, s3.url, "chat", remote_epochs=40, local_epochs=7)
    assert (remote, last) == (40, 47)
    b = _host(tmp_path, "b", catalog_url, bucket, s3.url)
    try:
        with pytest.raises(CorruptLogError, match=r"recorded epoch 47 as durable.*epoch 40.*The object store holds "
                                                  r"epochs up to 40") as refused:
            b.resume("chat")
        assert "seg-" in str(refused.value), "the refusal names the segment files the lost host had"
        assert b.info("chat").status == "crashed", "a refused resume leaves the session as it was"
        s = b.resume("chat", allow_rollback=True)
        assert s.rollback is not None and (s.rollback.recorded_epoch, s.rollback.epoch) == (47, 40)
        _assert_state(s, 7, 40)
        assert s.durability().remote == 40
        state = {n: s.regions[n].array for n in ("kv", "scratch")}
        for e in range(41, 44):
            mutate(state, 7, e)
            s.commit(meta={"epoch": e}, rows={"kv": (e - 1, e)})
        assert s.flush(level="remote", timeout=60) == 43
        d = s.durability()
        assert (d.level, d.committed, d.disk, d.remote, d.remote_lag, d.remote_error) == ("remote", 43, 43, 43, 0,
                                                                                          None)
        s.close()
    finally:
        b.close()
    c = _host(tmp_path, "c", catalog_url, bucket, s3.url)
    try:
        s = c.resume("chat")
        assert s.rollback is None
        _assert_state(s, 7, 43)
        s.close()
    finally:
        c.close()


def test_everything_remote_resumes_without_rollback(tmp_path, catalog_url, s3, bucket):
    """When the lost host's last epoch was remote, another host resumes it as if nothing happened."""
    remote, last = _host_a(tmp_path, catalog_url, bucket, s3.url, "all-up", remote_epochs=25, local_epochs=0)
    assert remote == last == 25
    b = _host(tmp_path, "b", catalog_url, bucket, s3.url)
    try:
        s = b.resume("all-up")
        assert s.rollback is None
        _assert_state(s, 7, 25)
        assert _session_files(b, "all-up"), "the objects were fetched into host B's session directory"
        for p in b.session_dir("all-up").iterdir():
            if p.is_file() and p.name.startswith(("seg-", "base-")):
                assert p.stat().st_mode & 0o777 == 0o600, f"{p.name}: a fetched log must be private"
        s.close()
    finally:
        b.close()


@pytest.mark.parametrize("compact_epochs", [0, 2], ids=["full-images", "layers"])
def test_compaction_deletes_covered_objects_and_a_remote_resume_reads_the_base(tmp_path, catalog_url, s3, bucket,
                                                                                compact_epochs):
    """With compaction on, covered delta objects leave the bucket once the base image that folds them is
    remote; the bucket holds exactly the catalog's objects; another host resumes from base + deltas. With
    layers (every 2 epochs, as often as the flusher passes), the images a layer lies on stay remote and the
    resume fetches and reads the chain (which compaction's timing decides; the uploader's chain rules are
    tested deterministically in tests/test_base_layers.py)."""
    remote, last = _host_a(tmp_path, catalog_url, bucket, s3.url, "compacted", remote_epochs=300, local_epochs=0,
                           segment_bytes=256 << 10, compact_bytes=1 << 20, compact_epochs=compact_epochs)
    assert remote == last == 300
    from concordia_agents._catalog import Catalog
    from concordia_agents._catalog._objects import objects

    cat = Catalog(catalog_url)
    try:
        rows = objects(cat, "compacted")
    finally:
        cat.dispose()
    assert any(o.kind == "base" for o in rows), "compaction wrote a base image and it went up"
    listed = {o["Key"].rsplit("/", 1)[1] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert listed == {o.name for o in rows if o.state == "remote"}, "the bucket holds exactly the catalog's objects"
    base = max((o for o in rows if o.kind == "base"), key=lambda o: o.base_offset)
    covered = [o.name for o in rows if o.kind == "delta" and o.base_offset + o.bytes - 64 <= base.base_offset]
    assert not covered, f"deltas the newest base covers are still remote: {covered}"
    bases = [o.name for o in rows if o.kind == "base" and o.state == "remote"]
    assert base_chain(base.name, bases) is not None, "every image the newest lies on is remote"
    b = _host(tmp_path, "b", catalog_url, bucket, s3.url)
    try:
        s = b.resume("compacted")
        _assert_state(s, 7, 300)
        fetched = [n for n in _session_files(b, "compacted") if n.startswith("base-")]
        assert sorted(fetched) == sorted(base_chain(base.name, bases) or []), "host B fetched the chain"
        s.close()
    finally:
        b.close()


def test_a_corrupted_object_is_a_clear_error_and_changes_nothing(tmp_path, catalog_url, s3, bucket):
    """An object whose bytes changed in the store fails its SHA-256 check on download: CorruptLogError naming
    the object and both digests; host B's session directory holds no log file afterwards; the session is
    left as it was."""
    _host_a(tmp_path, catalog_url, bucket, s3.url, "bitrot", remote_epochs=10, local_epochs=0)
    client = s3.client()
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"] if "/seg-" in o["Key"])
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x40
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    b = _host(tmp_path, "b", catalog_url, bucket, s3.url)
    try:
        before = b.info("bitrot")
        with pytest.raises(CorruptLogError, match=r"expected SHA-256 [0-9a-f]{64} \(catalog\), found [0-9a-f]{64}"):
            b.resume("bitrot")
        assert _session_files(b, "bitrot") == [], "a failed fetch leaves no part of a log behind"
        after = b.info("bitrot")
        assert (after.status, after.last_epoch, after.closed_at) == (before.status, before.last_epoch,
                                                                     before.closed_at)
    finally:
        b.close()


def test_bucket_unreachable_commits_go_on_and_status_says_remote_lag(tmp_path, catalog_url):
    """With the store unreachable, commits and local durability go on; durability() reports the lag and why,
    and flush(level="remote") gives up after its timeout naming both."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rt = _host(tmp_path, "a", catalog_url, "nowhere", dead, remote_interval=0.1, remote_retry=0.05,
               remote_options={"max_attempts": 1})
    try:
        s = rt.session("offline", durability="remote")
        a = np.zeros(4096, np.uint8)
        s.register("a", a)
        for e in range(1, 6):
            a[e] = e
            s.commit(meta={"e": e})
        assert s.flush(level="disk") == 5
        # The first attempt's failure must be on record before the timed wait: under load (CI's two cores)
        # spawning the upload worker alone can outlast a 2 s wait, and then there is no failure to name yet.
        give_up = time.monotonic() + 60
        while s.durability().remote_error is None and time.monotonic() < give_up:
            time.sleep(0.05)
        with pytest.raises(RemoteStoreError, match=r"epoch 5 not remote after 2\.0 s \(remote epoch 0, 5 behind\); "
                                                   r"last failure: cannot upload"):
            s.flush(level="remote", timeout=2.0)
        d = s.durability()
        assert (d.committed, d.disk, d.remote, d.remote_lag) == (5, 5, 0, 5)
        assert d.remote_error is not None and "cannot upload" in d.remote_error and dead in d.remote_error
        s.close()
    finally:
        rt.close()


def test_object_server_killed_mid_upload_and_restarted_loses_nothing(tmp_path, catalog_url, s3, bucket):
    """The endpoint dies in the middle of a multipart upload (SIGKILL of the process serving the client) and
    comes back on the same port: the uploader retries, the epoch becomes remote, and another host resumes it
    byte for byte."""
    relay = Relay(s3.port, bytes_per_s=6 << 20)  # ~3 s for a 16 MiB segment: time to kill it mid-upload
    relay.start()
    rt = _host(tmp_path, "a", catalog_url, bucket, relay.url, remote_interval=3600.0, remote_retry=0.2,
               segment_bytes=64 << 20,
               remote_options={"multipart_bytes": 5 << 20, "part_bytes": 5 << 20, "concurrency": 2,
                               "max_attempts": 2, "connect_timeout": 1.0, "read_timeout": 5.0})
    client = s3.client()
    try:
        s = rt.session("big", durability="remote")
        rng = np.random.default_rng(3)
        big = rng.integers(0, 256, 16 << 20, dtype=np.uint8)
        s.register("big", big)  # 16 MiB of incompressible pages: one multipart upload of 4 parts
        s.commit(meta={"e": 1})
        waiter = _Flush(s)
        deadline = time.monotonic() + 30
        while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            assert time.monotonic() < deadline, "the multipart upload never started"
            time.sleep(0.02)
        relay.kill()
        time.sleep(1.0)
        assert s.durability().remote == 0, "the killed upload did not complete"
        relay.start()
        waiter.join(60)
        assert waiter.result == 1, f"flush(level='remote') after the restart: {waiter.error!r}"
        s.close()
        # The killed upload's parts stay in the store until gc aborts the upload (here: any age; moto
        # reports a fixed start date, so the age rule itself is not tested against it).
        left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert len(left) == 1, left
        dry = [i for i in rt.gc(dry_run=True, upload_age=0).removed if "multipart" in str(i.path)]
        assert len(dry) == 1 and len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
        aborted = [i for i in rt.gc(upload_age=0).removed if "multipart" in str(i.path)]
        assert len(aborted) == 1 and "unfinished multipart upload" in aborted[0].reason
        assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    finally:
        rt.close()
        relay.kill()
    # ranged GETs of 1 MiB for host B's download of the 16 MiB segment (its path for multi-GB base images)
    b = _host(tmp_path, "b", catalog_url, bucket, s3.url, remote_options={"range_bytes": 1 << 20})
    try:
        shutil.rmtree(tmp_path / "a")
        s = b.resume("big")
        assert np.asarray(s.regions["big"].array).tobytes() == big.tobytes()
        s.close()
    finally:
        b.close()


class _Flush:
    """``session.flush(level="remote")`` on a thread (the test kills the endpoint meanwhile)."""

    def __init__(self, s) -> None:  # type: ignore[no-untyped-def]
        import threading

        self.result: int | None = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(s,), daemon=True)
        self._t.start()

    def _run(self, s) -> None:  # type: ignore[no-untyped-def]
        try:
            self.result = s.flush(level="remote", timeout=90)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def join(self, timeout: float) -> None:
        self._t.join(timeout)


def test_the_old_host_coming_back_cannot_write(tmp_path, catalog_url, s3, bucket):
    """Host A freezes (SIGSTOP: a partition, a hung driver) past its lease; host B takes the session over.
    When A wakes and commits, it gets OwnershipError, and it recorded no object after the takeover."""
    cmd = [sys.executable, "-m", "tests._remote_child", "--home", str(tmp_path / "a"), "--ring-dir",
           str(tmp_path / "rings-a"), "--catalog", catalog_url, "--remote", f"s3://{bucket}/p", "--endpoint",
           s3.url, "--session", "split", "--remote-epochs", "5", "--then-commit"]
    child = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, **CREDENTIALS})
    b = _host(tmp_path, "b", catalog_url, bucket, s3.url)
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line == "READY 5 5\n", f"host A: {line!r}; stderr:\n{child.stderr.read()[-3000:]}"  # type: ignore[union-attr]
        child.send_signal(signal.SIGSTOP)
        time.sleep(1.5)  # its 1 s lease runs out
        sb = b.resume("split")
        _assert_state(sb, 7, 5)
        from concordia_agents._catalog._objects import objects

        before = {o.name for o in objects(b.catalog, "split")}
        child.send_signal(signal.SIGCONT)
        child.stdin.write("go\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        outcome = child.stdout.readline()  # type: ignore[union-attr]
        assert outcome.startswith("REFUSED OwnershipError"), outcome
        after = objects(b.catalog, "split")
        assert {o.name for o in after} == before, "the fenced host recorded objects after the takeover"
        sb.close()
    finally:
        child.kill()
        child.wait()
        b.close()


def test_gc_removes_only_provably_orphaned_objects(tmp_path, catalog_url, s3, bucket):
    """Objects of a deleted session left in the bucket (its delete could not reach the store) go, a dry run
    first only lists them; an unknown directory's object and a live session's object without a row stay."""
    rt = _host(tmp_path, "a", catalog_url, bucket, s3.url)
    client = s3.client()
    try:
        for sid in ("keep", "gone"):
            s = rt.session(sid, durability="remote")
            s.register("a", np.ones(4096, np.uint8))
            s.commit()
            s.flush(level="remote", timeout=30)
            s.close()
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
        gone_dir = rt.session_dir("gone").name
        gone_keys = [k for k in keys if f"/{gone_dir}/" in k]
        assert gone_keys
        rt.delete("gone")
        left = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
        assert not left & set(gone_keys), "delete removes the session's objects"
        # what a delete that could not reach the store leaves behind, and two objects gc cannot judge
        client.put_object(Bucket=bucket, Key=gone_keys[0], Body=b"x" * 100)
        keep_dir = rt.session_dir("keep").name
        root = gone_keys[0].split(f"/{gone_dir}/")[0]
        strays = [f"{root}/{keep_dir}/seg-0000000099-0000000000000000.log", f"{root}/someone-else/seg-x.log"]
        for k in strays:
            client.put_object(Bucket=bucket, Key=k, Body=b"y")
        dry = rt.gc(dry_run=True)
        where = f"s3://{bucket}/{gone_keys[0]}"
        assert [i.path for i in dry.removed if str(i.path).startswith("s3://")] == [where]
        assert gone_keys[0] in {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
        real = rt.gc()
        assert [i.path for i in real.removed if str(i.path).startswith("s3://")] == [where]
        kept = {str(i.path) for i in real.kept}
        assert {f"s3://{bucket}/{k}" for k in strays} <= kept
        final = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
        assert gone_keys[0] not in final and set(strays) <= final
        s = rt.resume("keep")
        assert s.epoch == 1
        s.close()
    finally:
        rt.close()


def test_levels_and_their_errors(tmp_path, catalog_url, s3, bucket):
    """flush(level=...) per level; 'remote' without a remote, a bad remote URL and a bad level are named
    errors that change nothing."""
    with pytest.raises(ConfigurationError, match="expected s3://bucket/prefix, found 'gs://x'"):
        Runtime.open(home=tmp_path / "x", catalog_url=catalog_url, backend="host", remote="gs://x")
    local = Runtime.open(home=tmp_path / "l", catalog_url=catalog_url, backend="host", ring_dir=tmp_path / "rings-l")
    try:
        with pytest.raises(ConfigurationError, match="durability 'remote' asked for it, but this runtime has no "
                                                     "remote"):
            local.session("lv", durability="remote")
        with pytest.raises(ConfigurationError, match="expected one of local, disk, remote, found 'tape'"):
            local.session("lv", durability="tape")
        s = local.session("lv", durability="local")
        s.register("a", np.zeros(4096, np.uint8))
        s.commit()
        assert s.flush() == 1 and s.durability().level == "local" and s.durability().remote is None
        assert s.flush(level="disk") == 1 and s.durability().disk == 1
        with pytest.raises(ConfigurationError, match=r"durability level 'local'.*needs a session opened with "
                                                     r"durability='remote'"):
            s.flush(level="remote")
        s.close()
    finally:
        local.close()
    rt = _host(tmp_path, "l", catalog_url, bucket, s3.url)  # the same home, now with a remote
    try:
        s = rt.session("lv")  # a recorded level is kept
        assert s.durability().level == "local"
        s.close()
        s = rt.session("lv", durability="remote")
        s.commit()
        assert s.flush() == 2 and s.durability().remote == 2  # flush() waits for the session's level
        s.close()
    finally:
        rt.close()
    plain = Runtime.open(home=tmp_path / "l", catalog_url=catalog_url, backend="host", ring_dir=tmp_path / "rings-l")
    try:
        with pytest.raises(ConfigurationError, match="durability 'remote' recorded for it"):
            plain.session("lv")
        assert plain.info("lv").status != "running", "the refused open took no lease"
    finally:
        plain.close()


def test_cli_doctor_and_sessions_show_report_the_remote(tmp_path, s3, bucket):
    """`concordia doctor` says whether the remote's bucket answers (and counts an unreachable one as a
    problem); `concordia sessions show` prints the level, the remote epoch and each object."""
    from tests.test_cli import cli, one_error_line

    home = tmp_path / "home"
    catalog = f"sqlite:///{home / 'catalog.db'}"
    rt = _host(tmp_path, "home", catalog, bucket, s3.url)
    try:
        s = rt.session("shown", durability="remote")
        s.register("a", np.ones(4096, np.uint8))
        s.commit()
        s.flush(level="remote", timeout=30)
        s.close()
    finally:
        rt.close()
    env = {"CONCORDIA_REMOTE": f"s3://{bucket}/p", "CONCORDIA_REMOTE_ENDPOINT": s3.url, **CREDENTIALS,
           "CONCORDIA_RING_DIR": str(tmp_path / "rings-home")}
    out = cli(home, "doctor", env=env).stdout
    assert f"s3://{bucket}/p at {s3.url}: reachable" in out
    out = cli(home, "sessions", "show", "shown", env=env).stdout
    assert "durability  remote; remote epoch 1 (0 behind the durable epoch)" in out
    assert re.search(r"object      p/\S+/seg-0000000001-0000000000000000\.log: delta, remote, \d+ bytes", out)
    dead = {**env, "CONCORDIA_REMOTE_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    r = cli(home, "doctor", env=dead, check=False)
    assert "unreachable: cannot reach bucket" in r.stdout and "remote" in one_error_line(r)


def test_uploads_racing_segment_rolls_only_ever_take_sealed_files(tmp_path, catalog_url, s3, bucket):
    """Tiny segments rolled by the flusher while the uploader seals and uploads every 10 ms: every remote
    object is byte for byte the sealed file, and another host restores the last epoch exactly. (An uploader
    that read the open segment's name before listing took a just-opened segment for a sealed one.)"""
    from concordia_agents._catalog._objects import objects
    from concordia_agents._store import file_sha256

    rt = _host(tmp_path, "a", catalog_url, bucket, s3.url, segment_bytes=16 << 10, max_record_bytes=4096,
               remote_interval=0.01, compact_bytes=0)
    try:
        s = rt.session("rolls", durability="remote")
        state = fresh()
        s.register("kv", state["kv"], kind="kv", seq_axis=1)
        s.register("scratch", state["scratch"], page_size=4096)
        for e in range(1, 301):
            mutate(state, 7, e)
            s.commit(meta={"epoch": e}, rows={"kv": (e - 1, e)})
        assert s.flush(level="remote", timeout=120) == 300
        rows = [o for o in objects(rt.catalog, "rolls") if o.state == "remote"]
        assert len(rows) > 50, "expected many rolled segments"
        for o in rows:
            local = rt.session_dir("rolls") / o.name
            assert (o.bytes, o.sha256) == (local.stat().st_size, file_sha256(local)), o.name
        s.close()
    finally:
        rt.close()
    b = _host(tmp_path, "b", catalog_url, bucket, s3.url)
    try:
        _assert_state(b.resume("rolls"), 7, 300)
    finally:
        b.close()


def test_a_host_with_an_older_copy_of_the_log_fetches_what_another_host_added(tmp_path, catalog_url, s3, bucket):
    """Host A uploads epochs 1..20 and closes; host B resumes from the bucket, commits 21..300 with compaction
    (a remote base image) and closes; host A, whose disk still holds its old files, resumes: it fetches B's
    newer objects instead of asking for a rollback, and restores epoch 300 exactly; so does a third host."""
    kw = {"segment_bytes": 256 << 10, "compact_bytes": 1 << 20, "remote_interval": 0.2}

    def run(name: str, first: int, last: int) -> None:
        rt = _host(tmp_path, name, catalog_url, bucket, s3.url, **kw)
        try:
            if first == 1:
                s = rt.session("moving", durability="remote")
                state = fresh()
                s.register("kv", state["kv"], kind="kv", seq_axis=1)
                s.register("scratch", state["scratch"], page_size=4096)
            else:
                s = rt.resume("moving")
                _assert_state(s, 7, first - 1)
                state = {n: s.regions[n].array for n in ("kv", "scratch")}
            for e in range(first, last + 1):
                mutate(state, 7, e)
                s.commit(meta={"epoch": e}, rows={"kv": (e - 1, e)})
            assert s.flush(level="remote", timeout=120) == last
            s.close()
        finally:
            rt.close()

    run("a", 1, 20)
    run("b", 21, 300)
    from concordia_agents._catalog import Catalog
    from concordia_agents._catalog._objects import objects

    cat = Catalog(catalog_url)
    try:
        assert any(o.kind == "base" and o.state == "remote" for o in objects(cat, "moving")), "B compacted"
    finally:
        cat.dispose()
    a = _host(tmp_path, "a", catalog_url, bucket, s3.url, **kw)
    try:
        s = a.resume("moving")  # no rollback: the bucket has what A lacks
        assert s.rollback is None
        _assert_state(s, 7, 300)
        s.close()
    finally:
        a.close()
    c = _host(tmp_path, "c", catalog_url, bucket, s3.url)
    try:
        _assert_state(c.resume("moving"), 7, 300)
    finally:
        c.close()
