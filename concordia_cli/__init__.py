"""The ``concordia`` command line: sessions, resume, gc, doctor and the demos.

A package of its own, above the others: it may import ``integrations``
(``concordia resume`` resumes LangGraph threads, ``concordia demo`` runs the
agent demo), which ``concordia_agents`` may not. Imports point down only::

    concordia_cli -> integrations -> concordia_agents -> gpu_runtime

Run it as ``concordia`` (the console script) or ``python -m concordia_cli``.
Configuration comes from ``concordia_agents.config`` like everything else.
"""

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
