"""A Concordia home, the catalog it belongs to, and who may read it.

Layout of a home (every directory 0700, every file 0600: a KV log is
someone's conversation)::

    <home>/concordia-home.json        marker: the catalog this home belongs to
    <home>/catalog.db                 the default SQLite catalog
    <home>/sessions/<name>-<tag>/     one session's segments and base images,
        session.json                  marker: the session ID and its catalog
    <home>/rings/                     host rings, where there is no /dev/shm

Marker files, format version 1 (JSON objects)::

    concordia-home.json   {"format": 1, "catalog_id": "<hex>", "catalog": "<URL, password hidden>",
                           "created_at": <unix seconds>}
    session.json          {"format": 1, "session_id": "<ID>", "catalog_id": "<hex>",
                           "created_at": <the session row's created_at: which incarnation>}

Why: the catalog says which sessions exist. Opened with the wrong catalog (a
typo in ``--catalog``, a forgotten ``CONCORDIA_CATALOG_URL``), every session
directory of a home would look orphaned, and ``gc`` would delete them all. So
a home records the ID of its catalog (``Catalog.catalog_id``), and opening it
with another is refused (:class:`CatalogMismatchError`) before anything is
read or deleted; ``gc`` deletes a session directory only if its own marker
names this catalog and the catalog holds a tombstone of that very
incarnation of the session (``Catalog.deleted``).

Protocol (``Runtime.open``; ``bind_catalog`` is the only writer of the home
marker):

1. ``prepare_home(home, create=...)`` — check (and make) the directory.
2. ``read_home_marker(home)`` — None for a new home (or one made before
   markers existed).
3. open the catalog, with ``create=False`` where the marker exists (the home's
   catalog must already exist; a missing one is a mismatch, never a new one).
4. ``bind_catalog(home, catalog, marker)`` — compare, or write the marker.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._catalog import Catalog
from ._logging import get_logger
from .errors import CatalogMismatchError, ConfigurationError, HomeNotFound

__all__ = [
    "HOME_MARKER",
    "SESSION_MARKER",
    "HomeMarker",
    "bind_catalog",
    "catalog_missing",
    "make_private_dir",
    "prepare_home",
    "read_home_marker",
    "read_session_marker",
    "write_private_json",
    "write_session_marker",
]

HOME_MARKER = "concordia-home.json"
SESSION_MARKER = "session.json"
MARKER_FORMAT = 1


@dataclass(frozen=True, slots=True)
class HomeMarker:
    catalog_id: str
    catalog: str  #: the URL it was made with, password hidden (for messages)
    created_at: float


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0700; tighten it if it exists,
    is ours and others may enter it (a directory an older version made)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def prepare_home(home: Path, *, create: bool) -> None:
    """Make sure ``home`` exists (creating it 0700 if ``create``), belongs to
    this user, and is private: a home that others may read is tightened to
    0700 with a warning (its files are conversations)."""
    if not home.exists():
        if not create:
            raise HomeNotFound(f"expected a Concordia home at {home}, found no such directory; nothing was created "
                               "(check --home / CONCORDIA_HOME)")
        home.mkdir(parents=True, exist_ok=True, mode=0o700)  # another process may make it at the same moment
    if not home.is_dir():
        raise ConfigurationError(f"Concordia home: expected a directory at {home}, found a file")
    st = home.stat()
    if st.st_uid != os.getuid():
        raise ConfigurationError(f"Concordia home {home}: expected it to belong to this user (uid {os.getuid()}), "
                                 f"found uid {st.st_uid}; its logs would be readable by another account")
    if st.st_mode & 0o077:
        if not create:
            return  # a read-only command reports, it does not change modes
        os.chmod(home, stat.S_IMODE(st.st_mode) & 0o700)
        get_logger().warning("home was readable by other users; made private (0700)", home=str(home),
                             mode=oct(stat.S_IMODE(st.st_mode)))


def write_private_json(path: Path, data: dict[str, Any], *, exclusive: bool = False) -> bool:
    """Write ``data`` to ``path`` as a 0600 file, atomically (temporary name,
    fsync, then rename; with ``exclusive``, a hard link that fails if ``path``
    exists). Returns False if ``exclusive`` and ``path`` existed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"{path}: expected a Concordia marker (JSON), found unreadable content ({e})",
                                 orig=e) from e
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        raise ConfigurationError(f"{path}: expected a marker of format {MARKER_FORMAT}, found "
                                 f"{data.get('format') if isinstance(data, dict) else type(data).__name__}")
    return data


