"""Concordia's exceptions: the substrate's tree plus the session-level errors.

``ConcordiaError`` is the one root; children are named by meaning. Messages say
what was expected and what was found.
"""

from __future__ import annotations

from gpu_runtime.errors import (
    BackendUnavailableError,
    ConcordiaError,
    ConfigurationError,
    CorruptLogError,
    LogFullError,
    RegionError,
)

__all__ = [
    "BackendUnavailableError",
    "CatalogError",
    "CatalogMismatchError",
    "CatalogNotFound",
    "ConcordiaError",
    "ConfigurationError",
    "CorruptLogError",
    "HomeNotFound",
    "LogFullError",
    "MetaError",
    "OwnershipError",
    "RegionError",
    "RemoteStoreError",
    "SchemaVersionError",
    "SessionClosedError",
    "SessionKindError",
    "SessionNotFound",
    "StorageError",
]


class SessionNotFound(ConcordiaError, LookupError):
    """No session with this ID exists in the catalog."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"expected a session with ID {session_id!r} in the catalog, found none")
        self.session_id = session_id


class OwnershipError(ConcordiaError):
    """Another live process owns the session, or this process lost its lease
    (a newer owner holds a larger fencing token)."""


class SessionClosedError(ConcordiaError):
    """The session object was closed; open or resume it again to use it."""


class SessionKindError(ConcordiaError):
    """A session was opened as the other kind: a bare lease (a graph thread) as
    a region log, or a region log as a bare lease. Nothing was changed."""


class StorageError(ConcordiaError):
    """The disk under the segments failed other than by filling up (an I/O
    error, a read-only filesystem, a failed fsync). Committed epochs stay in
    the host ring; the next commit raises this until the flusher gets through."""


class RemoteStoreError(ConcordiaError):
    """The object store (``remote``) failed or is unreachable after retries.
    Commits go on locally; the uploader tries again with backoff, and
    ``session.durability()`` reports the remote lag until it gets through."""


class CatalogError(ConcordiaError):
    """The SQL catalog failed or holds something Concordia cannot use."""


class CatalogNotFound(CatalogError):
    """A command that only reads (or a home that already belongs to a catalog)
    found no Concordia catalog at the URL; nothing was created."""


class HomeNotFound(ConfigurationError):
    """A command that only reads was pointed at a Concordia home that does not
    exist; nothing was created."""


class CatalogMismatchError(ConfigurationError):
    """A Concordia home was opened with a catalog other than the one it belongs
    to (its marker file names that catalog's ID). Refused before anything is
    read or deleted: with the wrong catalog every session of the home would
    look orphaned."""


class SchemaVersionError(CatalogError):
    """The catalog's schema version is newer than this code understands."""


class MetaError(ConcordiaError, TypeError):
    """Epoch metadata that cannot be stored (it must be JSON-serializable)."""
