"""``wrap``: run a LangGraph graph as durable, single-writer Concordia sessions.

Call protocol::

    app = wrap(builder_or_compiled_graph, runtime=rt)   # compiles with a ConcordiaSaver
    app.invoke(inputs, session_id="s1")                 # thread "s1"
    # ... the process dies mid-run ...
    app.resume("s1")                                    # any process, same code

``invoke`` and ``resume`` take the thread's ownership lease *before* any node
runs (a second live process gets ``OwnershipError`` and runs nothing), run the
graph with ``durability="sync"`` (each step's writes are in the catalog before
the next step starts), and let the lease go at the end: the session is
"closed" when the graph reached its end, "idle" when it stopped at an interrupt
or raised. ``resume`` continues from the last checkpoint: tasks whose writes
were saved do not run again; the task that was running when the process died
runs again, and a ``durable_generate(session_id=task_session_id(config))``
inside it continues its generation from the last durable token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

from langchain_core.runnables import RunnableConfig
from langgraph.graph import StateGraph
from langgraph.pregel import Pregel

from concordia_agents import ConcordiaError, Runtime

from ._saver import ConcordiaSaver

__all__ = ["DurableGraph", "wrap"]

Durability = Literal["sync", "async", "exit"]


def wrap(graph: Any, *, runtime: Runtime | None = None, saver: ConcordiaSaver | None = None,
         durability: Durability = "sync", **compile_kwargs: Any) -> DurableGraph:
    """Wrap a ``StateGraph`` builder (compiled here with a ConcordiaSaver) or a
    compiled graph (a copy with its checkpointer replaced)."""
    saver = saver if saver is not None else ConcordiaSaver(runtime=runtime)
    if isinstance(graph, DurableGraph):
        graph = graph.graph
    compiled: Pregel[Any, Any, Any, Any]
    if isinstance(graph, StateGraph):
        compiled = graph.compile(checkpointer=saver, **compile_kwargs)
    elif isinstance(graph, Pregel):
        if compile_kwargs:
            raise ConcordiaError(f"wrap: compile options {sorted(compile_kwargs)} need a StateGraph builder, "
                                 "found an already compiled graph")
        compiled = graph.copy(update={"checkpointer": saver})
    else:
        raise ConcordiaError(f"wrap: expected a langgraph StateGraph or compiled graph, found {type(graph).__name__}")
    return DurableGraph(compiled, saver, durability=durability)


def _config(session_id: str, config: RunnableConfig | None) -> RunnableConfig:
    if not isinstance(session_id, str) or not session_id:
        raise ConcordiaError(f"expected a session ID (the graph's thread ID), found {session_id!r}")
    cfg: dict[str, Any] = dict(config or {})
    cfg["configurable"] = {**(cfg.get("configurable") or {}), "thread_id": session_id}
    return cfg  # type: ignore[return-value]


class DurableGraph:
    """A compiled graph whose threads are Concordia sessions. Other attributes
    are the compiled graph's."""

    def __init__(self, graph: Pregel, saver: ConcordiaSaver, *, durability: Durability = "sync") -> None:
        self.graph = graph
        self.saver = saver
        self.durability = durability

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)

    @property
    def runtime(self) -> Runtime:
        return self.saver.runtime

    # -- ownership around a run --------------------------------------------------

    def _finished(self, cfg: RunnableConfig) -> bool:
        return not self.graph.get_state(cfg).next

    @contextmanager
    def _owned(self, session_id: str, *, create: bool) -> Iterator[None]:
        self.saver.acquire(session_id, create=create)
        closed = False
        try:
            yield
            closed = self._finished(_config(session_id, None))
        finally:
            self.saver.release(session_id, closed=closed)

    @asynccontextmanager
    async def _aowned(self, session_id: str, *, create: bool) -> AsyncIterator[None]:
        """``_owned`` for the async runs (the lease calls go to a worker thread)."""
        await asyncio.to_thread(self.saver.acquire, session_id, create=create)
        closed = False
        try:
            yield
            closed = not (await self.graph.aget_state(_config(session_id, None))).next
        finally:
            await asyncio.to_thread(self.saver.release, session_id, closed=closed)

    def _check_resumable(self, cfg: RunnableConfig) -> Any:
        snapshot = self.graph.get_state(cfg)
        if snapshot.created_at is None:
            raise ConcordiaError(f"session {cfg['configurable']['thread_id']!r} has no graph checkpoint to resume")
        return snapshot

    # -- runs -----------------------------------------------------------------------------

    def invoke(self, input: Any, session_id: str, *, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Run the graph on thread ``session_id`` (created if new)."""
        cfg = _config(session_id, config)
        kwargs.setdefault("durability", self.durability)
        with self._owned(session_id, create=True):
            return self.graph.invoke(input, cfg, **kwargs)

    def resume(self, session_id: str, command: Any = None, *, config: RunnableConfig | None = None,
               **kwargs: Any) -> Any:
        """Continue thread ``session_id`` from its last checkpoint (``command``:
        e.g. ``Command(resume=...)`` after an interrupt). A finished thread
        returns its final state without running anything. Raises
        SessionNotFound for an unknown ID, OwnershipError while another live
        process owns it."""
        cfg = _config(session_id, config)
        kwargs.setdefault("durability", self.durability)
        with self._owned(session_id, create=False):
            snapshot = self._check_resumable(cfg)
            if not snapshot.next and command is None:
                return snapshot.values
            return self.graph.invoke(command, cfg, **kwargs)

    def stream(self, input: Any, session_id: str, *, config: RunnableConfig | None = None,
               **kwargs: Any) -> Iterator[Any]:
        """``graph.stream`` on thread ``session_id``; ``input=None`` continues it."""
        cfg = _config(session_id, config)
        kwargs.setdefault("durability", self.durability)
        with self._owned(session_id, create=input is not None):
            yield from self.graph.stream(input, cfg, **kwargs)

    async def ainvoke(self, input: Any, session_id: str, *, config: RunnableConfig | None = None,
                      **kwargs: Any) -> Any:
        cfg = _config(session_id, config)
        kwargs.setdefault("durability", self.durability)
        async with self._aowned(session_id, create=True):
            return await self.graph.ainvoke(input, cfg, **kwargs)

    async def aresume(self, session_id: str, command: Any = None, *, config: RunnableConfig | None = None,
                      **kwargs: Any) -> Any:
        cfg = _config(session_id, config)
        kwargs.setdefault("durability", self.durability)
        async with self._aowned(session_id, create=False):
            snapshot = await self.graph.aget_state(cfg)
            if snapshot.created_at is None:
                raise ConcordiaError(f"session {session_id!r} has no graph checkpoint to resume")
            if not snapshot.next and command is None:
                return snapshot.values
            return await self.graph.ainvoke(command, cfg, **kwargs)

    async def astream(self, input: Any, session_id: str, *, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[Any]:
        cfg = _config(session_id, config)
        kwargs.setdefault("durability", self.durability)
        async with self._aowned(session_id, create=input is not None):
            async for chunk in self.graph.astream(input, cfg, **kwargs):
                yield chunk

    # -- inspection ----------------------------------------------------------------------

    def get_state(self, session_id: str, *, config: RunnableConfig | None = None) -> Any:
        return self.graph.get_state(_config(session_id, config))

    def get_state_history(self, session_id: str, **kwargs: Any) -> Iterator[Any]:
        return self.graph.get_state_history(_config(session_id, None), **kwargs)

    def task_sessions(self, session_id: str) -> list[Any]:
        """The Concordia sessions bound to this thread's tasks (``task_session_id``)."""
        from ._task import TASK_SEP

        return self.runtime.catalog.list(prefix=session_id + TASK_SEP)

    def delete(self, session_id: str) -> None:
        """Delete the thread, its checkpoints and its task sessions."""
        self.runtime.info(session_id)  # SessionNotFound for an unknown ID
        self.saver.delete_thread(session_id)
