"""What opening a session's log checks against the catalog, and what a
rollback gives up.

* ``check_log`` (``Runtime.verify``, ``concordia sessions recover``): read-only.
* ``check_against_catalog`` (``SessionLog.open``): a log holding fewer epochs
  than the catalog recorded as durable is refused with the missing files and
  the epochs at stake, unless the caller allows a rollback; then ``Rollback``
  describes it and ``quarantine`` moves what is given up aside (kept).
* ``set_aside_leftovers``: files under a newly created session's name are an
  earlier incarnation's; they are moved aside, never read into the new one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_runtime.logring import LogRing
from gpu_runtime.records import session_tag as session_tag_of

from ._catalog import Catalog
from ._home import make_private_dir
from ._replay import LogIndex, scan
from ._ring_verify import intact_end
from ._segments import fsync_dir, list_segments
from .errors import CorruptLogError

__all__ = [
    "LogCheck",
    "Rollback",
    "check_against_catalog",
    "check_log",
    "missing_files",
    "quarantine",
    "set_aside_leftovers",
    "with_missing",
]


@dataclass(frozen=True, slots=True)
class Rollback:
    """What an open with ``allow_rollback`` gave up: the catalog had recorded
    ``recorded_epoch`` as durable, the log held intact epochs up to ``epoch``."""

    recorded_epoch: int
    epoch: int
    missing: tuple[str, ...]  #: segment files the catalog lists that are gone
    damage: str | None  #: the first damaged record or gap the salvage stopped at
    skipped_ring_bytes: int = 0  #: bytes of the host ring after a damaged record
    quarantined: tuple[str, ...] = ()  #: files moved to quarantine-<token>/ (kept, no longer history)

    def __str__(self) -> str:
        parts = [f"resumed at epoch {self.epoch}; the catalog had recorded epoch {self.recorded_epoch} as durable"]
        if self.recorded_epoch > self.epoch:
            parts.append(f"gave up epochs {self.epoch + 1}..{self.recorded_epoch}")
        if self.missing:
            parts.append(f"missing segment files: {', '.join(self.missing)}")
        if self.damage:
            parts.append(f"stopped at: {self.damage}")
        if self.skipped_ring_bytes:
            parts.append(f"dropped {self.skipped_ring_bytes} bytes of the host ring after a damaged record")
        if self.quarantined:
            parts.append(f"moved to quarantine: {', '.join(self.quarantined)}")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class LogCheck:
    """What ``Runtime.verify`` found: the newest epoch whose records all verify,
    against the epoch the catalog recorded as durable."""

    session_id: str
    recorded_epoch: int
    epoch: int  #: newest intact epoch in the segments
    damage: str | None  #: the first damaged record or gap, if any
    missing: tuple[str, ...]  #: segment files the catalog lists that are gone
    ring_bytes: int  #: bytes a crashed owner left in the host ring (drained at the next open)
    ring_damage: str | None  #: the first damaged record among them, if any

    @property
    def ok(self) -> bool:
        """Nothing lost: an open would restore every recorded epoch."""
        return (self.damage is None and self.ring_damage is None and not self.missing
                and self.epoch >= self.recorded_epoch)

    def __str__(self) -> str:
        if self.ok:
            extra = f", and {self.ring_bytes} bytes in the host ring to drain" if self.ring_bytes else ""
            return (f"session {self.session_id!r}: log intact, newest epoch {self.epoch} in the segments{extra} "
                    f"(the catalog recorded epoch {self.recorded_epoch} as durable)")
        parts = [f"session {self.session_id!r}: the catalog recorded epoch {self.recorded_epoch} as durable, the "
                 f"newest intact epoch is {self.epoch}"]
        if self.missing:
            parts.append(f"missing segment file(s) {', '.join(self.missing)}")
        if self.damage:
            parts.append(f"damage: {self.damage}")
        if self.ring_damage:
            parts.append(f"host ring damage: {self.ring_damage}")
        parts.append("resume with allow_rollback=True (concordia sessions recover ID --allow-rollback) to continue "
                     f"from epoch {self.epoch}")
        return "; ".join(parts)


def check_log(session_id: str, directory: Path, catalog: Catalog, info: Any, rpath: Path) -> LogCheck:
    """Read-only: verify every record of a session's segments (a salvage scan)
    and what its ring holds past ``consumed``; compare with the catalog."""
    tag = session_tag_of(session_id)
    index = scan(directory, session_tag=tag, salvage=True)
    ring_bytes, ring_damage = 0, None
    if rpath.exists():
        try:
            ring = LogRing.open(rpath)
        except CorruptLogError as e:
            ring_damage = str(e)
        else:
            try:
                ring_bytes = ring.written - ring.consumed
                _, damage = intact_end(ring, tag, ring.consumed, ring.written)
                ring_damage = None if damage is None else str(damage)
            finally:
                ring.close()
    return LogCheck(session_id=session_id, recorded_epoch=info.last_epoch, epoch=index.epoch,
                    damage=str(index.damage) if index.damage is not None else None,
                    missing=missing_files(session_id, directory, catalog, index.end), ring_bytes=ring_bytes,
                    ring_damage=ring_damage)


def missing_files(session_id: str, directory: Path, catalog: Catalog, end: int) -> tuple[str, ...]:
    """Segment files the catalog lists for the session that are gone (base images,
    and delta segments reaching past log offset ``end``)."""
    present = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    return tuple(seg.name for seg in catalog.segments(session_id)
                 if seg.name not in present and (seg.kind == "base" or seg.end_offset > end))


def with_missing(e: CorruptLogError, session_id: str, directory: Path, catalog: Catalog,
                  recorded: int) -> CorruptLogError:
    """The scan's CorruptLogError, naming the files the catalog lists that are
    gone (a lost base image shows as an epoch gap) and how to go on."""
    missing = missing_files(session_id, directory, catalog, 0)
    where = f"; missing segment file(s) {', '.join(missing)}" if missing else ""
    return CorruptLogError(
        f"session {session_id!r}: {e.reason}{where}; the catalog recorded epoch {recorded} as durable. Restore the "
        "files, or resume with allow_rollback=True (concordia sessions recover ID --allow-rollback) to continue "
        "from the newest intact epoch", path=str(directory / missing[0]) if missing else e.path,
        offset=None if missing else e.offset, orig=e)


def check_against_catalog(session_id: str, directory: Path, index: LogIndex, catalog: Catalog,
                           allow_rollback: bool, skipped_ring: int, recorded: int) -> Rollback | None:
    """Refuse a log that holds less than the catalog recorded as durable (raise
    CorruptLogError naming the missing files and the epochs at stake), or,
    with ``allow_rollback``, describe what is given up. None: nothing is."""
    if index.epoch >= recorded and index.damage is None and not skipped_ring:
        return None
    missing = missing_files(session_id, directory, catalog, index.end)
    if not allow_rollback:
        what = f"missing segment file(s) {', '.join(missing)}" if missing else "a segment file lost or cut short"
        raise CorruptLogError(
            f"session {session_id!r}: the catalog recorded epoch {recorded} as durable, the log holds epochs up to "
            f"{index.epoch} ({what}); resuming would lose epochs {index.epoch + 1}..{recorded}. Restore the files, "
            "or resume with allow_rollback=True (concordia sessions recover ID --allow-rollback) to continue from "
            f"epoch {index.epoch}", path=str(directory / missing[0]) if missing else str(directory))
    return Rollback(recorded_epoch=max(recorded, index.epoch), epoch=index.epoch, missing=missing,
                    damage=str(index.damage) if index.damage is not None else None, skipped_ring_bytes=skipped_ring)


def quarantine(directory: Path, index: LogIndex, token: int) -> tuple[str, ...]:
    """Move what a rollback gives up out of the log, into ``quarantine-<token>/``
    (kept for inspection, invisible to scans): every base image other than the
    one the index starts from (a damaged one would stop every later scan), and
    the delta segments lying wholly past the new end of history. Segments that
    straddle it stay: scans read an older chain only up to a later handoff."""
    bases, deltas = list_segments(directory)
    doomed = [f.path for f in bases if f.path not in index.chain]
    doomed += [f.path for f in deltas if f.base >= index.end]
    if not doomed:
        return ()
    qdir = directory / f"quarantine-{token:010d}"
    make_private_dir(qdir)
    for p in doomed:
        os.replace(p, qdir / p.name)
    fsync_dir(qdir)
    fsync_dir(directory)
    return tuple(p.name for p in doomed)


def set_aside_leftovers(directory: Path, rpath: Path, log: Any) -> None:
    """A session the catalog has just created owns no files yet. Files under its
    name are a deleted (or forgotten) session's: move its directory aside as
    ``<dir>.orphaned-<ns>`` (with its ring, if one is left) instead of reading
    them into the new session; ``gc`` keeps them (their marker names the old
    incarnation) for the user to inspect or delete."""
    if not directory.exists() and not rpath.exists():
        return
    aside = directory.with_name(f"{directory.name}.orphaned-{time.time_ns()}")
    if directory.exists():
        os.replace(directory, aside)
    else:
        make_private_dir(aside)
    if rpath.exists():
        shutil.move(str(rpath), str(aside / "ring.orphaned"))
    fsync_dir(directory.parent)
    log.warning("files of an earlier session with this ID set aside", moved_to=str(aside))
