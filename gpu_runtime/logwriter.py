"""Host-side record writer: frames records into a session's :class:`LogRing`.

Protocol for one epoch (the caller is a backend's ``commit_epoch``):

1. ``start = writer.position`` — log offset of the epoch's first data record.
2. ``writer.append(...)`` for each data record (REGION, PAGES, ROWS); each is
   published (``written``) as soon as its bytes are stored, so the flusher may
   copy an epoch that is larger than the ring before it commits.
3. ``writer.commit(epoch, body, epoch_start=start, nrecords=n)`` stores the
   COMMIT record last and publishes ``committed``. Only then is the epoch
   durable in the host tier; replay ignores any records without it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import LogFullError
from .logring import LogRing
from .records import (
    HEADER_SIZE,
    RecordFlags,
    RecordType,
    encode_header,
    payload_sum,
    record_size,
)

__all__ = ["LogWriter"]


class LogWriter:
    """Appends records for one session. One writer per ring (the session owner)."""

    def __init__(
        self,
        ring: LogRing,
        *,
        session_tag: int,
        max_record_bytes: int,
        space_timeout: float,
        kick: Callable[[], None] | None = None,
        fenced: Callable[[], None] | None = None,
        stalled: Callable[[], None] | None = None,
    ) -> None:
        """``fenced`` raises if the writer lost ownership (checked at every
        reservation); ``stalled`` raises if the ring cannot drain (checked only
        while a reservation waits for space)."""
        self.ring = ring
        self.session_tag = session_tag
        self.max_record_bytes = max_record_bytes
        self._timeout = space_timeout
        self._kick = kick
        self._fenced = fenced
        self._stalled = stalled
        self._next = ring.written  # reserved up to here (device writers fill reservations later)

    @property
    def position(self) -> int:
        """Logical offset where the next record goes."""
        return self._next

    def reserve(self, size: int) -> int:
        """Reserve ``size`` bytes of log (waiting for ring space); returns their
        offset. Whoever fills them publishes ``written`` past them, in order."""
        if size > self.ring.capacity:
            raise LogFullError(
                f"expected a record of at most the ring capacity ({self.ring.capacity} bytes), found {size} "
                "bytes; raise CONCORDIA_RING_BYTES or lower CONCORDIA_MAX_RECORD_BYTES")
        end = self._next + size
        self.ring.wait_for_space(end, timeout=self._timeout, kick=self._kick, fenced=self._while_waiting)
        if self._fenced is not None:
            self._fenced()
        at, self._next = self._next, end
        return at

    def _while_waiting(self) -> None:
        """Checks made while a reservation waits for ring space: ownership, and
        (``stalled``) whether the flusher has stopped, so that the wait ends at
        the flusher's next failed pass instead of after the space timeout. Both
        raise before this reservation is made; a caller that holds earlier
        reservations of the epoch must fill or give them back (see
        ``CupyBackend.commit_epoch``)."""
        if self._fenced is not None:
            self._fenced()
        if self._stalled is not None:
            self._stalled()

    def release(self, end: int) -> None:
        """Give back the reserved bytes past ``end``, the unused tail of the
        last reservation (a device writer that reports how much it used).
        Only valid while nothing was reserved after it and nothing past
        ``end`` was published: the writer's single owner guarantees both."""
        if not self.ring.written <= end <= self._next:
            raise ValueError(f"release: expected an offset within the last reservation "
                             f"[{self.ring.written}, {self._next}], found {end}")
        self._next = end

    def adopt(self, end: int) -> None:
        """Take the position back from a device producer that reserved and
        published the log up to ``end`` itself (``written`` must be there)."""
        if not (self._next <= end == self.ring.written):
            raise ValueError(f"adopt: expected the device to have published from {self._next} up to {end}, found "
                             f"written={self.ring.written}")
        self._next = end

    def append(
        self,
        type: RecordType,
        payload: bytes | memoryview | np.ndarray,
        *,
        epoch: int,
        region: int = 0,
        flags: int = 0,
        offset: int = 0,
        aux: int = 0,
    ) -> int:
        """Store one record and publish it; returns its logical offset."""
        body = payload if isinstance(payload, np.ndarray) else np.frombuffer(payload, dtype=np.uint8)
        body = body.reshape(-1).view(np.uint8)
        n = body.size
        size = record_size(n)
        at = self.reserve(size)
        header = encode_header(
            type, session_tag=self.session_tag, epoch=epoch, region=region, flags=flags,
            offset=offset, length=n, aux=aux, payload_sum=payload_sum(body),
        )
        self.ring.write_at(at, header)
        self.ring.write_at(at + HEADER_SIZE, body)
        pad = size - HEADER_SIZE - n
        if pad:
            self.ring.write_at(at + HEADER_SIZE + n, bytes(pad))
        self.ring.publish_written(at + size)
        return at

    def commit(self, epoch: int, body: bytes, *, epoch_start: int, nrecords: int, flags: int = 0) -> int:
        """Store the COMMIT record of ``epoch`` and publish it; returns the log
        offset just past it. Ownership is checked once more right before the
        commit point, so a fenced writer never publishes a commit."""
        at = self.append(
            RecordType.COMMIT, body, epoch=epoch, flags=int(RecordFlags(flags)),
            offset=epoch_start, aux=nrecords,
        )
        end = at + record_size(len(body))
        self.ring.publish_commit(end, epoch)
        return end
