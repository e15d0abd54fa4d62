"""The SQL catalog: engine setup, migrations, leases and durable progress.

SQLite (the default) is opened the way ``notes/sql.md`` measured to work with
several writer processes: autocommit at the driver, WAL, ``busy_timeout``, and
``BEGIN IMMEDIATE`` for every write transaction (a deferred BEGIN that reads
then writes fails with "database is locked" under contention). PostgreSQL is
used through ``postgresql+psycopg://`` with row locks (``FOR UPDATE``).

Every write made on behalf of a session owner names its fencing token and is
refused with ``OwnershipError`` if the lease row holds another token.

Size (over the project's ~500 lines): one class is the whole SQL surface, and
its transactions share the engine, the dialect switches and the lease-checking
helpers; the tables and migrations are already their own modules.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, bindparam, create_engine, delete, event, inspect, select, update
from sqlalchemy.engine import Connection, CursorResult, Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session as OrmSession

from .._owner import owner_is_dead
from ..errors import (
    CatalogError,
    CatalogNotFound,
    ConfigurationError,
    OwnershipError,
    SchemaVersionError,
    SessionKindError,
    SessionNotFound,
)
from ._migrations import MIGRATIONS, SCHEMA_VERSION
from ._models import (
    CatalogIdRow,
    DurabilityRow,
    EpochRow,
    LeaseRow,
    ObjectRow,
    RegionRow,
    SchemaVersionRow,
    SegmentRow,
    SessionRow,
    TombstoneRow,
)

__all__ = ["LEASE_ONLY", "Catalog", "PriorState", "SegmentInfo", "SessionInfo", "redact_url"]

#: label of a session made by ``Runtime.hold`` (a bare lease, e.g. a graph thread), which
#: ``Runtime.session`` refuses to give a region log ("kind": "graph" marks older ones)
LEASE_ONLY = "lease_only"


def redact_url(url: str) -> str:
    """``url`` with its password hidden; unparsable URLs are returned as they are."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return url


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    name: str
    token: int
    kind: str
    base_offset: int
    end_offset: int
    bytes: int
    sealed: bool


