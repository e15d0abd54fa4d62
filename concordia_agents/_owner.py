"""Owner identities, and telling a dead owner on this machine from a live one.

A lease names its owner as ``host:pid:nonce@machine`` where ``machine`` is this
boot of this kernel (``/proc/sys/kernel/random/boot_id``) plus this PID
namespace. Two processes share ``machine`` only if PIDs mean the same thing to
both, so one may ask the kernel whether the other's PID still runs. That lets a
resume on the same machine take over a SIGKILLed owner's lease at once instead
of waiting for it to expire. The check only ever errs towards "alive" (a reused
PID looks alive), so it can delay a takeover but never steal a live lease.
Owners on other machines are judged by lease expiry alone.
"""

from __future__ import annotations

import os
import secrets
import socket
from functools import cache
from pathlib import Path

__all__ = ["local_process_gone", "machine_id", "new_owner_id", "owner_is_dead", "private_suffix"]


@cache
def machine_id() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:16]
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""  # no /proc: never judge anyone dead
    return f"{boot}.{pidns}"


def new_owner_id() -> str:
    # secrets, not uuid.uuid4: callers (LangGraph's own tests) patch uuid.uuid4 to get
    # deterministic IDs, and opening a runtime must not draw from that stream.
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    mid = machine_id()
    return f"{owner}@{mid}" if mid else owner


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) runs no code: it is dead for us
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def owner_is_dead(owner: str) -> bool:
    """True only if ``owner`` ran on this machine (same boot and PID namespace)
    and its process is gone."""
    ident, sep, mid = owner.rpartition("@")
    if not sep or not mid or mid != machine_id():
        return False
    parts = ident.split(":")
    if len(parts) < 3 or parts[0] != socket.gethostname():
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    return local_process_gone(parts[0], pid)


def local_process_gone(host: str, pid: int) -> bool:
    """True only if ``host`` is this machine's hostname and process ``pid`` is gone."""
    return host == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid)


def private_suffix() -> str:
    """``.kept-<host>-<pid>``: the suffix a process's privately named files carry (``_warm_rings``)."""
    return f".kept-{socket.gethostname()}-{os.getpid()}"
