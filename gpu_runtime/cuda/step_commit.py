"""The in-step producer: epochs committed by a kernel launched inside a model
step (and captured with it into a CUDA graph), with no host work per step.

``kernels/step_commit.cu`` holds the protocol; in short, each launch reads the
step's new length ``L`` from device memory, stores the step's input tokens
into the tokens region, and when ``L`` reached the committed length plus
``every`` it appends the kv and tokens rows ``[committed, L)`` and a COMMIT
whose JSON body is a template with the decimal of ``L`` in its places, then
publishes the epoch in the ring header. Epoch numbers and the ring position
live in device memory (the state words below) while the producer is armed;
the host owns neither meanwhile (``concordia_agents/_step_commits.py`` hands
them over and takes them back).

The records are those the host writes for the same commit (same framing, the
planner's row spans): ``tests/test_step_commit_gpu.py`` compares the bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..backend import MAX_STEP_BODY, check_step_inputs
from ..errors import LogFullError, RegionError
from ..logring import LogRing
from ..planner import rows_per_record
from ..records import record_size
from .compiler import compile_cubin, kernel_source
from .memory import device_ptr
from .region import CupyRegion

__all__ = ["MAX_BODY", "MAX_RECORDS", "PARAM_WORDS", "STATE_WORDS", "StepCommitter", "StepState"]

MAX_RECORDS = 64  #: data records of one epoch (CNC_STEP_MAX_RECORDS)
MAX_BODY = MAX_STEP_BODY  #: bytes of a COMMIT body (CNC_STEP_MAX_BODY; every backend's limit: backend.py)
MAX_SLOTS = 8  #: places of the length whose offsets the kernel is given (CNC_STEP_MAX_SLOTS; more: formatted serially)
_BLOCK = 256
# State and parameter words: kernels/step_commit.cu's S_* and P_* (test_kernels_compile checks them).
STATE_WORDS = ("ARMED", "NEXT", "EPOCH", "COMMITTED", "ERROR", "ERROR_INFO", "ARRIVED", "COMMITS", "STEPS",
               "SEEN_VALID", "SEEN_OWNER", "SEEN_CONSUMED")
_ARMED, _NEXT, _EPOCH, _COMMITTED, _ERROR, _ERROR_INFO, _ARRIVED, _COMMITS, _STEPS, _SEEN_VALID, _, _ = range(
    len(STATE_WORDS))
_ACC = 16  #: S_ACC
PARAM_WORDS = ("HEADER", "CAPACITY", "TAG", "OWNER", "EVERY", "TIMEOUT_NS", "KV_BASE", "KV_OUTER", "KV_ROWS",
               "KV_ROW_BYTES", "KV_PER", "KV_REGION", "TOK_BASE", "TOK_OUTER", "TOK_ROWS", "TOK_PER", "TOK_REGION",
               "TEMPLATE_LEN", "SLOTS", "SLOT_AT")
_P_TEMPLATE = 32  #: P_TEMPLATE
_P_SLOT_AT = PARAM_WORDS.index("SLOT_AT")  #: P_SLOT_AT: MAX_SLOTS words from here (the last named word)
_ERRORS = {1: "unarmed", 2: "ring_full", 3: "fenced", 4: "rows", 5: "too_big"}
_modules: dict[str, Any] = {}
# The process's slot (kernels/step_commit.cu): two device words naming the armed
# producer's parameters and state, allocated once and never freed (graphs that
# captured a launch keep its address), and the producer armed in it.
_slot: list[Any] = []
_armed: list[StepCommitter] = []


def _the_slot() -> Any:
    import cupy

    if not _slot:
        _slot.append(cupy.zeros(2, dtype=cupy.uint64))
    return _slot[0]


@dataclasses.dataclass(frozen=True, slots=True)
class StepState:
    """The producer's state words, read back by the host."""

    armed: bool
    position: int  #: log offset of the next record
    epoch: int  #: last committed epoch
    committed: int  #: rows of the kv and tokens regions committed
    error: str | None  #: None, or what stopped it: unarmed, ring_full, fenced, rows, too_big
    error_info: int  #: what the failure saw (a length, the ring's owner token, its consumed offset)
    commits: int  #: epochs committed by this producer
    steps: int  #: launches


