"""Remote storage on this machine (CPU figures): upload throughput, resume on
another host from the object store vs a local resume, and commit latency with
the uploader running.

The object store is moto's S3 server in a subprocess on 127.0.0.1 (the one the
tests use; a real S3 server process, in memory): its throughput, not the
network, bounds these figures. The log is an 8B-shaped KV cache (Llama-3-8B:
32 layers x 8 KV heads x 128 dim, K and V, 2 bytes: 128 KiB per token), 32k
tokens = 4.3 GB by default.

* ``upload``: host A commits every token (256 per epoch) and makes them
  durable on disk; then ``flush(level="remote")`` seals and uploads the whole
  log: bytes / seconds.
* ``resume``: a second runtime with an empty home resumes the session (fetch,
  verify, scan, restore into host memory) against host A reopening its own
  local files (scan, restore): seconds each, median of ``repeats``.
* ``download clients``: the same objects fetched by boto3 (the store's
  client) and by obstore (parallel ranged GETs of both, four objects at a time).
* ``commit latency``: one token (128 KiB) per ``commit()`` + ``flush()``
  (fsync), a ``disk`` session against a ``remote`` one whose uploader seals and
  uploads every 0.5 s meanwhile; median and p90 of each, same run.

    python bench/bench_remote_cpu.py [--tokens 32768] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_device, versions, write
from concordia_agents import Runtime
from tests._s3 import CREDENTIALS, S3Server

#: Llama-3-8B's KV geometry: [layers * 2 (K, V), KV heads, tokens, head dim], 2-byte elements
LAYERS2, HEADS, DIM = 64, 8, 128
PER_TOKEN = LAYERS2 * HEADS * DIM * 2
CHUNK = 256  #: tokens per epoch while building the log


def _runtime(home: Path, catalog: str, remote: str, endpoint: str, **kw) -> Runtime:  # type: ignore[no-untyped-def]
    kw.setdefault("compact_bytes", 0)
    return Runtime.open(home=home, catalog_url=catalog, backend="host", remote=remote, remote_endpoint=endpoint,
                        ring_dir=home / "rings", **kw)


def build(tmp: Path, catalog: str, remote: str, endpoint: str, tokens: int) -> dict:
    # compaction off: the log stays 64 MiB delta segments (a base image is one multi-GB object)
    rt = _runtime(tmp / "a", catalog, remote, endpoint, remote_interval=3600.0)
    try:
        s = rt.session("kv-8b", durability="remote")
        kv = np.zeros((LAYERS2, HEADS, tokens, DIM), np.uint16)
        s.register("kv", kv, kind="kv", seq_axis=2)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for t in range(0, tokens, CHUNK):
            kv[:, :, t:t + CHUNK] = rng.integers(0, 1 << 16, (LAYERS2, HEADS, CHUNK, DIM), dtype=np.uint16)
            s.commit(meta={"tokens": t + CHUNK}, rows={"kv": (t, t + CHUNK)})
        s.flush(level="disk")
        t1 = time.perf_counter()
        s.flush(level="remote", timeout=3600)
        t2 = time.perf_counter()
        log_bytes = sum(p.stat().st_size for p in rt.session_dir("kv-8b").iterdir() if p.name.startswith("seg-"))
        s.close()
        digest = kv[:, :, ::97].tobytes()
    finally:
        rt.close()
    return {"commit_and_fsync_s": t1 - t0, "upload_s": t2 - t1, "log_bytes": log_bytes,
            "upload_GBps": log_bytes / (t2 - t1) / 1e9, "_digest": digest}


def resume_times(tmp: Path, catalog: str, remote: str, endpoint: str, repeats: int, digest: bytes) -> dict:
    out: dict[str, list[float]] = {"remote_resume_s": [], "local_resume_s": []}
    for i in range(repeats):
        home = tmp / f"b{i}"
        rt = _runtime(home, catalog, remote, endpoint)
        try:
            t = time.perf_counter()
            s = rt.resume("kv-8b")
            out["remote_resume_s"].append(time.perf_counter() - t)
            assert np.asarray(s.regions["kv"].array)[:, :, ::97].tobytes() == digest, "remote resume differs"
            s.close()
        finally:
            rt.close()
        shutil.rmtree(home)
        rt = _runtime(tmp / "a", catalog, remote, endpoint)
        try:
            t = time.perf_counter()
            s = rt.resume("kv-8b")
            out["local_resume_s"].append(time.perf_counter() - t)
            assert np.asarray(s.regions["kv"].array)[:, :, ::97].tobytes() == digest, "local resume differs"
            s.close()
        finally:
            rt.close()
    return {k: {"median_s": statistics.median(v), "runs_s": v} for k, v in out.items()}


def download_clients(tmp: Path, server: S3Server, bucket: str, repeats: int) -> dict:
    try:  # the comparison client (pip install obstore); not a dependency of Concordia
        import obstore
        from obstore.store import S3Store as ObStore
    except ImportError:
        obstore = None

    from concordia_agents._store import RemoteLocation, S3Store

    client = server.client()
    objs = [(o["Key"], o["Size"]) for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    total = sum(size for _, size in objs)
    boto = S3Store(RemoteLocation("s3", bucket, ""), endpoint_url=server.url)
    ob = obstore and ObStore(bucket, endpoint=server.url, access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                             client_options={"allow_http": True})
    dest = tmp / "dl"

    def with_transfer_manager() -> None:
        def one(key: str) -> None:
            boto._client.download_file(bucket, key, str(dest / key.replace("/", "_")), Config=boto._transfer)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, [k for k, _ in objs]))

    sha = {k: boto.head_sha256(k) or "" for k, _ in objs}

    def with_store() -> None:  # what a remote resume runs: S3Store.get_file, size and SHA-256 checked
        def one(item: tuple[str, int]) -> None:
            boto.get_file(item[0], dest / item[0].replace("/", "_"), sha256=sha[item[0]], size=item[1])
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, objs))

    def with_obstore() -> None:
        def one(key: str) -> None:
            with open(dest / key.replace("/", "_"), "wb") as f:
                for chunk in obstore.get(ob, key).stream(min_chunk_size=8 << 20):
                    f.write(chunk)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, [k for k, _ in objs]))

    out = {}
    clients = [("boto3 S3Store.get_file (streamed, SHA-256 checked)", with_store),
               ("boto3 download_file (transfer manager)", with_transfer_manager)]
    if obstore is not None:
        clients.append(("obstore stream (no checksum)", with_obstore))
    for name, fn in clients:
        runs = []
        for _ in range(repeats):
            dest.mkdir()
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
            shutil.rmtree(dest)
        out[name] = {"median_s": statistics.median(runs), "runs_s": runs,
                     "GBps": total / statistics.median(runs) / 1e9}
    out["bytes"] = total
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commit_latency(tmp: Path, catalog: str, remote: str, endpoint: str, commits: int, server_pid: int,
                   interval: float = 0.5) -> dict:
    out: dict = {"remote_interval_s": interval, "commits_per_run": commits}
    for level in ("disk", "remote") * 3:  # three times each, interleaved: drift shows as a spread
        home = tmp / f"lat-{level}"
        rt = _runtime(home, catalog, remote, endpoint, remote_interval=interval)
        try:
            sid = f"lat-{uuid.uuid4().hex[:8]}"
            s = rt.session(sid, durability=level)
            kv = np.zeros((LAYERS2, HEADS, commits + 8, DIM), np.uint16)
            s.register("kv", kv, kind="kv", seq_axis=2)
            times = []
            me, server, wall = _cpu_s(os.getpid()), _cpu_s(server_pid), time.perf_counter()
            for t in range(commits):
                kv[:, :, t] = t
                t0 = time.perf_counter()
                s.commit(meta={"t": t}, rows={"kv": (t, t + 1)})
                s.flush(level="disk")
                times.append(time.perf_counter() - t0)
            wall = time.perf_counter() - wall
            cpu = {"this_process": (_cpu_s(os.getpid()) - me) / wall, "s3_server": (_cpu_s(server_pid) - server) / wall}
            uploaded = s.durability().remote
            s.close()
        finally:
            rt.close()
        shutil.rmtree(home)
        times = times[20:]  # warm-up
        q = statistics.quantiles(times, n=10)
        entry = out.setdefault(level, {"median_ms": [], "p90_ms": [], "remote_epoch_at_end": [],
                                       "cores_busy_during_commits": []})
        entry["cores_busy_during_commits"].append(cpu)
        entry["median_ms"].append(statistics.median(times) * 1e3)
        entry["p90_ms"].append(q[-1] * 1e3)
        entry["remote_epoch_at_end"].append(uploaded)
    out["ratio_median_remote_over_disk"] = statistics.median(out["remote"]["median_ms"]) / statistics.median(
        out["disk"]["median_ms"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="4k tokens, 1 repeat, 100 commits")
    ap.add_argument("--only-latency", action="store_true", help="the commit latency comparison alone")
    ap.add_argument("--latency-interval", type=float, default=0.5,
                    help="remote_interval of the remote session in the latency comparison (default 0.5 s)")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.repeats, a.commits = 4096, 1, 100
    os.environ.update(CREDENTIALS)
    server = S3Server()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=bucket)
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        catalog = f"sqlite:///{tmp / 'catalog.db'}"
        remote = f"s3://{bucket}/bench"
        if a.only_latency:
            latency = commit_latency(tmp, catalog, remote, server.url, a.commits, server.proc.pid,
                                     a.latency_interval)
            path = write("remote_latency_cpu", {"device": cpu_device(), "versions": versions("boto3", "moto"),
                                                "commit_latency": latency})
            print(path, json.dumps(latency))
            return
        built = build(tmp, catalog, remote, server.url, a.tokens)
        digest = built.pop("_digest")
        resumed = resume_times(tmp, catalog, remote, server.url, a.repeats, digest)
        clients = download_clients(tmp, server, bucket, a.repeats)
        latency = commit_latency(tmp, catalog, remote, server.url, a.commits, server.proc.pid, a.latency_interval)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stop()
    payload = {
        "device": cpu_device(), "versions": versions("boto3", "moto", "obstore"),
        "store": "moto server (python -m moto.server) on 127.0.0.1, in memory",
        "shape": {"tokens": a.tokens, "bytes_per_token": PER_TOKEN, "geometry": [LAYERS2, HEADS, "T", DIM]},
        "upload": built, "resume": resumed, "download_clients": clients, "commit_latency": latency,
        "ratio_remote_over_local_resume": (resumed["remote_resume_s"]["median_s"]
                                           / resumed["local_resume_s"]["median_s"]),
    }
    path = write("remote_cpu", payload)
    print(path)
    print(f"log {built['log_bytes'] / 1e9:.2f} GB: upload {built['upload_s']:.1f} s ({built['upload_GBps']:.3f} GB/s); "
          f"resume remote {resumed['remote_resume_s']['median_s']:.1f} s vs local "
          f"{resumed['local_resume_s']['median_s']:.1f} s; downloads "
          + ", ".join(f"{k} {v['GBps']:.3f} GB/s" for k, v in clients.items() if isinstance(v, dict))
          + "; commit+fsync median disk "
          f"{statistics.median(latency['disk']['median_ms']):.2f} ms, remote "
          f"{statistics.median(latency['remote']['median_ms']):.2f} ms "
          f"(x{latency['ratio_median_remote_over_disk']:.3f})")


if __name__ == "__main__":
    main()