def read_home_marker(home: Path) -> HomeMarker | None:
    data = _read_json(home / HOME_MARKER)
    if data is None:
        return None
    try:
        return HomeMarker(str(data["catalog_id"]), str(data.get("catalog", "?")), float(data.get("created_at", 0)))
    except KeyError as e:
        raise ConfigurationError(f"{home / HOME_MARKER}: expected a catalog_id, found keys {sorted(data)}") from e


def _mismatch(home: Path, marker: HomeMarker, url: str, found: str) -> CatalogMismatchError:
    return CatalogMismatchError(
        f"home {home} belongs to catalog {marker.catalog} (catalog ID {marker.catalog_id}); it was opened with "
        f"catalog {url}, {found}. Pass that catalog (--catalog / CONCORDIA_CATALOG_URL) or another home; "
        "nothing was read or deleted")


def catalog_missing(home: Path, marker: HomeMarker, url: str, error: Exception) -> CatalogMismatchError:
    """The error for a home whose catalog could not be opened with ``create=False``."""
    return _mismatch(home, marker, url, f"where there is no Concordia catalog ({error})")


def bind_catalog(home: Path, catalog: Catalog, marker: HomeMarker | None, *, write: bool = True) -> None:
    """Check that ``catalog`` is the home's catalog, or make it so for a new
    home (``write=False``: check only, as read-only commands do).

    A home made before markers existed (no marker, but session directories)
    is adopted only if the catalog knows at least one of its sessions:
    otherwise the catalog is most likely the wrong one."""
    url = catalog.redacted_url
    if marker is not None:
        if marker.catalog_id != catalog.catalog_id:
            raise _mismatch(home, marker, url, f"whose catalog ID is {catalog.catalog_id}")
        return
    sessions = home / "sessions"
    dirs = [d for d in sessions.iterdir() if d.is_dir()] if sessions.is_dir() else []
    if dirs:
        from gpu_runtime.records import session_tag

        from ._names import session_dir_name

        known = {session_dir_name(i.id, session_tag(i.id)) for i in catalog.list()}
        if not any(d.name in known for d in dirs):
            raise CatalogMismatchError(
                f"home {home} holds {len(dirs)} session directories and no marker naming its catalog; catalog "
                f"{url} knows none of them, so it is most likely not this home's catalog. Pass the right "
                "catalog (--catalog / CONCORDIA_CATALOG_URL) or another home; nothing was read or deleted")
    default = home / "catalog.db"
    if default.exists() and not _is_sqlite_file(url, default):
        # An unmarked home whose own default catalog is not the one opened (graph
        # threads live only in the catalog: no session directory would tell).
        raise CatalogMismatchError(
            f"home {home} has its own catalog {default} and no marker naming its catalog; it was opened with "
            f"catalog {url}. Pass --catalog sqlite:///{default} (or move that file away if the home really "
            "belongs to the other catalog); nothing was read or deleted")
    if not write:
        return
    data = {"format": MARKER_FORMAT, "catalog_id": catalog.catalog_id, "catalog": url, "created_at": time.time()}
    if not write_private_json(home / HOME_MARKER, data, exclusive=True):
        # Another process bound the home meanwhile: it must have bound the same catalog.
        bind_catalog(home, catalog, read_home_marker(home))


def _is_sqlite_file(url: str, path: Path) -> bool:
    """Whether catalog ``url`` is the SQLite database file ``path``."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - an unparsable URL is not that file
        return False
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return False
    try:
        return Path(parsed.database).resolve() == path.resolve()
    except OSError:
        return False


def write_session_marker(directory: Path, session_id: str, catalog_id: str, created_at: float) -> None:
    """Name the session, its incarnation (its catalog row's ``created_at``) and
    the catalog a session directory belongs to (once: a directory is never
    reused by a later incarnation, see ``SessionLog.open``)."""
    path = directory / SESSION_MARKER
    if not path.exists():
        write_private_json(path, {"format": MARKER_FORMAT, "session_id": session_id, "catalog_id": catalog_id,
                                  "created_at": created_at}, exclusive=True)


def read_session_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of a session directory; None if it has none or it is unreadable."""
    try:
        return _read_json(directory / SESSION_MARKER)
    except ConfigurationError:
        return None
