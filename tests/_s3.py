"""A real S3-compatible server for the remote-storage tests, and a TCP relay
in front of it that tests kill and restart.

* ``S3Server``: moto's standalone server (``python -m moto.server``), the same
  server s3fs's own tests use, started as a subprocess on 127.0.0.1. It keeps
  objects in memory, so it lives as long as the test module.
* ``Relay``: ``python -m tests._s3 relay LISTEN TARGET BYTES_PER_S``, a process
  that forwards TCP connections to the server, optionally throttled. The client
  talks to the relay: SIGKILL it and the client sees its endpoint die
  mid-request (connections reset, new ones refused) while the stored objects
  stay, as they do on a real server that restarts; start it again on the same
  port and the endpoint is back.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "concordia-test", "AWS_SECRET_ACCESS_KEY": "concordia-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **CREDENTIALS})
        _wait_port(self.port, self.proc, "moto server")
        # the first request initialises moto's S3 backend (a second or so): do it here
        urllib.request.urlopen(f"{self.url}/moto-api/", timeout=30).read()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, endpoint: str | None = None):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.session.Session(**{"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                        "region_name": "us-east-1"}).client("s3", endpoint_url=endpoint or self.url)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Relay:
    """See the module docs; ``start()`` again after ``kill()`` reuses the port."""

    def __init__(self, target: int, bytes_per_s: int = 0) -> None:
        self.target = target
        self.rate = bytes_per_s
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests._s3", "relay", str(self.port), str(self.target),
                                      str(self.rate)], cwd=ROOT)
        _wait_port(self.port, self.proc, "relay")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def _pipe(src: socket.socket, dst: socket.socket, rate: int) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
            if rate:
                time.sleep(len(data) / rate)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def relay(listen: int, target: int, rate: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen))
    srv.listen(64)
    while True:
        client, _ = srv.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        threading.Thread(target=_pipe, args=(client, upstream, rate), daemon=True).start()
        threading.Thread(target=_pipe, args=(upstream, client, 0), daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        relay(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
