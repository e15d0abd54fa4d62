"""Garbage collection of the object store: remove only objects that can be
proven orphaned (``Runtime.gc`` runs it after the home's collection when the
runtime has a remote; the same dry run and report).

Protocol: list the objects under ``<prefix>/<catalog id>/`` first, then read
the catalog. The uploader makes an object's row before it sends a byte
(``_catalog._objects``), so an object listed here without a row in the
catalog read afterwards was never in flight. Then, per object:

* a row ``remote`` or ``uploading``: in use (or in flight), kept silently;
* a row ``deleting`` (compaction made it unnecessary, its deletion was cut
  short) of a session no live process owns: removed, then its row;
* no row, of a session the catalog lists: removed only if the session's
  newest remote base image covers it (history folded in); else kept;
* no row, of a session the catalog recorded as deleted (a tombstone) and
  does not list again: removed (``Runtime.delete`` could not reach the store);
* anything else (a session the catalog never heard of: another catalog's
  restore from a backup?): kept, with the reason.

Unfinished multipart uploads under the catalog's prefix (an upload whose
process or connection died; the store keeps their parts, and bills them)
are aborted once older than ``upload_age`` seconds (an hour by default, by
the store's clock), unless a live owner's row says it is uploading that
object now.
"""

from __future__ import annotations

import time
from typing import Any

from ._catalog import Catalog
from ._catalog._objects import ObjectInfo, forget_objects, objects_of_all
from ._segments import SEGMENT_HEADER_SIZE, parse_segment_name
from ._store import ObjectStore, object_key
from ._uploader import covered_by, newest_base
from .errors import RemoteStoreError

__all__ = ["collect_remote"]


def collect_remote(store: ObjectStore, catalog: Catalog, session_dir_name: Any, report: Any, log: Any, *,
                   upload_age: float = 3600.0) -> None:
    """Judge every object of this catalog in ``store``; ``report`` is the
    home's ``GcReport`` (items named ``s3://bucket/key``)."""
    from ._gc import GcItem

    root = object_key(store.location, catalog.catalog_id, "", "")
    listed = list(store.list(root.rstrip("/") + "/"))
    now = time.time()
    uploads = list(store.multipart_uploads(root.rstrip("/") + "/"))
    infos = {i.id: i for i in catalog.list()}
    live = {sid for sid, i in infos.items() if i.status == "running" and (i.expires_at or 0) > now}
    in_flight = {o.key for o in objects_of_all(catalog) if o.state == "uploading" and o.session_id in live}
    for key, upload_id, started in uploads:
        where = f"s3://{store.location.bucket}/{key} (multipart upload {upload_id[:16]}...)"
        if now - started < upload_age or key in in_flight:
            continue  # may be in flight: young, or its session's owner is uploading that object
        reason = f"an unfinished multipart upload started {now - started:.0f} s ago"
        if not report.dry_run:
            try:
                store.abort_upload(key, upload_id)
            except RemoteStoreError as e:
                report.kept.append(GcItem(where, f"{reason}, but aborting it failed: {e}"))
                continue
        report.removed.append(GcItem(where, reason))
        log.info("gc", path=where, reason=reason, dry_run=report.dry_run)
    rows: dict[tuple[str, str], ObjectInfo] = {}
    for o in objects_of_all(catalog):
        rows[(session_dir_name(o.session_id), o.name)] = o
    by_dir = {session_dir_name(sid): sid for sid in infos}
    deleted = {session_dir_name(sid): sid for sid in catalog.tombstoned_ids() if sid not in infos}
    of_session: dict[str, list[ObjectInfo]] = {}
    for o in rows.values():
        of_session.setdefault(o.session_id, []).append(o)
    newest = {sid: newest_base(objs) for sid, objs in of_session.items()}  # (base, its chain's offsets)
    for obj in listed:
        where = f"s3://{store.location.bucket}/{obj.key}"
        parts = obj.key[len(root):].lstrip("/").split("/")
        if len(parts) != 2:
            report.kept.append(GcItem(where, "not a Concordia object name under this catalog's prefix"))
            continue
        dname, fname = parts
        row = rows.get((dname, fname))

        def remove(reason: str, forget: ObjectInfo | None = None, key: str = obj.key, where: str = where) -> None:
            if not report.dry_run:
                try:
                    store.delete(key)
                except RemoteStoreError as e:
                    report.kept.append(GcItem(where, f"{reason}, but deleting it failed: {e}"))
                    return
                if forget is not None:
                    forget_objects(catalog, forget.session_id, [forget.name])
            report.removed.append(GcItem(where, reason))
            log.info("gc", path=where, reason=reason, dry_run=report.dry_run)

        if row is not None:
            if row.state == "deleting" and row.session_id not in live:
                remove(f"session {row.session_id!r}: compaction made it unnecessary; its deletion was cut short",
                       forget=row)
            continue
        if dname in by_dir:
            sid = by_dir[dname]
            parsed = parse_segment_name(fname)
            base, chain = newest.get(sid, (None, frozenset()))
            if parsed is not None and base is not None:
                kind, token, offset = parsed
                end = offset if kind == "base" else offset + max(0, obj.bytes - SEGMENT_HEADER_SIZE)
                if covered_by(base, kind, token, offset, end, chain):
                    remove(f"session {sid!r}: no catalog row, and its remote base image {base.name} covers it")
                    continue
            report.kept.append(GcItem(where, f"session {sid!r} exists but the catalog has no row for this object: "
                                             "not provably orphaned"))
        elif dname in deleted:
            remove(f"session {deleted[dname]!r} was deleted from the catalog")
        else:
            report.kept.append(GcItem(where, "no session of this catalog, live or deleted, has this directory name "
                                             "(a catalog restored from a backup?): not provably orphaned"))
