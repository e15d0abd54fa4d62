"""The SQL catalog on SQLite and PostgreSQL: schema versions, leases, fencing."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import select, update

from concordia_agents import SCHEMA_VERSION, CatalogError, ConfigurationError, OwnershipError, SchemaVersionError
from concordia_agents._catalog import Catalog
from concordia_agents._catalog._models import LeaseRow, SchemaVersionRow, SessionRow


def test_fresh_catalog_is_at_the_code_version(catalog_url):
    """A new catalog is migrated to SCHEMA_VERSION; opening it again changes nothing."""
    assert Catalog(catalog_url).schema_version == SCHEMA_VERSION
    assert Catalog(catalog_url).schema_version == SCHEMA_VERSION


def test_a_version_2_catalog_is_upgraded_in_place_and_keeps_its_sessions(catalog_url):
    """A catalog made by the version-2 code (before remote storage) gets the migration-3 tables when a newer
    Concordia opens it; its sessions and leases are still there, and its schema equals a fresh catalog's."""
    from sqlalchemy import create_engine, inspect

    from concordia_agents._catalog._migrations import MIGRATIONS
    from concordia_agents._catalog._objects import durability, set_level

    eng = create_engine(catalog_url)
    with eng.begin() as conn:
        for m in MIGRATIONS[:2]:
            m(conn)
        SchemaVersionRow.__table__.create(conn)  # type: ignore[attr-defined]
        conn.execute(SchemaVersionRow.__table__.insert().values(id=1, version=2, updated_at=0.0))  # type: ignore[attr-defined]
        assert not inspect(conn).has_table("concordia_objects")
    cat = Catalog(catalog_url)
    token, created = cat.acquire("old", owner="o", ttl=30, backend="host", create=True)
    assert created and cat.schema_version == SCHEMA_VERSION == 3
    set_level(cat, "old", token, "disk")
    assert durability(cat, "old").level == "disk"  # type: ignore[union-attr]
    with eng.connect() as conn:
        cols = {t: sorted(c["name"] for c in inspect(conn).get_columns(t))
                for t in ("concordia_objects", "concordia_durability")}
    assert cols["concordia_durability"] == ["level", "remote_at", "remote_epoch", "remote_offset", "session_id"]
    assert "sha256" in cols["concordia_objects"] and "state" in cols["concordia_objects"]
    eng.dispose()
    cat.dispose()


def test_newer_catalog_is_refused(catalog_url):
    """A catalog written by a newer Concordia raises SchemaVersionError naming both versions."""
    cat = Catalog(catalog_url)
    with cat.write() as s:
        s.execute(update(SchemaVersionRow).values(version=SCHEMA_VERSION + 1))
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}.*up to {SCHEMA_VERSION}"):
        Catalog(catalog_url)


