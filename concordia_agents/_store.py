"""Object storage for a session's sealed segments and base images: the tier
that survives the loss of the host.

One interface, :class:`ObjectStore`, and one implementation for S3-compatible
servers (AWS S3, MinIO, Ceph RGW, GCS's S3 API), :class:`S3Store`, on boto3:

* uploads go through boto3's transfer manager: one PUT below
  ``multipart_bytes``, else a multipart upload of parallel parts; every PUT
  and part carries a CRC-32 (``ChecksumAlgorithm``) that the server verifies
  before it stores the bytes (transfer damage), and the whole file's SHA-256,
  computed before the upload, is in the catalog and the object's metadata
  (``concordia-sha256``): a download is checked against it end to end. CRC-32
  rather than a second SHA-256 per part: the uploader shares the CPU with
  the commits (``bench/bench_remote_cpu.py``, commit latency);
* downloads go into a temporary file (0600) whose size and SHA-256 are
  checked against the catalog's before it is renamed into place, so a file
  under its final name is always the one that was uploaded: one streamed GET,
  hashed as it arrives, for a segment; parallel ranged GETs for an object
  larger than twice ``range_bytes`` (64 MiB; a base image of gigabytes);
* retries: botocore's ``standard`` mode (exponential backoff with jitter,
  ``max_attempts``) on every request; the uploader retries a whole object
  later, with its own backoff, when a call still fails.

Why boto3 (measured against a local moto server, ``bench/bench_remote_cpu.py``
and the README, "Running on several hosts"): boto3 and obstore upload at
the same rate (130-160 MB/s, the server's limit here) and both send a
checksum per part that the server verifies; for downloads, boto3's transfer manager
(``download_file``) reached 300-380 MB/s where a streamed ``get_object`` and
obstore's stream both reached 850-870 MB/s, so downloads here are streamed
GETs. boto3 is the reference client of S3-compatible servers, with a
synchronous API that fits the runtime's threads and documented retry and
multipart behaviour; obstore would add a second client for no measured gain.

Object keys: ``<prefix>/<catalog id>/<session directory name>/<file name>``;
the catalog ID keeps two catalogs sharing a bucket apart.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

    def multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        """``(key, upload id, started at, Unix seconds)`` of every unfinished multipart upload under ``prefix``."""

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort an unfinished multipart upload (its parts are freed)."""


class S3Store:
    """:class:`ObjectStore` on an S3-compatible server through boto3 (see the module docs).

    ``endpoint_url``: the server (None: AWS, or boto3's own ``AWS_ENDPOINT_URL``);
    credentials and region come from boto3's usual chain (environment, config
    files, instance roles). Thread-safe: one boto3 client, shared."""

    def __init__(self, location: RemoteLocation, *, endpoint_url: str | None = None, multipart_bytes: int = 64 << 20,
                 part_bytes: int = 16 << 20, concurrency: int = 8, max_attempts: int = 5,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0, range_bytes: int = 64 << 20) -> None:
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
        self._range_bytes = range_bytes
        self._concurrency = concurrency
        self._lock = threading.Lock()

    def _fail(self, what: str, key: str, e: Exception) -> RemoteStoreError:
        where = f"s3://{self.location.bucket}/{key}"
        return RemoteStoreError(f"cannot {what} {where}"
                                f"{f' at {self.endpoint_url}' if self.endpoint_url else ''}: {_reason(e)}", orig=e)

    def put_file(self, key: str, path: Path, *, sha256: str) -> None:
        args = {"ChecksumAlgorithm": "CRC32", "Metadata": {"concordia-sha256": sha256}}
        try:
            self._client.upload_file(str(path), self.location.bucket, key, ExtraArgs=args, Config=self._transfer)
        except Exception as e:  # boto3 raises botocore and S3Transfer errors; all are the store's
            raise self._fail("upload to", key, e) from e

    def get_file(self, key: str, dest: Path, *, sha256: str, size: int) -> None:
        tmp = dest.with_name(f".{dest.name}.part{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)  # a log is someone's conversation
        try:
            try:
                if size > 2 * self._range_bytes:
                    got_size, got = self._get_ranges(key, fd, size), None
                else:
                    got_size, got = self._get_stream(key, fd)
            except CorruptLogError:
                raise
            except Exception as e:
                raise self._fail("download", key, e) from e
            if got_size != size:
                raise CorruptLogError(f"object s3://{self.location.bucket}/{key}: expected {size} bytes (catalog), "
                                      f"found {got_size}", path=key, offset=0)
            got = got or file_sha256(tmp)
            if got != sha256:
                raise CorruptLogError(f"object s3://{self.location.bucket}/{key}: expected SHA-256 {sha256} "
                                      f"(catalog), found {got}", path=key, offset=0)
            os.fsync(fd)
            os.replace(tmp, dest)
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)

    def _get_stream(self, key: str, fd: int) -> tuple[int, str]:
        """One GET, hashed as it is written: ``(bytes, hex SHA-256)``."""
        body = self._client.get_object(Bucket=self.location.bucket, Key=key)["Body"]
        h, n = hashlib.sha256(), 0
        while chunk := body.read(_READ):
            h.update(chunk)
            n += os.write(fd, chunk)
        return n, h.hexdigest()

    def _get_ranges(self, key: str, fd: int, size: int) -> int:
        """Ranged GETs of ``_range_bytes`` on ``concurrency`` threads, each written
        at its offset (one stream of a multi-GB base image is the slow path).
        Returns the bytes written."""
        def one(start: int) -> int:
            end = min(size, start + self._range_bytes) - 1
            body = self._client.get_object(Bucket=self.location.bucket, Key=key, Range=f"bytes={start}-{end}")["Body"]
            pos = start
            while chunk := body.read(_READ):
                pos += os.pwrite(fd, chunk, pos)
            if pos != end + 1:
                raise CorruptLogError(f"object s3://{self.location.bucket}/{key}: range {start}-{end} returned "
                                      f"{pos - start} bytes", path=key, offset=start)
            return pos - start

        with ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="concordia-get") as pool:
            return sum(pool.map(one, range(0, size, self._range_bytes)))

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

    def multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        try:
            for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.location.bucket,
                                                                                      Prefix=prefix):
                for u in page.get("Uploads", ()):
                    yield u["Key"], u["UploadId"], u["Initiated"].timestamp()
        except Exception as e:
            raise self._fail("list the multipart uploads under", prefix, e) from e

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.location.bucket, Key=key, UploadId=upload_id)
        except Exception as e:
            raise self._fail("abort the multipart upload of", key, e) from e

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
