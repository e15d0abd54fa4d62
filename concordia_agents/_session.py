"""Sessions: state regions bound to a log, committed in epochs, owned by one process.

Call protocol (the user, or an integration, calls each step):

1. ``rt.session(id)`` / ``rt.resume(id)`` — take the lease (fencing token
   bumped), recover the log (drain the ring a dead owner left, scan), start a
   new chain. ``session.epoch`` is the last committed epoch (0: none).
2. ``session.register(name, array, kind=...)`` — bind an array as a region. If
   the log holds a region of that name, its state is restored into the array
   (``restore=True``), after checking dtype and shape.
3. ``session.commit(meta, rows=...)`` — the backend writes each region's delta
   records and then the COMMIT record into the host ring; returns the epoch
   once it is there (it survives a crash of this process from then on).
   No SQL on this path: ownership is checked against the ring's owner word.
4. ``session.flush()`` — wait until the newest epoch is fsynced to a segment.
5. ``session.close()`` — flush, release the lease, mark the session closed.
   Or ``session.cancel()`` — when opening it failed (a region that does not
   fit, a run that does not match): leave it as this process found it.

Errors of the flusher reach the committer: after the flusher failed to append
or fsync (a full or failing disk) or refused a damaged ring record, the next
``commit`` raises that error (``LogFullError``, ``StorageError``,
``CorruptLogError``) instead of writing; every
epoch committed before stays in the ring, and commits go on once the flusher
has caught up (space freed).

A Session is not meant to be shared between threads for commits; a lock keeps
concurrent calls from interleaving anyway.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any, Self

from gpu_runtime.backend import BackendRegion, Capability, CheckpointTask, check_step_inputs
from gpu_runtime.records import RecordType
from gpu_runtime.regions import RegionKind, RegionSpec, allocate, describe

from ._durability import Durability, check_level
from ._log import Rollback, SessionLog
from ._logging import get_logger
from ._replay import LogIndex, PayloadReader
from ._services import SessionServices
from ._step_commits import StepCommits
from .errors import (
    ConcordiaError,
    ConfigurationError,
    CorruptLogError,
    LogFullError,
    MetaError,
    RegionError,
    SessionClosedError,
    StorageError,
)

# The commit body's encoder, made once: json.dumps with arguments builds one per
# call (a few microseconds of the per-token commit). Same bytes as json.dumps.
_BODY = json.JSONEncoder(sort_keys=True, separators=(",", ":"))

__all__ = ["Durability", "Region", "Session"]


class Region:
    """A registered region. ``array`` is the caller's array (restored in place);
    ``length`` is the committed row count of a kv region."""

    def __init__(self, handle: BackendRegion, length: int = 0) -> None:
        self._handle = handle
        self.length = length
        self._marked: tuple[int, int] | None = None
        # Plain attributes, read on every commit (the spec's are computed).
        self.kind: RegionKind = handle.spec.kind
        self.rows = handle.spec.rows if self.kind == "kv" else 0  #: kv capacity along the sequence axis

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def spec(self) -> RegionSpec:
        return self._handle.spec

    @property
    def array(self) -> Any:
        return self._handle.array

    def mark_rows(self, t0: int, t1: int) -> None:
        """Declare rows ``[t0, t1)`` of a kv region dirty for the next commit."""
        if self.kind != "kv":
            raise RegionError(f"region {self.name!r}: mark_rows() is for kv regions, this one is {self.kind!r}")
        if not 0 <= t0 <= t1 <= self.spec.rows:
            raise RegionError(f"region {self.name!r}: expected rows within [0, {self.spec.rows}], found [{t0}, {t1})")
        self._marked = (t0, t1) if self._marked is None else (min(self._marked[0], t0), max(self._marked[1], t1))

    def __repr__(self) -> str:
        extra = f" length={self.length}" if self.kind == "kv" else ""
        return f"<Region {self.name!r} {self.kind} {self.spec.dtype}{list(self.spec.shape)}{extra}>"


class Session:
    """A session opened by ``Runtime.session`` / ``Runtime.resume`` (see the
    module docs for the call protocol); it reaches the runtime only through
    ``services`` (``_services``)."""

    def __init__(self, services: SessionServices, session_id: str, token: int, log: SessionLog, index: LogIndex,
                 *, prior: Any = None) -> None:
        self._services = services
        self._prior = prior  #: the catalog's state before this open (for cancel)
        self.id = session_id
        self.token = token
        self._log = log
        self._index = index
        self.epoch = index.epoch  #: last committed epoch
        self.meta: Any = index.meta  #: meta of that epoch
        self.regions: dict[str, Region] = {}
        self._recorded: dict[str, RegionSpec] = {s.name: s for s in index.specs.values()}
        self._lengths: dict[str, int] = index.lengths
        self._next_region_id = max(index.specs, default=0) + 1
        self._lock = threading.Lock()
        self._closed = False
        self._stepping = False  #: an in-step producer holds the log (StepCommits armed)
        self.log = get_logger(session=session_id, token=token)

    # -- introspection ------------------------------------------------------------

    @property
    def recorded(self) -> dict[str, RegionSpec]:
        """Regions the log holds state for, registered here or not."""
        return dict(self._recorded)

    @property
    def rollback(self) -> Rollback | None:
        """What opening with ``allow_rollback=True`` gave up (None: nothing)."""
        return self._log.rollback

    @property
    def durable_epoch(self) -> int:
        return self._log.state.durable_epoch

    @property
    def backend(self) -> str:
        return self._services.backend.name

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(f"session {self.id!r} is closed; open it again with rt.session() or rt.resume()")

    # -- 2. register ------------------------------------------------------------

    def register(
        self, name: str, array: Any, kind: RegionKind = "pages", *,
        page_size: int = 4096, seq_axis: int = 0, restore: bool = True, assume_restored: bool = False,
    ) -> Region:
        """Register ``array`` as region ``name``; restore its logged state into it.

        ``assume_restored=True``: the array already holds the state of the
        session's newest epoch (this process committed it and kept the array,
        and the caller checked that nothing committed since): nothing is read
        from the log; the recorded length is taken."""
        self._check_open()
        if name in self.regions:
            raise RegionError(f"region {name!r} is already registered in session {self.id!r}")
        info = describe(array)
        if not info.contiguous:
            raise RegionError(f"region {name!r}: expected a C-contiguous array, found a strided view")
        if info.on_device and Capability.DEVICE_MEMORY not in self._services.backend.capabilities:
            raise RegionError(
                f"region {name!r}: the {self.backend!r} backend serves host memory, found an array on {info.device}; "
                "open the runtime with backend='cupy' (or 'auto' on a GPU machine)")
        recorded = self._recorded.get(name)
        region_id = recorded.region_id if recorded else self._next_region_id
        spec = RegionSpec(name=name, region_id=region_id, kind=kind, dtype=info.dtype, shape=info.shape,
                          library=info.library, device=info.device, page_size=page_size, seq_axis=seq_axis)
        if recorded is not None and (restore or assume_restored):
            problem = recorded.compatible_with(info)
            was = (recorded.kind, recorded.page_size, recorded.seq_axis)
            if problem is None and was != (kind, page_size, seq_axis):
                problem = (f"expected kind={recorded.kind!r} page_size={recorded.page_size} "
                           f"seq_axis={recorded.seq_axis}, found kind={kind!r} page_size={page_size} "
                           f"seq_axis={seq_axis}")
            if problem:
                raise RegionError(
                    f"region {name!r} of session {self.id!r} cannot be restored into this array: {problem}")
        handle = self._services.backend.attach(spec, array)
        region = Region(handle)
        if recorded is not None and assume_restored:
            self._services.backend.after_restore(handle)  # the backend's view of the state (page hashes)
            region.length = int(self._lengths.get(name, 0))
            handle.described = recorded == spec
        elif recorded is not None and restore:
            self._restore_into(region)
            # Re-describe only if the array now lives elsewhere (library/device).
            handle.described = recorded == spec
        if recorded is None or spec != recorded:
            self._services.catalog.record_region(self.id, self.token, spec, self.epoch + 1)
        self._next_region_id = max(self._next_region_id, region_id + 1)
        self.regions[name] = region
        self._recorded[name] = spec
        self.log.debug("region registered", region=name, kind=kind, nbytes=spec.nbytes, restored=recorded is not None)
        return region

    def _restore_into(self, region: Region) -> None:
        spec = region.spec
        backend = self._services.backend
        locs = self._index.records.get(spec.region_id, [])
        for loc in locs:
            h = loc.header
            if h.type is RecordType.PAGES:
                ok = h.offset + h.length <= spec.nbytes
            elif h.type is RecordType.ROWS:
                ok = h.offset + h.aux <= spec.rows and h.length == spec.outer * h.aux * spec.row_bytes
            else:
                ok = False
            if not ok:
                raise CorruptLogError(f"{h.type.name} record of epoch {h.epoch} does not fit region {spec.name!r} "
                                      f"({spec.dtype}{list(spec.shape)})", path=str(loc.path),
                                      offset=loc.file_offset)
        with PayloadReader() as read:
            backend.apply_records(region._handle, locs, read)
        backend.after_restore(region._handle)
        region.length = int(self._lengths.get(spec.name, 0))

    def restore(self, name: str, into: Any = None, *, device: str | None = None) -> Region:
        """Register a logged region, allocating its array unless ``into`` is given."""
        spec = self._recorded.get(name)
        if spec is None:
            raise RegionError(f"session {self.id!r} holds no region {name!r}; it has {sorted(self._recorded)}")
        if into is None:
            dev = device or spec.device
            if dev != "cpu" and Capability.DEVICE_MEMORY not in self._services.backend.capabilities:
                raise RegionError(
                    f"region {name!r} was recorded on {spec.device}, and the {self.backend!r} backend serves host "
                    "memory only; pass device='cpu' to restore it into host memory")
            into = allocate(spec, device=dev)
        return self.register(name, into, spec.kind, page_size=spec.page_size, seq_axis=spec.seq_axis)

    # -- 3. commit ----------------------------------------------------------------

    def commit(self, meta: Any = None, *, rows: Mapping[str, tuple[int, int] | int] | None = None,
               wait: bool = True, quiesce: bool = False, quiesce_timeout: float = 5.0) -> int:
        """Commit an epoch; returns its number once it is in the host log ring.

        ``rows`` gives each kv region's dirty rows: ``(t0, t1)``, or an int
        ``n`` meaning rows ``[length, n)``. Rows marked with
        ``Region.mark_rows`` are added. A kv region's length becomes the end
        of its dirty range.

        ``wait=False`` returns as soon as the epoch is handed to the backend:
        on the GPU backend the executor copies it while the caller goes on
        (decode never waits); ``wait_visible(epoch)`` or ``flush()`` wait for
        it. The host backend always copies before returning.

        ``quiesce=True`` (GPU, with ``gpu_runtime.cuda.instrument`` enabled) takes a
        checkpoint at a safe point between instrumented kernels instead of
        after a stream fence: it sets the pause word (new instrumented blocks
        wait at their entry gate), waits until no block is inside an
        instrumented kernel body, copies the epoch, waits for the copy, and
        releases the gates. Work queued behind a paused kernel on a stream is
        not waited for (that is the point: it has not run). Precompiled
        library kernels are not paused; order them with a stream fence
        (``gpu_runtime.cuda.instrument.stream_completion``) if they write the
        regions. Cost: two small host-device copies plus polling for the drain,
        plus the copy itself (the commit always waits); on the H100, 0.16-0.22 ms
        for a 4 MiB region on an idle GPU against 0.11-0.12 ms for ``commit()``,
        ~0.7 ms while 20 us instrumented launches run (docs/gpu.md)."""
        self._check_open()
        if quiesce:
            from gpu_runtime.cuda import instrument

            if not instrument.is_enabled():
                raise ConfigurationError(
                    "commit(quiesce=True): expected GPU instrumentation to be enabled "
                    "(gpu_runtime.cuda.instrument.enable()), found it disabled")
            with instrument.paused(timeout=quiesce_timeout):
                return self._commit(meta, rows, wait=True, fence=False)
        return self._commit(meta, rows, wait=wait, fence=True)

    def _commit(self, meta: Any, rows: Mapping[str, tuple[int, int] | int] | None, *, wait: bool,
                fence: bool) -> int:
        with self._lock:
            if self._stepping:
                raise ConcordiaError(f"session {self.id!r}: the in-step producer holds the log (step commits armed); "
                                     "close the StepCommits before committing on the host")
            self._log.check_owner()
            if (err := self._log.error) is not None:
                self._raise_flusher_error(err)
            ranges: dict[str, tuple[int, int]] = {}
            for name, r in (rows or {}).items():
                region = self.regions.get(name)
                if region is None or region.kind != "kv":
                    kv = sorted(n for n, g in self.regions.items() if g.kind == "kv")
                    raise RegionError(f"rows given for {name!r}, which is not a registered kv region of session "
                                      f"{self.id!r} (kv regions: {kv})")
                rng = (region.length, r) if isinstance(r, int) else (int(r[0]), int(r[1]))
                if not 0 <= rng[0] <= rng[1] <= region.rows:
                    raise RegionError(f"region {name!r}: expected rows within [0, {region.rows}], found {rng}")
                ranges[name] = rng
            tasks = []
            lengths = dict(self._lengths)  # the loop below adds every registered kv region's
            for name, region in self.regions.items():
                span: tuple[int, int] | None = ranges.get(name)
                if region._marked is not None:
                    m = region._marked
                    span = m if span is None else (min(span[0], m[0]), max(span[1], m[1]))
                tasks.append(CheckpointTask(region._handle, span))
                if region.kind == "kv":
                    lengths[name] = span[1] if span is not None else region.length
            body = self._commit_body(meta, lengths)
            epoch = self.epoch + 1
            self._services.backend.commit_epoch(self._log.writer, epoch, tasks, body, fence=fence)
            if wait:
                self._services.backend.wait_visible(self._log.writer, epoch)
            self.epoch, self.meta, self._lengths = epoch, meta, lengths
            for name, region in self.regions.items():
                region._marked = None
                if region.kind == "kv":
                    region.length = lengths[name]
        # No kick: the flusher polls every flush_poll seconds and batches the
        # fsyncs of all commits in between. Waking it here made it contend for
        # the GIL with the caller's next step (measured on the decode path).
        return epoch

    def _current_lengths(self) -> dict[str, int]:
        """Every kv region's committed length: those recorded, and the
        registered ones (a COMMIT body names them all)."""
        lengths = dict(self._lengths)
        lengths.update((name, r.length) for name, r in self.regions.items() if r.kind == "kv")
        return lengths

    @staticmethod
    def _commit_body(meta: Any, lengths: dict[str, int]) -> bytes:
        try:
            return _BODY.encode({"lengths": lengths, "meta": meta}).encode()
        except (TypeError, ValueError) as e:
            raise MetaError(f"commit meta must be JSON-serializable, found {type(meta).__name__}: {e}") from e

    def step_commits(self, *, kv: str, tokens: str, meta: Mapping[str, Any], length_key: str, every: int = 1,
                     device: bool = True) -> StepCommits:
        """Commits at model steps: rows of kv regions ``kv`` and ``tokens`` up
        to each step's length, with ``meta`` whose ``length_key`` is that
        length, every ``every`` rows; on the GPU by a kernel inside the step
        (``device=True`` and a backend that has one). With ``device=True``,
        every backend refuses (RegionError) what that kernel could not commit:
        tokens rows other than int64, a COMMIT body over 4096 bytes. See
        ``_step_commits.py`` for the protocol."""
        self._check_open()
        handles = []
        for name in (kv, tokens):
            region = self.regions.get(name)
            if region is None or region.kind != "kv":
                raise RegionError(f"step commits: {name!r} is not a registered kv region of session {self.id!r}")
            handles.append(region._handle)
        producer = None
        if device:
            template, slots = StepCommits.template(self._commit_body, dict(meta), length_key, self._current_lengths(),
                                                   (kv, tokens))
            # The in-step producer's limits, on every backend (one that has none runs the steps on the host)
            check_step_inputs(template=template, slots=slots, tokens_name=tokens,
                              token_row_bytes=handles[1].spec.row_bytes)
            producer = self._services.backend.step_committer(
                self._log.writer, owner_token=self.token, kv=handles[0], tokens=handles[1], template=template,
                slots=slots, every=every, space_timeout_s=self._log.config.space_timeout)

        def stepping(on: bool) -> None:
            self._stepping = on

        return StepCommits(self, kv=self.regions[kv], tokens=self.regions[tokens], meta=dict(meta),
                           length_key=length_key, every=every, writer=self._log.writer, adopt=self._adopt_steps,
                           stepping=stepping, device=producer)

    def _adopt_steps(self, epoch: int, meta: Any, lengths: dict[str, int], position: int) -> None:
        """Make epochs an in-step producer committed the session's own: its
        log position (published up to there), epoch, meta and lengths."""
        with self._lock:
            self._log.writer.adopt(position)
            merged = self._current_lengths()
            merged.update(lengths)
            self.epoch, self.meta, self._lengths = epoch, meta, merged
            for name, n in lengths.items():
                self.regions[name].length = n

    def _raise_flusher_error(self, err: BaseException) -> None:
        """Raise what stopped the flusher, as an error of this commit (not written)."""
        last = f"epoch {self.epoch} and every one before it"
        if isinstance(err, (LogFullError, StorageError)):
            raise type(err)(f"session {self.id!r}: epoch {self.epoch + 1} not committed: the flusher cannot "
                            f"write the segments ({err}); {last} stay in the host ring until the disk takes them "
                            "again (space freed), then commits go on", orig=err)
        if isinstance(err, CorruptLogError):
            where = ("a damaged record in the host ring, and copies nothing past it"
                     if err.path == str(self._log.ring.path) else "a damaged log file while compacting")
            raise CorruptLogError(f"session {self.id!r}: epoch {self.epoch + 1} not committed: the flusher found "
                                  f"{where} ({err.reason}); close this process and resume with allow_rollback=True "
                                  "to continue from the newest intact epoch", path=err.path, offset=err.offset,
                                  orig=err)

    # -- 4. flush / 5. close ----------------------------------------------------

    def wait_visible(self, epoch: int | None = None, timeout: float = 30.0) -> None:
        """Wait until ``epoch`` (default: the newest) is in the host ring."""
        self._check_open()
        self._services.backend.wait_visible(self._log.writer, self.epoch if epoch is None else epoch, timeout)

    def flush(self, timeout: float = 60.0, *, level: str | None = None) -> int:
        """Wait until the newest committed epoch has reached ``level`` (default:
        the session's level, ``durability().level``); returns it.

        * ``"local"``: in the host ring (survives this process);
        * ``"disk"``: fsynced in a segment (survives a power loss);
        * ``"remote"``: sealed, uploaded and verified by the object store
          (survives the host); RemoteStoreError after ``timeout`` seconds,
          naming the lag and the last failure. Needs a session of level remote."""
        self._check_open()
        level = check_level(level or self._log.level)
        self._services.backend.wait_visible(self._log.writer, self.epoch, timeout)
        if level == "local":
            return self.epoch
        durable = self._log.wait_durable(self.epoch, timeout)
        if level == "disk":
            return durable
        if self._log.level != "remote" or self._services.wait_remote is None:
            raise ConfigurationError(f"session {self.id!r} is at durability level {self._log.level!r}; flush("
                                     "level='remote') needs a session opened with durability='remote' on a runtime "
                                     "with a remote")
        self._services.wait_remote(self.id, self.epoch, timeout)
        return self.epoch

    def durability(self) -> Durability:
        """Where the session's epochs are now: its level, the newest committed,
        fsynced and remote epochs, and the last upload failure (the lag's cause)."""
        status = self._services.remote_status(self.id) if self._services.remote_status else None
        remote, error = status if status is not None else (None, None)
        return Durability(level=self._log.level, committed=self.epoch, disk=self._log.state.durable_epoch,
                          remote=remote, remote_error=None if error is None else str(error))

    def close(self) -> None:
        """Flush, release the lease and mark the session closed. If the last
        flush fails (a full disk, a damaged ring record), the error is raised
        and the session is released without being marked closed: its ring still
        holds what the segments lack, and a resume picks it up."""
        if self._end(closed=True):
            self.log.info("session closed", epoch=self.epoch)

    def cancel(self) -> None:
        """Give the session back as this process found it, after opening it
        failed (a region that does not fit, a run that does not match): its
        status (closed, crashed, idle) and lease are put back, the host ring is
        left in place, and this owner's empty segment is removed. After a
        commit of this process it is a release without close instead: what was
        committed stays, flushed, and the status is idle."""
        if self._closed:
            return
        if self.epoch > self._index.epoch or self.rollback is not None:  # committed here, or rolled back
            # A rollback is a decision already recorded (catalog, new chain): keep it.
            self.release()
            return
        self._closed = True
        self._services.detach(self.id, self.token)
        try:
            self._log.cancel()
        finally:
            self._services.give_back(self.id, self.token, self._prior)
        self.log.info("session open cancelled", epoch=self.epoch)

    def release(self) -> None:
        """Flush, release the lease and keep the session resumable (status
        idle, not closed): for a process that stops using a session it has not
        finished, e.g. after a failure it cannot handle itself."""
        if self._end(closed=False):
            self.log.info("session released", epoch=self.epoch)

    def _end(self, *, closed: bool) -> bool:
        """``close`` (``closed``) or ``release``: a last flush, then the lease goes,
        marked closed only if the flush got through. False if already ended."""
        with self._lock:  # not while a commit of another thread is under way
            if self._closed:
                return False
            self._closed = True
        self._services.detach(self.id, self.token)
        try:
            self._log.close(clean=closed)
        except BaseException:
            self._services.release(self.id, self.token, False)
            raise
        self._services.release(self.id, self.token, closed)
        return True

    def _abandon(self) -> None:
        """Stop using the session without closing it (its lease is kept until it
        expires: the state is as after a crash). For tests and shutdown paths."""
        self._closed = True
        self._services.detach(self.id, self.token)
        try:
            self._log.close(clean=False)
        except ConcordiaError as e:  # as after a crash: what the flush could not copy stays in the ring
            self.log.warning("abandoned session's last flush failed", error=str(e))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"epoch {self.epoch}"
        return f"<Session {self.id!r} {state} token={self.token} regions={sorted(self.regions)}>"
