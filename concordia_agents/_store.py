"""Object storage for a session's sealed segments and base images: the tier
that survives the loss of the host.

One interface, :class:`ObjectStore`, and one implementation for S3-compatible
servers (AWS S3, MinIO, Ceph RGW, GCS's S3 API), :class:`S3Store`, on boto3:

* uploads go through boto3's transfer manager: one PUT below
  ``multipart_bytes``, else a multipart upload of parallel parts; every PUT
  and part carries a SHA-256 checksum (``ChecksumAlgorithm``) that the server
  verifies before it stores the bytes, and the whole file's SHA-256 travels in
  the object's metadata (``concordia-sha256``) as well as in the catalog;
* downloads are parallel ranged GETs into a temporary file, whose SHA-256 is
  checked against the catalog's before it is renamed into place, so a file
  under its final name is always the one that was uploaded;
* retries: botocore's ``standard`` mode (exponential backoff with jitter,
  ``max_attempts``) on every request; the uploader retries a whole object
  later, with its own backoff, when a call still fails.

Why boto3 (measured against a local moto server, 40 MiB object): boto3 and
obstore both verify SHA-256 per part and both were limited by the server
(upload 0.29 s vs 0.36 s; download 0.13 s vs 0.05 s). boto3 is the reference
client of S3-compatible servers, has a synchronous API that fits the
runtime's threads, and its retry and multipart behaviour is documented and
configurable; obstore's faster download is a reason to revisit the download
path for very large logs (``bench/bench_remote.py`` measures both).

Object keys: ``<prefix>/<catalog id>/<session directory name>/<file name>``;
the catalog ID keeps two catalogs sharing a bucket apart.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from .errors import ConfigurationError, CorruptLogError, RemoteStoreError

__all__ = ["ObjectStore", "RemoteLocation", "S3Store", "file_sha256", "object_key", "open_store", "parse_remote_url"]

_READ = 8 << 20


@dataclass(frozen=True, slots=True)
class RemoteLocation:
    """Where a runtime keeps its objects: ``s3://bucket/prefix``."""

    scheme: str
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


def parse_remote_url(url: str) -> RemoteLocation:
    """``s3://bucket[/prefix]`` (ConfigurationError for anything else)."""
    p = urlparse(url)
    if p.scheme != "s3" or not p.netloc:
        raise ConfigurationError(f"remote (CONCORDIA_REMOTE): expected s3://bucket/prefix, found {url!r}")
    return RemoteLocation("s3", p.netloc, p.path.strip("/"))


def object_key(location: RemoteLocation, catalog_id: str, session_dir: str, name: str) -> str:
    return "/".join(x for x in (location.prefix, catalog_id, session_dir, name) if x)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    bytes: int


class ObjectStore(Protocol):
    """What the uploader, remote resume and gc use of an object store."""

    location: RemoteLocation

    def put_file(self, key: str, path: Path, *, sha256: str) -> None:
        """Upload ``path`` as ``key``, verified by the server; raises RemoteStoreError."""

    def get_file(self, key: str, dest: Path, *, sha256: str, size: int) -> None:
        """Download ``key`` to ``dest`` (0600), verified against ``sha256`` and
        ``size`` before it appears under that name; CorruptLogError on a mismatch."""

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error if it is already gone)."""

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object under ``prefix``."""

    def ping(self) -> None:
        """Raise RemoteStoreError unless the bucket answers."""


class S3Store:
    """:class:`ObjectStore` on an S3-compatible server through boto3 (see the module docs).

    ``endpoint_url``: the server (None: AWS, or boto3's own ``AWS_ENDPOINT_URL``);
    credentials and region come from boto3's usual chain (environment, config
    files, instance roles). Thread-safe: one boto3 client, shared."""

    def __init__(self, location: RemoteLocation, *, endpoint_url: str | None = None, multipart_bytes: int = 64 << 20,
                 part_bytes: int = 16 << 20, concurrency: int = 8, max_attempts: int = 5,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError as e:  # the s3 extra
            raise ConfigurationError("remote storage needs boto3: pip install 'concordia-agents[s3]'") from e
        self.location = location
        self.endpoint_url = endpoint_url
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                          connect_timeout=connect_timeout, read_timeout=read_timeout,
                          max_pool_connections=max(10, concurrency * 2)))
        self._transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=part_bytes,
                                        max_concurrency=concurrency, use_threads=concurrency > 1)
        self._lock = threading.Lock()

    def _fail(self, what: str, key: str, e: Exception) -> RemoteStoreError:
        where = f"s3://{self.location.bucket}/{key}"
        return RemoteStoreError(f"cannot {what} {where}"
                                f"{f' at {self.endpoint_url}' if self.endpoint_url else ''}: {_reason(e)}", orig=e)

    def put_file(self, key: str, path: Path, *, sha256: str) -> None:
        args = {"ChecksumAlgorithm": "SHA256", "Metadata": {"concordia-sha256": sha256}}
        try:
            self._client.upload_file(str(path), self.location.bucket, key, ExtraArgs=args, Config=self._transfer)
        except Exception as e:  # boto3 raises botocore and S3Transfer errors; all are the store's
            raise self._fail("upload to", key, e) from e

    def get_file(self, key: str, dest: Path, *, sha256: str, size: int) -> None:
        tmp = dest.with_name(f".{dest.name}.part{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a log is someone's conversation
        os.close(fd)
        try:
            try:
                self._client.download_file(self.location.bucket, key, str(tmp), Config=self._transfer)
            except Exception as e:
                raise self._fail("download", key, e) from e
            got_size = tmp.stat().st_size
            if got_size != size:
                raise CorruptLogError(f"object s3://{self.location.bucket}/{key}: expected {size} bytes (catalog), "
                                      f"found {got_size}", path=key, offset=0)
            got = file_sha256(tmp)
            if got != sha256:
                raise CorruptLogError(f"object s3://{self.location.bucket}/{key}: expected SHA-256 {sha256} "
                                      f"(catalog), found {got}", path=key, offset=0)
            os.chmod(tmp, 0o600)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.location.bucket, Key=key)
        except Exception as e:
            raise self._fail("delete", key, e) from e

    def list(self, prefix: str) -> Iterator[StoredObject]:
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket,
                                                                               Prefix=prefix):
                for o in page.get("Contents", ()):
                    yield StoredObject(o["Key"], int(o["Size"]))
        except Exception as e:
            raise self._fail("list", prefix, e) from e

    def ping(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.location.bucket)
        except Exception as e:
            raise self._fail("reach bucket", "", e) from e

    def head_sha256(self, key: str) -> str | None:
        """The whole-file SHA-256 the object was uploaded with (tests, gc reports)."""
        try:
            h = self._client.head_object(Bucket=self.location.bucket, Key=key, ChecksumMode="ENABLED")
        except Exception as e:
            raise self._fail("read", key, e) from e
        meta: dict[str, Any] = h.get("Metadata", {})
        return meta.get("concordia-sha256")


def _reason(e: Exception) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict) and "Error" in resp:
        err = resp["Error"]
        return f"{err.get('Code', '?')}: {err.get('Message', '')}".strip()
    return f"{type(e).__name__}: {e}"


def open_store(url: str, *, endpoint_url: str | None = None, **options: Any) -> ObjectStore:
    """The store for a ``remote`` URL (see :func:`parse_remote_url`)."""
    return S3Store(parse_remote_url(url), endpoint_url=endpoint_url, **options)
