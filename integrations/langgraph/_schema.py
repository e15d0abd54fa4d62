"""The graph-checkpoint tables, kept in the Concordia catalog database.

They belong to this integration (the core catalog knows nothing of LangGraph),
so they carry their own append-only migration list and version row
(``concordia_lg_schema``), like the core's. Every row hangs off its thread's
session (``concordia_sessions.id``): deleting the session deletes the graph's
checkpoints with it. On SQLite that is a foreign key with ``ON DELETE
CASCADE``. On PostgreSQL it is a trigger on ``concordia_sessions`` (from
version 2): a foreign key check locks the session's row once per inserted row
(``FOR KEY SHARE``), which cost a tenth of a ``put`` in the benchmark, and the
fenced writes already prove the session exists (they lock its lease row, which
a session delete removes).

Storage layout (the point of it: a channel value is stored once per version):

* ``concordia_lg_checkpoints`` — one row per checkpoint: the checkpoint
  (serialized with the saver's serde, then compressed: see ``ZLIB``) whose
  ``channel_values`` keep only the
  small scalar values (None, bool, int, float, str up to ``INLINE_STR``
  characters: a blob row costs more than such a value, so they ride along in
  every checkpoint, as in PostgresSaver), its metadata, the parent ID, the run
  ID (for ``delete_for_runs``) and whether the thread uses a ``DeltaChannel``
  (``prune`` refuses those, as PostgresSaver does). The channel versions are
  read from the checkpoint itself (version 1 kept a JSON copy of them).
* ``concordia_lg_blobs`` — ``(thread, ns, channel, version) → value`` for every
  other value; written only for the channels a ``put`` lists in
  ``new_versions``. A channel in ``new_versions`` without a value gets no row
  (version 1 stored an ``"empty"`` row; readers still skip those). On
  PostgreSQL 14+ built with lz4, large values are TOAST-compressed with lz4
  instead of pglz: the server compressed a growing message list on every
  ``put``, and lz4 took less time and stored fewer bytes (benchmark: 760 KiB
  against 768–784 KiB; PostgresSaver uses pglz).
* ``concordia_lg_writes`` — pending writes keyed ``(thread, ns, checkpoint, task,
  idx)``.

A ``type`` column holds the serde's type name for the bytes beside it, or
``ZLIB`` + that name when the bytes are the serde's bytes compressed with zlib
(RFC 1950); ``pack`` does that for a checkpoint of at least ``ZLIB_MIN`` bytes
when it saves space. Checkpoints are small (PostgreSQL's TOAST compresses only
rows over 2 KB) and mostly 49-character channel versions: zlib level 1 halves
them (652 → 299 bytes on average in the benchmark, 13 µs).

Column order of the three tables is the order of ``*_COLUMNS``: the saver's
write paths (``_sqlite``, ``_pg``) build rows as tuples in that order.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    inspect,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError

from concordia_agents import SchemaVersionError

__all__ = ["BLOBS", "BLOB_COLUMNS", "CHECKPOINTS", "CHECKPOINT_COLUMNS", "INLINE_STR", "INLINE_TYPES",
           "LG_SCHEMA_VERSION", "SCHEMA", "WRITES", "WRITE_COLUMNS", "ZLIB", "ZLIB_MIN", "migrate", "pack", "unpack"]

metadata = MetaData()
# The core's table, declared only so the foreign keys resolve (never created here).
Table("concordia_sessions", metadata, Column("id", String(512), primary_key=True))
_bytes = LargeBinary()


def _thread() -> Column:
    return Column("session_id", String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"),
                  primary_key=True)


SCHEMA = Table("concordia_lg_schema", metadata,
               Column("id", Integer, primary_key=True),
               Column("version", Integer, nullable=False),
               Column("updated_at", Float, nullable=False))

CHECKPOINTS = Table(
    "concordia_lg_checkpoints", metadata, _thread(),
    Column("checkpoint_ns", String(512), primary_key=True),
    Column("checkpoint_id", String(64), primary_key=True),
    Column("parent_checkpoint_id", String(64), nullable=True),
    Column("type", String(32), nullable=False),
    Column("checkpoint", _bytes, nullable=False),
    Column("metadata_type", String(32), nullable=False),
    Column("metadata", _bytes, nullable=False),
    Column("run_id", String(128), nullable=True, index=True),
    Column("uses_delta", Boolean, nullable=False))

BLOBS = Table(
    "concordia_lg_blobs", metadata, _thread(),
    Column("checkpoint_ns", String(512), primary_key=True),
    Column("channel", String(512), primary_key=True),
    Column("version", String(128), primary_key=True),
    Column("type", String(32), nullable=False),
    Column("blob", _bytes, nullable=True))

WRITES = Table(
    "concordia_lg_writes", metadata, _thread(),
    Column("checkpoint_ns", String(512), primary_key=True),
    Column("checkpoint_id", String(64), primary_key=True),
    Column("task_id", String(128), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("channel", String(512), nullable=False),
    Column("type", String(32), nullable=False),
    Column("blob", _bytes, nullable=True),
    Column("task_path", String(1024), nullable=False))

#: table columns in order (the write paths build rows as tuples in this order)
CHECKPOINT_COLUMNS = tuple(c.name for c in CHECKPOINTS.columns)
BLOB_COLUMNS = tuple(c.name for c in BLOBS.columns)
WRITE_COLUMNS = tuple(c.name for c in WRITES.columns)
#: values kept inside the checkpoint instead of a blob row: these exact types, and
#: str of at most INLINE_STR characters (longer ones are stored once per version)
INLINE_TYPES = (type(None), bool, int, float)
INLINE_STR = 64
#: type-name prefix of zlib-compressed bytes; pack compresses from this many bytes on
ZLIB = "zlib:"
ZLIB_MIN = 128


def pack(serde: Any, obj: Any) -> tuple[str, bytes]:
    """``(type, bytes)`` of ``obj``: the serde's, compressed when that saves space."""
    type_, data = serde.dumps_typed(obj)
    if len(data) >= ZLIB_MIN:
        packed = zlib.compress(data, 1)
        if len(packed) < len(data):
            return ZLIB + type_, packed
    return type_, data


