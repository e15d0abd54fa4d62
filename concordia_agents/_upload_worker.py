"""Uploads in a child process: the SHA-256 of a sealed file and its upload run
in ``python -m concordia_agents._upload_worker``, not in the process that
commits.

Why a process: hashing and boto3's HTTP move every byte of the log through
Python-level loops that hold the GIL. Run on a thread of the committing
process, they delayed commits measurably (``bench/bench_remote_cpu.py``,
commit latency: +66 % median at 51 MB/s of log on 2 cores); in a child they
only take a core.

Protocol (one JSON object per line; one request at a time):

* request ``{"key": ..., "path": ...}``: the child hashes ``path``, uploads it
  as ``key`` (``S3Store.put_file``: server-verified CRC-32 per part, SHA-256 in
  the metadata) and answers ``{"key": ..., "ok": true, "bytes": n, "sha256":
  hex}`` — the size and digest of exactly the bytes it read and sent — or
  ``{"key": ..., "ok": false, "error": "...", "missing": bool}`` (``missing``:
  the file was gone, e.g. folded into a base image by compaction meanwhile).
  A reply for another key, or a line that is not one, ends the child.
* The child's store is built from the arguments on its command line (the
  runtime's remote URL, endpoint and store options, as JSON); credentials come
  from the environment it inherits, as boto3's own chain reads them.
* It runs at niceness 10 (``main``), and exits when its stdin closes: the
  parent closed it, or died (SIGKILL included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .errors import RemoteStoreError

__all__ = ["UploadWorker", "main"]

_NICE = 10


class UploadWorker:
    """The parent's side: starts the child at the first upload, and again after it died."""

    def __init__(self, url: str, endpoint_url: str | None, options: dict[str, Any]) -> None:
        self._args = json.dumps({"url": url, "endpoint_url": endpoint_url, "options": options})
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            # -c, not -m: the package has imported this module already, and runpy would warn
            self._proc = subprocess.Popen([sys.executable, "-c", "from concordia_agents._upload_worker import main; "
                                           "main()", self._args],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        return self._proc

    def put(self, key: str, path: Path) -> tuple[int, str]:
        """Hash and upload ``path`` as ``key`` in the child; ``(bytes, sha256)``.
        FileNotFoundError if the file is gone; RemoteStoreError on any failure."""
        with self._lock:
            proc = self._start()
            try:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps({"key": key, "path": str(path)}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except OSError as e:
                line, why = "", str(e)
            else:
                why = "it closed its output"
            if not line:
                proc.kill()
                proc.wait()
                raise RemoteStoreError(f"the upload worker died while uploading {key} ({why}; exit status "
                                       f"{proc.returncode}); it is started again for the next upload")
            try:
                reply = json.loads(line)
                if reply.get("key") != key:
                    raise ValueError(f"a reply for {reply.get('key')!r}")
            except (ValueError, AttributeError) as e:
                # Out of step (a stray line on the child's stdout): never take another
                # object's size and digest for this one; start a fresh child.
                proc.kill()
                proc.wait()
                raise RemoteStoreError(f"the upload worker answered out of step while uploading {key} ({e}: "
                                       f"{line[:200]!r}); it is started again for the next upload") from None
        if reply["ok"]:
            return int(reply["bytes"]), str(reply["sha256"])
        if reply.get("missing"):
            raise FileNotFoundError(reply["error"])
        raise RemoteStoreError(reply["error"])

    def close(self) -> None:
        """End the child: at once if an upload is still running (the runtime is
        closing; the object is uploaded again by the session's next owner)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        if not self._lock.acquire(timeout=1.0):
            proc.kill()  # an upload in flight: its put() sees the child die
            proc.wait()
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._proc = None
        finally:
            self._lock.release()


def _serve(args: dict[str, Any]) -> None:
    from ._store import file_sha256, open_store

    store = open_store(args["url"], endpoint_url=args["endpoint_url"], **args["options"])
    for line in sys.stdin:
        req = json.loads(line)
        path = Path(req["path"])
        try:
            size, digest = path.stat().st_size, file_sha256(path)
            store.put_file(req["key"], path, sha256=digest)
            if path.stat().st_size != size:
                raise RemoteStoreError(f"{path} changed from {size} to {path.stat().st_size} bytes while it was "
                                       "uploaded (only sealed files are uploaded)")
            reply: dict[str, Any] = {"key": req["key"], "ok": True, "bytes": size, "sha256": digest}
        except FileNotFoundError as e:
            reply = {"key": req["key"], "ok": False, "error": str(e), "missing": True}
        except Exception as e:  # noqa: BLE001 - every failure is the parent's to report
            reply = {"key": req["key"], "ok": False, "error": str(e) or repr(e), "missing": False}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main() -> None:
    """The child's entry point (see the module docs)."""
    try:
        os.nice(_NICE)
    except OSError:
        pass
    _serve(json.loads(sys.argv[1]))
