"""PostgreSQL write path for the saver's fenced writes: one statement, one round trip.

The generic path (a transaction: BEGIN, the token check, every insert, COMMIT)
spends a round trip on each. On PostgreSQL one autocommitted statement does it
all: a CTE locks the thread's lease row *if* it still holds this owner's token,
and the inserts run only ``WHERE EXISTS`` that row. The statement returns
whether the lease matched; when it did not, nothing was written and the caller
raises OwnershipError.

The lock is ``FOR SHARE``. It conflicts with every update of the lease row, so
a takeover (which locks the row ``FOR UPDATE`` and changes the token) either
commits first — then this statement, having waited for it, re-reads the row,
finds the new token and writes nothing — or waits until this statement has
committed, and the new owner reads after this write. Unlike ``FOR UPDATE``
(used before), it lets the same owner's writes run side by side: LangGraph
calls ``put`` and ``put_writes`` from several threads at once, and half of the
benchmark's calls overlapped, each waiting for the other's lock.

The statements go to psycopg directly (prepared by psycopg after a few
executions on each connection, every parameter in binary format) on
autocommit connections with the catalog's lock and idle timeouts. Through
SQLAlchemy, with text-format parameters, binding them was a quarter of a
``put`` (cProfile of ``bench/bench_langgraph_cpu.py``): a ``bytea[]`` in text
format is hex-escaped, then escaped again as an array literal by a regular
expression. The benchmark's puts replayed outside the graph took 0.76 ms
before, 0.53 ms with binary parameters.
A connection the server closed is replaced and the statement run once more (it
is idempotent).

Protocol: ``PgWriter(catalog)`` → ``put`` / ``put_writes`` (each returns False,
having written nothing, when the token no longer owns the thread) → ``close``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from concordia_agents._catalog import Catalog

from ._schema import CHECKPOINT_COLUMNS

if TYPE_CHECKING:
    import psycopg

__all__ = ["PgWriter"]

_LEASE = """
WITH lease AS (
    SELECT 1 AS ok FROM concordia_leases WHERE session_id = %(sid)b AND token = %(tok)b FOR SHARE
)"""

_CKPT_SET = ", ".join(f"{c} = EXCLUDED.{c}" for c in CHECKPOINT_COLUMNS[3:])
_PUT = (_LEASE + f""",
blobs AS (
    INSERT INTO concordia_lg_blobs (session_id, checkpoint_ns, channel, version, type, blob)
    SELECT %(sid)b, %(ns)b, x.channel, x.version, x.type, x.blob
    FROM unnest(%(b_channel)b::text[], %(b_version)b::text[], %(b_type)b::text[], %(b_blob)b::bytea[])
        AS x(channel, version, type, blob)
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (session_id, checkpoint_ns, channel, version)
    DO UPDATE SET type = EXCLUDED.type, blob = EXCLUDED.blob
),
ckpt AS (
    INSERT INTO concordia_lg_checkpoints ({", ".join(CHECKPOINT_COLUMNS)})
    SELECT %(sid)b, %(ns)b, %(cid)b, %(parent)b, %(type)b, %(checkpoint)b, %(mtype)b, %(metadata)b, %(run_id)b,
        %(uses_delta)b
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (session_id, checkpoint_ns, checkpoint_id) DO UPDATE SET {_CKPT_SET}
)
SELECT count(*) FROM lease
""")

_WRITES = (_LEASE + """,
w AS (
    SELECT * FROM unnest(%(w_idx)b::integer[], %(w_channel)b::text[], %(w_type)b::text[], %(w_blob)b::bytea[])
        AS x(idx, channel, type, blob)
    WHERE EXISTS (SELECT 1 FROM lease)
),
plain AS (
    INSERT INTO concordia_lg_writes (session_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, type, blob,
        task_path)
    SELECT %(sid)b, %(ns)b, %(cid)b, %(task)b, idx, channel, type, blob, %(path)b FROM w WHERE idx >= 0
    ON CONFLICT (session_id, checkpoint_ns, checkpoint_id, task_id, idx) DO NOTHING
),
special AS (
    INSERT INTO concordia_lg_writes (session_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, type, blob,
        task_path)
    SELECT %(sid)b, %(ns)b, %(cid)b, %(task)b, idx, channel, type, blob, %(path)b FROM w WHERE idx < 0
    ON CONFLICT (session_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE SET
        channel = EXCLUDED.channel, type = EXCLUDED.type, blob = EXCLUDED.blob, task_path = EXCLUDED.task_path
)
SELECT count(*) FROM lease
""")


_KEEP = 8  #: idle connections kept per writer


class PgWriter:
    """Fenced writes of checkpoints, blobs and pending writes on a PostgreSQL catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        # The engine only makes connections (URL, driver options, the catalog's timeouts on
        # connect); this writer pools them itself, idle ones in a LIFO stack whose append and
        # pop are atomic, instead of SQLAlchemy's checkout and checkin (3.5 % of a put in
        # cProfile, each with its lock). One connection per concurrent writer thread; at most
        # _KEEP idle ones are kept.
        self._engine = create_engine(catalog.url, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                                     connect_args={"application_name": "concordia-langgraph"})
        catalog.configure_postgres(self._engine)
        self._idle: deque[Any] = deque()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        self._engine.dispose()

    def put(self, thread_id: str, token: int, checkpoint: tuple[Any, ...], blobs: list[tuple[Any, ...]]) -> bool:
        """Store a checkpoint row and its blob rows (tuples in table column order)."""
        sid, ns, cid, parent, ctype, cbytes, mtype, mbytes, run_id, uses_delta = checkpoint
        return self._run(_PUT, {
            "sid": sid, "tok": token, "ns": ns, "cid": cid, "parent": parent, "type": ctype, "checkpoint": cbytes,
            "mtype": mtype, "metadata": mbytes, "run_id": run_id, "uses_delta": uses_delta,
            "b_channel": [b[2] for b in blobs], "b_version": [b[3] for b in blobs], "b_type": [b[4] for b in blobs],
            "b_blob": [b[5] for b in blobs]})

    def put_writes(self, thread_id: str, token: int, plain: list[tuple[Any, ...]],
                   special: list[tuple[Any, ...]]) -> bool:
        """Store pending writes: ``plain`` insert-or-ignore, ``special`` upsert."""
        rows = plain + special
        sid, ns, cid, task, _, _, _, _, path = rows[0]
        return self._run(_WRITES, {
            "sid": sid, "tok": token, "ns": ns, "cid": cid, "task": task, "path": path,
            "w_idx": [r[4] for r in rows], "w_channel": [r[5] for r in rows], "w_type": [r[6] for r in rows],
            "w_blob": [r[7] for r in rows]})

    def _run(self, sql: str, params: dict[str, Any]) -> bool:
        import psycopg  # here, not at import: SQLite users need not install the postgres extra

        for attempt in (1, 2):
            try:
                pooled = self._idle.pop()
            except IndexError:
                pooled = self._engine.raw_connection()
            conn: psycopg.Connection = pooled.driver_connection
            try:
                row = conn.execute(sql, params).fetchone()
                assert row is not None  # the statement always returns its one row
                done = bool(row[0])
            except psycopg.Error as e:
                if conn.closed:
                    pooled.invalidate()  # the server closed it: drop it, and once more on a fresh one
                    if attempt == 1:
                        continue
                else:
                    self._release(pooled)
                raise self._catalog.failure("write", DBAPIError.instance(None, None, e, psycopg.Error)) from e
            except BaseException:
                pooled.invalidate()  # in an unknown state
                raise
            self._release(pooled)
            return done
        raise AssertionError("unreachable")

    def _release(self, pooled: Any) -> None:
        if len(self._idle) < _KEEP:
            self._idle.append(pooled)
        else:
            pooled.close()