@dataclass(frozen=True, slots=True)
class PriorState:
    """What :meth:`Catalog.take` changed, so that a failed open can put it back."""

    closed_at: float | None
    backend: str
    released: bool = True
    had_lease: bool = False
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session as the catalog sees it; ``status`` is derived, never stored."""

    id: str
    status: str  #: "running", "crashed" (lease expired without close), "closed", "idle" or "new"
    backend: str
    created_at: float
    closed_at: float | None
    last_epoch: int  #: last epoch the flusher recorded as durable
    log_bytes: int
    owner: str | None
    token: int
    expires_at: float | None
    labels: dict[str, Any]

    @property
    def resumable(self) -> bool:
        return self.last_epoch > 0


def _live(lease: LeaseRow | None, now: float) -> bool:
    """A lease blocks others while unreleased, unexpired, and its owner is not
    known dead (a process on this machine that no longer exists)."""
    return lease is not None and not lease.released and lease.expires_at > now and not owner_is_dead(lease.owner)


def _status(row: SessionRow, lease: LeaseRow | None, now: float) -> str:
    if row.closed_at is not None:
        return "closed"
    if lease is None:
        return "new"
    if _live(lease, now):
        return "running"
    if not lease.released:
        return "crashed"
    return "idle"  # released without a close: the owner let go, nothing is lost


class Catalog:
    """One catalog database; thread-safe (a connection pool underneath).

    ``busy_timeout_s`` bounds how long a write waits for a lock another process
    holds: SQLite's single write lock (``busy_timeout``), PostgreSQL's row locks
    (``lock_timeout``); past it the write fails with a :class:`CatalogError`
    that says so, instead of hanging. A process frozen (SIGSTOP, a debugger)
    inside a write transaction keeps its locks while it lives. SQLite cannot take
    them back. PostgreSQL ends such a transaction after ``idle_tx_timeout_s``
    without a statement (``idle_in_transaction_session_timeout``): its locks
    are freed for the process that takes the session over, and the frozen one's
    next catalog call fails. Catalog transactions never idle that long by design
    (a few statements each, no I/O in between).
    """

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0, idle_tx_timeout_s: float = 10.0,
                 create: bool = True) -> None:
        """Open the catalog at ``url``, migrating it to ``SCHEMA_VERSION``.

        ``create=False`` is for callers that must not create anything (read-only
        commands, a home that already belongs to a catalog): a missing SQLite
        file or a PostgreSQL database without Concordia's tables raises
        :class:`CatalogNotFound` and leaves no file or table behind."""
        self.url = url
        self.busy_timeout_s = busy_timeout_s
        self.idle_tx_timeout_s = idle_tx_timeout_s
        try:
            parsed = make_url(url)
        except Exception as e:  # any kind: SQLAlchemy raises several
            raise ConfigurationError(f"catalog URL: expected an SQLAlchemy URL, found {url!r}", orig=e) from e
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ConfigurationError(f"catalog URL: expected a sqlite:// or postgresql+psycopg:// URL, found {url!r}")
        if "\0" in url:
            raise ConfigurationError("catalog URL: expected no NUL character, found one")
        try:
            if self.dialect == "sqlite":
                self._open_sqlite(parsed, url, create=create)
            else:
                self.engine = create_engine(url, pool_pre_ping=True, pool_recycle=1800, pool_size=5,
                                            max_overflow=5)
                self.configure_postgres(self.engine)
                self._read_engine = self.engine
        except ImportError as e:  # the dialect imports its driver here
            raise ConfigurationError(
                f"catalog URL {self._redacted()}: its database driver is not installed ({e}); for PostgreSQL "
                "install Concordia's postgres extra: pip install 'concordia-agents[postgres]' (from a checkout: "
                "pip install -e '.[postgres]')", orig=e) from e
        # Core, built once: this check runs in every fenced write (graph puts).
        lt = LeaseRow.__table__
        self._token_q = select(lt.c.token, lt.c.owner).where(lt.c.session_id == bindparam("sid"))
        if self.dialect == "postgresql":
            self._token_q = self._token_q.with_for_update()
        try:
            self._migrate_retrying(create=create)
        except BaseException:
            self.dispose()
            raise
        self._catalog_id: str | None = None

    def _open_sqlite(self, parsed: Any, url: str, *, create: bool) -> None:
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            path = Path(db)
            if not path.exists():
                if not create:
                    raise CatalogNotFound(f"expected a Concordia catalog at {self._redacted()}, found no file "
                                          f"{path}; nothing was created")
                path.parent.mkdir(parents=True, exist_ok=True)
                # Made here, private to the user: SQLite would create it with the umask's
                # mode, and makes its -wal and -shm files with the database file's mode.
                try:
                    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                except FileExistsError:
                    pass  # another process made it at the same moment (its migration and ours serialize)
        self.engine = self._sqlite_engine(url, immediate=True, busy_timeout_s=self.busy_timeout_s)
        self._read_engine = self._sqlite_engine(url, immediate=False, busy_timeout_s=self.busy_timeout_s)

    def configure_postgres(self, engine: Engine) -> None:
        """Give every new connection of ``engine`` (this catalog's, or another
        engine on the same database) the catalog's lock and idle timeouts."""
        lock_ms, idle_ms = max(1, int(self.busy_timeout_s * 1000)), max(1, int(self.idle_tx_timeout_s * 1000))

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # SET SESSION (committed): outlives the pool's rollbacks; set here and not in the
            # URL's `options`, which a user's URL may already use (search_path).
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET SESSION lock_timeout = {lock_ms}")
                cur.execute(f"SET SESSION idle_in_transaction_session_timeout = {idle_ms}")
            dbapi_conn.commit()

    @staticmethod
    def _sqlite_engine(url: str, *, immediate: bool, busy_timeout_s: float) -> Engine:
        engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    # -- transactions -------------------------------------------------------------

    def failure(self, what: str, e: StatementError) -> CatalogError:
        """The CatalogError for a driver error during a catalog ``what`` ("read", "write")."""
        found = " ".join(str(e.orig or e).split())  # one line: drivers break theirs with tabs and newlines
        # Lock failures a user can act on without a DBA: say who can hold a lock this long.
        if self.dialect == "sqlite" and "database is locked" in found:
            found += (f" (another process held the write lock past the {self.busy_timeout_s:g} s busy timeout;"
                      " a live process stopped or hung inside a catalog write keeps it until it continues"
                      " or dies; PostgreSQL catalogs have no single write lock)")
        elif self.dialect == "postgresql" and "lock timeout" in found:
            found += (f" (another process held a row lock this write needs past the {self.busy_timeout_s:g} s"
                      f" lock timeout; the server ends a transaction left idle for {self.idle_tx_timeout_s:g} s,"
                      " so a retry after that finds a frozen holder's locks free)")
        elif self.dialect == "postgresql" and "idle-in-transaction timeout" in found:
            found += (f" (this process sat inside a catalog transaction for more than {self.idle_tx_timeout_s:g} s"
                      " — stopped or hung — and the server ended it, freeing its locks for another owner)")
        return CatalogError(f"catalog {what} failed on {self._redacted()}: {found}", orig=e)

    @contextmanager
    def write(self) -> Iterator[OrmSession]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        try:
            with OrmSession(self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except IntegrityError:
            raise  # a constraint race the caller interprets (e.g. two creators of one session)
        except (OperationalError, DBAPIError) as e:
            raise self.failure("write", e) from e

    @contextmanager
    def write_core(self) -> Iterator[Connection]:
        """A write transaction on a Core connection: the same as :meth:`write`
        without the ORM's per-transaction overhead (hot paths: graph puts)."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except (OperationalError, DBAPIError) as e:
            raise self.failure("write", e) from e

    @contextmanager
    def read(self) -> Iterator[OrmSession]:
        try:
            with OrmSession(self._read_engine, expire_on_commit=False) as s, s.begin():
                yield s
        except (OperationalError, DBAPIError) as e:
            raise self.failure("read", e) from e

    def _redacted(self) -> str:
        return redact_url(self.url)

    @property
    def redacted_url(self) -> str:
        """The URL with its password hidden (for messages and markers)."""
        return self._redacted()

    def _lock_lease(self, s: OrmSession, session_id: str) -> LeaseRow | None:
        q = select(LeaseRow).where(LeaseRow.session_id == session_id)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        return s.scalars(q).first()

    # -- schema -------------------------------------------------------------------

    def _read_version(self) -> int | None:
        """The stored schema version; None where Concordia's tables do not exist."""
        with self.read() as s:
            if not inspect(s.connection()).has_table(SchemaVersionRow.__tablename__):
                return None
            row = s.get(SchemaVersionRow, 1)
            return row.version if row else 0

    def _refuse_newer(self, current: int) -> None:
        if current > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"catalog {self._redacted()} has schema version {current}; this Concordia understands "
                f"versions up to {SCHEMA_VERSION}. Upgrade Concordia (pip install -U concordia-agents).")

    def _migrate_retrying(self, *, create: bool) -> None:
        """``_migrate``, again after a SQLite "database is locked" that came at
        once: while another process creates the same new catalog file (turns it
        to WAL, makes its tables: the ranks of a torchrun job opening one home),
        SQLite answers a reader busy without waiting for its busy timeout. Up to
        the busy timeout in all; PostgreSQL never gets here."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                self._migrate(create=create)
                return
            except CatalogError as e:
                locked = self.dialect == "sqlite" and "database is locked" in str(e.orig or "")
                if not locked or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def _migrate(self, *, create: bool = True) -> None:
        # A read first: an up-to-date catalog (the usual case) is opened without a
        # write transaction, and a server that cannot be reached is reported as a
        # failed read.
        current = self._read_version()
        if current is None and not create:
            raise CatalogNotFound(f"expected a Concordia catalog at {self._redacted()}, found a database "
                                  "without Concordia's tables; nothing was created")
        if current is not None:
            self._refuse_newer(current)
            if current == SCHEMA_VERSION:
                return
        with self.write() as s:
            conn = s.connection()
            if self.dialect == "postgresql":
                # Serialize concurrent first-time migrations across processes.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(260623521)")
            if not inspect(conn).has_table(SchemaVersionRow.__tablename__):
                cast(Table, SchemaVersionRow.__table__).create(conn)
            row = s.get(SchemaVersionRow, 1)
            current = row.version if row else 0
            self._refuse_newer(current)
            for version in range(current, SCHEMA_VERSION):
                MIGRATIONS[version](conn)
            if row is None:
                s.add(SchemaVersionRow(id=1, version=SCHEMA_VERSION, updated_at=time.time()))
            elif current != SCHEMA_VERSION:
                row.version, row.updated_at = SCHEMA_VERSION, time.time()

    @property
    def catalog_id(self) -> str:
        """This catalog's identity (random, made once by migration 2)."""
        if self._catalog_id is None:
            with self.read() as s:
                row = s.get(CatalogIdRow, 1)
                if row is None:
                    raise CatalogError(f"catalog {self._redacted()} has no identity row (concordia_catalog_id)")
                self._catalog_id = row.catalog_id
        return self._catalog_id

    @property
    def schema_version(self) -> int:
        with self.read() as s:
            row = s.get(SchemaVersionRow, 1)
            return row.version if row else 0

    # -- sessions and leases -----------------------------------------------------

    def acquire(self, session_id: str, *, owner: str, ttl: float, backend: str, create: bool) -> tuple[int, bool]:
        """Take the session's lease; returns ``(token, created)``. See :meth:`take`."""
        token, created, _ = self.take(session_id, owner=owner, ttl=ttl, backend=backend, create=create)
        return token, created

    def take(self, session_id: str, *, owner: str, ttl: float, backend: str, create: bool,
             log: bool | None = None) -> tuple[int, bool, PriorState | None]:
        """Take the session's lease; returns ``(token, created, prior)``.

        Creates the session if ``create``; raises ``SessionNotFound`` otherwise.
        Raises ``OwnershipError`` while another owner's lease is live. ``prior``
        is what the rows held before (None for a new session), for
        :meth:`give_back` when the opening fails. ``log`` says what the caller
        opens: a region log (True) or a bare lease (False); a bare lease on a
        session that has a region log is refused (``OwnershipError`` is not the
        point there: ``SessionKindError`` naming both kinds)."""
        now = time.time()
        try:
            with self.write() as s:
                row = s.get(SessionRow, session_id)
                created = row is None
                prior: PriorState | None = None
                if created:
                    if not create:
                        raise SessionNotFound(session_id)
                    s.add(SessionRow(id=session_id, created_at=now, backend=backend, last_epoch=0,
                                     durable_offset=0, log_bytes=0, labels={}))
                    s.flush()
                else:
                    assert row is not None  # not created: the row exists
                    labels = row.labels or {}
                    if log is True and (labels.get(LEASE_ONLY) or labels.get("kind") == "graph"):
                        raise SessionKindError(
                            f"session {session_id!r} is a bare lease (a graph thread: labels {row.labels}); expected "
                            "a session with a region log: open its task sessions, or use a new session ID")
                    if log is False and row.last_epoch > 0 and s.scalar(
                            select(RegionRow.name).where(RegionRow.session_id == session_id).limit(1)) is not None:
                        raise SessionKindError(
                            f"session {session_id!r} holds a region log (epoch {row.last_epoch}, backend "
                            f"{row.backend!r}); expected a session without one (a graph thread): resume it with "
                            "Runtime.resume, not as a graph")
                    prior = PriorState(closed_at=row.closed_at, backend=row.backend)
                    row.closed_at = None
                    row.backend = backend
                lease = self._lock_lease(s, session_id)
                if lease is None:
                    s.add(LeaseRow(session_id=session_id, owner=owner, token=1, acquired_at=now,
                                   heartbeat_at=now, expires_at=now + ttl, released=False))
                    return 1, created, prior
                if _live(lease, now):
                    raise OwnershipError(
                        f"session {session_id!r}: expected no live owner, found {lease.owner} holding fencing "
                        f"token {lease.token} for another {lease.expires_at - now:.1f} s")
                if prior is not None:
                    prior = replace(prior, released=lease.released, had_lease=True, owner=lease.owner)
                lease.owner, lease.token = owner, lease.token + 1
                lease.acquired_at = lease.heartbeat_at = now
                lease.expires_at, lease.released = now + ttl, False
                return lease.token, created, prior
        except IntegrityError as e:  # another process created it between our read and insert
            raise OwnershipError(f"session {session_id!r}: another process created it concurrently", orig=e) from e

    def give_back(self, session_id: str, token: int, prior: PriorState | None) -> None:
        """Undo :meth:`take` after a failed open: the session's status is again
        what it was (closed, crashed, idle), with the lease free for anyone. The
        fencing token stays bumped (tokens never go back). A session that
        :meth:`take` created (``prior`` None) is left idle."""
        now = time.time()
        with self.write() as s:
            lease = self._lock_lease(s, session_id)
            if lease is None or lease.token != token:
                return  # a newer owner holds it: nothing of ours to give back
            row = s.get(SessionRow, session_id)
            if prior is None:
                lease.released, lease.expires_at = True, now
                return
            if row is not None:
                row.closed_at, row.backend = prior.closed_at, prior.backend
            # A crashed session (lease expired, never released) stays crashed:
            # expired now, not released, its dead owner named again (so that a
            # heartbeat of ours already in flight cannot extend it). Anyone may
            # take it at once.
            lease.released = prior.released if prior.had_lease else True
            if prior.had_lease and prior.owner is not None:
                lease.owner = prior.owner
            lease.expires_at = now

    def roll_back(self, session_id: str, token: int, *, epoch: int, offset: int, missing: list[str]) -> None:
        """Record that the owner holding ``token`` resumed the session at
        ``epoch`` (an explicit rollback to the newest intact epoch): the durable
        epoch goes back to it and rows of segment files that are gone are
        dropped, so that the next open does not report the same loss again."""
        with self.write() as s:
            self.check_token(s, session_id, token)
            row = s.get(SessionRow, session_id)
            if row is None:
                raise SessionNotFound(session_id)
            row.last_epoch, row.durable_offset = epoch, offset
            s.execute(delete(EpochRow).where(EpochRow.session_id == session_id, EpochRow.epoch > epoch))
            if missing:
                s.execute(delete(SegmentRow).where(SegmentRow.session_id == session_id,
                                                   SegmentRow.name.in_(missing)))

    def heartbeat(self, session_id: str, token: int, ttl: float, owner: str | None = None) -> bool:
        """Extend the lease; False if ``token`` (held by ``owner``, when given)
        is no longer the owner's, or was given back."""
        now = time.time()
        cond = [LeaseRow.session_id == session_id, LeaseRow.token == token, LeaseRow.released.is_(False)]
        if owner is not None:
            cond.append(LeaseRow.owner == owner)
        with self.write() as s:
            res = s.execute(update(LeaseRow).where(*cond).values(heartbeat_at=now, expires_at=now + ttl))
            return cast(CursorResult[Any], res).rowcount == 1

    def release(self, session_id: str, token: int, *, closed: bool) -> None:
        """Give the lease up. ``closed`` marks a clean close of the session."""
        with self.write() as s:
            lease = self._lock_lease(s, session_id)
            if lease is None or lease.token != token:
                return  # a newer owner holds it: nothing of ours to release
            lease.released = True
            lease.expires_at = time.time()
            if closed:
                row = s.get(SessionRow, session_id)
                if row is not None:
                    row.closed_at = time.time()

    def check_token(self, s: OrmSession | Connection, session_id: str, token: int) -> None:
        """Inside a write transaction (ORM session or Core connection): raise
        OwnershipError unless ``token`` is the session's current fencing token.
        On PostgreSQL the lease row stays locked until the transaction ends, so
        a takeover cannot slip between this check and the caller's writes."""
        lease = s.execute(self._token_q, {"sid": session_id}).first()
        if lease is None or lease.token != token:
            found = "no lease" if lease is None else f"token {lease.token} held by {lease.owner}"
            raise OwnershipError(
                f"session {session_id!r}: this process holds fencing token {token}, the catalog has {found}; "
                "a newer owner took over")

    def live_leases(self, s: OrmSession, session_ids: list[str]) -> list[tuple[str, str, int, float]]:
        """``(session_id, owner, token, expires_at)`` of each live lease among these sessions."""
        now = time.time()
        return [(lease.session_id, lease.owner, lease.token, lease.expires_at)
                for lease in s.scalars(select(LeaseRow).where(LeaseRow.session_id.in_(session_ids)))
                if _live(lease, now)]

    def get(self, session_id: str) -> SessionInfo:
        with self.read() as s:
            row = s.get(SessionRow, session_id)
            if row is None:
                raise SessionNotFound(session_id)
            return self._info(row, s.get(LeaseRow, session_id), time.time())

    def list(self, prefix: str | None = None) -> list[SessionInfo]:
        """All sessions (or those whose ID starts with ``prefix``), oldest first."""
        now = time.time()
        q = select(SessionRow).order_by(SessionRow.created_at)
        lq = select(LeaseRow)
        if prefix:
            q = q.where(SessionRow.id.startswith(prefix, autoescape=True))
            lq = lq.where(LeaseRow.session_id.startswith(prefix, autoescape=True))
        with self.read() as s:
            leases = {lease.session_id: lease for lease in s.scalars(lq)}
            return [self._info(r, leases.get(r.id), now) for r in s.scalars(q)]

    @staticmethod
    def _info(row: SessionRow, lease: LeaseRow | None, now: float) -> SessionInfo:
        return SessionInfo(
            id=row.id, status=_status(row, lease, now), backend=row.backend, created_at=row.created_at,
            closed_at=row.closed_at, last_epoch=row.last_epoch, log_bytes=row.log_bytes,
            owner=lease.owner if lease else None, token=lease.token if lease else 0,
            expires_at=lease.expires_at if lease else None, labels=dict(row.labels or {}))

    def delete(self, session_id: str, *, owner_token: int | None = None) -> None:
        """Remove a session's rows. Refused while another owner's lease is live."""
        now = time.time()
        with self.write() as s:
            row = s.get(SessionRow, session_id)
            if row is None:
                raise SessionNotFound(session_id)
            lease = self._lock_lease(s, session_id)
            if lease is not None and _live(lease, now) and lease.token != owner_token:
                raise OwnershipError(
                    f"session {session_id!r}: expected no live owner to delete it, found {lease.owner} "
                    f"(token {lease.token}, {lease.expires_at - now:.1f} s left)")
            for model in (SegmentRow, EpochRow, RegionRow, ObjectRow, DurabilityRow, LeaseRow):
                s.execute(delete(model).where(model.session_id == session_id))
            s.merge(TombstoneRow(session_id=session_id, created_at=row.created_at, deleted_at=now))
            s.delete(row)

    def tombstoned_ids(self) -> set[str]:
        """IDs of which some incarnation was deleted."""
        with self.read() as s:
            return set(s.scalars(select(TombstoneRow.session_id)))

    def deleted(self, session_id: str, created_at: float) -> bool:
        """Whether the incarnation of ``session_id`` created at ``created_at`` was deleted."""
        with self.read() as s:
            return s.get(TombstoneRow, (session_id, created_at)) is not None

    # -- regions and durable progress (owner writes, fenced) ----------------------

    def record_region(self, session_id: str, token: int, spec: Any, epoch: int) -> None:
        with self.write() as s:
            self.check_token(s, session_id, token)
            s.merge(RegionRow(
                session_id=session_id, name=spec.name, region_id=spec.region_id, kind=spec.kind,
                dtype=spec.dtype, shape=list(spec.shape), library=spec.library, device=spec.device,
                page_size=spec.page_size, seq_axis=spec.seq_axis, registered_epoch=epoch))

    def regions(self, session_id: str) -> builtins.list[RegionRow]:
        with self.read() as s:
            return list(s.scalars(select(RegionRow).where(RegionRow.session_id == session_id)
                                  .order_by(RegionRow.region_id)))

    def record_progress(
        self, session_id: str, token: int, *, epoch: int, offset: int, log_bytes: int,
        segments: builtins.list[SegmentInfo], removed: builtins.list[str] = (),  # type: ignore[assignment]
    ) -> None:
        """The flusher's batch: newest durable epoch, segment files, their sizes."""
        now = time.time()
        with self.write() as s:
            self.check_token(s, session_id, token)
            row = s.get(SessionRow, session_id)
            if row is None:
                raise SessionNotFound(session_id)
            if epoch > row.last_epoch:
                row.last_epoch = epoch
                s.merge(EpochRow(session_id=session_id, epoch=epoch, log_offset=offset, durable_at=now))
            row.durable_offset = max(row.durable_offset, offset)
            row.log_bytes = log_bytes
            for seg in segments:
                s.merge(SegmentRow(session_id=session_id, name=seg.name, token=seg.token, kind=seg.kind,
                                   base_offset=seg.base_offset, end_offset=seg.end_offset, bytes=seg.bytes,
                                   sealed=seg.sealed, created_at=now))
            for name in removed:
                s.execute(delete(SegmentRow).where(SegmentRow.session_id == session_id, SegmentRow.name == name))

    def prune_epochs(self, session_id: str, below: int) -> None:
        with self.write() as s:
            s.execute(delete(EpochRow).where(EpochRow.session_id == session_id, EpochRow.epoch < below))

    def segments(self, session_id: str) -> builtins.list[SegmentInfo]:
        with self.read() as s:
            rows = s.scalars(select(SegmentRow).where(SegmentRow.session_id == session_id)
                             .order_by(SegmentRow.base_offset))
            return [SegmentInfo(r.name, r.token, r.kind, r.base_offset, r.end_offset, r.bytes, r.sealed) for r in rows]

    def set_labels(self, session_id: str, token: int, labels: dict[str, Any]) -> None:
        with self.write() as s:
            self.check_token(s, session_id, token)
            row = s.get(SessionRow, session_id)
            if row is not None:
                row.labels = {**(row.labels or {}), **labels}

    def dispose(self) -> None:
        self.engine.dispose()
        if self._read_engine is not self.engine:
            self._read_engine.dispose()
