"""Shared fixtures.

* ``catalog_url`` runs a test against every catalog available: SQLite always,
  PostgreSQL when ``CONCORDIA_TEST_POSTGRES_URL`` is set (each test gets its own
  schema, dropped afterwards). CI sets it, so Postgres tests run for real there.
* ``backend`` runs a host-only test against every usable backend that serves host
  memory; a test that needs more asks for a capability, never a backend name. The
  tests every backend runs, in the memory it serves, are the conformance suite
  (``tests/conformance``: its ``substrate`` fixture, and ``backend`` overridden there).
* ``make_runtime`` opens runtimes of the test's ``backend`` on one home and catalog.
"""

from __future__ import annotations

import glob
import hashlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gpu_runtime.backend import BACKENDS as REGISTERED
from gpu_runtime.backend import Capability, backend_class, open_backend
from gpu_runtime.errors import BackendUnavailableError

PG_URL = os.environ.get("CONCORDIA_TEST_POSTGRES_URL")


def _backends() -> list[str]:
    """The registered backends that open here (the CuPy backend only with a usable GPU)."""
    names = []
    for name in REGISTERED:
        try:
            open_backend(name).close()
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


BACKENDS = _backends()


def with_capability(capability: Capability) -> list[str]:
    """The usable backends that have ``capability``."""
    return [name for name in BACKENDS if capability in backend_class(name).capabilities]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if with_capability(Capability.DEVICE_MEMORY):
        return
    skip = pytest.mark.skip(reason="no usable CUDA GPU with CuPy on this machine (GPU tests run on the H100)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=with_capability(Capability.HOST_MEMORY))
def backend(request: pytest.FixtureRequest) -> str:
    """Every usable backend that serves host memory, for host-only tests (they register
    NumPy arrays or CPU torch tensors); backends without HOST_MEMORY are not
    parametrized. tests/conformance overrides this fixture with its substrate's backend."""
    return request.param


def _pg_schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL catalog URL in a fresh schema (skips without a server)."""
    if not PG_URL:
        pytest.skip("CONCORDIA_TEST_POSTGRES_URL is not set: no PostgreSQL to test against")
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    eng = create_engine(PG_URL)
    with eng.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield _pg_schema_url(PG_URL, schema)
    finally:
        with eng.begin() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return request.getfixturevalue("pg_url")


def remove_rings(home: Path) -> None:
    """Remove the rings a home left in /dev/shm (a session not closed keeps its ring)."""
    tag = hashlib.blake2b(str(home.resolve()).encode(), digest_size=4).hexdigest()
    for p in glob.glob(f"/dev/shm/concordia-{tag}-*"):
        os.unlink(p)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A Concordia home; rings it leaves in /dev/shm are removed afterwards."""
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    yield h
    remove_rings(h)


@pytest.fixture
def make_runtime(home: Path, catalog_url: str, backend: str):  # type: ignore[no-untyped-def]
    """Open runtimes on one home and catalog (closed at teardown)."""
    from concordia_agents import Runtime

    opened: list[Runtime] = []

    def make(**options):  # type: ignore[no-untyped-def]
        options.setdefault("backend", backend)
        rt = Runtime.open(home=home, catalog_url=catalog_url, **options)
        opened.append(rt)
        return rt

    yield make
    for rt in opened:
        rt.close()


def expire_lease(catalog_url: str, session_id: str) -> None:
    """Make a session's lease look expired, as if its owner died ttl ago."""
    from sqlalchemy import update

    from concordia_agents._catalog import Catalog
    from concordia_agents._catalog._models import LeaseRow

    cat = Catalog(catalog_url)
    with cat.write() as s:
        s.execute(update(LeaseRow).where(LeaseRow.session_id == session_id).values(expires_at=0.0))
    cat.dispose()


@contextmanager
def failing_reservation(writer: Any, nth: int, error: BaseException) -> Iterator[list[int]]:
    """Make ``writer``'s ``nth`` reservation from now raise ``error`` (as when the flusher stops while a
    commit waits for ring space); yields the sizes asked for. The writer is restored afterwards."""
    real, calls = writer.reserve, []

    def reserve(size: int) -> int:
        calls.append(size)
        if len(calls) == nth:
            raise error
        return real(size)

    writer.reserve = reserve
    try:
        yield calls
    finally:
        writer.reserve = real


def needs(capability: Capability, backend_name: str) -> None:
    """Skip unless the backend has ``capability`` (decided by capability, never by name)."""
    if capability not in backend_class(backend_name).capabilities:
        pytest.skip(f"backend {backend_name!r} lacks capability {capability.value!r} that this test needs")


def _catalog_write_lock_is_free(catalog: str) -> bool:
    """Whether a write transaction could start now without waiting: SQLite's one write lock, or on
    PostgreSQL the lease rows a resumer locks."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    if catalog.startswith("sqlite:///"):
        import sqlite3

        c = sqlite3.connect(catalog.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
        try:
            c.execute("BEGIN IMMEDIATE")
            c.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            c.close()
    eng = create_engine(catalog)
    try:
        with eng.begin() as c:
            c.execute(text("SELECT 1 FROM concordia_leases FOR UPDATE NOWAIT")).all()
        return True
    except OperationalError:
        return False
    finally:
        eng.dispose()


def _all_threads_stopped(pid: int) -> bool:
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            pass  # a thread that just ended
    return bool(states) and all(st in ("T", "t") for st in states)


def freeze_between_catalog_writes(pid: int, catalog: str) -> None:
    """SIGSTOP ``pid`` at a moment it is not inside a catalog write transaction.

    A process frozen inside one keeps SQLite's write lock (or PostgreSQL's row locks) while it
    lives, and no lease expiry can free it (Catalog's docstring; the error test in test_catalog).
    The tests that use this are about the other case: an owner frozen between writes (its
    heartbeat and flusher threads included), whose lease must expire."""
    for _ in range(500):
        os.kill(pid, signal.SIGSTOP)
        while not _all_threads_stopped(pid):
            time.sleep(0.001)  # SIGSTOP is delivered asynchronously, thread by thread
        if _catalog_write_lock_is_free(catalog):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.003)
    raise AssertionError(f"process {pid} was inside a catalog write at 500 tries to freeze it")
