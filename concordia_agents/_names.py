"""Session naming: tasks bound to a parent session.

A session whose ID is ``parent + TASK_SEP + task`` belongs to ``parent``: the
LangGraph binding names a node's generation session this way
(``task_session_id``), so listing, deleting and resuming a graph thread can
find the sessions of its tasks by prefix, without a table of bindings.
"""

from __future__ import annotations

__all__ = ["TASK_SEP", "parent_of"]

TASK_SEP = "#task:"


def parent_of(session_id: str) -> str | None:
    """The session ``session_id`` is bound to, or None."""
    parent, sep, _ = session_id.rpartition(TASK_SEP)
    return parent if sep and parent else None
