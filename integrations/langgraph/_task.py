"""Session IDs for the tasks of a graph run.

A node that LangGraph re-runs after a crash gets the same task ID it had before
(the ID derives from the checkpoint the step started from, which is durable),
so ``thread_id + TASK_SEP + task_id`` names the same Concordia session in the
crashed process and in the resuming one: a ``durable_generate`` inside the node
finds the KV log of its interrupted generation and continues it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from concordia_agents import ConcordiaError
from concordia_agents._names import TASK_SEP, parent_of

__all__ = ["TASK_SEP", "conversation_ids", "task_session_id", "thread_of"]
_TASK_ID_KEY = "__pregel_task_id"  # langgraph._internal._constants.CONFIG_KEY_TASK_ID
_MAX_ID = 512


def task_session_id(config: Any) -> str:
    """The session ID of the task running with ``config`` (call it inside a
    node): stable across a crash and resume of the graph."""
    conf = (config or {}).get("configurable") or {}
    thread_id, task_id = conf.get("thread_id"), conf.get(_TASK_ID_KEY)
    if thread_id in (None, "") or not task_id:
        raise ConcordiaError(
            "task_session_id: expected the config LangGraph passes to a running node (configurable.thread_id and "
            f"a task ID), found configurable keys {sorted(conf)}")
    sid = f"{thread_id}{TASK_SEP}{task_id}"
    if len(sid) > _MAX_ID:  # keep within the catalog's 512 characters, still bound to the thread by prefix
        digest = hashlib.sha256(sid.encode()).hexdigest()[:32]
        raise ConcordiaError(
            f"task_session_id: thread ID of {len(str(thread_id))} characters is too long to bind task sessions "
            f"(at most {_MAX_ID - len(TASK_SEP) - 64}); hash it, e.g. {digest!r}")
    return sid



def conversation_ids(config: Any) -> tuple[str, str]:
    """``(conversation_id, call_id)`` for ``conversation_generate`` inside a
    node: the graph's thread ID (one conversation per thread) and the task's
    session ID (the same call when LangGraph re-runs the node after a crash)."""
    call_id = task_session_id(config)
    return str(config["configurable"]["thread_id"]), call_id


#: the graph thread a task session belongs to, or None (the core's naming rule)
thread_of = parent_of
