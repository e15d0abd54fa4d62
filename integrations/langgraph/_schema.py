"""The graph-checkpoint tables, kept in the Concordia catalog database.

They belong to this integration (the core catalog knows nothing of LangGraph),
so they carry their own append-only migration list and version row
(``concordia_lg_schema``), like the core's. Every row hangs off its thread's
session (``concordia_sessions.id``, ``ON DELETE CASCADE``): deleting the session
deletes the graph's checkpoints with it.

Storage layout (the point of it: a channel value is stored once per version):

* ``concordia_lg_checkpoints`` — one row per checkpoint, the checkpoint *without*
  its ``channel_values`` (serialized with the saver's serde), its metadata, the
  parent ID, the run ID (for ``delete_for_runs``), ``channel_versions`` as JSON
  (so blob garbage collection needs no deserialization) and whether the thread
  uses a ``DeltaChannel`` (``prune`` refuses those, as PostgresSaver does).
* ``concordia_lg_blobs`` — ``(thread, ns, channel, version) → value``; written
  only for the channels a ``put`` lists in ``new_versions``.
* ``concordia_lg_writes`` — pending writes keyed ``(thread, ns, checkpoint, task,
  idx)``.
"""

from __future__ import annotations

import time

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

from concordia_agents import SchemaVersionError

__all__ = ["BLOBS", "CHECKPOINTS", "LG_SCHEMA_VERSION", "SCHEMA", "WRITES", "migrate"]

metadata = MetaData()
# The core's table, declared only so the foreign keys resolve (never created here).
Table("concordia_sessions", metadata, Column("id", String(512), primary_key=True))
_json = JSONB().with_variant(JSON(), "sqlite")
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
    Column("channel_versions", _json, nullable=False),
    Column("run_id", String(128), nullable=True, index=True),
    Column("uses_delta", Boolean, nullable=False),
    Column("created_at", Float, nullable=False))

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


def _v1(conn: Connection) -> None:
    """Checkpoints, blobs and writes. Built from the definitions above while
    they are still version 1; the first change to them must freeze a copy of
    these three tables here and add ``_v2``."""
    md = MetaData()
    for table in (metadata.tables["concordia_sessions"], CHECKPOINTS, BLOBS, WRITES):
        table.to_metadata(md)
    md.create_all(conn, tables=[md.tables[t.name] for t in (CHECKPOINTS, BLOBS, WRITES)])


MIGRATIONS = [_v1]
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
