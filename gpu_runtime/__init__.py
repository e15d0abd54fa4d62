"""Concordia's device substrate: backends, regions, record framing, host log ring.

Knows nothing of sessions, SQL or LangGraph (see DESIGN.md, "Layers").
"""

from .backend import BACKENDS, Backend, BackendRegion, Capability, CheckpointTask, open_backend
from .errors import (
    BackendUnavailableError,
    ConcordiaError,
    ConfigurationError,
    CorruptLogError,
    LogFullError,
    RegionError,
)
from .logring import LogRing, default_ring_dir
from .logwriter import LogWriter
from .records import RecordFlags, RecordHeader, RecordType
from .regions import ArrayInfo, RegionSpec, allocate, describe

__all__ = [
    "BACKENDS",
    "ArrayInfo",
    "Backend",
    "BackendRegion",
    "BackendUnavailableError",
    "Capability",
    "CheckpointTask",
    "ConcordiaError",
    "ConfigurationError",
    "CorruptLogError",
    "LogFullError",
    "LogRing",
    "LogWriter",
    "RecordFlags",
    "RecordHeader",
    "RecordType",
    "RegionError",
    "RegionSpec",
    "allocate",
    "default_ring_dir",
    "describe",
    "open_backend",
]
