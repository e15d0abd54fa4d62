"""The Runtime: one per process and home; owns the backend, the catalog, the
flusher thread and the lease heartbeat thread.

Call protocol::

    rt = Runtime.open()              # home, catalog, backend ("auto")
    s = rt.session("chat-42")        # create or open; takes the lease
    s.register(...); s.commit(...)   # see Session
    rt.resume("chat-42")             # after a crash, in any process
    lease = rt.hold("thread-7")      # a lease without a region log (graph threads)
    rt.let_go(lease)
    rt.sessions(); rt.delete(id); rt.gc(dry_run=True)
    rt.close()                       # closes open sessions cleanly

Opening binds the home to its catalog (``_home``): a home opened with another
catalog raises ``CatalogMismatchError`` before anything is read or deleted.
``Runtime.open(create=False)`` (read-only commands) creates no home, catalog
or marker: a missing one raises ``HomeNotFound`` / ``CatalogNotFound``.

A failed open or resume leaves the session as it was found: status, ring,
segments (``Catalog.give_back``, ``Session.cancel``).

Threads: the *flusher* copies every open session's ring into segments (woken
by each commit, else every ``flush_poll`` seconds); the *heartbeat* extends
every held lease every ``lease_ttl / 3`` seconds and fences a session whose
lease was taken over.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Self

from sqlalchemy.engine import make_url

from gpu_runtime import set_kernel_cache_dir
from gpu_runtime.backend import Backend, open_backend
from gpu_runtime.records import session_tag

from ._catalog import LEASE_ONLY, Catalog, SessionInfo, redact_url
from ._catalog._objects import durability as durability_of
from ._catalog._objects import objects as objects_of
from ._catalog._objects import roll_back_remote, set_level
from ._gc import GcContext, GcItem, GcReport, collect
from ._gc_remote import collect_remote
from ._home import (
    bind_catalog,
    catalog_missing,
    prepare_home,
    read_home_marker,
)
from ._lease import Lease
from ._log import (
    LogCheck,
    SessionLog,
    check_log,
    ring_path,
    session_dir_name,
)
from ._logging import configure_logging, get_logger
from ._names import TASK_SEP, check_session_id
from ._owner import new_owner_id
from ._remote_session import abandon_remote, choose_level, delete_remote, store_may_lag
from ._services import SessionServices
from ._session import Session
from ._store import open_store
from ._upload_worker import UploadWorker
from ._uploader import Uploader
from ._warm_rings import WarmRings
from .config import RuntimeConfig
from .errors import (
    CatalogMismatchError,
    CatalogNotFound,
    ConcordiaError,
    CorruptLogError,
    LogFullError,
    OwnershipError,
)

__all__ = ["GcItem", "GcReport", "Runtime"]

#: the flusher thread's longest sleep between backend polls (``_flush_loop``)
_BACKEND_POLL_S = 0.01


class _Open(NamedTuple):
    """A session open in this runtime and its log (which the flusher and the
    heartbeat walk; the Session keeps its own reference, private to it)."""

    session: Session
    log: SessionLog


def _new_sqlite_file(url: str) -> Path | None:
    """The SQLite file of ``url`` if it does not exist yet (opening will make it)."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - the catalog reports a bad URL
        return None
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    path = Path(db)
    return None if path.exists() else path


