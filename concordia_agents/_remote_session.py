"""What opening and deleting a session do about its remote objects and its
durability level (``Runtime.session`` and ``Runtime.delete`` call these; the
uploader itself is ``_uploader``)."""

from __future__ import annotations

from typing import Any

from ._catalog import Catalog
from ._catalog._objects import DurabilityInfo, ObjectInfo, mark_deleting
from ._catalog._objects import objects as objects_of
from ._durability import check_level
from ._log import Rollback
from ._replay import LogIndex
from ._store import ObjectStore
from .errors import ConfigurationError, CorruptLogError, RemoteStoreError

__all__ = ["abandon_remote", "choose_level", "delete_remote", "store_may_lag"]


def choose_level(session_id: str, asked: str | None, recorded: DurabilityInfo | None, default: str, *,
                 has_remote: bool) -> str:
    """The level an open gives the session: the one asked for, else the
    recorded one, else the configured default; ``remote`` needs a remote."""
    level = check_level(asked or (recorded.level if recorded else default))
    if level == "remote" and not has_remote:
        how = "asked for" if asked else "recorded for"
        raise ConfigurationError(f"session {session_id!r}: durability 'remote' {how} it, but this runtime has "
                                 "no remote; set CONCORDIA_REMOTE=s3://bucket/prefix (or pass remote=...), or "
                                 "open it with durability='disk'")
    return level


def abandon_remote(catalog: Catalog, session_id: str, token: int, rollback: Rollback, index: LogIndex,
                   log: Any) -> None:
    """A rollback gave up history: the remote objects of it are marked
    ``deleting`` (no fetch or remote epoch counts them again; the uploader or
    gc deletes them): base images other than those the log now starts from
    (the newest and, for a layer, its chain), segments wholly past its new
    end, and what the rollback moved aside."""
    aside = set(rollback.quarantined)
    chain = {p.name for p in index.chain}
    gone = [o.name for o in objects_of(catalog, session_id) if o.state != "deleting" and (
        o.name in aside or (o.kind == "base" and o.name not in chain)
        or (o.kind == "delta" and o.base_offset >= index.end))]
    if gone:
        mark_deleting(catalog, session_id, token, gone)
        log.warning("remote objects of the abandoned history marked for deletion", session=session_id, objects=gone)


def delete_remote(store: ObjectStore, session_id: str, remote: list[ObjectInfo], log: Any) -> None:
    """A deleted session's objects (listed before its rows went). One the store
    refuses now is left to ``gc``, which removes objects of deleted sessions."""
    for o in remote:
        try:
            store.delete(o.key)
        except RemoteStoreError as e:
            log.warning("could not delete a remote object of a deleted session; gc removes it later",
                        session=session_id, object=o.key, error=str(e))


def store_may_lag(e: CorruptLogError, recorded: DurabilityInfo) -> CorruptLogError:
    """A refused open of a remote session, before its advice to roll back: the
    object store may only be behind (a last segment still uploading)."""
    return CorruptLogError(
        e.reason + f". The object store holds epochs up to {recorded.remote_epoch}; if the session's last owner "
        "closed it moments ago, its last segment may still be uploading: retry before rolling back",
        path=e.path, offset=e.offset, orig=e.orig)
