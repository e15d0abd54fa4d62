"""Durability levels: where a session's committed epochs are kept.

* ``local``: the host ring (shared memory): survives the process;
* ``disk``: fsynced segment files: survives a power loss of the host;
* ``remote``: sealed files uploaded to the object store and verified by it:
  survives the loss of the host (another host resumes from it).

A session has one level (recorded in the catalog, kept across opens);
``Session.flush(level=...)`` waits for any level up to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["LEVELS", "Durability", "check_level"]

#: weakest first
LEVELS = ("local", "disk", "remote")


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ConfigurationError(f"durability level: expected one of {', '.join(LEVELS)}, found {level!r}")
    return level


@dataclass(frozen=True, slots=True)
class Durability:
    """``Session.durability()``: how far each tier has got (epochs)."""

    level: str  #: "local", "disk" or "remote"
    committed: int  #: newest committed epoch (in the host ring)
    disk: int  #: newest epoch fsynced in a segment
    remote: int | None  #: newest epoch restorable from the object store alone (None: not uploaded)
    remote_error: str | None  #: the last upload failure while the store lags (None: none)

    @property
    def remote_lag(self) -> int | None:
        """Epochs committed but not yet remote (None: not uploaded)."""
        return None if self.remote is None else self.committed - self.remote
