"""Garbage collection of a home: remove only what can be proven orphaned.

``Runtime.gc`` calls ``collect`` with a ``GcContext`` (the runtime's config,
catalog, owner ID, session directory naming and lease give-back). Protocol,
in order: list the session directories and rings on disk, then the catalog
(a session's row is committed before its files are made, so every file of a
live session is in the listing that follows); judge each file; remove, or in
a dry run only report, each with its reason. Anything not provably orphaned is
kept and reported with why.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_runtime.records import session_tag

from ._catalog import Catalog, SessionInfo
from ._home import read_session_marker
from ._log import kept_ring_files, ring_files, ring_holds_unflushed
from ._owner import local_process_gone
from .config import RuntimeConfig
from .errors import OwnershipError, SessionKindError, SessionNotFound

__all__ = ["GcContext", "GcItem", "GcReport", "collect"]


@dataclass(frozen=True, slots=True)
class GcItem:
    path: Path | str  #: a file of the home, or an object's ``s3://bucket/key``
    reason: str


@dataclass(slots=True)
class GcReport:
    """What :meth:`Runtime.gc` removed (or, in a dry run, would remove) and what
    it kept although no session refers to it, each with the reason."""

    dry_run: bool
    removed: list[GcItem] = field(default_factory=list)
    kept: list[GcItem] = field(default_factory=list)

    @property
    def paths(self) -> list[Path | str]:
        return [i.path for i in self.removed]


@dataclass(frozen=True, slots=True)
class GcContext:
    """What gc needs of the runtime."""

    config: RuntimeConfig
    catalog: Catalog
    owner: str
    session_dir: Callable[[str], Path]
    give_back: Callable[[str, int, Any], None]  #: hand a lease taken with ``catalog.take`` back
    log: Any


def collect(ctx: GcContext, *, dry_run: bool = False) -> GcReport:
    """Remove files that no session refers to, and only what can be proven
    orphaned (``dry_run``: report without removing):

    * a session directory the catalog does not list, whose own marker
      (``session.json``) names this catalog and an incarnation of the
      session that the catalog recorded as deleted (a tombstone). A
      directory without a marker, naming another catalog, or of a session
      with no tombstone (a catalog restored from a backup) is kept;
    * the host ring of a closed session whose bytes are all in segments (a
      ring still holding unflushed bytes is kept: resume the session to
      flush them), and a ring of this home that no session has, if it holds
      nothing unflushed or its session was deleted;
    * a ring kept under a private name (``_warm_rings``) by a process of this
      machine that is gone (it was renamed only once flushed);
    * a compaction's temporary file in a session that no process owns.

    The home is bound to its catalog (``Runtime.open`` refuses another one),
    so a wrong ``--catalog`` never gets here."""
    report = GcReport(dry_run=dry_run)
    root = ctx.config.home / "sessions"
    # Files first, then the catalog: a session's row is committed before its
    # directory and ring are made, so every file listed here that belongs to a
    # live session is in the catalog listing that follows.
    dirs = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    rings = sorted(ring_files(ctx.config).items())
    infos = {i.id: i for i in ctx.catalog.list()}
    by_dir = {ctx.session_dir(i).name: info for i, info in infos.items()}
    catalog_id = ctx.catalog.catalog_id

    def remove(path: Path, reason: str) -> None:
        if not dry_run:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        report.removed.append(GcItem(path, reason))

    for d in dirs:
        info = by_dir.get(d.name)
        if info is not None:
            if info.status != "running":
                for tmp in sorted(d.glob(".base-*.tmp*")):
                    remove(tmp, f"temporary file of an unfinished compaction of session {info.id!r}")
            continue
        marker = read_session_marker(d)
        sid = str(marker.get("session_id")) if marker else ""
        created_at = marker.get("created_at") if marker else None
        if marker is None:
            report.kept.append(GcItem(d, "no catalog lists it, and it has no session.json naming its catalog: "
                                         "not provably orphaned"))
        elif marker.get("catalog_id") != catalog_id:
            report.kept.append(GcItem(d, f"belongs to another catalog (ID {marker.get('catalog_id')})"))
        elif not isinstance(created_at, (int, float)) or not ctx.catalog.deleted(sid, float(created_at)):
            report.kept.append(GcItem(d, f"session {sid!r}: the catalog does not list it and holds no record of "
                                         "deleting it (a catalog restored from a backup?): not provably orphaned"))
        elif d.name != ctx.session_dir(sid).name:
            # set aside by a later incarnation (".orphaned-..."): nobody opens it again
            remove(d, f"files of deleted session {sid!r}, set aside when the ID was used again")
        else:
            _deleted_dir(ctx, sid, float(created_at), d, remove, report)
    tags = {session_tag(i): info for i, info in infos.items()}
    deleted_tags = {session_tag(sid) for sid in ctx.catalog.tombstoned_ids()}
    for rp, host, pid in kept_ring_files(ctx.config):
        if local_process_gone(host, pid):
            remove(rp, f"ring kept by process {pid}, which is gone; it was kept only once its bytes were all "
                       "in segments")
    for tag, rp in rings:
        info = tags.get(tag)
        if info is None:
            unflushed = ring_holds_unflushed(rp)
            if not unflushed:
                remove(rp, "no session of this home's catalog has this ring's tag, and it holds no unflushed bytes")
            elif tag in deleted_tags:
                remove(rp, "ring of a deleted session")
            else:
                report.kept.append(GcItem(rp, f"no session of the catalog has this ring's tag, but it holds "
                                              f"{unflushed} unflushed bytes and no deleted session had it"))
        elif info.status == "closed":
            _closed_ring(ctx, info, rp, remove, report)
    for item in report.removed:
        ctx.log.info("gc", path=str(item.path), reason=item.reason, dry_run=dry_run)
    return report

def _deleted_dir(ctx: GcContext, sid: str, created_at: float, d: Path, remove: Any, report: GcReport) -> None:
    """Remove the directory of a deleted session holding the session ID's lease
    (a catalog row made for the purpose, deleted after): a process creating
    the session again meanwhile either waits for it or is seen here."""
    if report.dry_run:
        remove(d, f"session {sid!r} was deleted from the catalog")
        return
    try:
        token, created, prior = ctx.catalog.take(sid, owner=ctx.owner, ttl=ctx.config.lease_ttl,
                                                  backend="gc", create=True)
    except (OwnershipError, SessionKindError):
        report.kept.append(GcItem(d, f"session {sid!r} is being opened by another process"))
        return
    if not created:
        ctx.give_back(sid, token, prior)
        report.kept.append(GcItem(d, f"session {sid!r} was created again meanwhile"))
        return
    try:
        marker = read_session_marker(d)
        if marker is not None and marker.get("created_at") == created_at:
            remove(d, f"session {sid!r} was deleted from the catalog")
        else:
            report.kept.append(GcItem(d, f"session {sid!r}: its directory changed meanwhile"))
    finally:
        ctx.catalog.delete(sid, owner_token=token)



def _closed_ring(ctx: GcContext, info: SessionInfo, rp: Path, remove: Any, report: GcReport) -> None:
    """Remove a closed session's ring if all its bytes are in segments, holding
    the session's lease meanwhile so that no process reopens it under us (a
    dry run only looks: it takes no lease, so it writes nothing)."""
    taken = None
    if not report.dry_run:
        try:
            taken = ctx.catalog.take(info.id, owner=ctx.owner, ttl=ctx.config.lease_ttl,
                                      backend=info.backend, create=False)
        except (OwnershipError, SessionNotFound):
            report.kept.append(GcItem(rp, f"session {info.id!r} was reopened meanwhile"))
            return
    try:
        unflushed = ring_holds_unflushed(rp)
        if unflushed:
            report.kept.append(GcItem(rp, f"closed session {info.id!r}, but the ring holds {unflushed} bytes "
                                          "not in its segments; resume the session to flush them"))
        else:
            remove(rp, f"ring of closed session {info.id!r}; every byte is in its segments")
    finally:
        if taken is not None:
            token, _, prior = taken
            ctx.give_back(info.id, token, prior)