class Runtime:
    def __init__(self, config: RuntimeConfig, *, backend: Backend | None = None, create: bool = True) -> None:
        self.config = config
        configure_logging(format=config.log_format, level=config.log_level)
        self.log = get_logger()
        prepare_home(config.home, create=create)
        marker = read_home_marker(config.home)
        fresh = _new_sqlite_file(config.catalog_url)
        try:
            # A home with a marker already has its catalog: never make a new, empty one for it.
            self.catalog = Catalog(config.catalog_url, create=create and marker is None)
        except CatalogNotFound as e:
            if marker is not None:
                raise catalog_missing(config.home, marker, redact_url(config.catalog_url), e) from e
            raise
        try:
            bind_catalog(config.home, self.catalog, marker, write=create)
            set_kernel_cache_dir(config.home / "kernel-cache")  # process-wide, content-addressed (compiler.py)
            self.backend = backend or open_backend(config.backend, **config.backend_options)
        except BaseException as e:
            self.catalog.dispose()
            if fresh is not None and isinstance(e, CatalogMismatchError):
                for suffix in ("", "-wal", "-shm"):  # the catalog this open made for the wrong home goes again
                    Path(f"{fresh}{suffix}").unlink(missing_ok=True)
            raise
        self.owner = new_owner_id()
        self._sessions: dict[str, _Open] = {}
        self._leases: dict[str, Lease] = {}
        #: rings of sessions ended in this process, kept mapped (and registered) for their next open
        self._warm = WarmRings(config.warm_ring_bytes)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="concordia-flusher", daemon=True)
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="concordia-heartbeat", daemon=True)
        self._uploader: Uploader | None = None
        if config.remote is not None:
            try:
                self._uploader = Uploader(
                    open_store(config.remote, endpoint_url=config.remote_endpoint, **config.remote_options),
                    UploadWorker(config.remote, config.remote_endpoint, config.remote_options), self.catalog, config)
            except BaseException:
                self.backend.close()
                self.catalog.dispose()
                raise
            self._uploader.start()
        self._flusher.start()
        self._heartbeat.start()
        # All a Session sees of this runtime (``_services``): Session never calls the Runtime.
        up = self._uploader
        self._services = SessionServices(backend=self.backend, catalog=self.catalog, detach=self._forget,
                                         release=self._release, give_back=self._give_back,
                                         wait_remote=up.wait_remote if up else None,
                                         remote_status=up.status if up else None)
        self._finalizer = weakref.finalize(self, Runtime._shutdown_threads, self._stop, self._wake)
        self.log.info("runtime opened", home=str(config.home), backend=self.backend.name,
                      catalog=self.catalog._redacted())

    @classmethod
    def open(
        cls, home: str | os.PathLike[str] | None = None, catalog_url: str | None = None,
        backend: str | None = None, *, create: bool = True, **options: Any,
    ) -> Runtime:
        """Open a runtime; arguments override environment variables (see README).
        ``create=False`` creates no home, catalog or marker (read-only use)."""
        return cls(RuntimeConfig.from_env(home=home, catalog_url=catalog_url, backend=backend, **options),
                   create=create)

    # -- sessions ---------------------------------------------------------------

    def session_dir(self, session_id: str) -> Path:
        return self.config.home / "sessions" / session_dir_name(session_id, session_tag(session_id))

    def session(self, session_id: str, *, create: bool = True, allow_rollback: bool = False,
                durability: str | None = None) -> Session:
        """Create or open a session and take its lease (OwnershipError if another
        live process holds it). An existing session's log is recovered, not yet
        restored: ``register``/``restore`` bring regions back.

        A log that holds less than the catalog recorded as durable (a segment
        file lost, a damaged record) raises ``CorruptLogError`` naming what is
        missing, and the session is left as it was. ``allow_rollback=True``
        opens it at the newest intact epoch instead, verifying every record;
        ``session.rollback`` then says what was given up.

        ``durability``: ``"local"`` (the host ring: survives the process),
        ``"disk"`` (fsynced segments: survives the machine's power) or
        ``"remote"`` (uploaded to the runtime's object store: survives the
        host). None keeps the session's recorded level, or for a new session
        the configured default. On a host with no local file of a session
        whose objects are remote, the open fetches them first (see
        ``_uploader``); what only the lost host had fsynced is missing then,
        and the open asks for ``allow_rollback`` as for any lost segment."""
        self._check_id(session_id)
        recorded = durability_of(self.catalog, session_id)
        level = choose_level(session_id, durability, recorded, self.config.default_level,
                             has_remote=self._uploader is not None)
        token, created, prior = self.catalog.take(session_id, owner=self.owner, ttl=self.config.lease_ttl,
                                                  backend=self.backend.name, create=create, log=True)
        tag = session_tag(session_id)
        slog: SessionLog | None = None
        try:
            slog, index = SessionLog.open(session_id=session_id, tag=tag, token=token,
                                          directory=self.session_dir(session_id), config=self.config,
                                          catalog=self.catalog, allow_rollback=allow_rollback, created=created,
                                          fetch=self._uploader.fetch if self._uploader else None,
                                          warm=self._warm)
            self.backend.prepare_ring(slog.ring)  # its first commit page-locks it otherwise
            slog.level = level
            remote_epoch, remote_offset = (recorded.remote_epoch, recorded.remote_offset) if recorded else (0, 0)
            if slog.rollback is not None:
                abandon_remote(self.catalog, session_id, token, slog.rollback, index, self.log)
                if index.epoch < remote_epoch:
                    roll_back_remote(self.catalog, session_id, token, epoch=index.epoch, offset=index.end)
                    remote_epoch, remote_offset = index.epoch, index.end
            if recorded is None or recorded.level != level:
                set_level(self.catalog, session_id, token, level)
        except CorruptLogError as e:
            if slog is not None:
                slog.cancel()
            self._give_back(session_id, token, prior)
            if recorded is not None and recorded.level == "remote" and not allow_rollback and "epoch" in e.reason:
                raise store_may_lag(e, recorded) from e
            raise
        except BaseException:
            if slog is not None:
                slog.cancel()
            self._give_back(session_id, token, prior)
            raise
        if level == "remote" and self._uploader is not None:
            self._uploader.attach(slog, remote_epoch=remote_epoch, remote_offset=remote_offset)
        slog.kick = self._kick
        session = Session(self._services, session_id, token, slog, index, prior=prior)
        with self._lock:
            self._sessions[session_id] = _Open(session, slog)
        self.log.info("session opened", session=session_id, token=token, created=created, epoch=index.epoch)
        return session

    def _give_back(self, session_id: str, token: int, prior: Any) -> None:
        try:
            self.catalog.give_back(session_id, token, prior)
        except ConcordiaError as e:
            self.log.warning("lease give-back failed", session=session_id, error=str(e))

    def _check_id(self, session_id: str) -> None:
        check_session_id(session_id)
        with self._lock:
            if session_id in self._sessions or session_id in self._leases:
                raise OwnershipError(f"session {session_id!r} is already open in this process ({self.owner})")

    def hold(self, session_id: str, *, create: bool = True, kind: str = "lease",
             labels: Mapping[str, Any] | None = None) -> Lease:
        """Take a session's ownership lease without opening a region log (graph
        threads keep their state in catalog tables). The runtime heartbeats it
        until :meth:`let_go`. Raises OwnershipError while another live owner
        holds it, SessionNotFound if it does not exist and ``create`` is False."""
        self._check_id(session_id)
        token, created, prior = self.catalog.take(session_id, owner=self.owner, ttl=self.config.lease_ttl,
                                                  backend=kind, create=create, log=False)
        lease = Lease(session_id, token, self.owner)
        # LEASE_ONLY, on a session made here: session() refuses to give it a region log.
        labels = {**(labels or {}), **({LEASE_ONLY: True} if created else {})}
        try:
            if labels:
                self.catalog.set_labels(session_id, token, labels)
        except BaseException:
            self._give_back(session_id, token, prior)
            raise
        with self._lock:
            self._leases[session_id] = lease
        self.log.info("lease taken", session=session_id, token=token, created=created)
        return lease

    def held(self, session_id: str) -> Lease | None:
        """The lease this runtime holds on ``session_id`` through :meth:`hold`, if any."""
        with self._lock:
            return self._leases.get(session_id)

    def let_go(self, lease: Lease, *, closed: bool = False) -> None:
        """Release a lease taken with :meth:`hold`; ``closed`` marks the session
        finished (status "closed") rather than merely idle."""
        with self._lock:
            if self._leases.get(lease.session_id) is lease:
                del self._leases[lease.session_id]
        if not lease.released:
            lease.released = True
            try:
                self.catalog.release(lease.session_id, lease.token, closed=closed)
            except ConcordiaError as e:
                self.log.warning("lease release failed", session=lease.session_id, error=str(e))

    def resume(self, session_id: str, arrays: Mapping[str, Any] | None = None, *, device: str | None = None,
               allow_rollback: bool = False) -> Session:
        """Open an existing session and restore every logged region: into
        ``arrays[name]`` where given, else into new arrays of the recorded
        library, dtype, shape and device (``device`` overrides the latter).

        If anything fails (a damaged log, an array that does not fit), the
        session is left as it was found (``Session.cancel``): status, ring,
        segments, and the lease free. ``allow_rollback``: see :meth:`session`."""
        session = self.session(session_id, create=False, allow_rollback=allow_rollback)
        try:
            arrays = dict(arrays or {})
            unknown = set(arrays) - set(session.recorded)
            if unknown:
                raise ConcordiaError(f"session {session_id!r} holds no regions {sorted(unknown)}; "
                                     f"it has {sorted(session.recorded)}")
            for name in session.recorded:
                session.restore(name, arrays.get(name), device=device)
        except BaseException:
            session.cancel()
            raise
        return session

    def sessions(self) -> list[SessionInfo]:
        return self.catalog.list()

    def info(self, session_id: str) -> SessionInfo:
        check_session_id(session_id)
        return self.catalog.get(session_id)

    def delete(self, session_id: str) -> None:
        """Delete a session: catalog rows, segments and ring (refused while another
        process owns it), and the task sessions bound to it (``id#task:...``, see
        ``_names``) first: a deleted graph thread leaves no orphaned generation logs."""
        check_session_id(session_id)
        for child in self.catalog.list(prefix=session_id + TASK_SEP):
            self.delete(child.id)
        with self._lock:
            mine = self._sessions.get(session_id)
            lease = self._leases.get(session_id)
        if mine is not None:
            mine.session.close()
        if lease is not None:
            self.let_go(lease)
        if self._uploader is not None:
            self._uploader.forget(session_id)  # nothing of it goes up after this
        remote = objects_of(self.catalog, session_id) if self._uploader is not None else []
        self.catalog.delete(session_id)  # refused while another process owns it: nothing deleted then
        if self._uploader is not None:
            delete_remote(self._uploader.store, session_id, remote, self.log)
        shutil.rmtree(self.session_dir(session_id), ignore_errors=True)
        rpath = ring_path(self.config, session_tag(session_id))
        self._warm.forget(rpath)
        rpath.unlink(missing_ok=True)
        self.log.info("session deleted", session=session_id)

    def gc(self, *, dry_run: bool = False, upload_age: float = 3600.0) -> GcReport:
        """Remove files that no session refers to, and only what can be proven
        orphaned (``dry_run``: report without removing). The rules and the
        protocol are ``_gc.collect``'s, and for the object store (with a
        remote) ``_gc_remote.collect_remote``'s: ``upload_age`` is the age in
        seconds past which an unfinished multipart upload is aborted."""
        report = collect(GcContext(config=self.config, catalog=self.catalog, owner=self.owner,
                                   session_dir=self.session_dir, give_back=self._give_back, log=self.log),
                         dry_run=dry_run)
        if self._uploader is not None:
            collect_remote(self._uploader.store, self.catalog, lambda sid: self.session_dir(sid).name, report,
                           self.log, upload_age=upload_age)
        return report

    def verify(self, session_id: str) -> LogCheck:
        """Check a session's log without opening it (no lease, nothing written):
        every record verified, the newest intact epoch against the catalog's
        durable epoch, missing files, and what a crashed owner left in the ring."""
        check_session_id(session_id)
        info = self.catalog.get(session_id)
        return check_log(session_id, self.session_dir(session_id), self.catalog, info,
                         ring_path(self.config, session_tag(session_id)))

    # -- internals ----------------------------------------------------------------

    def _kick(self) -> None:
        self._wake.set()

    def _forget(self, session_id: str, token: int) -> None:
        """Stop flushing and heart-beating the session opened with ``token``
        (``SessionServices.detach``: a session calls it as it ends)."""
        with self._lock:
            mine = self._sessions.get(session_id)
            if mine is not None and mine.session.token == token:
                del self._sessions[session_id]
        if self._uploader is not None:
            self._uploader.ended(session_id, token)

    def _release(self, session_id: str, token: int, closed: bool) -> None:
        """``SessionServices.release``: end a session's lease, logging a failure."""
        try:
            self.catalog.release(session_id, token, closed=closed)
        except ConcordiaError as e:
            self.log.warning("lease release failed", session=session_id, error=str(e))

    def _open_logs(self) -> list[SessionLog]:
        with self._lock:
            return [mine.log for mine in self._sessions.values()]

    def _flush_loop(self) -> None:
        warned: set[str] = set()
        poll_error = ""  # the last poll failure, logged once until it changes or clears
        # The backend is polled at least every _BACKEND_POLL_S whatever flush_poll says: a CUDA executor that
        # parked with a task pending is relaunched there, and a longer flush period must not delay that task.
        # The logs are flushed every flush_poll, or at once when kicked (a forced flush, close).
        tick = min(self.config.flush_poll, _BACKEND_POLL_S)
        last_pass = time.monotonic()
        while not self._stop.is_set():
            kicked = self._wake.wait(tick)
            self._wake.clear()
            try:
                self.backend.poll()  # e.g. relaunch an executor that parked with a task pending
                poll_error = ""
            except Exception as e:  # the flusher must survive and say why
                if repr(e) != poll_error:
                    self.log.exception("backend poll failed")
                poll_error = repr(e)
            now = time.monotonic()
            if not kicked and now < last_pass + self.config.flush_poll - tick / 2:
                continue  # half a tick early counts as due: a wait may end a little before its timeout
            last_pass = now
            for slog in self._open_logs():
                try:
                    slog.flush_step()
                    warned.discard(slog.session_id)
                except OwnershipError as e:
                    self.log.warning("session fenced", session=slog.session_id, error=str(e))
                except (LogFullError, CorruptLogError) as e:
                    # Logged once per session until a pass gets through; the next commit raises it.
                    if slog.session_id not in warned:
                        self.log.error("flusher stopped; the next commit raises this", session=slog.session_id,
                                       error=str(e))
                        warned.add(slog.session_id)
                except Exception as e:  # the flusher must survive and say why
                    slog.error = e
                    if slog.session_id not in warned:
                        self.log.exception("flusher error", session=slog.session_id)
                        warned.add(slog.session_id)

    def _heartbeat_loop(self) -> None:
        period = self.config.lease_ttl / 3
        while not self._stop.wait(period):
            with self._lock:
                held: list[tuple[str, int, SessionLog | Lease]] = [
                    (m.session.id, m.session.token, m.log) for m in self._sessions.values()]
                held += [(lease.session_id, lease.token, lease) for lease in self._leases.values()
                         if not lease.released]
            for session_id, token, holder in held:  # holder: a SessionLog or a Lease, both with `fenced`
                try:
                    if not self.catalog.heartbeat(session_id, token, self.config.lease_ttl, owner=self.owner):
                        holder.fenced = "the catalog lease was taken over by a newer owner"
                        self.log.warning("lease lost", session=session_id, token=token)
                except ConcordiaError as e:
                    self.log.warning("heartbeat failed", session=session_id, error=str(e))

    @staticmethod
    def _shutdown_threads(stop: threading.Event, wake: threading.Event) -> None:
        stop.set()
        wake.set()

    def close(self) -> None:
        """Close every open session cleanly and stop the threads."""
        with self._lock:
            sessions = [mine.session for mine in self._sessions.values()]
            leases = list(self._leases.values())
        for lease in leases:
            self.let_go(lease)
        for s in sessions:
            try:
                s.close()
            except ConcordiaError as e:
                self.log.warning("session close failed", session=s.id, error=str(e))
        if self._uploader is not None:
            behind = self._uploader.drain(timeout=max(30.0, 2 * self.config.remote_interval))
            if behind:
                self.log.warning("closing with sessions not yet remote; their files are on this host's disk and "
                                 "go up when the sessions are opened again with a remote", sessions=behind)
            self._uploader.close()
        self._stop.set()
        self._wake.set()
        self._flusher.join(timeout=10)
        self._heartbeat.join(timeout=10)
        self._warm.close()  # before the backend: closing a ring unregisters it there
        self.backend.close()
        self.catalog.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
