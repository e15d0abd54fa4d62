"""Typed SQLAlchemy models of the catalog (schema version in ``_migrations``).

The catalog says which sessions exist, who owns each (lease and fencing token),
which regions they registered and which segment files hold their log. It is not
written per commit: the flusher records durable progress in batches, and the
log itself is the source of truth for the newest epochs.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "CatalogIdRow",
    "DurabilityRow",
    "EpochRow",
    "LeaseRow",
    "ObjectRow",
    "RegionRow",
    "SchemaVersionRow",
    "SegmentRow",
    "SessionRow",
    "TombstoneRow",
]

JsonType = JSONB().with_variant(JSON(), "sqlite")


class Base(DeclarativeBase):
    pass


class SchemaVersionRow(Base):
    __tablename__ = "concordia_schema"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)


class CatalogIdRow(Base):
    """The catalog's identity (one row, id 1), made by migration 2."""

    __tablename__ = "concordia_catalog_id"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    catalog_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class TombstoneRow(Base):
    """A deleted session: its ID and the ``created_at`` of the row that went (migration 2)."""

    __tablename__ = "concordia_tombstones"
    session_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, primary_key=True)
    deleted_at: Mapped[float] = mapped_column(Float)


class SessionRow(Base):
    __tablename__ = "concordia_sessions"
    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    backend: Mapped[str] = mapped_column(String(32))
    #: last epoch the flusher saw durable (the log may hold newer ones)
    last_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    durable_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    log_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    labels: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)


class LeaseRow(Base):
    __tablename__ = "concordia_leases"
    session_id: Mapped[str] = mapped_column(
        String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[str] = mapped_column(String(256))
    #: fencing token: bumped by every acquisition, never reused
    token: Mapped[int] = mapped_column(BigInteger)
    acquired_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    released: Mapped[bool] = mapped_column(Boolean, default=False)


class RegionRow(Base):
    __tablename__ = "concordia_regions"
    session_id: Mapped[str] = mapped_column(
        String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    region_id: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    dtype: Mapped[str] = mapped_column(String(32))
    shape: Mapped[list[int]] = mapped_column(JsonType)
    library: Mapped[str] = mapped_column(String(16))
    device: Mapped[str] = mapped_column(String(32))
    page_size: Mapped[int] = mapped_column(Integer)
    seq_axis: Mapped[int] = mapped_column(Integer)
    registered_epoch: Mapped[int] = mapped_column(BigInteger)


class EpochRow(Base):
    """Durable-progress milestones written by the flusher (not one per commit)."""

    __tablename__ = "concordia_epochs"
    session_id: Mapped[str] = mapped_column(
        String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    log_offset: Mapped[int] = mapped_column(BigInteger)
    durable_at: Mapped[float] = mapped_column(Float)


class SegmentRow(Base):
    __tablename__ = "concordia_segments"
    session_id: Mapped[str] = mapped_column(
        String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    token: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(8))
    base_offset: Mapped[int] = mapped_column(BigInteger)
    end_offset: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sealed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class ObjectRow(Base):
    """A sealed segment or base image in the object store (migration 3)."""

    __tablename__ = "concordia_objects"
    session_id: Mapped[str] = mapped_column(
        String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(1024))
    kind: Mapped[str] = mapped_column(String(8))
    token: Mapped[int] = mapped_column(BigInteger)
    base_offset: Mapped[int] = mapped_column(BigInteger)
    #: "uploading" (row made before the upload), "remote" (verified by the server), "deleting"
    state: Mapped[str] = mapped_column(String(12))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    uploaded_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class DurabilityRow(Base):
    """A session's durability level and remote progress (migration 3)."""

    __tablename__ = "concordia_durability"
    session_id: Mapped[str] = mapped_column(
        String(512), ForeignKey("concordia_sessions.id", ondelete="CASCADE"), primary_key=True)
    level: Mapped[str] = mapped_column(String(8))
    remote_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    remote_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    remote_at: Mapped[float | None] = mapped_column(Float, nullable=True)