def test_bad_urls_are_configuration_errors(tmp_path):
    """An unsupported or malformed catalog URL raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match="sqlite:// or postgresql"):
        Catalog("mysql://x@y/z")
    with pytest.raises(ConfigurationError, match="SQLAlchemy URL"):
        Catalog("not a url")


def test_unreachable_postgres_is_a_catalog_error():
    """A PostgreSQL server that does not answer raises CatalogError, not a driver exception; opening
    the catalog reads first, so the message says a read failed, on one line."""
    with pytest.raises(CatalogError, match="catalog read failed") as e:
        Catalog("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert "\n" not in str(e.value) and "\t" not in str(e.value)


def test_read_only_open_creates_nothing(tmp_path, pg_url):
    """Catalog(create=False) on a missing SQLite file or a PostgreSQL database without Concordia's
    tables raises CatalogNotFound and creates no file, directory or table."""
    from sqlalchemy import create_engine, inspect

    from concordia_agents import CatalogNotFound

    missing = tmp_path / "nowhere" / "catalog.db"
    with pytest.raises(CatalogNotFound, match="found no file"):
        Catalog(f"sqlite:///{missing}", create=False)
    assert not missing.parent.exists()
    with pytest.raises(CatalogNotFound, match="without Concordia's tables"):
        Catalog(pg_url, create=False)
    eng = create_engine(pg_url)
    with eng.connect() as c:
        assert inspect(c).get_table_names() == []
    eng.dispose()
    Catalog(pg_url).dispose()  # made by a writer
    Catalog(pg_url, create=False).dispose()  # then found


def test_new_sqlite_catalog_is_private(tmp_path):
    """A catalog file Concordia creates is readable by its user only (0600), whatever the umask."""
    old = os.umask(0)
    try:
        Catalog(f"sqlite:///{tmp_path / 'c.db'}").dispose()
    finally:
        os.umask(old)
    assert (tmp_path / "c.db").stat().st_mode & 0o777 == 0o600


def test_postgres_url_without_its_driver_names_the_extra(tmp_path):
    """A postgresql+psycopg:// URL where psycopg cannot be imported raises ConfigurationError naming
    the extra to install, not ModuleNotFoundError."""
    code = ("import sys; sys.modules['psycopg'] = None\n"
            "from concordia_agents._catalog import Catalog\n"
            "from concordia_agents import ConfigurationError\n"
            "try:\n    Catalog('postgresql+psycopg://u@127.0.0.1:5432/x')\n"
            "except ConfigurationError as e:\n    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR") and "[postgres]" in r.stdout, r.stdout


def test_a_held_sqlite_write_lock_is_a_catalog_error_that_says_so(tmp_path):
    """A write that cannot get SQLite's write lock within the busy timeout (another process holds it)
    raises CatalogError naming the lock and the timeout; the catalog's data is untouched."""
    import sqlite3

    path = tmp_path / "c.db"
    cat = Catalog(f"sqlite:///{path}", busy_timeout_s=0.2)
    cat.acquire("s", owner="a", ttl=5, backend="host", create=True)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        with pytest.raises(CatalogError, match=r"database is locked.*held the write lock past the 0.2 s"):
            cat.set_labels("s", 1, {"x": 1})
        assert 0.15 < time.monotonic() - t0 < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert cat.get("s").labels == {}
    cat.set_labels("s", 1, {"x": 1})  # the lock is free again: the same write lands
    assert cat.get("s").labels == {"x": 1}


@pytest.mark.postgres
def test_a_held_postgres_row_lock_is_a_bounded_wait_that_says_so(pg_url):
    """A write that waits for a row lock another connection holds fails after the catalog's lock
    timeout with a CatalogError that names it (it used to wait forever); once the lock is free the
    same write lands."""
    from sqlalchemy import create_engine, text

    cat = Catalog(pg_url, busy_timeout_s=0.3)
    cat.acquire("s", owner="a", ttl=5, backend="host", create=True)
    holder = create_engine(pg_url).connect()
    tx = holder.begin()
    holder.execute(text("SELECT 1 FROM concordia_leases WHERE session_id = 's' FOR UPDATE")).all()
    try:
        t0 = time.monotonic()
        with pytest.raises(CatalogError, match=r"(?s)lock timeout.*row lock this write needs past the 0.3 s"):
            cat.set_labels("s", 1, {"x": 1})
        assert 0.25 < time.monotonic() - t0 < 5
    finally:
        tx.rollback()
        holder.close()
    cat.set_labels("s", 1, {"x": 1})
    assert cat.get("s").labels == {"x": 1}


