"""Module-load interposition: CuPy modules loaded while enabled carry the pause
gate and the completion hook of :mod:`gpu_runtime.cuda.ptx`.

Call protocol::

    instrument.enable(gate_timeout=5.0)   # patch CuPy's module loading, allocate the control block
    ...                                   # kernels compiled or loaded from now on are rewritten
    with instrument.paused(timeout=5.0):  # new blocks wait at their gates; blocks already
        ...                               # inside a body have finished: a safe point
    c = instrument.completion("my_kernel")   # its finished-launch counter, as a Completion
    c.wait_on(executor)                   # the persistent executor waits for it, no host sync
    instrument.disable()                  # unpatch; loaded modules keep their hooks

What is interposed (CuPy 14):

* Source compiled through CuPy — ``RawModule(code=)``, ``RawKernel``,
  ``ElementwiseKernel``, ``ReductionKernel`` and CuPy's own generated kernels —
  all reach ``cupy.cuda.compiler._compile_with_cache_cuda``. While enabled,
  NVRTC is asked for PTX (``-arch=compute_XX``), the PTX is rewritten, and the
  module is loaded from it (the driver JIT-compiles it). A ``-D`` option naming
  the rewriter version keeps CuPy's on-disk kernel cache from serving an
  uninstrumented binary (and serves the instrumented one next time).
* PTX or cubin from files or bytes: ``RawModule(path=...)`` (patched in the
  ``cupy`` namespace) and :func:`load_module`. PTX is rewritten; a cubin or
  fatbin carries no PTX to rewrite and is loaded as is, *counted and logged* as
  uninstrumented (``stats()["passthrough_binaries"]``), never reported as covered.
* Not interposed: kernels already compiled before ``enable()`` (CuPy memoizes
  them), and precompiled library kernels (cuBLAS, cuDNN, torch). Those are
  covered only at stream boundaries: :func:`stream_completion`.

Each kernel's completion counter is chosen by its name (CRC32 modulo
``CTL_MAX_KERNELS``), so an instrumented binary from CuPy's disk cache counts
into the same slot in every process; two kernels with one name share it.

Size (slightly over the project's ~500 lines): the interposer patches several
CuPy entry points that share one control block and one state object; split,
each part would reach into the others' state.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..errors import ConcordiaError, ConfigurationError
from .ptx import (
    CTL_ADMIT,
    CTL_BYTES,
    CTL_COMPLETIONS,
    CTL_GATE_TIMEOUTS,
    CTL_MAGIC,
    CTL_MAX_KERNELS,
    CTL_PAUSE,
    CTL_TIMEOUT_NS,
    CTL_VERSION,
    CTL_WORD,
    REWRITE_VERSION,
    PtxError,
    instrument,
)

__all__ = [
    "Completion",
    "GateTimeoutError",
    "QuiesceTimeoutError",
    "active_launches",
    "completion",
    "completion_count",
    "disable",
    "enable",
    "enabled",
    "gate_timeouts",
    "hold",
    "is_enabled",
    "kernel_id",
    "load_module",
    "paused",
    "release",
    "rewrite",
    "set_gate_timeout",
    "stats",
    "stream_completion",
]

def _option() -> str:
    """The compile option that marks (and keys CuPy's caches for) instrumented
    builds: the rewrite's version and variant."""
    return f"-DCONCORDIA_INSTRUMENTED={REWRITE_VERSION}" + ("" if _state().single_block else "_SLOTS")


class GateTimeoutError(ConcordiaError):
    """An instrumented kernel waited at its pause gate longer than the gate
    timeout and ran anyway (a checkpoint taken meanwhile may be inconsistent),
    or a launch waited that long for its launch slot (it keeps waiting)."""


class QuiesceTimeoutError(ConcordiaError):
    """Instrumented kernel bodies were still running when the quiesce timed out."""


def kernel_id(name: str) -> int:
    """The completion-counter index of kernel ``name`` (stable across processes)."""
    return zlib.crc32(name.encode()) % CTL_MAX_KERNELS


def rewrite(ptx: str | bytes) -> str:
    """The instrumented PTX (``gpu_runtime.cuda.ptx.instrument`` with name-derived IDs)."""
    out = instrument(ptx, kernel_id, single_block=_state().single_block)
    if out.funcs_with_exit:
        _state().log.warning("functions end threads with `exit`: such exits are not counted",
                             functions=out.funcs_with_exit)
    with _LOCK:
        st = _state()
        st.modules += 1
        st.entries += len(out.entries)
        st.names.update(out.entries)
    return out.ptx


# -- state ------------------------------------------------------------------------------------


@dataclass
class _State:
    log: Any
    active: bool = False
    ctl: Any = None  #: cupy uint8 array of CTL_BYTES (device memory, kept for the process lifetime)
    stream: Any = None  #: a non-blocking stream for control-block traffic
    pinned: Any = None  #: pinned host staging for control-block reads and writes
    modules: int = 0
    entries: int = 0
    passthrough: int = 0
    failures: int = 0
    names: dict[str, int] = field(default_factory=dict)
    saved: dict[str, Any] = field(default_factory=dict)
    tmpdir: Path | None = None
    single_block: bool = True  #: rewrite with the single-block fast path (see gpu_runtime/cuda/ptx.py)


_LOCK = threading.RLock()
_STATE: _State | None = None


def _state() -> _State:
    global _STATE
    if _STATE is None:
        _STATE = _State(structlog.get_logger("concordia").bind(component="instrument"))
    return _STATE


def is_enabled() -> bool:
    return _STATE is not None and _STATE.active


def stats() -> dict[str, Any]:
    """Counts since the process started: rewritten modules and entries, binaries
    loaded without instrumentation, rewrites that failed (loaded uninstrumented);
    and whether modules loaded from now on get the single-block fast path."""
    st = _state()
    return {"enabled": st.active, "single_block": st.single_block, "instrumented_modules": st.modules,
            "instrumented_entries": st.entries,
            "passthrough_binaries": st.passthrough, "rewrite_failures": st.failures,
            "kernels": dict(st.names)}


def _ctl_ptr() -> int:
    st = _state()
    if st.ctl is None:
        raise ConfigurationError("instrumentation: expected instrument.enable() to have run, found no control block")
    return int(st.ctl.data.ptr)


def _write_u32(offset: int, value: int) -> None:
    import cupy

    st = _state()
    st.pinned[0:4] = np.frombuffer(np.uint32(value).tobytes(), np.uint8)
    cupy.cuda.runtime.memcpyAsync(_ctl_ptr() + offset, st.pinned.ctypes.data, 4,
                                  cupy.cuda.runtime.memcpyHostToDevice, st.stream.ptr)
    st.stream.synchronize()


def _read(offset: int, nbytes: int) -> np.ndarray:
    import cupy

    st = _state()
    cupy.cuda.runtime.memcpyAsync(st.pinned.ctypes.data, _ctl_ptr() + offset, nbytes,
                                  cupy.cuda.runtime.memcpyDeviceToHost, st.stream.ptr)
    st.stream.synchronize()
    return st.pinned[:nbytes].copy()


# -- attach: point a loaded module's control word at the control block ------------------------


def _attach(module_handle: int) -> None:
    """Set ``__concordia_ctl`` of a loaded module (a module without it — a
    pass-through binary — is left alone)."""
    import cupy
    from cuda.bindings import driver

    err, ptr, _size = driver.cuModuleGetGlobal(driver.CUmodule(module_handle), CTL_WORD.encode())
    if err != driver.CUresult.CUDA_SUCCESS:
        return
    st = _state()
    st.pinned[8:16] = np.frombuffer(np.uint64(_ctl_ptr()).tobytes(), np.uint8)
    cupy.cuda.runtime.memcpyAsync(int(ptr), st.pinned.ctypes.data + 8, 8,
                                  cupy.cuda.runtime.memcpyHostToDevice, st.stream.ptr)
    st.stream.synchronize()


def _image_kind(data: bytes) -> str:
    if data[:4] == b"\x7fELF":
        return "cubin"
    if data[:4] == b"\x50\xed\x55\xba":  # fatbin magic 0xBA55ED50, little-endian
        return "fatbin"
    head = data[:4096].decode("ascii", errors="replace")
    return "ptx" if ".version" in head or ".target" in head else "unknown"


def _prepare_image(data: bytes, what: str) -> tuple[bytes, bool]:
    """(image to load, instrumented?) for bytes from a file or a caller."""
    kind = _image_kind(data)
    st = _state()
    if kind == "ptx":
        try:
            return rewrite(data).encode() + b"\0", True
        except PtxError as e:
            st.failures += 1
            st.log.warning("PTX not instrumented: rewrite refused", what=what, error=str(e))
            return data, False
    st.passthrough += 1
    st.log.warning("binary loaded without instrumentation (no PTX to rewrite)", what=what, kind=kind)
    return data, False


def load_module(source: str | Path | bytes) -> Any:
    """Load a module from a ``.ptx`` / ``.cubin`` / fatbin file or from bytes,
    instrumented where it is PTX; returns a ``cupy.cuda.function.Module``."""
    from cupy.cuda import function

    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    image, hooked = _prepare_image(data, str(source) if isinstance(source, (str, Path)) else "bytes")
    mod = function.Module()
    mod.load(image)
    if hooked:
        _attach(int(mod.ptr))
    return mod


# -- CuPy patches ---------------------------------------------------------------------------


def _patch_cupy() -> None:
    import cupy
    from cupy.cuda import compiler

    st = _state()
    orig_nvrtc = compiler._compile_using_nvrtc_no_warning
    orig_cache = compiler._compile_with_cache_cuda
    orig_raw = cupy.RawModule
    orig_arch = compiler._get_arch_for_options_for_nvrtc
    st.saved = {"nvrtc": orig_nvrtc, "cache": orig_cache, "arch": orig_arch, "RawModule": orig_raw}

    def arch_options(arch=None):  # type: ignore[no-untyped-def]
        # CuPy memoizes this per device (sm_XX -> cubin); while enabled NVRTC must emit PTX to rewrite.
        if not is_enabled():
            return orig_arch(arch)
        return f"-arch=compute_{arch if arch is not None else compiler._get_arch()}", "ptx"

    def nvrtc(source, options=(), arch=None, filename="kern.cu", name_expressions=None,  # type: ignore[no-untyped-def]
              log_stream=None, cache_in_memory=False, jitify=None, method=None):
        binary, mapping = orig_nvrtc(source, options, arch, filename, name_expressions, log_stream,
                                     cache_in_memory, jitify, method)
        if not is_enabled() or _option() not in options or method == "lto":
            return binary, mapping
        image, _ = _prepare_image(bytes(binary), filename or "cupy source")
        return image, mapping

    def with_cache(source, options, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not is_enabled():
            return orig_cache(source, options, *args, **kwargs)
        mod = orig_cache(source, (*tuple(options), _option()), *args, **kwargs)
        if hasattr(mod, "ptr"):
            _attach(int(mod.ptr))
        return mod

    RawModule = _path_raw_module(orig_raw, st)
    compiler._compile_using_nvrtc_no_warning = nvrtc
    compiler._compile_with_cache_cuda = with_cache
    compiler._get_arch_for_options_for_nvrtc = arch_options
    if RawModule is not None:
        cupy.RawModule = RawModule


def _path_raw_module(orig_raw: Any, st: _State) -> Any:
    """A ``cupy.RawModule`` subclass that instruments ``path=`` modules, or None
    (logged) if this CuPy's RawModule cannot be subclassed."""
    try:
        return _make_raw_module(orig_raw, st)
    except TypeError as e:
        st.log.warning("RawModule(path=...) is not interposed: cannot subclass cupy.RawModule; use "
                       "instrument.load_module(path)", error=str(e))
        return None


def _make_raw_module(orig_raw: Any, st: _State) -> Any:
    class RawModule(orig_raw):
        """cupy.RawModule whose ``path=`` modules are instrumented (see gpu_runtime.cuda.instrument)."""

        def __init__(self, *args: Any, path: str | None = None, **kwargs: Any) -> None:
            self._cc_hooked = False
            if path is not None and is_enabled():
                image, self._cc_hooked = _prepare_image(Path(path).read_bytes(), str(path))
                if self._cc_hooked:
                    assert st.tmpdir is not None
                    tmp = st.tmpdir / f"{zlib.crc32(image):08x}-{Path(path).name}"
                    tmp.write_bytes(image.rstrip(b"\0"))
                    path = str(tmp)
            super().__init__(*args, path=path, **kwargs)

        def get_function(self, name: str) -> Any:
            fn = super().get_function(name)
            if self._cc_hooked:
                ptr = self.get_global(CTL_WORD)
                _attach_ptr(int(ptr.ptr))
            return fn

    return RawModule


def _attach_ptr(word_ptr: int) -> None:
    import cupy

    st = _state()
    st.pinned[8:16] = np.frombuffer(np.uint64(_ctl_ptr()).tobytes(), np.uint8)
    cupy.cuda.runtime.memcpyAsync(word_ptr, st.pinned.ctypes.data + 8, 8, cupy.cuda.runtime.memcpyHostToDevice,
                                  st.stream.ptr)
    st.stream.synchronize()


def _unpatch_cupy() -> None:
    import cupy
    from cupy.cuda import compiler

    st = _state()
    if not st.saved:
        return
    compiler._compile_using_nvrtc_no_warning = st.saved["nvrtc"]
    compiler._compile_with_cache_cuda = st.saved["cache"]
    compiler._get_arch_for_options_for_nvrtc = st.saved["arch"]
    cupy.RawModule = st.saved["RawModule"]
    st.saved = {}


# -- enable / disable -------------------------------------------------------------------------


def enable(*, gate_timeout: float = 5.0, single_block: bool | None = None) -> None:
    """Interpose on CuPy's module loading (idempotent). The control block is
    allocated once on the current device and lives as long as the process:
    instrumented modules keep pointing at it after ``disable()``.
    ``single_block`` chooses for modules loaded from now on whether one-block
    launches take the single-block fast path (the default) or, like every
    other launch, a launch slot (``False``); ``None`` keeps the setting."""
    import cupy

    with _LOCK:
        st = _state()
        if single_block is not None:
            st.single_block = single_block
        if st.ctl is None:
            st.stream = cupy.cuda.Stream(non_blocking=True)
            st.pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(4096), np.uint8, 4096)
            st.ctl = cupy.zeros(CTL_BYTES, np.uint8)
            st.tmpdir = Path(tempfile.mkdtemp(prefix="concordia-ptx-"))
            head = np.zeros(32, np.uint8)
            head[0:4] = np.frombuffer(np.uint32(CTL_MAGIC).tobytes(), np.uint8)
            head[4:8] = np.frombuffer(np.uint32(CTL_VERSION).tobytes(), np.uint8)
            head[16:24] = np.frombuffer(np.uint64(int(gate_timeout * 1e9)).tobytes(), np.uint8)
            st.ctl[:32] = cupy.asarray(head)
            cupy.cuda.runtime.deviceSynchronize()
        else:
            set_gate_timeout(gate_timeout)
        if not st.active:
            _patch_cupy()
            st.active = True
        st.log.info("instrumentation enabled", gate_timeout=gate_timeout)


def set_gate_timeout(seconds: float) -> None:
    import cupy

    st = _state()
    st.pinned[16:24] = np.frombuffer(np.uint64(int(seconds * 1e9)).tobytes(), np.uint8)
    cupy.cuda.runtime.memcpyAsync(_ctl_ptr() + CTL_TIMEOUT_NS, st.pinned.ctypes.data + 16, 8,
                                  cupy.cuda.runtime.memcpyHostToDevice, st.stream.ptr)
    st.stream.synchronize()


def disable() -> None:
    """Stop interposing (modules loaded meanwhile stay instrumented)."""
    with _LOCK:
        st = _state()
        if st.active:
            _unpatch_cupy()
            st.active = False


@contextlib.contextmanager
def enabled(*, gate_timeout: float = 5.0, single_block: bool | None = None) -> Iterator[None]:
    enable(gate_timeout=gate_timeout, single_block=single_block)
    try:
        yield
    finally:
        disable()


# -- pause, quiesce, completions -----------------------------------------------------------------


def hold() -> None:
    """Set the pause word (the admission word's high half; only the host
    writes it, 4 bytes): new instrumented launches wait at their gates
    (``paused()`` is the safe form; this is for tests and tools)."""
    _write_u32(CTL_PAUSE, 1)


def release() -> None:
    """Clear the pause word."""
    _write_u32(CTL_PAUSE, 0)


def gate_timeouts() -> int:
    return int(_read(CTL_GATE_TIMEOUTS, 8).view(np.uint64)[0])


def active_launches() -> int:
    """Instrumented launches admitted past their gates and not finished (the
    admission word's low half; a gate backing out of a pause counts for a
    moment too)."""
    return int(_read(CTL_ADMIT, 4).view(np.uint32)[0])


@contextlib.contextmanager
def paused(timeout: float = 5.0) -> Iterator[None]:
    """Hold new instrumented launches at their gates and wait until every
    admitted launch has finished: a safe point between kernels' writes (a
    launch runs all of its blocks or none). Raises QuiesceTimeoutError if
    launches are still running after ``timeout``, and GateTimeoutError (on
    exit) if a gate gave up waiting meanwhile."""
    with _LOCK:
        before = gate_timeouts()
        _write_u32(CTL_PAUSE, 1)
        try:
            deadline = time.monotonic() + timeout
            delay = 20e-6
            while (n := active_launches()) != 0:
                if time.monotonic() > deadline:
                    raise QuiesceTimeoutError(
                        f"quiesce: expected no instrumented launch running within {timeout:.1f} s, found {n} "
                        "still running (a kernel that waits on host input, or blocks of another stream's paused "
                        "launch holding the SMs it needs?)")
                time.sleep(delay)
                delay = min(delay * 2, 1e-3)
            yield
        finally:
            _write_u32(CTL_PAUSE, 0)
        after = gate_timeouts()
        if after != before:
            raise GateTimeoutError(
                f"{after - before} gate timeout(s) while paused: a kernel block waited at its pause gate past the "
                "gate timeout and ran while paused (the state read meanwhile may mix before and after), or a "
                "launch waited that long for its launch slot (held by a launch 1024 grid IDs older)")


@dataclass(frozen=True, slots=True)
class Completion:
    """A device word and the value it reaches when the awaited work is done:
    ``*address >= target``. The same notion for an instrumented kernel's
    finished launches and for a stream fence (precompiled library kernels)."""

    address: int
    target: int
    what: str

    def done(self) -> bool:
        import cupy

        _ctl_ptr()  # ConfigurationError before enable(): no stream or staging to read with
        st = _state()
        cupy.cuda.runtime.memcpyAsync(st.pinned.ctypes.data + 24, self.address, 8,
                                      cupy.cuda.runtime.memcpyDeviceToHost, st.stream.ptr)
        st.stream.synchronize()
        return int(st.pinned[24:32].view(np.uint64)[0]) >= self.target

    def wait_on(self, executor: Any, timeout: float = 30.0) -> int:
        """Enqueue a FENCE_WAIT on the persistent executor (no host sync); returns its ticket."""
        from .tasks import LAYOUTS, TaskKind

        return int(executor.enqueue(TaskKind.FENCE_WAIT, LAYOUTS["FENCE_WAIT"].pack(
            word=self.address, value=self.target, timeout_ns=int(timeout * 1e9))))


def completion(kernel: str, launches: int | None = None) -> Completion:
    """The finished-launch counter of kernel ``kernel`` (its PTX entry name);
    ``target``: ``launches`` if given, else the number launched so far is unknown
    to the host, so the counter's current value + 1 (the next launch)."""
    kid = kernel_id(kernel)
    address = _ctl_ptr() + CTL_COMPLETIONS + 8 * kid
    if launches is None:
        launches = int(_read(CTL_COMPLETIONS + 8 * kid, 8).view(np.uint64)[0]) + 1
    return Completion(address, launches, f"kernel {kernel} (counter {kid})")


def completion_count(kernel: str) -> int:
    return int(_read(CTL_COMPLETIONS + 8 * kernel_id(kernel), 8).view(np.uint64)[0])


_FENCES: dict[int, Any] = {}
_FENCE_VALUES: dict[int, int] = {}


def stream_completion(stream: Any = None) -> Completion:
    """A Completion for everything queued on ``stream`` (default: CuPy's current
    stream) so far — precompiled kernels included — via a device-side write of a
    fresh value (``cuStreamWriteValue64``) queued behind that work."""
    import cupy
    from cuda.bindings import driver

    s = stream if stream is not None else cupy.cuda.get_current_stream()
    handle = int(getattr(s, "ptr", getattr(s, "cuda_stream", s)))
    with _LOCK:
        word = _FENCES.get(handle)
        if word is None:
            word = _FENCES[handle] = cupy.zeros(1, np.uint64)
        value = _FENCE_VALUES[handle] = _FENCE_VALUES.get(handle, 0) + 1
    (err,) = driver.cuStreamWriteValue64(handle, int(word.data.ptr), value, 0)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise ConcordiaError(f"cuStreamWriteValue64 on stream {handle:#x} failed: {err}")
    return Completion(int(word.data.ptr), value, f"stream {handle:#x} fence {value}")
