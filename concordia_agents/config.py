"""Typed configuration. Environment variables are read here and nowhere else.

| variable                    | default                      | meaning |
|-----------------------------|------------------------------|---------|
| CONCORDIA_HOME              | ~/.concordia                 | segments, catalog, rings (if no /dev/shm) |
| CONCORDIA_CATALOG_URL       | sqlite:///<home>/catalog.db  | SQLAlchemy URL of the catalog |
| CONCORDIA_BACKEND           | auto                         | auto, host or cupy |
| CONCORDIA_FSYNC             | every_commit                 | every_commit, interval or none |
| CONCORDIA_FSYNC_INTERVAL_MS | 50                           | fsync period under ``interval`` |
| CONCORDIA_RING_DIR          | /dev/shm (else <home>/rings) | where host log rings live |
| CONCORDIA_RING_BYTES        | 67108864 (64 MiB)            | data bytes of each session's ring |
| CONCORDIA_SEGMENT_BYTES     | 67108864 (64 MiB)            | segment size before rolling over |
| CONCORDIA_MAX_RECORD_BYTES  | 1048576 (1 MiB)              | payload bytes per record (chunking) |
| CONCORDIA_COMPACT_BYTES     | 268435456 (256 MiB)          | delta bytes that start compaction (0: never) |
| CONCORDIA_COMPACT_EPOCHS    | 256                          | epochs since the newest base image that start it |
| CONCORDIA_LEASE_TTL         | 30                           | seconds a lease lives without a heartbeat |
| CONCORDIA_FLUSH_POLL_MS     | 10                           | the flusher's period (0 < ms <= 3600000) |
| CONCORDIA_REMOTE            | unset                        | s3://bucket/prefix: sealed segments go there too |
| CONCORDIA_REMOTE_ENDPOINT   | unset (AWS)                  | the S3-compatible server (MinIO, Ceph RGW, GCS) |
| CONCORDIA_DURABILITY        | remote with a remote, else disk | level of new sessions: local, disk, remote |
| CONCORDIA_REMOTE_INTERVAL_S | 5                            | most seconds a commit waits to be uploaded |
| CONCORDIA_LOG_FORMAT        | console                      | console or json |
| CONCORDIA_LOG_LEVEL         | warning                      | critical, error, warning, info, debug (any case) |
| CONCORDIA_DEBUG             | unset                        | the CLI shows tracebacks (any non-empty value) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from ._logging import LOG_FORMATS, LOG_LEVELS, log_level_number
from .errors import ConfigurationError

__all__ = ["FsyncPolicy", "RuntimeConfig", "locate", "show_tracebacks"]

FsyncPolicy = Literal["every_commit", "interval", "none"]
_FSYNC = ("every_commit", "interval", "none")
#: the longest flusher period accepted: an hour (tests use it to keep the flusher away)
_MAX_FLUSH_POLL_S = 3600.0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}: expected an integer, found {raw!r}") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}: expected a number, found {raw!r}") from None


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Everything a Runtime needs; build it with :meth:`from_env`."""

    home: Path
    catalog_url: str
    backend: str = "auto"
    fsync: FsyncPolicy = "every_commit"
    fsync_interval: float = 0.05
    ring_dir: Path | None = None
    ring_bytes: int = 64 << 20
    #: ring capacity this process keeps mapped (and registered with the GPU) after its sessions end, for their
    #: next open (``_warm_rings``: a conversation reopens its session every call); 0 keeps none
    warm_ring_bytes: int = 1 << 30
    segment_bytes: int = 64 << 20
    max_record_bytes: int = 1 << 20
    compact_bytes: int = 256 << 20
    #: epochs since the newest base image that start a compaction (a layer, usually: ``_base_image``), so
    #: that a resume scans and restores at most this many per-token epochs one record at a time; 0: bytes
    #: alone decide; compact_bytes=0 turns compaction off whatever this says
    compact_epochs: int = 256
    lease_ttl: float = 30.0
    #: how long commit() waits for ring space before LogFullError
    space_timeout: float = 60.0
    #: the flusher's period when nobody kicks it (seconds): each pass verifies the rings' new records and appends
    #: them to segments. Its passes share the GIL with a compiled decode that commits from the device (about a
    #: point of a 1B step on an H100: docs/gpu.md, "The flusher, timed"); a longer period needs a ring that holds
    #: a period's epochs, and a host crash may lose up to a period more. The backend is polled every 10 ms
    #: regardless.
    flush_poll: float = 0.01
    #: ``s3://bucket/prefix``: the object store for sealed segments and base images (None: local only)
    remote: str | None = None
    #: the S3-compatible server (None: AWS, or boto3's own configuration)
    remote_endpoint: str | None = None
    #: the level a session opens with unless it asks for another (None: "remote" with a remote, else "disk")
    durability: str | None = None
    #: at most this many seconds between a commit and the upload of the segment holding it
    remote_interval: float = 5.0
    #: the uploader's first retry delay after a failure (doubling up to 30 s)
    remote_retry: float = 0.5
    #: keyword arguments of the store (``S3Store``: multipart_bytes, part_bytes, concurrency, max_attempts, ...)
    remote_options: dict[str, Any] = field(default_factory=dict)
    log_format: Literal["console", "json"] = "console"
    log_level: str = "warning"
    backend_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fsync not in _FSYNC:
            raise ConfigurationError(f"fsync: expected one of {_FSYNC}, found {self.fsync!r}")
        if self.ring_bytes < 1 << 20 or self.ring_bytes % 4096:
            raise ConfigurationError(
                f"ring_bytes: expected a multiple of 4096 of at least 1 MiB, found {self.ring_bytes}")
        if self.warm_ring_bytes < 0:
            raise ConfigurationError(f"warm_ring_bytes: expected >= 0 (0 keeps no ring), found {self.warm_ring_bytes}")
        if not 4096 <= self.max_record_bytes <= self.ring_bytes // 4:
            raise ConfigurationError(
                f"max_record_bytes: expected 4096 .. ring_bytes/4 ({self.ring_bytes // 4}), "
                f"found {self.max_record_bytes}")
        if self.segment_bytes < self.max_record_bytes:
            raise ConfigurationError(
                f"segment_bytes: expected at least max_record_bytes ({self.max_record_bytes}), "
                f"found {self.segment_bytes}")
        if self.compact_epochs < 0:
            raise ConfigurationError(f"compact_epochs (CONCORDIA_COMPACT_EPOCHS): expected 0 or more, found "
                                     f"{self.compact_epochs}")
        if not 0 < self.flush_poll <= _MAX_FLUSH_POLL_S:  # NaN fails too; inf would end the flusher's wait loop
            raise ConfigurationError(f"flush_poll (CONCORDIA_FLUSH_POLL_MS): expected a period above 0 and at most "
                                     f"{int(_MAX_FLUSH_POLL_S * 1000)} ms, found {self.flush_poll * 1000!r} ms")
        if self.lease_ttl <= 0:
            raise ConfigurationError(f"lease_ttl: expected a positive number of seconds, found {self.lease_ttl}")
        if self.remote is not None:
            from ._store import parse_remote_url

            parse_remote_url(self.remote)
        if self.durability is not None and self.durability not in ("local", "disk", "remote"):
            raise ConfigurationError(f"durability (CONCORDIA_DURABILITY): expected local, disk or remote, "
                                     f"found {self.durability!r}")
        if self.durability == "remote" and self.remote is None:
            raise ConfigurationError("durability 'remote' needs a remote (CONCORDIA_REMOTE=s3://bucket/prefix)")
        if self.remote_interval <= 0:
            raise ConfigurationError(f"remote_interval: expected a positive number of seconds, "
                                     f"found {self.remote_interval}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigurationError(f"log_format (CONCORDIA_LOG_FORMAT): expected one of {', '.join(LOG_FORMATS)}, "
                                     f"found {self.log_format!r}")
        try:
            log_level_number(self.log_level)
        except ConfigurationError:
            raise ConfigurationError(f"log_level (CONCORDIA_LOG_LEVEL): expected one of {', '.join(LOG_LEVELS)} "
                                     f"(any case), found {self.log_level!r}") from None

    @classmethod
    def from_env(
        cls, *, home: str | os.PathLike[str] | None = None, catalog_url: str | None = None, **overrides: Any
    ) -> RuntimeConfig:
        """Defaults, then environment variables, then explicit arguments."""
        home_path, url = locate(home=home, catalog_url=catalog_url)
        ring_dir = os.environ.get("CONCORDIA_RING_DIR")
        values: dict[str, Any] = {
            "home": home_path,
            "catalog_url": url,
            "backend": os.environ.get("CONCORDIA_BACKEND") or "auto",
            "fsync": os.environ.get("CONCORDIA_FSYNC") or "every_commit",
            "fsync_interval": _env_float("CONCORDIA_FSYNC_INTERVAL_MS", 50.0) / 1000.0,
            "ring_dir": Path(ring_dir) if ring_dir else None,
            "ring_bytes": _env_int("CONCORDIA_RING_BYTES", 64 << 20),
            "warm_ring_bytes": _env_int("CONCORDIA_WARM_RING_BYTES", 1 << 30),
            "segment_bytes": _env_int("CONCORDIA_SEGMENT_BYTES", 64 << 20),
            "max_record_bytes": _env_int("CONCORDIA_MAX_RECORD_BYTES", 1 << 20),
            "compact_bytes": _env_int("CONCORDIA_COMPACT_BYTES", 256 << 20),
            "compact_epochs": _env_int("CONCORDIA_COMPACT_EPOCHS", 256),
            "lease_ttl": _env_float("CONCORDIA_LEASE_TTL", 30.0),
            "flush_poll": _env_float("CONCORDIA_FLUSH_POLL_MS", 10.0) / 1000.0,
            "remote": os.environ.get("CONCORDIA_REMOTE") or None,
            "remote_endpoint": os.environ.get("CONCORDIA_REMOTE_ENDPOINT") or None,
            "durability": os.environ.get("CONCORDIA_DURABILITY") or None,
            "remote_interval": _env_float("CONCORDIA_REMOTE_INTERVAL_S", 5.0),
            "log_format": os.environ.get("CONCORDIA_LOG_FORMAT") or "console",
            "log_level": os.environ.get("CONCORDIA_LOG_LEVEL") or "warning",
        }
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigurationError(f"unknown configuration keys {sorted(unknown)}; expected some of {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def default_level(self) -> str:
        """The durability level of an open that names none."""
        return self.durability or ("remote" if self.remote else "disk")

    def with_(self, **changes: Any) -> RuntimeConfig:
        return replace(self, **changes)


def locate(*, home: str | os.PathLike[str] | None = None, catalog_url: str | None = None) -> tuple[Path, str]:
    """The home and catalog URL :meth:`RuntimeConfig.from_env` uses, without
    checking anything else (``concordia doctor`` reports where they are even
    when another setting is invalid)."""
    home_path = Path(home or os.environ.get("CONCORDIA_HOME") or Path.home() / ".concordia").expanduser()
    url = catalog_url or os.environ.get("CONCORDIA_CATALOG_URL") or f"sqlite:///{home_path / 'catalog.db'}"
    return home_path, url


def show_tracebacks() -> bool:
    """Whether the ``concordia`` command line lets an error's traceback through
    instead of its one-line message (``CONCORDIA_DEBUG`` set, to any non-empty
    value). Read on each call: the CLI asks only once an error happened."""
    return bool(os.environ.get("CONCORDIA_DEBUG"))
