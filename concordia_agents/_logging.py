"""structlog configuration, confined to this module.

Library code gets loggers with :func:`get_logger` and binds context
(``session``, ``epoch``, ``region``); it never prints. The first Runtime
configures structlog unless the application already did.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]

_configured = False


def configure_logging(*, format: str = "console", level: str = "warning", force: bool = False) -> None:
    """Console (human) or JSON lines on stderr, filtered at ``level``."""
    global _configured
    if (_configured or structlog.is_configured()) and not force:
        return
    lvl = logging.getLevelNamesMapping().get(level.upper())
    if lvl is None:
        lvl = logging.WARNING
    renderer: Any = (
        structlog.processors.JSONRenderer() if format == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("concordia").bind(**context)
