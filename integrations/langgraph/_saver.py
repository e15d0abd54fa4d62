"""``ConcordiaSaver``: a complete LangGraph checkpoint saver on the Concordia catalog.

Contract (``langgraph.checkpoint.base.BaseCheckpointSaver``; who calls what):

* LangGraph calls ``get_tuple`` when a run starts, ``put_writes`` as each task
  finishes and ``put`` at each step boundary — the sync methods from worker
  threads, the ``a*`` methods under ``ainvoke``, possibly concurrently. Every
  method here is thread-safe; the async ones run the sync ones in a thread.
* ``put`` stores the checkpoint with only its small scalar channel values
  (a counter, a flag: they ride along in every checkpoint), plus one blob per
  other channel listed in ``new_versions``: such a value is stored once per
  (channel, version), never once per step (see ``_schema``).
* Single writer. A graph thread is a Concordia session. The first write to a
  thread takes its ownership lease (``Runtime.hold``; the runtime heartbeats
  it) unless the caller took it already (``acquire``, which ``wrap`` does before
  any node runs). Every write checks the lease's fencing token in the same
  transaction, so a stale owner — one whose lease expired and was taken over —
  gets ``OwnershipError`` instead of forking the thread's history. A live
  owner elsewhere makes ``acquire`` and the first write fail the same way.
  ``release(thread_id)`` (or ``close()``) lets the lease go.
  The writes go to the DBAPI driver directly: on SQLite one ``BEGIN
  IMMEDIATE`` transaction (``_sqlite``), on PostgreSQL one autocommitted
  statement, one round trip (``_pg``).
* Reads (``get_tuple``, ``list``) take no lease.
* Administrative deletes (``delete_thread``, ``delete_for_runs``, ``prune``)
  refuse threads that another live process owns.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    SerializerProtocol,
    get_checkpoint_id,
    get_checkpoint_metadata,
    writes_sort_key,
)
from sqlalchemy import and_, delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session as OrmSession

from concordia_agents import ConcordiaError, OwnershipError, Runtime, SessionNotFound
from concordia_agents._lease import Lease
from concordia_agents._logging import get_logger

from ._pg import PgWriter
from ._schema import BLOBS, CHECKPOINTS, INLINE_STR, INLINE_TYPES, WRITES, migrate, pack, unpack
from ._sqlite import SqliteWriter
from ._task import TASK_SEP

__all__ = ["GRAPH_KIND", "ConcordiaSaver"]

#: the ``backend`` column and ``kind`` label of a graph thread's session
GRAPH_KIND = "langgraph"
_PAGE = 100
_DELTA_KEYS = ("counters_since_delta_snapshot", "delta_writes_versioned")
_PRUNE_STRATEGIES = ("keep_latest", "delete")


def _ids(config: RunnableConfig) -> tuple[str, str]:
    conf = config.get("configurable") or {}
    if conf.get("thread_id") in (None, ""):
        raise ConcordiaError(f"checkpoint config: expected configurable.thread_id, found keys {sorted(conf)}")
    return str(conf["thread_id"]), str(conf.get("checkpoint_ns") or "")


def _config(thread_id: str, ns: str, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint_id}}


class ConcordiaSaver(BaseCheckpointSaver[str]):
    """LangGraph checkpoints, blobs and pending writes in the Concordia catalog
    (SQLite or PostgreSQL), one ownership lease per thread.

    ``ConcordiaSaver(runtime=rt)`` uses ``rt``'s catalog and heartbeat;
    ``ConcordiaSaver()`` opens a runtime from the environment and
    ``ConcordiaSaver.from_conn_string(url)`` one on that catalog URL; a saver
    closes a runtime it opened itself. Usable as a context manager."""

    def __init__(self, runtime: Runtime | None = None, *, serde: SerializerProtocol | None = None) -> None:
        super().__init__(serde=serde)
        self._owns_runtime = runtime is None
        self.runtime = runtime if runtime is not None else Runtime.open(backend="host")
        self.catalog = self.runtime.catalog
        self.log = get_logger().bind(component="langgraph")
        self._lock = threading.Lock()
        self._upserts: dict[tuple[str, bool], Any] = {}
        self._taken: set[str] = set()  #: threads whose lease this saver took (let go on close)
        with self.catalog.write() as s:
            migrate(s.connection(), self.catalog.dialect)
        #: the fenced write path of put/put_writes, one per dialect (same methods)
        self._writer = PgWriter(self.catalog) if self.catalog.dialect == "postgresql" else SqliteWriter(self.catalog)

    @classmethod
    def from_conn_string(cls, conn_string: str, *, home: str | None = None, **options: Any) -> ConcordiaSaver:
        """A saver on the catalog at ``conn_string`` (``sqlite:///path`` or
        ``postgresql+psycopg://...``), with its own runtime (host backend)."""
        saver = cls(Runtime.open(home=home, catalog_url=conn_string, backend="host", **options))
        saver._owns_runtime = True
        return saver

    def close(self) -> None:
        """Let every lease this saver took go; close the runtime if it is ours."""
        with self._lock:
            taken, self._taken = sorted(self._taken), set()
        for thread_id in taken:
            self.release(thread_id)
        self._writer.close()
        if self._owns_runtime:
            self.runtime.close()

    def __enter__(self) -> ConcordiaSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ConcordiaSaver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    # -- ownership ------------------------------------------------------------------

    def acquire(self, thread_id: str, *, create: bool = True) -> Lease:
        """Take the thread's lease now (OwnershipError while another live process
        holds it); returns the lease this runtime already holds if any."""
        thread_id = str(thread_id)
        with self._lock:
            lease = self.runtime.held(thread_id)
            if lease is None:
                lease = self.runtime.hold(thread_id, create=create, kind=GRAPH_KIND, labels={"kind": "graph"})
                self._taken.add(thread_id)
        lease.check()
        return lease

    def release(self, thread_id: str, *, closed: bool = False) -> None:
        """Let the thread's lease go (``closed``: the graph finished)."""
        thread_id = str(thread_id)
        with self._lock:
            self._taken.discard(thread_id)
        lease = self.runtime.held(thread_id)
        if lease is not None:
            self.runtime.let_go(lease, closed=closed)

    def _check(self, s: Connection, thread_id: str, lease: Lease) -> None:
        """``Catalog.check_token``, remembering on the lease why it was fenced."""
        try:
            self.catalog.check_token(s, thread_id, lease.token)
        except OwnershipError as e:
            lease.fenced = str(e)
            raise

    @contextmanager
    def _owned(self, thread_id: str) -> Iterator[Connection]:
        """A write transaction in which this process provably owns the thread."""
        lease = self.acquire(thread_id)
        with self.catalog.write_core() as s:
            self._check(s, thread_id, lease)
            yield s

    def _fenced(self, thread_id: str, write: Any, *args: Any) -> None:
        """Run a fenced write of ``self._writer``; on a token mismatch (nothing
        was written), name the current owner and raise OwnershipError."""
        lease = self.acquire(thread_id)
        if write(thread_id, lease.token, *args):
            return
        with self.catalog.write_core() as s:
            self._check(s, thread_id, lease)  # raises, naming the owner that took over
        raise OwnershipError(f"thread {thread_id!r}: the fenced write did not find lease token {lease.token}")

    def _refuse_foreign(self, s: OrmSession, thread_ids: Sequence[str]) -> None:
        """OwnershipError if another live process owns any of these threads."""
        for thread_id, owner, token, expires_at in self.catalog.live_leases(s, list(thread_ids)):
            mine = self.runtime.held(thread_id)
            if mine is None or mine.token != token:
                raise OwnershipError(
                    f"thread {thread_id!r}: expected no other live owner, found {owner} "
                    f"(token {token}, {expires_at - time.time():.1f} s left)")

    # -- SQL helpers ---------------------------------------------------------------------

    def _upsert(self, s: OrmSession | Connection, table: Any, rows: list[dict[str, Any]], *, replace: bool) -> None:
        """Insert ``rows`` (all with every column of ``table``); on a key conflict
        replace the row or keep the old one. Statements are built once."""
        if not rows:
            return
        stmt = self._upserts.get((table.name, replace))
        if stmt is None:
            stmt = (pg_insert if self.catalog.dialect == "postgresql" else sqlite_insert)(table)
            keys = [c.name for c in table.primary_key.columns]
            if replace:
                stmt = stmt.on_conflict_do_update(
                    index_elements=keys, set_={c.name: stmt.excluded[c.name] for c in table.columns
                                               if c.name not in keys})
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=keys)
            self._upserts[(table.name, replace)] = stmt
        s.execute(stmt, rows)

    def _versions(self, row: Any) -> dict[str, Any]:
        return unpack(self.serde, row.type, row.checkpoint).get("channel_versions") or {}

    def _gc_blobs(self, s: OrmSession, thread_id: str, ns: str) -> None:
        """Delete blobs of (thread, ns) that no remaining checkpoint references."""
        live: set[tuple[str, str]] = set()
        for row in s.execute(select(CHECKPOINTS.c.type, CHECKPOINTS.c.checkpoint).where(
                CHECKPOINTS.c.session_id == thread_id, CHECKPOINTS.c.checkpoint_ns == ns)):
            live.update((ch, str(v)) for ch, v in self._versions(row).items())
        stale = [(ch, v) for ch, v in s.execute(select(BLOBS.c.channel, BLOBS.c.version).where(
            BLOBS.c.session_id == thread_id, BLOBS.c.checkpoint_ns == ns)) if (ch, v) not in live]
        for i in range(0, len(stale), 500):
            s.execute(delete(BLOBS).where(BLOBS.c.session_id == thread_id, BLOBS.c.checkpoint_ns == ns,
                                          tuple_(BLOBS.c.channel, BLOBS.c.version).in_(stale[i:i + 500])))

    def _tuple(self, s: OrmSession, row: Any) -> CheckpointTuple:
        checkpoint = unpack(self.serde, row.type, row.checkpoint)
        versions: dict[str, Any] = checkpoint.get("channel_versions") or {}
        values = {ch: v for ch, v in (checkpoint.get("channel_values") or {}).items() if ch in versions}
        missing = [(ch, str(v)) for ch, v in versions.items() if ch not in values]
        if missing:
            for b in s.execute(select(BLOBS.c.channel, BLOBS.c.type, BLOBS.c.blob).where(
                    BLOBS.c.session_id == row.session_id, BLOBS.c.checkpoint_ns == row.checkpoint_ns,
                    tuple_(BLOBS.c.channel, BLOBS.c.version).in_(missing))):
                if b.type != "empty":  # version 1 stored a row for a channel without a value
                    values[b.channel] = unpack(self.serde, b.type, b.blob)
        writes = sorted(s.execute(select(WRITES).where(
            WRITES.c.session_id == row.session_id, WRITES.c.checkpoint_ns == row.checkpoint_ns,
            WRITES.c.checkpoint_id == row.checkpoint_id)), key=lambda w: writes_sort_key(w.task_path, w.task_id, w.idx))
        return CheckpointTuple(
            config=_config(row.session_id, row.checkpoint_ns, row.checkpoint_id),
            checkpoint=cast(Checkpoint, {**checkpoint, "channel_values": values}),
            metadata=unpack(self.serde, row.metadata_type, row.metadata),
            parent_config=(_config(row.session_id, row.checkpoint_ns, row.parent_checkpoint_id)
                           if row.parent_checkpoint_id else None),
            pending_writes=[(w.task_id, w.channel, unpack(self.serde, w.type, w.blob)) for w in writes],
        )

    # -- reads ------------------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id, ns = _ids(config)
        q = select(CHECKPOINTS).where(CHECKPOINTS.c.session_id == thread_id, CHECKPOINTS.c.checkpoint_ns == ns)
        if checkpoint_id := get_checkpoint_id(config):
            q = q.where(CHECKPOINTS.c.checkpoint_id == str(checkpoint_id))
        else:
            q = q.order_by(CHECKPOINTS.c.checkpoint_id.desc()).limit(1)
        with self.catalog.read() as s:
            row = s.execute(q).first()
            return None if row is None else self._tuple(s, row)

    def list(
        self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None, limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Newest first; pages through the table so no transaction stays open
        while the caller consumes the iterator."""
        q = select(CHECKPOINTS)
        if config is not None:
            conf = config.get("configurable") or {}
            if conf.get("thread_id") is not None:
                q = q.where(CHECKPOINTS.c.session_id == str(conf["thread_id"]))
            if conf.get("checkpoint_ns") is not None:
                q = q.where(CHECKPOINTS.c.checkpoint_ns == str(conf["checkpoint_ns"]))
            if checkpoint_id := get_checkpoint_id(config):
                q = q.where(CHECKPOINTS.c.checkpoint_id == str(checkpoint_id))
        if before is not None and (before_id := get_checkpoint_id(before)):
            q = q.where(CHECKPOINTS.c.checkpoint_id < str(before_id))
        if limit is not None and limit <= 0:
            return
        order = (CHECKPOINTS.c.checkpoint_id, CHECKPOINTS.c.session_id, CHECKPOINTS.c.checkpoint_ns)
        q = q.order_by(*(c.desc() for c in order))
        remaining = limit
        cursor: tuple[str, str, str] | None = None
        while True:
            page_q = q if cursor is None else q.where(tuple_(*order) < cursor)
            with self.catalog.read() as s:
                rows = s.execute(page_q.limit(_PAGE)).all()
                out = []
                for row in rows:
                    tup = self._tuple(s, row)
                    if filter and not all(tup.metadata.get(k) == v for k, v in filter.items()):
                        continue
                    out.append(tup)
            for tup in out:
                yield tup
                if remaining is not None:
                    remaining -= 1
                    if remaining <= 0:
                        return
            if len(rows) < _PAGE:
                return
            last = rows[-1]
            cursor = (last.checkpoint_id, last.session_id, last.checkpoint_ns)

    # -- writes -----------------------------------------------------------------------------

    def put(
        self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        thread_id, ns = _ids(config)
        parent = get_checkpoint_id(config)
        values: dict[str, Any] = checkpoint.get("channel_values") or {}
        versions = checkpoint.get("channel_versions") or {}
        inline = {ch: v for ch, v in values.items() if ch in versions and (
            type(v) in INLINE_TYPES or (type(v) is str and len(v) <= INLINE_STR))}
        blobs = [(thread_id, ns, ch, str(version), *self.serde.dumps_typed(values[ch]))
                 for ch, version in new_versions.items() if ch in values and ch not in inline]
        ctype, cbytes = pack(self.serde, {**checkpoint, "channel_values": inline})
        md = get_checkpoint_metadata(config, metadata)
        mtype, mbytes = self.serde.dumps_typed(md)
        run_id = md.get("run_id")
        row = (thread_id, ns, str(checkpoint["id"]), str(parent) if parent else None, ctype, cbytes, mtype, mbytes,
               None if run_id is None else str(run_id), any(k in md for k in _DELTA_KEYS))
        self._fenced(thread_id, self._writer.put, row, blobs)
        return _config(thread_id, ns, str(checkpoint["id"]))

    def put_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = "",
    ) -> None:
        """Ordinary writes are insert-or-ignore (a retried task cannot change what
        was recorded); the special channels (error, interrupt, ...) upsert."""
        thread_id, ns = _ids(config)
        checkpoint_id = get_checkpoint_id(config)
        if not checkpoint_id:
            raise ConcordiaError(f"put_writes on thread {thread_id!r}: expected configurable.checkpoint_id, found none")
        # One row per write index. A special channel can come twice in one call (a node
        # with two interrupt() calls passes two __resume__ writes, both at its one index):
        # the last one wins, as in LangGraph's own savers. A single SQL statement must not
        # see the key twice (PostgreSQL refuses ON CONFLICT DO UPDATE on a row it wrote).
        by_idx: dict[int, tuple[str, Any]] = {}
        for i, (channel, value) in enumerate(writes):
            idx = WRITES_IDX_MAP.get(channel, i)
            if idx < 0 or idx not in by_idx:
                by_idx[idx] = (channel, value)
        plain: list[tuple[Any, ...]] = []
        special: list[tuple[Any, ...]] = []
        for idx, (channel, value) in by_idx.items():
            row = (thread_id, ns, str(checkpoint_id), str(task_id), idx, channel, *self.serde.dumps_typed(value),
                   task_path)
            (special if idx < 0 else plain).append(row)
        if plain or special:
            self._fenced(thread_id, self._writer.put_writes, plain, special)

    def delete_thread(self, thread_id: str) -> None:
        """Delete the thread's checkpoints and its session, with the generation
        sessions bound to its tasks (``task_session_id``) and their logs."""
        thread_id = str(thread_id)
        with self.catalog.write() as s:
            self._refuse_foreign(s, [thread_id])
            for table in (WRITES, BLOBS, CHECKPOINTS):
                s.execute(delete(table).where(table.c.session_id == thread_id))
        for info in self.catalog.list(prefix=thread_id + TASK_SEP):
            try:
                self.runtime.delete(info.id)
            except OwnershipError as e:
                self.log.warning("task session left in place: owned elsewhere", session=info.id, error=str(e))
        try:
            self.runtime.delete(thread_id)
        except SessionNotFound:
            pass

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints (and their writes) that these runs created."""
        run_ids = [str(r) for r in run_ids]
        if not run_ids:
            return
        with self.catalog.write() as s:
            doomed = s.execute(select(CHECKPOINTS.c.session_id, CHECKPOINTS.c.checkpoint_ns,
                                      CHECKPOINTS.c.checkpoint_id).where(CHECKPOINTS.c.run_id.in_(run_ids))).all()
            if not doomed:
                return
            self._refuse_foreign(s, sorted({d.session_id for d in doomed}))
            for d in doomed:
                where = and_(WRITES.c.session_id == d.session_id, WRITES.c.checkpoint_ns == d.checkpoint_ns,
                             WRITES.c.checkpoint_id == d.checkpoint_id)
                s.execute(delete(WRITES).where(where))
            s.execute(delete(CHECKPOINTS).where(CHECKPOINTS.c.run_id.in_(run_ids)))
            for thread_id, ns in sorted({(d.session_id, d.checkpoint_ns) for d in doomed}):
                self._gc_blobs(s, thread_id, ns)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, blob and write (the whole parent chain, as
        DeltaChannel needs) of one thread to another, which this process owns."""
        src, dst = str(source_thread_id), str(target_thread_id)
        with self.catalog.read() as s:
            tables = {t: [dict(r._mapping) for r in s.execute(select(t).where(t.c.session_id == src))]
                      for t in (CHECKPOINTS, BLOBS, WRITES)}
        with self._owned(dst) as s:
            for table in (BLOBS, CHECKPOINTS, WRITES):
                rows = [{**r, "session_id": dst} for r in tables[table]]
                for i in range(0, len(rows), 500):
                    self._upsert(s, table, rows[i:i + 500], replace=True)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``"delete"``: remove every checkpoint, write and blob of the threads
        (their sessions stay). ``"keep_latest"``: keep the newest checkpoint of
        each namespace with its writes and the blobs it references; a kept
        checkpoint whose parent goes is left without a parent. Threads using a
        DeltaChannel are refused (NotImplementedError) for ``keep_latest``: their
        latest value is rebuilt from older checkpoints."""
        if isinstance(thread_ids, str):
            raise TypeError("prune: expected a sequence of thread IDs, found a str")
        if strategy not in _PRUNE_STRATEGIES:
            raise ValueError(f"prune: expected strategy in {_PRUNE_STRATEGIES}, found {strategy!r}")
        thread_ids = [str(t) for t in thread_ids]
        if not thread_ids:
            return
        with self.catalog.write() as s:
            self._refuse_foreign(s, thread_ids)
            if strategy == "delete":
                for table in (WRITES, BLOBS, CHECKPOINTS):
                    s.execute(delete(table).where(table.c.session_id.in_(thread_ids)))
                return
            delta = sorted(set(s.scalars(select(CHECKPOINTS.c.session_id).where(
                CHECKPOINTS.c.session_id.in_(thread_ids), CHECKPOINTS.c.uses_delta.is_(True)))))
            if delta:
                raise NotImplementedError(
                    f"keep_latest can't prune threads that use a DeltaChannel: {', '.join(delta)}")
            heads: dict[tuple[str, str], str] = {}
            for r in s.execute(select(CHECKPOINTS.c.session_id, CHECKPOINTS.c.checkpoint_ns,
                                      CHECKPOINTS.c.checkpoint_id).where(CHECKPOINTS.c.session_id.in_(thread_ids))):
                key = (r.session_id, r.checkpoint_ns)
                heads[key] = max(heads.get(key, ""), r.checkpoint_id)
            for (thread_id, ns), head in sorted(heads.items()):
                for table in (WRITES, CHECKPOINTS):
                    s.execute(delete(table).where(table.c.session_id == thread_id, table.c.checkpoint_ns == ns,
                                                  table.c.checkpoint_id != head))
                s.execute(update(CHECKPOINTS).where(
                    CHECKPOINTS.c.session_id == thread_id, CHECKPOINTS.c.checkpoint_ns == ns).values(
                    parent_checkpoint_id=None))
                self._gc_blobs(s, thread_id, ns)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Zero-padded counter plus a random suffix, as LangGraph's own savers."""
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(str(current).split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"

    # -- async: the sync methods in a worker thread ---------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(
        self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None, limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        it = self.list(config, filter=filter, before=before, limit=limit)
        done = object()
        while (tup := await asyncio.to_thread(next, it, done)) is not done:
            yield tup  # type: ignore[misc]

    async def aput(
        self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = "",
    ) -> None:
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.to_thread(self.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await asyncio.to_thread(self.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await asyncio.to_thread(self.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await asyncio.to_thread(self.prune, thread_ids, strategy=strategy)
