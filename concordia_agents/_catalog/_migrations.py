"""Versioned catalog migrations, in code, append-only.

``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``. Never edit
a shipped migration: each one builds its tables from its own frozen snapshot
(not from the ORM models, which follow the newest version), so a fresh catalog
and an upgraded one end up identical. A catalog whose version is newer than
``SCHEMA_VERSION`` is refused (``SchemaVersionError``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]


def _v1(conn: Connection) -> None:
    """Sessions, leases, regions, durable-epoch milestones, segments."""
    md = MetaData()
    js = JSONB().with_variant(JSON(), "sqlite")
    sid = lambda: Column(  # noqa: E731 - a column factory for the snapshot
        "session_id", String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"), primary_key=True)
    Table("concordia_sessions", md,
          Column("id", String(512), primary_key=True),
          Column("created_at", Float, nullable=False),
          Column("closed_at", Float, nullable=True),
          Column("backend", String(32), nullable=False),
          Column("last_epoch", BigInteger, nullable=False, default=0),
          Column("durable_offset", BigInteger, nullable=False, default=0),
          Column("log_bytes", BigInteger, nullable=False, default=0),
          Column("labels", js, nullable=False))
    Table("concordia_leases", md, sid(),
          Column("owner", String(256), nullable=False),
          Column("token", BigInteger, nullable=False),
          Column("acquired_at", Float, nullable=False),
          Column("heartbeat_at", Float, nullable=False),
          Column("expires_at", Float, nullable=False),
          Column("released", Boolean, nullable=False))
    Table("concordia_regions", md, sid(),
          Column("name", String(256), primary_key=True),
          Column("region_id", Integer, nullable=False),
          Column("kind", String(16), nullable=False),
          Column("dtype", String(32), nullable=False),
          Column("shape", js, nullable=False),
          Column("library", String(16), nullable=False),
          Column("device", String(32), nullable=False),
          Column("page_size", Integer, nullable=False),
          Column("seq_axis", Integer, nullable=False),
          Column("registered_epoch", BigInteger, nullable=False))
    Table("concordia_epochs", md, sid(),
          Column("epoch", BigInteger, primary_key=True),
          Column("log_offset", BigInteger, nullable=False),
          Column("durable_at", Float, nullable=False))
    Table("concordia_segments", md, sid(),
          Column("name", String(128), primary_key=True),
          Column("token", BigInteger, nullable=False),
          Column("kind", String(8), nullable=False),
          Column("base_offset", BigInteger, nullable=False),
          Column("end_offset", BigInteger, nullable=False),
          Column("bytes", BigInteger, nullable=False),
          Column("sealed", Boolean, nullable=False),
          Column("created_at", Float, nullable=False))
    md.create_all(conn)


def _v2(conn: Connection) -> None:
    """The catalog's identity, and tombstones of deleted sessions.

    * ``concordia_catalog_id``: one row with a random ID, made once. A
      Concordia home records the ID of the catalog it belongs to (``_home``),
      so that a home opened with another catalog (a typo in a URL, a forgotten
      environment variable) is refused instead of looking empty to ``gc``.
    * ``concordia_tombstones``: (session ID, its row's ``created_at``) of every
      deleted session. ``gc`` removes a session directory only if a tombstone
      matches the incarnation its marker names: "the catalog does not list it"
      is no proof (a catalog restored from a backup forgets newer sessions)."""
    md = MetaData()
    Table("concordia_catalog_id", md,
          Column("id", Integer, primary_key=True),
          Column("catalog_id", String(64), nullable=False),
          Column("created_at", Float, nullable=False))
    Table("concordia_tombstones", md,
          Column("session_id", String(512), primary_key=True),
          Column("created_at", Float, primary_key=True),
          Column("deleted_at", Float, nullable=False))
    md.create_all(conn)
    conn.execute(md.tables["concordia_catalog_id"].insert().values(
        id=1, catalog_id=secrets.token_hex(16), created_at=time.time()))


def _v3(conn: Connection) -> None:
    """Remote storage: the objects of each session in the object store, and
    each session's durability level and remote progress.

    * ``concordia_objects``: one row per sealed segment or base image the
      uploader handles, made (state ``uploading``) *before* the upload starts,
      so an object in the bucket without a row is never one in flight;
      ``remote`` once the server verified it; ``deleting`` once compaction
      made it unnecessary (the row goes after the object).
    * ``concordia_durability``: the session's level (``local``, ``disk``,
      ``remote``) and the newest epoch restorable from the ``remote`` objects
      alone (``remote_epoch``, its log offset and when it got there)."""
    md = MetaData()
    sid = lambda: Column(  # noqa: E731 - a column factory for the snapshot
        "session_id", String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"), primary_key=True)
    Table("concordia_sessions", md, Column("id", String(512), primary_key=True))  # the FK's target, not created
    Table("concordia_objects", md, sid(),
          Column("name", String(128), primary_key=True),
          Column("key", String(1024), nullable=False),
          Column("kind", String(8), nullable=False),
          Column("token", BigInteger, nullable=False),
          Column("base_offset", BigInteger, nullable=False),
          Column("state", String(12), nullable=False),
          Column("bytes", BigInteger, nullable=False),
          Column("sha256", String(64), nullable=False),
          Column("created_at", Float, nullable=False),
          Column("uploaded_at", Float, nullable=True))
    Table("concordia_durability", md, sid(),
          Column("level", String(8), nullable=False),
          Column("remote_epoch", BigInteger, nullable=False),
          Column("remote_offset", BigInteger, nullable=False),
          Column("remote_at", Float, nullable=True))
    md.create_all(conn, tables=[md.tables["concordia_objects"], md.tables["concordia_durability"]])


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3]
SCHEMA_VERSION = len(MIGRATIONS)