def _function(arch: str, probe: int = 0) -> tuple[Any, Any]:
    """The kernels for ``arch``: the producer and its ring check
    (``cnc_step_check``, launched before it); ``probe`` (a CNC_STEP_PROBE mask of
    ``kernels/step_commit.cu``) builds a diagnostic variant that leaves parts
    of a commit out: for ``bench/bench_step_commit_gpu.py`` on a ring no
    flusher reads, never for a session's log."""
    import cupy

    key = f"{arch}/{probe}"
    if key not in _modules:
        module = cupy.cuda.function.Module()
        options = (f"-DCNC_STEP_PROBE={probe}",) if probe else ()
        module.load(compile_cubin(kernel_source("step_commit.cu"), options=options, arch=arch,
                                  name="step_commit.cu").cubin)
        _modules[key] = (module, (module.get_function("cnc_step_commit"), module.get_function("cnc_step_check")))
    return _modules[key][1]


class StepCommitter:
    """One producer for a session's kv region and tokens region.

    Allocates and fills everything the kernel reads before any capture
    (allocation during CUDA graph capture fails); ``launch`` only launches.
    ``arm`` / ``disarm`` are stream-ordered on the given stream; ``state``
    synchronizes the device."""

    def __init__(self, *, arch: str, sms: int, ring: LogRing, ring_header: int, session_tag: int, owner_token: int,
                 max_record_bytes: int, kv: CupyRegion, tokens: CupyRegion, template: bytes, slots: int,
                 every: int, space_timeout_s: float) -> None:
        import cupy

        self._cupy = cupy
        most_body = check_step_inputs(template=template, slots=slots, tokens_name=tokens.spec.name,
                                      token_row_bytes=tokens.spec.row_bytes)
        self.every = every
        self._units = (kv.unit, tokens.unit)
        self._pers = (rows_per_record(kv.unit, max_record_bytes), rows_per_record(tokens.unit, max_record_bytes))
        # The largest epoch it writes in decode: `every` rows (an eager step of
        # more rows is checked by the kernel, which then stops with too_big).
        most = self.epoch_bytes(every, most_body)
        records = sum(-(-every // per) for per in self._pers)
        if records > MAX_RECORDS or most > ring.capacity // 2:
            raise LogFullError(f"the in-step producer commits at most {MAX_RECORDS} records and half the ring "
                               f"({ring.capacity // 2} bytes) per epoch; checkpoint_every={every} makes epochs of "
                               f"{records} records, {most} bytes: lower checkpoint_every or raise "
                               "CONCORDIA_RING_BYTES")
        fields = {
            "HEADER": ring_header, "CAPACITY": ring.capacity, "TAG": session_tag, "OWNER": owner_token,
            "EVERY": every, "TIMEOUT_NS": int(space_timeout_s * 1e9),
            "KV_BASE": device_ptr(kv.array), "KV_OUTER": kv.spec.outer, "KV_ROWS": kv.rows,
            "KV_ROW_BYTES": kv.spec.row_bytes, "KV_PER": self._pers[0], "KV_REGION": kv.spec.region_id,
            "TOK_BASE": device_ptr(tokens.array), "TOK_OUTER": tokens.spec.outer, "TOK_ROWS": tokens.rows,
            "TOK_PER": self._pers[1], "TOK_REGION": tokens.spec.region_id,
            "TEMPLATE_LEN": len(template), "SLOTS": slots,
        }
        # The places of the length, listed for the kernel's parallel formatting of
        # the body (a wrong list would misplace its bytes: checked, not assumed).
        at = [i for i, byte in enumerate(template) if byte == 0]
        if len(at) != slots:
            raise RegionError(f"the in-step producer's body template: expected {slots} places of the length, found "
                              f"{len(at)} zero bytes")
        words = np.zeros(_P_TEMPLATE + MAX_BODY // 8, dtype=np.uint64)
        words[:_P_SLOT_AT] = [fields[name] for name in PARAM_WORDS[:_P_SLOT_AT]]
        if slots <= MAX_SLOTS:  # more: the kernel walks the template on one thread
            words[_P_SLOT_AT:_P_SLOT_AT + slots] = at
        words.view(np.uint8)[8 * _P_TEMPLATE:8 * _P_TEMPLATE + len(template)] = np.frombuffer(template, np.uint8)
        self._params = cupy.asarray(words)
        self._state = cupy.zeros(_ACC + MAX_RECORDS, dtype=cupy.uint64)
        self._fn, self._check = _function(arch)
        # Enough blocks that each thread stores a few words of an epoch's rows.
        step_words = (kv.unit + tokens.unit) * every // 8
        self.blocks = max(1, min(sms, -(-step_words // (_BLOCK * 8))))
        #: True: launch cnc_step_check before each producer launch (kernels/step_commit.cu: the ring's words
        #: read once a launch); False: every block reads them; None (the default): checked from 5 blocks on.
        #: The check is a launch of its own and pays from a few blocks on (H100, 2026-12-07,
        #: bench/bench_step_commit_gpu.py, us a step checked against read per block: 3 blocks, 1B batch 1,
        #: 24.9 against 21.9; 9 blocks, 8B batch 1, 25.4 against 32.3; 17, 1B batch 8, 26.7 against 41.9;
        #: 65, 8B batch 8, 52.2 against 107.1)
        self.ring_check: bool | None = None
        self._streams: dict[int, Any] = {}
        self._arm = cupy.cuda.alloc_pinned_memory(8 * 4)
        cupy.cuda.runtime.deviceSynchronize()  # the parameters are in place before any capture

    def epoch_bytes(self, rows: int, body_len: int) -> int:
        """Log bytes of an epoch of ``rows`` rows and a ``body_len``-byte body:
        each region's rows cut every ``per`` rows (planner.row_spans), then
        the COMMIT."""
        total = record_size(body_len)
        for unit, per in zip(self._units, self._pers, strict=True):
            full, rest = divmod(rows, per)
            total += full * record_size(unit * per) + (record_size(unit * rest) if rest else 0)
        return total

    def _stream(self, handle: int) -> Any:
        if handle not in self._streams:
            self._streams[handle] = self._cupy.cuda.ExternalStream(handle)
        return self._streams[handle]

    def arm(self, stream: int, *, position: int, epoch: int, committed: int) -> None:
        """Hand the writer's position and the session's epoch to the device and
        point the process's slot at this producer, in stream order (before
        the next launch on ``stream``). One producer is armed at a time."""
        if _armed and _armed[0] is not self:
            raise RegionError("another in-step producer is armed in this process (a concurrent durable_generate "
                              "with a static cache on the GPU?); one runs at a time")
        words = np.frombuffer(self._arm, np.uint64, 4)
        words[:] = (1, position, epoch, committed)
        s = self._stream(stream)
        self._state[:4].set(words, stream=s)  # from the pinned words
        with s:  # a ring check of an earlier arming (whose launch then failed) is not this one's
            self._state[_SEEN_VALID:_SEEN_VALID + 1].fill(0)
        _the_slot().set(np.array([self._params.data.ptr, self._state.data.ptr], np.uint64), stream=s)
        self._stream(stream).synchronize()  # the pinned words may be rewritten by the next arm
        _armed[:] = [self]

    def disarm(self) -> None:
        """Later launches (a graph replayed outside a durable_generate call)
        do nothing. Call after ``state`` (the device is idle)."""
        if _armed and _armed[0] is self:
            _armed.clear()  # first: a failing device below must not keep the process's slot taken
            _the_slot().fill(0)
            self._state[_ARMED:_ARMED + 1].fill(0)
            self._cupy.cuda.runtime.deviceSynchronize()

    def __del__(self) -> None:
        try:
            self.disarm()  # never leave the slot naming freed memory
        except Exception:  # noqa: BLE001 - interpreter shutdown, a failed device: nothing to do
            pass

    def launch(self, stream: int, length_ptr: int, ids_ptr: int, n_in: int, ids_stride: int) -> None:
        """One step's launch on ``stream``: ``length_ptr`` the device int64 new
        length, ``ids_ptr`` the step's int64 input tokens ``[outer, n_in]``
        with row stride ``ids_stride`` (elements)."""
        if self.checks_ring:
            self.check_ring(stream, length_ptr)
        u = np.uint64
        self._fn((self.blocks,), (_BLOCK,), (_the_slot(), u(length_ptr), u(ids_ptr), u(n_in), u(ids_stride)),
                 stream=self._stream(stream))

    @property
    def checks_ring(self) -> bool:
        """Whether ``launch`` launches the ring check (``ring_check``, or
        its default for this producer's blocks)."""
        return self.ring_check if self.ring_check is not None else self.blocks > 4

    def check_ring(self, stream: int, length_ptr: int) -> None:
        """Launch ``cnc_step_check`` on ``stream``: the ring's owner and
        consumed words read once, by one thread, for the producer launch
        queued next, if that launch commits (``launch`` does this itself
        while ``ring_check``; kernels/step_commit.cu says why)."""
        self._check((1,), (1,), (_the_slot(), np.uint64(length_ptr)), stream=self._stream(stream))

    def state(self) -> StepState:
        """The state words (synchronizes the device first)."""
        self._cupy.cuda.runtime.deviceSynchronize()
        w = [int(x) for x in self._state[:_ACC].get()]
        return StepState(armed=bool(w[_ARMED]), position=w[_NEXT], epoch=w[_EPOCH], committed=w[_COMMITTED],
                         error=_ERRORS.get(w[_ERROR]) if w[_ERROR] else None, error_info=w[_ERROR_INFO],
                         commits=w[_COMMITS], steps=w[_STEPS])
