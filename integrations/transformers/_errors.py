"""The transformers binding's own exception (its modules share it)."""

from __future__ import annotations

from concordia_agents import ConcordiaError

__all__ = ["ResumeMismatchError"]


class ResumeMismatchError(ConcordiaError):
    """``durable_generate`` was called again for a session recorded with another
    model, prompt, generation arguments or tensor-parallel layout."""
