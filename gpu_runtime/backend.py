"""The backend contract: what the middleware asks of the device substrate.

Call protocol (the middleware's Session is the only caller):

1. ``backend = open_backend(name)`` — once per Runtime.
2. ``handle = backend.attach(spec, array)`` — when a region is registered;
   validates that this backend can serve the array (host vs device memory).
3. ``backend.commit_epoch(writer, epoch, tasks, body)`` — at each commit: for
   every task, write the region's REGION record (first epoch only) and its delta
   records (dirty pages by page hash; the given KV row range), then the COMMIT
   record. The host backend returns once the COMMIT record is in the host log
   ring; a backend that copies asynchronously (the GPU executor) returns once
   the work is enqueued, and ``wait_visible(writer, epoch)`` waits for the ring.
4. ``backend.apply(handle, header, payload)`` — during recovery, for each data
   record of the epochs being restored, in log order; then
   ``backend.after_restore(handle)`` so that the next commit writes only what
   changes after the restored state.
5. ``backend.close()``.

A test that passes on one backend must pass on every backend that has the
capabilities it declares; capability flags, never backend names, decide what a
test or a caller may do.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import BackendUnavailableError, ConfigurationError, RegionError
from .logring import LogRing
from .logwriter import LogWriter
from .records import RecordHeader
from .regions import RegionSpec

__all__ = [
    "BACKENDS",
    "MAX_STEP_BODY",
    "Backend",
    "BackendRegion",
    "Capability",
    "CheckpointTask",
    "backend_class",
    "check_step_inputs",
    "open_backend",
]

MAX_STEP_BODY = 4096  #: bytes of a step commit's COMMIT body (the in-step producer's CNC_STEP_MAX_BODY)


def check_step_inputs(*, template: bytes, slots: int, tokens_name: str, token_row_bytes: int) -> int:
    """The limits of step commits (``Backend.step_committer``) on what they are
    given: rows of 64-bit tokens, and a COMMIT body (``template`` with
    ``slots`` places of the length) of at most ``MAX_STEP_BODY`` bytes at the
    largest length. Returns that largest body's size.

    They are the GPU's in-step producer's limits, and every backend checks
    them when step commits are asked for (``Session.step_commits``), not only
    that one: a program that runs on the host backend must not be refused
    later on the GPU."""
    if token_row_bytes != 8:
        raise RegionError(f"region {tokens_name!r}: step commits store 64-bit tokens (one int64 per row), found rows "
                          f"of {token_row_bytes} bytes")
    most_body = len(template) - slots + slots * 20  # 20 digits: the largest u64
    if most_body > MAX_STEP_BODY:
        raise RegionError(f"step commits: the COMMIT body (lengths and meta as JSON, the length at its largest) "
                          f"must fit the in-step producer's {MAX_STEP_BODY} bytes, found {most_body}: shorten the meta")
    return most_body


class Capability(enum.Enum):
    HOST_MEMORY = "host_memory"  #: registers arrays in host memory
    DEVICE_MEMORY = "device_memory"  #: registers arrays in GPU memory
    PERSISTENT_EXECUTOR = "persistent_executor"  #: checkpoints run in a resident kernel


class BackendRegion:
    """A backend's handle on one registered region (subclasses add state such
    as page hashes)."""

    def __init__(self, spec: RegionSpec, array: Any) -> None:
        self.spec = spec
        self.array = array
        self.described = False  #: REGION record already in the log

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.name!r} {self.spec.kind} {self.spec.dtype}{list(self.spec.shape)}>"


@dataclass(slots=True)  # not frozen: made per region per commit, and a frozen __init__ costs 3x
class CheckpointTask:
    """One region's part of an epoch. ``rows`` is the dirty ``[t0, t1)`` range
    of a kv region (``None``: nothing appended); ignored for pages regions."""

    region: BackendRegion
    rows: tuple[int, int] | None = None


class Backend(abc.ABC):
    name: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]

    @abc.abstractmethod
    def attach(self, spec: RegionSpec, array: Any) -> BackendRegion: ...

    @abc.abstractmethod
    def commit_epoch(
        self, writer: LogWriter, epoch: int, tasks: Sequence[CheckpointTask], body: bytes, *, fence: bool = True
    ) -> int:
        """Write (or enqueue) the epoch's records and its COMMIT; return the log offset past it.
        ``fence=False``: do not order the copy after work queued on the regions'
        streams (the caller quiesced the device instead; see ``Session.commit``)."""

    def wait_visible(self, writer: LogWriter, epoch: int, timeout: float = 30.0) -> None:  # noqa: B027 - optional
        """Block until ``epoch``'s COMMIT is published in the ring. Backends whose
        ``commit_epoch`` returns before that (the GPU executor) override this."""

    def step_committer(self, writer: LogWriter, *, owner_token: int, kv: BackendRegion, tokens: BackendRegion,
                       template: bytes, slots: int, every: int, space_timeout_s: float) -> Any | None:
        """An in-step producer for ``kv`` and ``tokens`` (a kernel a CUDA graph
        can capture, committing with no host work per step;
        ``gpu_runtime/cuda/step_commit.py``), or None where this backend has
        none: the caller then commits each step on the host, with the same
        records."""
        return None

    @abc.abstractmethod
    def apply(self, region: BackendRegion, header: RecordHeader, payload: memoryview) -> None: ...

    def apply_records(self, region: BackendRegion, locs: Sequence[Any], reader: Any) -> None:
        """Apply a region's logged records in order (restore).

        ``locs`` have ``path``, ``file_offset`` (of the 64-byte header) and
        ``header``; ``reader(loc)`` returns a verified payload and
        ``reader.read_verified(loc, out)`` reads one into a u8 array; both
        raise ``CorruptLogError`` on a bad checksum
        (``reader.read_unverified``, ``reader.read_part`` and
        ``reader.raise_corrupt`` serve a backend that checks payloads on its
        device). No payload may reach the
        region unverified. This default applies one record at a time; backends
        override it to pipeline."""
        for loc in locs:
            self.apply(region, loc.header, reader(loc))

    @abc.abstractmethod
    def after_restore(self, region: BackendRegion) -> None: ...

    def prepare_ring(self, ring: LogRing) -> None:  # noqa: B027 - optional hook
        """A session's host ring was just opened: start what its
        first commit will need that takes long to make (page-locking it),
        without waiting for it. Never required for correctness; nothing to do
        by default."""

    def resident(self, idle_ms: float, max_life_ms: float | None = None) -> contextlib.AbstractContextManager[None]:
        """A block during which the backend's device side stays ready between
        commits that come less than ``idle_ms`` apart (a decode loop), instead
        of stopping and being restarted by each commit; ``max_life_ms`` bounds
        how long it stays up at a time. Nothing to do for backends without a
        resident device side."""
        return contextlib.nullcontext()

    def poll(self) -> None:  # noqa: B027 - optional hook
        """Called by the runtime's flusher thread every ``flush_poll`` seconds:
        a backend whose device side can stop with work pending restarts it here."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def describe(self) -> dict[str, Any]:
        """Facts for ``concordia doctor`` and benchmark JSON."""
        return {"backend": self.name, "capabilities": sorted(c.value for c in self.capabilities)}


