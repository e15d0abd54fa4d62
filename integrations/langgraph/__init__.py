"""LangGraph on Concordia: single-writer checkpointing and resume by session ID.

::

    from integrations.langgraph import ConcordiaSaver, task_session_id, wrap

    app = wrap(builder, runtime=rt)          # compiles with ConcordiaSaver(runtime=rt)
    app.invoke({"question": q}, session_id="s1")
    app.resume("s1")                         # after a crash, in any process

    def llm(state, config):                  # a node
        out = durable_generate(model, ids, session_id=task_session_id(config), runtime=rt)

* ``ConcordiaSaver`` — a complete ``BaseCheckpointSaver`` (sync and async,
  ``delete_for_runs``, ``copy_thread``, ``prune``) storing checkpoints, blobs and
  pending writes in the Concordia catalog; a thread is a session with an
  ownership lease, and every write is fenced by its token.
* ``wrap`` / ``DurableGraph`` — take the lease before any node runs, run with
  ``durability="sync"``, ``resume(session_id)`` from the last checkpoint.
* ``task_session_id(config)`` — a node's session ID, stable across crash and
  resume, so an interrupted ``durable_generate`` continues instead of restarting.
* ``conversation_ids(config)`` — ``(thread ID, task session ID)``: the
  conversation and call IDs of ``conversation_generate`` in a node (one KV
  cache per thread, reused by every LLM call of the thread).
"""

from ._app import DurableGraph, wrap
from ._saver import GRAPH_KIND, ConcordiaSaver
from ._task import TASK_SEP, conversation_ids, task_session_id, thread_of

__all__ = ["GRAPH_KIND", "TASK_SEP", "ConcordiaSaver", "DurableGraph", "conversation_ids", "task_session_id",
           "thread_of", "wrap"]
