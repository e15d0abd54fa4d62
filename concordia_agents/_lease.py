"""A bare ownership lease: a session owned without a log of regions.

Graph threads (the LangGraph binding) are sessions whose state lives in catalog
tables rather than in a region log; they still need exactly one writer. The
runtime holds such a lease, heartbeats it with its sessions' leases, and marks
it ``fenced`` when a newer owner took over. Every write made under a lease names
``token`` and is checked against the catalog in the same transaction
(``Catalog.check_token``), so a fenced owner's write fails even if it never
noticed.

Protocol: ``lease = rt.hold(id)`` → writes checked with ``lease.token`` →
``rt.let_go(lease, closed=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import OwnershipError

__all__ = ["Lease"]


@dataclass(slots=True, eq=False)
class Lease:
    session_id: str
    token: int
    owner: str
    fenced: str | None = None  #: why this owner lost the session, once it did
    released: bool = False

    def check(self) -> None:
        """Raise OwnershipError if this lease was fenced or let go."""
        if self.fenced is not None:
            raise OwnershipError(f"session {self.session_id!r}: lost ownership (token {self.token}): {self.fenced}")
        if self.released:
            raise OwnershipError(f"session {self.session_id!r}: this process let its lease (token {self.token}) go")