#: name -> "module:Class"; modules are imported only when chosen.
BACKENDS = {
    "host": "gpu_runtime.host:HostBackend",
    "cupy": "gpu_runtime.cuda.backend:CupyBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name`` (imported on first use), to read its
    ``capabilities`` without opening it; BackendUnavailableError if it cannot
    be imported here."""
    if name not in BACKENDS:
        raise ConfigurationError(f"expected backend {', '.join(map(repr, BACKENDS))}; found {name!r}")
    return _load(name)


def _load(name: str) -> type[Backend]:
    mod, _, cls = BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} cannot be imported here: {e}", orig=e) from e


def open_backend(name: str = "auto", **options: Any) -> Backend:
    """Open a backend by name. ``"auto"`` picks ``cupy`` where a usable GPU and
    the CuPy backend exist, else ``host``; the choice is logged by the caller."""
    if name == "auto":
        try:
            cls = _load("cupy")
            if cls.available():  # type: ignore[attr-defined]
                return cls(**options)
        except BackendUnavailableError:
            pass
        return _load("host")(**options)
    if name not in BACKENDS:
        raise ConfigurationError(f"expected backend 'auto', {', '.join(map(repr, BACKENDS))}; found {name!r}")
    cls = _load(name)
    available = getattr(cls, "available", None)
    if available is not None and not available():
        raise BackendUnavailableError(f"backend {name!r} was asked for but cannot run here (no usable GPU)")
    return cls(**options)
