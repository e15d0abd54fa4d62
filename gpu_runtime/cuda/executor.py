"""Host side of the persistent executor (``kernels/executor.cu``).

Protocol, in order, with who does each step:

1. ``Executor(...)`` allocates the task ring and the control block in mapped
   pinned host memory, compiles the module (NVRTC, cached) and loads it.
2. ``enqueue(kind, ...)`` (any thread): under a lock, wait for a free slot
   (``ticket - head < nslots``), store the arguments, then ``seq = ticket + 1``
   last. After the lock (a full fence on x86), if the executor is parked or
   parking, launch a new generation on the executor's stream: stream order puts
   it after the exiting one, so at most one generation runs at a time.
3. The kernel runs tickets in order and stores ``head = ticket + 1`` after
   each; it parks itself after ``idle_ms`` without work or ``max_life_ms`` of
   life, so no host call (a device synchronize, a module load) can block on it
   for longer than that. A data task whose stream fence (or a FENCE_WAIT
   whose word) is not reached within ``fence_yield_ms`` parks it too, unretired: the work the fence waits for
   may itself wait for no kernel to be resident (the first launch of a lazily
   loaded module, queued before the commit). The next ``enqueue``, ``wait``
   or ``poll`` (the runtime's flusher polls) relaunches it at that task.
4. ``wait(ticket)`` polls ``head`` (and relaunches if needed); errors raised on
   the device (a fence timeout, a bad task) surface as ``ExecutorError``.
5. ``set_handlers(...)`` (hot swap): compile the new module while the old
   generation runs, ask it to park at a task boundary (``stop``), load the new
   module, and relaunch on the same ring: queued tasks run once, in order.

Task slot layout (TASK_VERSION 1, 128 bytes): ``u64 seq, u32 kind, u32
handler, u64 args[14]``, the arguments of each kind defined in ``tasks.py``;
control block (CONTROL_VERSION 2, 128 bytes): see ``kernels/concordia.cuh``.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ExecutorError
from .compiler import compile_cubin, kernel_source
from .memory import PinnedBuffer
from .tasks import TASK_ARGS

__all__ = ["Executor", "ExecutorError", "Handler", "module_options"]

TASK_VERSION = 1
CONTROL_VERSION = 2  # 2: fence_yield_ns, fence_ticket, fence_since
SLOT_WORDS = 16
# control words
(HEAD, STOP, STATE, GENERATION, ERROR, ERROR_TICKET, PARKS, HEARTBEAT, IDLE_NS, MAX_LIFE_NS, NSLOTS,
 FENCE_YIELD_NS, FENCE_TICKET, FENCE_SINCE) = range(14)
PARKED, RUNNING, PARKING, LAUNCHED = 0, 1, 2, 3
REGION_WORDS = 16
DEFAULT_BLOCKS = 8
DEFAULT_BLOCK = 512  # threads per block (CNC_BLOCK)
MAX_REGIONS = 1024
_SLOT_BODY = struct.Struct("<15Q")  # kind | handler << 32, a0..a13
_SEQ = struct.Struct("<Q")
_NO_ARGS = (0,) * TASK_ARGS
_ERRORS = {1: "fence wait timed out", 2: "log ring full", 3: "unknown task kind", 4: "no handler for the task"}


@dataclass(frozen=True, slots=True)
class Handler:
    """One compiled specialization: ``CNC_KV(id, row_bytes)`` or ``CNC_PAGES(id, page_size)``."""

    kind: str  #: "kv" or "pages"
    constant: int

    def macro(self, hid: int) -> str:
        return f"CNC_{self.kind.upper()}({hid}, {self.constant}ull)"


def module_options(handlers: Sequence[Handler], block: int, *, fused_pages: bool = False) -> tuple[str, ...]:
    cases = " ".join(h.macro(i) for i, h in enumerate(handlers))
    return (f"-DCNC_HANDLER_CASES={cases}", f"-DCNC_BLOCK={block}") + (("-DCNC_FUSED_PAGES=1",) if fused_pages else ())


class Executor:
    def __init__(
        self, *, nslots: int = 4096, blocks: int | None = None, block: int = DEFAULT_BLOCK, idle_ms: float = 10.0,
        max_life_ms: float = 500.0, fence_yield_ms: float = 2.0, arch: str | None = None,
        fused_pages: bool = False,
    ) -> None:
        import cupy

        self._cupy = cupy
        dev = cupy.cuda.Device()
        self.device_id = int(dev.id)  #: the device it runs on (threads that allocate for it select it)
        self.sm_count = dev.attributes["MultiProcessorCount"]
        self.arch = arch or f"sm_{dev.compute_capability}"
        # A few SMs by default: a resident executor block can keep a large GEMM
        # (which wants a whole SM's registers) off its SM, and the compute that a
        # commit's fence waits for must be able to run (measured: with one block
        # on every SM, an 8B-shaped decode step never reached the fence).
        self.blocks = min(blocks or DEFAULT_BLOCKS, self.sm_count)
        self.block = block
        self.fused_pages = fused_pages  #: the module has the SCAN_COMMIT task (kernels/executor.cu)
        self.nslots = nslots
        self._slots_mem = PinnedBuffer(nslots * SLOT_WORDS * 8)
        self.slots = self._slots_mem.view(np.uint64).reshape(nslots, SLOT_WORDS)
        self.slots[:] = 0
        self._slot_bytes = self._slots_mem.array.data  # enqueue packs slots with struct (cheapest)
        self._ctl_mem = PinnedBuffer(128)
        self.ctl = self._ctl_mem.view(np.uint64)
        self.ctl[:] = 0
        self._ctlq = self._ctl_mem.array.data.cast("Q")  # word reads as Python ints, no NumPy scalar
        self.ctl[IDLE_NS] = int(idle_ms * 1e6)
        self.ctl[MAX_LIFE_NS] = int(max_life_ms * 1e6)
        self.ctl[NSLOTS] = nslots
        self.ctl[FENCE_YIELD_NS] = int(fence_yield_ms * 1e6)
        self.grid = cupy.zeros(512, dtype=cupy.uint64)  # CncGrid (barrier, task copy, checksum sums)
        self.regions = np.zeros((MAX_REGIONS, REGION_WORDS), np.uint64)
        self._regions_dev = cupy.asarray(self.regions)
        self._nregions = 0
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._lock = threading.Lock()  # producers: ticket order = slot order
        self._launch_lock = threading.RLock()  # launches and swaps
        self._tail = 0
        self.generation = 0
        self.handlers: list[Handler] = []
        self.swaps = 0
        self._function = self._load(self._compile(self.handlers))

    # -- modules ------------------------------------------------------------------

    def _compile(self, handlers: Sequence[Handler]) -> bytes:
        return compile_cubin(kernel_source("executor.cu"),
                             options=module_options(handlers, self.block, fused_pages=self.fused_pages),
                             arch=self.arch, name="executor.cu").cubin

    def _load(self, cubin: bytes) -> Any:
        module = self._cupy.cuda.function.Module()
        module.load(cubin)
        self._module = module  # keep it alive with its function
        return module.get_function("cnc_executor")

    def handler_id(self, handler: Handler) -> int:
        """The operator-table index of a specialization, hot-swapping it in if new."""
        with self._launch_lock:
            if handler in self.handlers:
                return self.handlers.index(handler)
            self.set_handlers([*self.handlers, handler])
            return len(self.handlers) - 1

    def set_handlers(self, handlers: Sequence[Handler]) -> None:
        """Hot swap: compile (old generation keeps running), park, load, relaunch."""
        cubin = self._compile(handlers)  # NVRTC needs no device: no blocking here
        with self._launch_lock:
            self.park()
            self._function = self._load(cubin)
            self.handlers = list(handlers)
            self._regions_dev.set(self.regions)
            self.swaps += 1
            self.ctl[STOP] = 0
            if self._tail > int(self.ctl[HEAD]):
                self._launch()

    def set_region(self, index: int | None, words: np.ndarray) -> int:
        """Write an operator-table region entry (parks the executor to upload it)."""
        with self._launch_lock:
            if index is None:
                index = self._nregions
                self._nregions += 1
                if index >= MAX_REGIONS:
                    raise ExecutorError(f"expected at most {MAX_REGIONS} regions per executor")
            self.regions[index] = 0
            self.regions[index, : words.size] = words
            self.park()
            self._regions_dev.set(self.regions)
            self.ctl[STOP] = 0
            if self._tail > int(self.ctl[HEAD]):
                self._launch()
            return index

    def set_windows(self, idle_ms: float, max_life_ms: float) -> None:
        """Change the idle window and the maximum lifetime. A generation reads
        them once, at launch: a running one is parked at a task boundary and
        relaunched if tasks are pending, so the new windows hold from now on."""
        with self._launch_lock:
            self.ctl[IDLE_NS] = int(idle_ms * 1e6)
            self.ctl[MAX_LIFE_NS] = int(max_life_ms * 1e6)
            self.park()
            self.ctl[STOP] = 0
            if self.pending:
                self._launch()

    @property
    def idle_ms(self) -> float:
        return int(self.ctl[IDLE_NS]) / 1e6

    @property
    def max_life_ms(self) -> float:
        return int(self.ctl[MAX_LIFE_NS]) / 1e6

    # -- launching and parking ----------------------------------------------------

    def _launch(self) -> None:
        self.generation += 1
        self.ctl[STATE] = LAUNCHED
        cp = self._cupy
        self._function(
            (self.blocks,), (self.block,),
            (cp.uint64(self._slots_mem.device_ptr), cp.uint64(self._ctl_mem.device_ptr), self.grid,
             self._regions_dev, cp.uint64(self.generation)),
            stream=self.stream, enable_cooperative_groups=True)

    def ensure_running(self) -> None:
        ctl = self._ctlq
        if ctl[STATE] in (PARKED, PARKING):
            with self._launch_lock:
                if ctl[STATE] in (PARKED, PARKING) and not ctl[STOP]:
                    self._launch()

    def park(self, timeout: float = 10.0) -> None:
        """Ask the running generation to exit at a task boundary and wait for it."""
        with self._launch_lock:
            self.ctl[STOP] = 1
            deadline = time.monotonic() + timeout
            while not self.stream.done:
                if time.monotonic() > deadline:
                    raise ExecutorError(f"executor did not park within {timeout} s (head {int(self.ctl[HEAD])})")
                time.sleep(20e-6)

    @property
    def state(self) -> int:
        return int(self.ctl[STATE])

    @property
    def head(self) -> int:
        return int(self.ctl[HEAD])

    @property
    def parks(self) -> int:
        return int(self.ctl[PARKS])

    # -- tasks --------------------------------------------------------------------

    def enqueue(self, kind: int, args: Sequence[int] = (), *, handler: int = 0, timeout: float = 30.0) -> int:
        """Publish one task (arguments not given are 0); returns its ticket.
        Never launches per task in steady state: only a parked executor is
        relaunched. On the commit path: one ``struct`` pack per slot."""
        n = len(args)
        if n > TASK_ARGS:
            raise ValueError(f"a task has at most {TASK_ARGS} arguments, found {n}")
        with self._lock:
            ticket = self._tail
            if ticket - self._ctlq[HEAD] >= self.nslots:
                self._wait_head(ticket - self.nslots + 1, timeout)
            at = (ticket % self.nslots) * SLOT_WORDS * 8
            try:
                _SLOT_BODY.pack_into(self._slot_bytes, at + 8, kind | (handler << 32), *args, *_NO_ARGS[n:])
            except struct.error:  # a negative argument: stored as its two's complement
                _SLOT_BODY.pack_into(self._slot_bytes, at + 8, kind | (handler << 32),
                                     *[int(a) & 0xFFFFFFFFFFFFFFFF for a in args], *_NO_ARGS[n:])
            # Publish last (x86 keeps stores in program order; the device reads
            # the other words only after it saw this one).
            _SEQ.pack_into(self._slot_bytes, at, ticket + 1)
            self._tail = ticket + 1
        self.ensure_running()
        return ticket

    def _wait_head(self, target: int, timeout: float) -> None:
        # Spin for the first 2 ms (tasks take microseconds; a sleep costs ~60 us
        # of timer slack), then back off to sleeps.
        start = time.monotonic()
        deadline = start + timeout
        spins = 0
        ctl = self._ctlq
        while ctl[HEAD] < target:
            spins += 1
            if spins % 256 == 0:
                self.ensure_running()
                self._raise_error()
                now = time.monotonic()
                if now > deadline:
                    raise ExecutorError(f"ticket {target - 1} not done after {timeout} s "
                                        f"(head {self.head}, state {self.state}, generation {self.generation})")
                if now - start > 2e-3:
                    time.sleep(50e-6 if now - start < 0.1 else 500e-6)

    def wait(self, ticket: int, timeout: float = 30.0) -> None:
        """Block until ``ticket`` has run; raise ExecutorError if it failed."""
        self._wait_head(ticket + 1, timeout)
        self._raise_error()

    def _raise_error(self) -> None:
        code = int(self.ctl[ERROR])
        if code:
            ticket = int(self.ctl[ERROR_TICKET])
            self.ctl[ERROR] = 0
            raise ExecutorError(f"executor task {ticket} failed: {_ERRORS.get(code, code)}")

    def wait_all(self, timeout: float = 30.0) -> None:
        """Block until every task enqueued so far has run."""
        if self._tail:
            self.wait(self._tail - 1, timeout)

    @property
    def pending(self) -> int:
        return self._tail - self.head

    def poll(self) -> None:
        """Relaunch a parked executor that still has tasks (one whose fence wait
        yielded, with no enqueue or wait since to relaunch it). The runtime's
        flusher calls this every ``flush_poll``."""
        if self.pending:
            self.ensure_running()

    def close(self) -> None:
        """Park, then free the ring and control block. If the executor does not
        park, the memory is left allocated: freeing pinned memory waits for
        every resident kernel, so it would hang instead of raising."""
        self.park()
        self._slots_mem.close()
        self._ctl_mem.close()
