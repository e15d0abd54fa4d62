"""The one exception tree of Concordia.

Every error Concordia raises derives from :class:`ConcordiaError`. Children are
named by meaning, not by the module that raised them, and every message says
what was expected and what was found. Where an error wraps a lower-level one
(an ``OSError``, a driver error) the original is kept as ``.orig``.

The root lives in the lowest layer (``gpu_runtime``) so that the substrate and
the middleware share it; ``concordia_agents.errors`` re-exports all of it and
adds the session-level errors.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ConcordiaError",
    "ConfigurationError",
    "CorruptLogError",
    "ExecutorError",
    "LogFullError",
    "RegionError",
]


class ConcordiaError(Exception):
    """Root of every error Concordia raises."""

    def __init__(self, message: str, *, orig: BaseException | None = None) -> None:
        super().__init__(message)
        self.orig = orig


class ConfigurationError(ConcordiaError):
    """A setting, argument or environment variable has a value Concordia cannot use."""


class BackendUnavailableError(ConfigurationError):
    """A backend was asked for explicitly but cannot run here (no GPU, no CuPy, …)."""


class ExecutorError(ConcordiaError):
    """The GPU executor (or the device memory it runs on) reported an error for
    a task, or did not finish it in time."""


class RegionError(ConcordiaError):
    """A state region was given, or found, with the wrong dtype, shape, layout or device."""


class CorruptLogError(ConcordiaError):
    """A log file or ring holds bytes that fail their checksum or framing.

    ``path`` and ``offset`` name the file and byte offset of the first bad
    record, so that an operator can inspect or truncate it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        orig: BaseException | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = f" [{path}" + (f" @ byte {offset}" if offset is not None else "") + "]"
        super().__init__(message + where, orig=orig)
        self.reason = message  #: the message without the location
        self.path = path
        self.offset = offset


class LogFullError(ConcordiaError):
    """The log cannot take more bytes: the host ring stayed full past its timeout,
    or the disk under the segments is full. Nothing already committed is lost."""
