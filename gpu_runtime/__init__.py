"""Concordia's device substrate: backends, regions, record framing, host log ring.

Knows nothing of sessions, SQL or LangGraph (see DESIGN.md, "Layers").
"""

from .backend import BACKENDS, Backend, BackendRegion, Capability, CheckpointTask, backend_class, open_backend
from .cuda.compiler import set_default_cache_dir as set_kernel_cache_dir
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
    "backend_class",
    "default_ring_dir",
    "describe",
    "open_backend",
    "set_kernel_cache_dir",
]
