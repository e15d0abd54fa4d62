"""Session naming: IDs, their directory names, and tasks bound to a parent session.

A session whose ID is ``parent + TASK_SEP + task`` belongs to ``parent``: the
LangGraph binding names a node's generation session this way
(``task_session_id``), so listing, deleting and resuming a graph thread can
find the sessions of its tasks by prefix, without a table of bindings.
"""

from __future__ import annotations

from .errors import ConcordiaError

__all__ = ["MAX_ID_LENGTH", "TASK_SEP", "check_session_id", "parent_of", "session_dir_name"]

TASK_SEP = "#task:"
MAX_ID_LENGTH = 512  #: the catalog's column width


def check_session_id(session_id: object) -> None:
    """Raise ConcordiaError unless ``session_id`` is a string both catalogs can
    store: 1..512 characters, valid Unicode (no lone surrogates), no NUL
    (PostgreSQL's text refuses it; SQLite would take it)."""
    ok = isinstance(session_id, str) and 0 < len(session_id) <= MAX_ID_LENGTH and "\0" not in session_id
    if ok:
        try:
            str(session_id).encode("utf-8")
        except UnicodeEncodeError:
            ok = False
    if not ok:
        raise ConcordiaError(f"expected a session ID of 1..{MAX_ID_LENGTH} characters of valid Unicode without NUL, "
                             f"found {session_id!r}")


def parent_of(session_id: str) -> str | None:
    """The session ``session_id`` is bound to, or None."""
    parent, sep, _ = session_id.rpartition(TASK_SEP)
    return parent if sep and parent else None


def session_dir_name(session_id: str, tag: int) -> str:
    """A filesystem-safe directory name that still shows the ID to a human."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in session_id)[:48]
    return f"{safe}-{tag:016x}"
