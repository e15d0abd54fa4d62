"""What a Session uses of the runtime that opened it.

Imports point one way: ``_runtime -> _session -> _services``. A Session never
sees the Runtime class; ``Runtime.session`` hands each Session one
:class:`SessionServices`, and the Session calls only its fields. The Runtime,
in turn, uses only the Session's public methods and attributes.

Call protocol (who calls what):

1. ``Runtime.session`` takes the lease, opens the session's log, and builds
   ``Session(services, id, token, log, index, prior=...)``; it keeps the log
   itself (its flusher and heartbeat threads walk the open logs).
2. ``Session.register`` / ``restore`` attach arrays through ``backend`` and
   record new region layouts with ``catalog.record_region``.
3. ``Session.commit`` / ``wait_visible`` / ``flush`` write and wait through
   ``backend``.
4. A session ends once, in one of two ways, and first calls ``detach`` (the
   runtime stops flushing and heart-beating it), then closes its log, then:

   * ``close`` / ``release`` / a failed last flush: ``release(id, token,
     closed)`` ends the lease (``closed``: mark the session finished);
   * ``cancel`` (opening failed, nothing committed here): ``give_back(id,
     token, prior)`` puts back the catalog state found at open.

   ``release`` and ``give_back`` log a catalog failure and do not raise: the
   session has already ended in this process, and the lease expires anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpu_runtime.backend import Backend

from ._catalog import Catalog

__all__ = ["SessionServices"]


@dataclass(frozen=True, slots=True)
class SessionServices:
    """The backend, the catalog and the lease operations a Session needs (see the module docs)."""

    backend: Backend
    catalog: Catalog
    #: ``detach(session_id, token)``: stop flushing and heart-beating the session opened with ``token``
    detach: Callable[[str, int], None]
    #: ``release(session_id, token, closed)``: end the lease; ``closed`` marks the session finished
    release: Callable[[str, int, bool], None]
    #: ``give_back(session_id, token, prior)``: put back the catalog state the open found
    give_back: Callable[[str, int, Any], None]
    #: ``wait_remote(session_id, epoch, timeout)``: seal and upload until ``epoch`` is remote (None: no remote)
    wait_remote: Callable[[str, int, float], int] | None = None
    #: ``remote_status(session_id)``: ``(remote epoch, last upload failure)``, None if not uploaded
    remote_status: Callable[[str], tuple[int, BaseException | None] | None] | None = None
