"""Concordia: durable GPU-resident state for long-running LLM agents.

Register state regions with a session, commit epochs, and after a crash resume
the session by its ID::

    from concordia_agents import Runtime

    with Runtime.open() as rt:
        s = rt.session("chat-42")
        s.register("scratch", array)          # pages region (page-hash deltas)
        s.register("kv", kv, kind="kv", seq_axis=2)
        s.commit(meta={"step": 1}, rows={"kv": (0, 17)})

    rt = Runtime.open(); s = rt.resume("chat-42")   # in any later process
"""

from ._catalog import SCHEMA_VERSION, SessionInfo
from ._durability import Durability
from ._logging import configure_logging
from ._runtime import Runtime
from ._session import Region, Session
from ._step_commits import StepCommits
from .config import RuntimeConfig
from .errors import (
    BackendUnavailableError,
    CatalogError,
    CatalogMismatchError,
    CatalogNotFound,
    ConcordiaError,
    ConfigurationError,
    CorruptLogError,
    HomeNotFound,
    LogFullError,
    MetaError,
    OwnershipError,
    RegionError,
    RemoteStoreError,
    SchemaVersionError,
    SessionClosedError,
    SessionKindError,
    SessionNotFound,
    StorageError,
)

__all__ = [
    "SCHEMA_VERSION",
    "BackendUnavailableError",
    "CatalogError",
    "CatalogMismatchError",
    "CatalogNotFound",
    "ConcordiaError",
    "ConfigurationError",
    "CorruptLogError",
    "Durability",
    "HomeNotFound",
    "LogFullError",
    "MetaError",
    "OwnershipError",
    "Region",
    "RegionError",
    "RemoteStoreError",
    "Runtime",
    "RuntimeConfig",
    "SchemaVersionError",
    "Session",
    "SessionClosedError",
    "SessionInfo",
    "SessionKindError",
    "SessionNotFound",
    "StepCommits",
    "StorageError",
    "configure_logging",
]
__version__ = "0.1.0"
