"""Checkpointer fixtures for LangGraph's own test suite, extended with ConcordiaSaver.

Imported at the end of the upstream ``tests/conftest.py`` (the harness,
``tests/test_langgraph_upstream.py``, appends the import), so these two
fixtures replace upstream's ``sync_checkpointer`` and ``async_checkpointer``;
every other fixture and every test body is LangGraph's, unchanged.

Parameters (``CONCORDIA_UPSTREAM_CHECKPOINTERS``, a comma list set by the
harness, picks which of them run):

* ``memory``, ``sqlite`` / ``sqlite_aio`` — LangGraph's InMemorySaver (its
  test subclass) and SqliteSaver / AsyncSqliteSaver, built by upstream's own
  ``conftest_checkpointer`` helpers: the baselines.
* ``postgres`` / ``postgres_aio`` — LangGraph's PostgresSaver /
  AsyncPostgresSaver, each test in a fresh schema of the database at
  ``CONCORDIA_TEST_POSTGRES_URL`` (upstream makes a fresh database on a Docker
  server at localhost:5442; a schema is the same isolation on the server CI has).
* ``concordia_sqlite`` / ``concordia_postgres`` — ConcordiaSaver on a fresh
  SQLite catalog file / a fresh PostgreSQL schema, with its own runtime (host
  backend), for both the sync and the async fixture (one class does both).

Names here never touch ``uuid.uuid4``: upstream's ``deterministic_uuids``
fixture patches it, and a fixture drawing from it would shift the IDs a test
expects.
"""

from __future__ import annotations

import glob
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver

from tests.conftest_checkpointer import (  # upstream's baselines, as upstream builds them
    _apply_strict_msgpack,
    _checkpointer_memory,
    _checkpointer_sqlite,
    _checkpointer_sqlite_aio,
)

PG_URL = os.environ.get("CONCORDIA_TEST_POSTGRES_URL")
SYNC = ["memory", "sqlite", "postgres", "concordia_sqlite", "concordia_postgres"]
ASYNC = ["memory", "sqlite_aio", "postgres_aio", "concordia_sqlite", "concordia_postgres"]


def _chosen(names: list[str]) -> list[str]:
    wanted = [n for n in os.environ.get("CONCORDIA_UPSTREAM_CHECKPOINTERS", "").split(",") if n]
    unknown = set(wanted) - set(SYNC) - set(ASYNC)
    if not wanted or unknown:
        raise RuntimeError(f"CONCORDIA_UPSTREAM_CHECKPOINTERS: expected a comma list of {sorted(set(SYNC + ASYNC))}, "
                           f"found {os.environ.get('CONCORDIA_UPSTREAM_CHECKPOINTERS')!r}")
    return [n for n in names if n in wanted]


@contextmanager
def _pg_schema() -> Iterator[str]:
    """A fresh schema on the test server (dropped afterwards); yields its name."""
    if not PG_URL:
        pytest.skip("CONCORDIA_TEST_POSTGRES_URL is not set: no PostgreSQL to test against")
    from sqlalchemy import create_engine, text

    schema = f"lgup_{secrets.token_hex(6)}"
    admin = create_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with admin.begin() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _scoped(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@contextmanager
def _checkpointer_postgres() -> Iterator[BaseCheckpointSaver]:
    from langgraph.checkpoint.postgres import PostgresSaver

    with _pg_schema() as schema:
        libpq = _scoped(PG_URL.replace("postgresql+psycopg://", "postgresql://"), schema)  # type: ignore[union-attr]
        with PostgresSaver.from_conn_string(libpq) as saver:
            saver.setup()
            _apply_strict_msgpack(saver)
            yield saver


@asynccontextmanager
async def _checkpointer_postgres_aio() -> AsyncIterator[BaseCheckpointSaver]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    with _pg_schema() as schema:
        libpq = _scoped(PG_URL.replace("postgresql+psycopg://", "postgresql://"), schema)  # type: ignore[union-attr]
        async with AsyncPostgresSaver.from_conn_string(libpq) as saver:
            await saver.setup()
            _apply_strict_msgpack(saver)
            yield saver


@contextmanager
def _concordia(catalog: str) -> Iterator[BaseCheckpointSaver]:
    """ConcordiaSaver with its own runtime on a fresh catalog; closed (leases let
    go) and removed afterwards."""
    from integrations.langgraph import ConcordiaSaver

    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="lgup-"))
        stack.callback(_remove_home, tmp)
        if catalog == "sqlite":
            url = f"sqlite:///{tmp / 'catalog.db'}"
        else:
            url = _scoped(PG_URL or "", stack.enter_context(_pg_schema()))
        saver = ConcordiaSaver.from_conn_string(url, home=str(tmp / "home"))
        stack.callback(saver.close)
        _apply_strict_msgpack(saver)
        yield saver


def _remove_home(tmp: Path) -> None:
    """The temporary catalog and home, and any ring the runtime left in /dev/shm."""
    tag = hashlib.blake2b(str((tmp / "home").resolve()).encode(), digest_size=4).hexdigest()
    shutil.rmtree(tmp, ignore_errors=True)
    for p in glob.glob(f"/dev/shm/concordia-{tag}-*"):
        os.unlink(p)


@pytest.fixture(scope="function", params=_chosen(SYNC))
def sync_checkpointer(request: pytest.FixtureRequest) -> Iterator[BaseCheckpointSaver]:
    name = request.param
    make = {"memory": _checkpointer_memory, "sqlite": _checkpointer_sqlite, "postgres": _checkpointer_postgres,
            "concordia_sqlite": lambda: _concordia("sqlite"), "concordia_postgres": lambda: _concordia("postgres")}
    with make[name]() as checkpointer:
        yield checkpointer


@pytest.fixture(scope="function", params=_chosen(ASYNC))
async def async_checkpointer(request: pytest.FixtureRequest) -> AsyncIterator[BaseCheckpointSaver]:
    name = request.param
    if name == "memory":
        with _checkpointer_memory() as checkpointer:
            yield checkpointer
    elif name == "sqlite_aio":
        async with _checkpointer_sqlite_aio() as checkpointer:
            yield checkpointer
    elif name == "postgres_aio":
        async with _checkpointer_postgres_aio() as checkpointer:
            yield checkpointer
    else:
        with _concordia(name.removeprefix("concordia_")) as checkpointer:
            yield checkpointer
