"""The Runtime: one per process and home; owns the backend, the catalog, the
flusher thread and the lease heartbeat thread.

Call protocol::

    rt = Runtime.open()              # home, catalog, backend ("auto")
    s = rt.session("chat-42")        # create or open; takes the lease
    s.register(...); s.commit(...)   # see Session
    rt.resume("chat-42")             # after a crash, in any process
    lease = rt.hold("thread-7")      # a lease without a region log (graph threads)
    rt.let_go(lease)
    rt.sessions(); rt.delete(id)
    rt.close()                       # closes open sessions cleanly

Threads: the *flusher* copies every open session's ring into segments (woken
by each commit, else every ``flush_poll`` seconds); the *heartbeat* extends
every held lease every ``lease_ttl / 3`` seconds and fences a session whose
lease was taken over.
"""

from __future__ import annotations

import os
import shutil
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpu_runtime.backend import Backend, open_backend
from gpu_runtime.records import session_tag

from ._catalog import Catalog, SessionInfo
from ._lease import Lease
from ._log import SessionLog, ring_path, session_dir_name
from ._logging import configure_logging, get_logger
from ._names import TASK_SEP
from ._owner import new_owner_id
from ._session import Session
from .config import RuntimeConfig
from .errors import ConcordiaError, LogFullError, OwnershipError

__all__ = ["Runtime"]