def unpack(serde: Any, type_: str, data: bytes) -> Any:
    """The object ``pack`` (or the bare serde) stored as ``(type_, data)``."""
    if type_.startswith(ZLIB):
        return serde.loads_typed((type_[len(ZLIB):], zlib.decompress(data)))
    return serde.loads_typed((type_, data))


def _v1(conn: Connection) -> None:
    """Checkpoints (with a JSON copy of channel_versions and created_at), blobs
    and writes: version 1's tables, frozen here."""
    md = MetaData()
    Table("concordia_sessions", md, Column("id", String(512), primary_key=True))
    sid = lambda: Column(  # noqa: E731 - a column factory for the snapshot
        "session_id", String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"), primary_key=True)
    Table("concordia_lg_checkpoints", md, sid(),
          Column("checkpoint_ns", String(512), primary_key=True),
          Column("checkpoint_id", String(64), primary_key=True),
          Column("parent_checkpoint_id", String(64), nullable=True),
          Column("type", String(32), nullable=False),
          Column("checkpoint", LargeBinary(), nullable=False),
          Column("metadata_type", String(32), nullable=False),
          Column("metadata", LargeBinary(), nullable=False),
          Column("channel_versions", JSONB().with_variant(JSON(), "sqlite"), nullable=False),
          Column("run_id", String(128), nullable=True, index=True),
          Column("uses_delta", Boolean, nullable=False),
          Column("created_at", Float, nullable=False))
    Table("concordia_lg_blobs", md, sid(),
          Column("checkpoint_ns", String(512), primary_key=True),
          Column("channel", String(512), primary_key=True),
          Column("version", String(128), primary_key=True),
          Column("type", String(32), nullable=False),
          Column("blob", LargeBinary(), nullable=True))
    Table("concordia_lg_writes", md, sid(),
          Column("checkpoint_ns", String(512), primary_key=True),
          Column("checkpoint_id", String(64), primary_key=True),
          Column("task_id", String(128), primary_key=True),
          Column("idx", Integer, primary_key=True),
          Column("channel", String(512), nullable=False),
          Column("type", String(32), nullable=False),
          Column("blob", LargeBinary(), nullable=True),
          Column("task_path", String(1024), nullable=False))
    md.create_all(conn, tables=[t for name, t in md.tables.items() if name != "concordia_sessions"])


def _v2(conn: Connection) -> None:
    """Checkpoints lose ``channel_versions`` (a copy of what the serialized
    checkpoint holds: 35 % of a row on PostgreSQL in the benchmark) and the
    unused ``created_at``. Existing rows stay readable: their checkpoints carry
    their versions, and their ``"empty"`` blob rows are skipped on load.

    PostgreSQL only: the foreign keys to ``concordia_sessions`` give way to a
    trigger that deletes a thread's rows with its session (what ``ON DELETE
    CASCADE`` did), and values are compressed with lz4 where the server has it
    (see the module docstring)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ALTER TABLE concordia_lg_checkpoints DROP COLUMN channel_versions, "
                             "DROP COLUMN created_at")
        for table in ("concordia_lg_checkpoints", "concordia_lg_blobs", "concordia_lg_writes"):
            for (name,) in conn.exec_driver_sql(
                    "SELECT conname FROM pg_constraint WHERE contype = 'f' AND conrelid = "
                    f"'{table}'::regclass").all():
                conn.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        conn.exec_driver_sql("""
            CREATE FUNCTION concordia_lg_session_deleted() RETURNS trigger LANGUAGE plpgsql
            SET search_path FROM CURRENT AS $$
            BEGIN
                DELETE FROM concordia_lg_writes WHERE session_id = OLD.id;
                DELETE FROM concordia_lg_blobs WHERE session_id = OLD.id;
                DELETE FROM concordia_lg_checkpoints WHERE session_id = OLD.id;
                RETURN OLD;
            END $$""")
        conn.exec_driver_sql("CREATE TRIGGER concordia_lg_session_deleted AFTER DELETE ON concordia_sessions "
                             "FOR EACH ROW EXECUTE FUNCTION concordia_lg_session_deleted()")
        try:
            with conn.begin_nested():  # a savepoint: without lz4 (PostgreSQL < 14, or built without it) keep pglz
                for table in ("concordia_lg_blobs", "concordia_lg_writes"):
                    conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN blob SET COMPRESSION lz4")
        except DBAPIError:
            pass
        return
    # SQLite: ALTER TABLE ... DROP COLUMN needs SQLite 3.35; a table rebuild works everywhere.
    md = MetaData()
    Table("concordia_sessions", md, Column("id", String(512), primary_key=True))
    Table("concordia_lg_checkpoints_v2", md,
          Column("session_id", String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"),
                 primary_key=True),
          Column("checkpoint_ns", String(512), primary_key=True),
          Column("checkpoint_id", String(64), primary_key=True),
          Column("parent_checkpoint_id", String(64), nullable=True),
          Column("type", String(32), nullable=False),
          Column("checkpoint", LargeBinary(), nullable=False),
          Column("metadata_type", String(32), nullable=False),
          Column("metadata", LargeBinary(), nullable=False),
          Column("run_id", String(128), nullable=True),
          Column("uses_delta", Boolean, nullable=False)).create(conn)
    keep = ("session_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type, checkpoint, metadata_type, "
            "metadata, run_id, uses_delta")
    conn.exec_driver_sql(
        f"INSERT INTO concordia_lg_checkpoints_v2 ({keep}) SELECT {keep} FROM concordia_lg_checkpoints")
    conn.exec_driver_sql("DROP TABLE concordia_lg_checkpoints")
    conn.exec_driver_sql("ALTER TABLE concordia_lg_checkpoints_v2 RENAME TO concordia_lg_checkpoints")
    conn.exec_driver_sql("CREATE INDEX ix_concordia_lg_checkpoints_run_id ON concordia_lg_checkpoints (run_id)")


MIGRATIONS = [_v1, _v2]
LG_SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: Connection, dialect: str) -> None:
    """Bring the graph tables to ``LG_SCHEMA_VERSION`` inside the caller's
    write transaction; refuse a newer schema."""
    if dialect == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(260623522)")
    if not inspect(conn).has_table(SCHEMA.name):
        SCHEMA.create(conn)
    current = conn.execute(select(SCHEMA.c.version).where(SCHEMA.c.id == 1)).scalar()
    if current is not None and current > LG_SCHEMA_VERSION:
        raise SchemaVersionError(
            f"graph checkpoint tables have schema version {current}; this Concordia understands versions up to "
            f"{LG_SCHEMA_VERSION}. Upgrade Concordia (pip install -U concordia-agents).")
    for version in range(current or 0, LG_SCHEMA_VERSION):
        MIGRATIONS[version](conn)
    if current is None:
        conn.execute(SCHEMA.insert().values(id=1, version=LG_SCHEMA_VERSION, updated_at=time.time()))
    elif current != LG_SCHEMA_VERSION:
        conn.execute(SCHEMA.update().where(SCHEMA.c.id == 1).values(version=LG_SCHEMA_VERSION,
                                                                    updated_at=time.time()))