@pytest.mark.postgres
def test_postgres_ends_a_frozen_catalog_transaction_and_frees_its_locks(pg_url):
    """A transaction left idle (its process frozen inside it) is ended by the server after the
    catalog's idle timeout: another process's write that waited on its row lock lands, and the
    frozen one's commit fails with a CatalogError that says why; its write is not in the catalog."""
    import threading

    frozen = Catalog(pg_url, idle_tx_timeout_s=0.5)
    frozen.acquire("s", owner="a", ttl=5, backend="host", create=True)
    other = Catalog(pg_url, busy_timeout_s=10)
    waited: dict = {}

    def write_meanwhile() -> None:
        time.sleep(0.1)
        t0 = time.monotonic()
        other.set_labels("s", 1, {"by": "other"})
        waited["s"] = time.monotonic() - t0

    t = threading.Thread(target=write_meanwhile)
    with pytest.raises(CatalogError, match=r"(?s)idle-in-transaction timeout.*for more than 0.5 s"):
        with frozen.write() as s:
            s.execute(select(LeaseRow).where(LeaseRow.session_id == "s").with_for_update()).all()
            s.execute(update(SessionRow).where(SessionRow.id == "s").values(labels={"by": "frozen"}))
            t.start()
            time.sleep(1.5)  # frozen between two statements of its transaction
    t.join(timeout=10)
    assert waited and 0.2 < waited["s"] < 1.4, waited  # freed at ~0.5 s, not at the end of the sleep
    assert other.get("s").labels == {"by": "other"}


def test_lease_tokens_grow_and_fence(catalog_url):
    """Each acquisition bumps the token; heartbeats by an old token fail; writes are fenced."""
    cat = Catalog(catalog_url)
    t1, created = cat.acquire("s", owner="a", ttl=0.2, backend="host", create=True)
    assert (t1, created) == (1, True)
    with pytest.raises(OwnershipError, match=r"held by|holding"):
        cat.acquire("s", owner="b", ttl=0.2, backend="host", create=True)
    time.sleep(0.25)
    t2, created = cat.acquire("s", owner="b", ttl=5, backend="host", create=True)
    assert (t2, created) == (2, False)
    assert not cat.heartbeat("s", t1, 5)
    assert cat.heartbeat("s", t2, 5)
    with pytest.raises(OwnershipError, match="token 1"):
        cat.set_labels("s", t1, {"x": 1})
    cat.set_labels("s", t2, {"x": 1})
    assert cat.get("s").labels == {"x": 1}


def _race(url: str, start: float, q) -> None:  # type: ignore[no-untyped-def]
    cat = Catalog(url)
    while time.time() < start:
        time.sleep(0.001)
    try:
        token, _ = cat.acquire("contended", owner=f"p{mp.current_process().pid}", ttl=30, backend="host", create=True)
        q.put(("won", token))
    except OwnershipError:
        q.put(("lost", 0))


def test_concurrent_acquire_has_one_winner(catalog_url):
    """Six processes racing to create and own one session: exactly one wins."""
    Catalog(catalog_url)  # migrate once up front
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = time.time() + 2.0
    procs = [ctx.Process(target=_race, args=(catalog_url, start, q)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sorted(r[0] for r in results) == ["lost"] * 5 + ["won"]
    assert [r[1] for r in results if r[0] == "won"] == [1]


def test_dead_owner_on_this_machine_is_recognized_and_foreign_ones_are_not():
    """An owner ID of an exited process on this machine is dead; a live one, ours, one from another
    machine or a malformed one are not (the check only ever errs towards 'alive')."""
    import subprocess
    import sys

    from concordia_agents._owner import machine_id, new_owner_id, owner_is_dead

    code = "from concordia_agents._owner import new_owner_id; print(new_owner_id())"
    gone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert owner_is_dead(gone)
    live = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(30)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert not owner_is_dead(live.stdout.readline().strip())
    finally:
        live.kill()
        live.wait()
    assert not owner_is_dead(new_owner_id())
    host, pid, nonce = gone.split("@")[0].split(":")
    assert not owner_is_dead(f"{host}:{pid}:{nonce}@0000000000000000.1")  # another machine
    assert not owner_is_dead(f"{host}:{pid}:{nonce}")  # old-style ID without a machine
    assert not owner_is_dead("garbage") and machine_id()
