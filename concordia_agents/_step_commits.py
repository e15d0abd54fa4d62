"""Epochs committed at model steps, with no host work per step where the
backend has an in-step producer.

A model step (one forward of a decoder) writes rows ``[L - n, L)`` of a kv
region (the KV cache) and takes ``n`` input tokens, which belong in a tokens
region at the same rows. ``StepCommits`` commits an epoch holding both
regions' rows up to ``L`` every ``every`` rows, with the caller's ``meta``
whose ``length_key`` is ``L``. On the CuPy backend a kernel launched inside
the step does it (``gpu_runtime/cuda/step_commit.py``; a CUDA graph captures
it with the step); elsewhere, and for steps the host runs itself, the host
commits. Both write the same records for the same steps.

Protocol (the caller, e.g. ``integrations.transformers``, drives it):

1. ``steps = session.step_commits(kv=..., tokens=..., meta=..., length_key=...)``.
2. Host steps: ``steps.host_step(L)`` commits on the host (rows of both
   regions up to ``L``), waiting until the epoch is in the ring; then
   ``steps.arm(stream)`` hands the log position and the epoch counter to the
   device producer, in ``stream``'s order.
3. Device steps: ``steps.device.launch(...)`` (the integration's custom op);
   nothing on the host.
4. ``steps.close()`` takes them back: the session's epoch, meta, lengths and
   log position become the device's; then it raises what stopped the
   producer, if anything (epochs committed before that stand).

While armed, the device owns the log's reservation: ``Session.commit``
refuses until ``close``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from gpu_runtime.logwriter import LogWriter

from .errors import ConcordiaError, LogFullError, OwnershipError, RegionError


class _Session(Protocol):
    """What step commits use of a Session (typed here: ``_session`` imports this module)."""

    id: str
    epoch: int

    def commit(self, meta: Any = None, *, rows: Mapping[str, tuple[int, int] | int] | None = None,
               wait: bool = True) -> int: ...


class _Region(Protocol):
    """What step commits use of a registered kv region."""

    length: int

    @property
    def name(self) -> str: ...

__all__ = ["StepCommits", "body_template"]

# A length that no real run reaches, put where L goes to find its places in the body.
_SENTINEL = 9876543210123456789


def body_template(body: bytes, value: int, slots: int) -> bytes:
    """A COMMIT body with each decimal ``value`` replaced by a 0 byte (the
    in-step producer writes the step's length there). ``value`` must appear
    exactly ``slots`` times; JSON never holds a raw 0 byte."""
    text = str(value).encode()
    if body.count(text) != slots or b"\0" in body:
        raise ValueError(f"body template: expected {value} {slots} times and no 0 byte in the body, found it "
                         f"{body.count(text)} times")
    return body.replace(text, b"\0")


class StepCommits:
    """See the module docs. Made by ``Session.step_commits``."""

    def __init__(self, session: _Session, *, kv: _Region, tokens: _Region, meta: dict[str, Any], length_key: str,
                 every: int, writer: LogWriter, adopt: Callable[[int, Any, dict[str, int], int], None],
                 stepping: Callable[[bool], None], device: Any | None) -> None:
        """``adopt(epoch, meta, lengths, position)`` makes the device's epochs
        the session's; ``stepping(on)`` makes ``Session.commit`` refuse while
        the device is armed."""
        if every < 1:
            raise ConcordiaError(f"step commits: expected every >= 1, found {every}")
        self._session = session
        self.kv, self.tokens = kv, tokens
        self.meta, self.length_key, self.every = dict(meta), length_key, every
        self._writer, self._adopt, self._stepping = writer, adopt, stepping
        self.device = device  #: the in-step producer, or None (host steps only)
        self.armed = False
        self.host_commits = 0  #: epochs committed by host_step
        self._armed_epoch = 0

    @staticmethod
    def template(body: Callable[[Any, dict[str, int]], bytes], meta: dict[str, Any], length_key: str,
                 lengths: dict[str, int], names: tuple[str, str]) -> tuple[bytes, int]:
        """The COMMIT body with a 0 byte where the kernel writes ``L``, and
        the number of those places."""
        at = {**lengths, **dict.fromkeys(names, _SENTINEL)}
        data = body({**meta, length_key: _SENTINEL}, at)
        slots = data.count(str(_SENTINEL).encode())
        return body_template(data, _SENTINEL, slots), slots

    @property
    def committed(self) -> int:
        """Rows of both regions committed (the smaller of their lengths)."""
        return min(self.kv.length, self.tokens.length)

    def host_step(self, length: int, *, force: bool = False) -> int | None:
        """Commit rows up to ``length`` on the host if ``every`` rows are new
        (or any are and ``force``); returns the epoch, or None if nothing was
        committed. Waits until the epoch is in the ring (a device producer
        armed after it publishes behind it)."""
        if self.armed:
            raise ConcordiaError("step commits: host_step while the device producer is armed; close() first")
        new = length - self.committed
        if new <= 0 or (new < self.every and not force):
            return None
        rows = {r.name: (r.length, length) for r in (self.kv, self.tokens) if r.length < length}
        epoch = self._session.commit({**self.meta, self.length_key: length}, rows=rows, wait=True)
        self.host_commits += 1
        return epoch

    def arm(self, stream: int) -> None:
        """Hand the log to the device producer (no-op without one)."""
        if self.device is None or self.armed:
            return
        if self.kv.length != self.tokens.length:
            raise RegionError(f"step commits: expected regions {self.kv.name!r} and {self.tokens.name!r} committed "
                              f"to the same length before arming, found {self.kv.length} and {self.tokens.length}")
        self.device.arm(stream, position=self._writer.position, epoch=self._session.epoch,
                        committed=self.kv.length)
        self._armed_epoch = self._session.epoch
        self._stepping(True)
        self.armed = True

    def close(self) -> Any | None:
        """Take the log back from the device (synchronizes it) and raise what
        stopped it, if anything. Returns the producer's final state (None
        without one). Idempotent."""
        if self.device is None or not self.armed:
            return None
        self.armed = False
        try:
            state = self.device.state()
        finally:
            try:
                self.device.disarm()  # whatever happened: no later launch may use this producer
            finally:
                self._stepping(False)
        sid = self._session.id
        if state.error == "fenced":  # the ring is another owner's now: nothing here to take back
            raise OwnershipError(f"session {sid!r}: in-step commits stopped after epoch {state.epoch}: lost "
                                 f"ownership: the host ring now belongs to fencing token {state.error_info}")
        if state.epoch > self._armed_epoch:
            n = state.committed
            self._adopt(state.epoch, {**self.meta, self.length_key: n}, {self.kv.name: n, self.tokens.name: n},
                        state.position)
        if state.error is not None:
            what = {
                "ring_full": (LogFullError, f"the host ring stayed full (the flusher had consumed up to log offset "
                                            f"{state.error_info}); is the flusher stuck or the disk full?"),
                "rows": (RegionError, f"a step's length {state.error_info} is outside the regions or behind the "
                                      f"committed length {state.committed}"),
                "too_big": (LogFullError, f"a step's epoch of {state.error_info} bytes exceeds the in-step "
                                          "producer's limits (half the ring, 64 records)"),
                "unarmed": (ConcordiaError, "a step ran before the producer was armed (a compiled step before "
                                            "the first eager one?)"),
            }[state.error]
            raise what[0](f"session {sid!r}: in-step commits stopped after epoch {state.epoch}: {what[1]}")
        return state
