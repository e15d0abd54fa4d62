"""The catalog's record of remote storage: each session's objects in the
object store and its durability level and remote progress (tables of
migration 3). Owner writes are fenced by the session's token, as every other
owner write (``Catalog.check_token``).

Object protocol (the uploader's, ``_uploader``):

1. ``begin_upload`` makes the row (``uploading``; size as listed, digest not
   yet known) before a byte is sent, so an object in the bucket without a row
   was never in flight: gc may judge it.
2. ``finish_upload`` marks it ``remote`` once the server has verified it, with
   the size and SHA-256 of the bytes sent.
3. ``record_remote`` moves the session's remote epoch forward (never back,
   except through ``Catalog.roll_back``'s explicit rollback).
4. ``mark_deleting`` (compaction made the object unnecessary) then, after the
   object is deleted, ``forget_objects``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from .._durability import check_level
from ._catalog import Catalog
from ._models import DurabilityRow, ObjectRow

__all__ = [
    "DurabilityInfo",
    "ObjectInfo",
    "begin_upload",
    "durability",
    "finish_upload",
    "forget_objects",
    "mark_deleting",
    "objects",
    "objects_of_all",
    "record_remote",
    "roll_back_remote",
    "set_level",
]

@dataclass(frozen=True, slots=True)
class ObjectInfo:
    session_id: str
    name: str
    key: str
    kind: str  #: "delta" or "base"
    token: int
    base_offset: int
    state: str  #: "uploading", "remote" or "deleting"
    bytes: int
    sha256: str
    uploaded_at: float | None = None


@dataclass(frozen=True, slots=True)
class DurabilityInfo:
    level: str
    remote_epoch: int = 0
    remote_offset: int = 0
    remote_at: float | None = None


def set_level(catalog: Catalog, session_id: str, token: int, level: str) -> None:
    check_level(level)
    with catalog.write() as s:
        catalog.check_token(s, session_id, token)
        row = s.get(DurabilityRow, session_id)
        if row is None:
            s.add(DurabilityRow(session_id=session_id, level=level, remote_epoch=0, remote_offset=0))
        else:
            row.level = level


def durability(catalog: Catalog, session_id: str) -> DurabilityInfo | None:
    with catalog.read() as s:
        row = s.get(DurabilityRow, session_id)
        return None if row is None else DurabilityInfo(row.level, row.remote_epoch, row.remote_offset, row.remote_at)


def _info(r: ObjectRow) -> ObjectInfo:
    return ObjectInfo(r.session_id, r.name, r.key, r.kind, r.token, r.base_offset, r.state, r.bytes, r.sha256,
                      r.uploaded_at)


def objects(catalog: Catalog, session_id: str) -> list[ObjectInfo]:
    with catalog.read() as s:
        return [_info(r) for r in s.scalars(select(ObjectRow).where(ObjectRow.session_id == session_id)
                                            .order_by(ObjectRow.kind, ObjectRow.token, ObjectRow.base_offset))]


def objects_of_all(catalog: Catalog) -> list[ObjectInfo]:
    with catalog.read() as s:
        return [_info(r) for r in s.scalars(select(ObjectRow))]


def begin_upload(catalog: Catalog, token: int, obj: ObjectInfo) -> None:
    with catalog.write() as s:
        catalog.check_token(s, obj.session_id, token)
        s.merge(ObjectRow(session_id=obj.session_id, name=obj.name, key=obj.key, kind=obj.kind, token=obj.token,
                          base_offset=obj.base_offset, state="uploading", bytes=obj.bytes, sha256=obj.sha256,
                          created_at=time.time(), uploaded_at=None))


def finish_upload(catalog: Catalog, session_id: str, token: int, name: str, *, size: int, sha256: str) -> None:
    """The object is in the store, verified: ``size`` bytes of SHA-256 ``sha256``."""
    with catalog.write() as s:
        catalog.check_token(s, session_id, token)
        s.execute(update(ObjectRow).where(ObjectRow.session_id == session_id, ObjectRow.name == name)
                  .values(state="remote", uploaded_at=time.time(), bytes=size, sha256=sha256))


def record_remote(catalog: Catalog, session_id: str, token: int, *, epoch: int, offset: int) -> None:
    """The newest epoch restorable from the ``remote`` objects alone (only forward)."""
    with catalog.write() as s:
        catalog.check_token(s, session_id, token)
        row = s.get(DurabilityRow, session_id)
        if row is None:
            s.add(DurabilityRow(session_id=session_id, level="remote", remote_epoch=epoch, remote_offset=offset,
                                remote_at=time.time()))
        elif epoch > row.remote_epoch:
            row.remote_epoch, row.remote_offset, row.remote_at = epoch, offset, time.time()


def roll_back_remote(catalog: Catalog, session_id: str, token: int, *, epoch: int, offset: int) -> None:
    """An explicit rollback below the remote epoch (``allow_rollback``): the remote epoch follows it."""
    with catalog.write() as s:
        catalog.check_token(s, session_id, token)
        row = s.get(DurabilityRow, session_id)
        if row is not None and row.remote_epoch > epoch:
            row.remote_epoch, row.remote_offset = epoch, offset


def mark_deleting(catalog: Catalog, session_id: str, token: int, names: list[str]) -> None:
    with catalog.write() as s:
        catalog.check_token(s, session_id, token)
        s.execute(update(ObjectRow).where(ObjectRow.session_id == session_id, ObjectRow.name.in_(names))
                  .values(state="deleting"))


def forget_objects(catalog: Catalog, session_id: str, names: list[str]) -> None:
    """Drop the rows of objects already deleted from the store (no token: gc
    and ``delete`` call it for sessions nobody owns)."""
    with catalog.write() as s:
        s.execute(delete(ObjectRow).where(ObjectRow.session_id == session_id, ObjectRow.name.in_(names)))