class Runtime:
    def __init__(self, config: RuntimeConfig, *, backend: Backend | None = None) -> None:
        self.config = config
        configure_logging(format=config.log_format, level=config.log_level)
        self.log = get_logger()
        config.home.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(config.catalog_url)
        self.backend = backend or open_backend(config.backend, **config.backend_options)
        self.owner = new_owner_id()
        self._sessions: dict[str, Session] = {}
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="concordia-flusher", daemon=True)
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="concordia-heartbeat", daemon=True)
        self._flusher.start()
        self._heartbeat.start()
        self._finalizer = weakref.finalize(self, Runtime._shutdown_threads, self._stop, self._wake)
        self.log.info("runtime opened", home=str(config.home), backend=self.backend.name,
                      catalog=self.catalog._redacted())

    @classmethod
    def open(
        cls, home: str | os.PathLike[str] | None = None, catalog_url: str | None = None,
        backend: str | None = None, **options: Any,
    ) -> Runtime:
        """Open a runtime; arguments override environment variables (see README)."""
        return cls(RuntimeConfig.from_env(home=home, catalog_url=catalog_url, backend=backend, **options))

    # -- sessions ---------------------------------------------------------------

    def session_dir(self, session_id: str) -> Path:
        return self.config.home / "sessions" / session_dir_name(session_id, session_tag(session_id))

    def session(self, session_id: str, *, create: bool = True) -> Session:
        """Create or open a session and take its lease (OwnershipError if another
        live process holds it). An existing session's log is recovered, not yet
        restored: ``register``/``restore`` bring regions back."""
        self._check_id(session_id)
        token, created = self.catalog.acquire(session_id, owner=self.owner, ttl=self.config.lease_ttl,
                                              backend=self.backend.name, create=create)
        tag = session_tag(session_id)
        try:
            slog, index = SessionLog.open(session_id=session_id, tag=tag, token=token,
                                          directory=self.session_dir(session_id), config=self.config,
                                          catalog=self.catalog)
        except BaseException:
            self.catalog.release(session_id, token, closed=False)
            raise
        slog.kick = self._kick
        session = Session(self, session_id, token, slog, index)
        with self._lock:
            self._sessions[session_id] = session
        self.log.info("session opened", session=session_id, token=token, created=created, epoch=index.epoch)
        return session

    def _check_id(self, session_id: str) -> None:
        if not isinstance(session_id, str) or not session_id or len(session_id) > 512:
            raise ConcordiaError(f"expected a session ID of 1..512 characters, found {session_id!r}")
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
        token, created = self.catalog.acquire(session_id, owner=self.owner, ttl=self.config.lease_ttl,
                                              backend=kind, create=create)
        lease = Lease(session_id, token, self.owner)
        try:
            if labels:
                self.catalog.set_labels(session_id, token, dict(labels))
        except BaseException:
            self.catalog.release(session_id, token, closed=False)
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

    def resume(self, session_id: str, arrays: Mapping[str, Any] | None = None, *, device: str | None = None) -> Session:
        """Open an existing session and restore every logged region: into
        ``arrays[name]`` where given, else into new arrays of the recorded
        library, dtype, shape and device (``device`` overrides the latter)."""
        session = self.session(session_id, create=False)
        try:
            arrays = dict(arrays or {})
            unknown = set(arrays) - set(session.recorded)
            if unknown:
                raise ConcordiaError(f"session {session_id!r} holds no regions {sorted(unknown)}; "
                                     f"it has {sorted(session.recorded)}")
            for name in session.recorded:
                session.restore(name, arrays.get(name), device=device)
        except BaseException:
            session.close()
            raise
        return session

    def sessions(self) -> list[SessionInfo]:
        return self.catalog.list()

    def info(self, session_id: str) -> SessionInfo:
        return self.catalog.get(session_id)

    def delete(self, session_id: str) -> None:
        """Delete a session: catalog rows, segments and ring (refused while another
        process owns it), and the task sessions bound to it (``id#task:...``, see
        ``_names``) first: a deleted graph thread leaves no orphaned generation logs."""
        for child in self.catalog.list(prefix=session_id + TASK_SEP):
            self.delete(child.id)
        with self._lock:
            mine = self._sessions.get(session_id)
            lease = self._leases.get(session_id)
        if mine is not None:
            mine.close()
        if lease is not None:
            self.let_go(lease)
        self.catalog.delete(session_id)
        shutil.rmtree(self.session_dir(session_id), ignore_errors=True)
        ring_path(self.config, session_tag(session_id)).unlink(missing_ok=True)
        self.log.info("session deleted", session=session_id)

    def gc(self) -> list[Path]:
        """Remove files no catalog row refers to: session directories of deleted
        sessions, rings of closed sessions, temporary files. Returns what went."""
        known = {self.session_dir(i.id).name: i for i in self.catalog.list()}
        removed: list[Path] = []
        root = self.config.home / "sessions"
        if root.is_dir():
            for d in root.iterdir():
                if d.name not in known:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
                    continue
                for tmp in d.glob(".base-*.tmp*"):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        for info in known.values():
            rp = ring_path(self.config, session_tag(info.id))
            if info.status == "closed" and rp.exists():
                rp.unlink(missing_ok=True)
                removed.append(rp)
        return removed

    # -- internals ----------------------------------------------------------------

    def _kick(self) -> None:
        self._wake.set()

    def _forget(self, session: Session) -> None:
        """Stop flushing and heart-beating a session."""
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]

    def _release(self, session: Session, *, closed: bool) -> None:
        try:
            self.catalog.release(session.id, session.token, closed=closed)
        except ConcordiaError as e:
            self.log.warning("lease release failed", session=session.id, error=str(e))

    def _open_logs(self) -> list[SessionLog]:
        with self._lock:
            return [s._log for s in self._sessions.values()]

    def _flush_loop(self) -> None:
        warned: set[str] = set()
        poll_error = ""  # the last poll failure, logged once until it changes or clears
        while not self._stop.is_set():
            self._wake.wait(self.config.flush_poll)
            self._wake.clear()
            try:
                self.backend.poll()  # e.g. relaunch an executor that parked with a task pending
                poll_error = ""
            except Exception as e:  # noqa: BLE001 - the flusher must survive and say why
                if repr(e) != poll_error:
                    self.log.exception("backend poll failed")
                poll_error = repr(e)
            for slog in self._open_logs():
                try:
                    slog.flush_step()
                    slog.error = None
                    warned.discard(slog.session_id)
                except OwnershipError as e:
                    self.log.warning("session fenced", session=slog.session_id, error=str(e))
                except LogFullError as e:
                    slog.error = e
                    if slog.session_id not in warned:
                        self.log.error("log full; commits continue until the host ring fills",
                                       session=slog.session_id, error=str(e))
                        warned.add(slog.session_id)
                except Exception as e:  # noqa: BLE001 - the flusher must survive and say why
                    slog.error = e
                    self.log.exception("flusher error", session=slog.session_id)

    def _heartbeat_loop(self) -> None:
        period = self.config.lease_ttl / 3
        while not self._stop.wait(period):
            with self._lock:
                held = [(s.id, s.token, s._log) for s in self._sessions.values()]
                held += [(lease.session_id, lease.token, lease) for lease in self._leases.values()
                         if not lease.released]
            for session_id, token, holder in held:  # holder: a SessionLog or a Lease, both with `fenced`
                try:
                    if not self.catalog.heartbeat(session_id, token, self.config.lease_ttl):
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
            sessions = list(self._sessions.values())
            leases = list(self._leases.values())
        for lease in leases:
            self.let_go(lease)
        for s in sessions:
            try:
                s.close()
            except ConcordiaError as e:
                self.log.warning("session close failed", session=s.id, error=str(e))
        self._stop.set()
        self._wake.set()
        self._flusher.join(timeout=10)
        self._heartbeat.join(timeout=10)
        self.backend.close()
        self.catalog.dispose()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
