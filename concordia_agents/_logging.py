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

from .errors import ConfigurationError

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "configure_logging", "get_logger", "log_level_number"]

#: the names ``level`` accepts, in any case (the standard library's, aliases included)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "notset", "fatal", "warn")
LOG_FORMATS = ("console", "json")

_configured = False


def log_level_number(level: str) -> int:
    """The ``logging`` number of a level name; ConfigurationError for any other
    name (a typo must not quietly log at another level)."""
    number = logging.getLevelNamesMapping().get(level.upper()) if isinstance(level, str) else None
    if number is None or level.lower() not in LOG_LEVELS:
        raise ConfigurationError(f"log level: expected one of {', '.join(LOG_LEVELS)} (any case), found {level!r}")
    return number


def configure_logging(*, format: str = "console", level: str = "warning", force: bool = False) -> None:
    """Console (human) or JSON lines on stderr, filtered at ``level``. An
    unknown format or level raises ConfigurationError, configured or not."""
    if format not in LOG_FORMATS:
        raise ConfigurationError(f"log format: expected one of {', '.join(LOG_FORMATS)}, found {format!r}")
    lvl = log_level_number(level)
    global _configured
    if (_configured or structlog.is_configured()) and not force:
        return
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
