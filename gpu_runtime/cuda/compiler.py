"""NVRTC compilation of Concordia's kernels, with an on-disk cache.

``compile_cubin(source, options=..., arch="sm_90")`` returns cubin bytes. It
needs no GPU (NVRTC from the ``nvidia-cuda-nvrtc`` wheel), so CI compiles every
kernel and every handler specialization. The cache key covers the source, the
headers it includes, the options, the architecture and the NVRTC version;
entries carry a content hash (a corrupt entry is a miss) and are written
atomically (temporary file + ``os.replace``).

Cache file layout, version 1: magic b"CNCRCUBN", u32 version, u32 reserved,
32-byte SHA-256 of the cubin, then the cubin.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ConcordiaError

__all__ = [
    "KernelCompileError",
    "compile_cubin",
    "default_cache_dir",
    "kernel_source",
    "nvrtc_version",
    "set_default_cache_dir",
]

_MAGIC = b"CNCRCUBN"
_VERSION = 1


class KernelCompileError(ConcordiaError):
    """NVRTC rejected a kernel. Carries the source, the options and the log."""

    def __init__(self, message: str, *, source: str, options: tuple[str, ...], log: str) -> None:
        super().__init__(f"{message}\n{log}")
        self.source, self.options, self.log = source, options, log

    def dump(self, path: str | os.PathLike[str]) -> Path:
        """Write source, options and log to one file for a bug report."""
        p = Path(path)
        p.write_text(f"// options: {' '.join(self.options)}\n// log:\n/*\n{self.log}\n*/\n{self.source}")
        return p


@dataclass(frozen=True, slots=True)
class Compiled:
    cubin: bytes
    key: str
    cached: bool


def kernels_dir() -> Path:
    return Path(str(resources.files("gpu_runtime.cuda") / "kernels"))


def kernel_source(name: str) -> str:
    return (kernels_dir() / name).read_text()


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "nvrtcVersion")
    return int(major), int(minor)


_cache_dir: Path | None = None


def set_default_cache_dir(path: Path | None) -> None:
    """Where ``compile_cubin`` caches by default from now on (process-wide, like
    CuPy's kernel cache): the runtime points it at ``<home>/kernel-cache``
    (``concordia_agents.config`` reads the home); None restores the default.
    Entries are content-addressed, so runtimes of two homes in one process
    share correct entries whichever directory they land in."""
    global _cache_dir
    _cache_dir = path


def default_cache_dir() -> Path:
    return _cache_dir or Path.home() / ".concordia" / "kernel-cache"


def _check(err: object, what: str) -> None:
    from cuda.bindings import nvrtc

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise ConcordiaError(f"{what} failed: {err}")


def _headers() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(kernels_dir().glob("*.cuh"))}


def _key(source: str, options: tuple[str, ...], arch: str) -> str:
    h = hashlib.sha256()
    for part in (source, "\0".join(options), arch, "{}.{}".format(*nvrtc_version())):
        h.update(part.encode())
        h.update(b"\0")
    for name, text in _headers().items():
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()[:40]


def _read_cache(path: Path) -> bytes | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) < 48 or raw[:8] != _MAGIC or struct.unpack("<I", raw[8:12])[0] != _VERSION:
        return None
    body = raw[48:]
    return body if hashlib.sha256(body).digest() == raw[16:48] else None


def _write_cache(path: Path, cubin: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = _MAGIC + struct.pack("<II", _VERSION, 0) + hashlib.sha256(cubin).digest() + cubin
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compile_cubin(
    source: str, *, options: tuple[str, ...] = (), arch: str = "sm_90", name: str = "kernel.cu",
    cache_dir: Path | None = None, ptx: bool = False,
) -> Compiled:
    """Compile ``source`` (which may include the kernels' headers) to a cubin
    (or PTX with ``ptx=True``) for ``arch``."""
    from cuda.bindings import nvrtc

    opts = (f"--gpu-architecture={arch}", "--std=c++17", f"-I{kernels_dir()}", "-default-device", *options)
    key = _key(source, opts + (("ptx",) if ptx else ()), arch)
    cache = (cache_dir or default_cache_dir()) / f"{key}.{'ptx' if ptx else 'cubin'}"
    hit = _read_cache(cache)
    if hit is not None:
        return Compiled(hit, key, True)
    headers = _headers()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), len(headers),
                                        [v.encode() for v in headers.values()],
                                        [k.encode() for k in headers])
    _check(err, "nvrtcCreateProgram")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        log = _log(prog)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(f"NVRTC could not compile {name} for {arch}", source=source,
                                     options=opts, log=log)
        if ptx:
            err, size = nvrtc.nvrtcGetPTXSize(prog)
            _check(err, "nvrtcGetPTXSize")
            buf = b" " * size
            (err,) = nvrtc.nvrtcGetPTX(prog, buf)
        else:
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            _check(err, "nvrtcGetCUBINSize")
            buf = b" " * size
            (err,) = nvrtc.nvrtcGetCUBIN(prog, buf)
        _check(err, "nvrtcGet(PTX|CUBIN)")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    _write_cache(cache, buf)
    return Compiled(buf, key, False)


def _log(prog: object) -> str:
    from cuda.bindings import nvrtc

    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.rstrip(b"\0 ").decode(errors="replace")
