"""The ``concordia`` command line.

    concordia sessions list [--json]
    concordia sessions show ID
    concordia sessions rm ID
    concordia gc
    concordia doctor
    concordia demo

Global options (before the command): ``--home``, ``--catalog``, ``--backend``;
they default to the environment (see README). Errors print one line and exit
with status 1; no tracebacks unless ``CONCORDIA_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from .errors import ConcordiaError

__all__ = ["main"]


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _runtime(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ._runtime import Runtime

    return Runtime.open(home=args.home, catalog_url=args.catalog, backend=args.backend or "host")


def cmd_sessions_list(args: argparse.Namespace) -> None:
    with _runtime(args) as rt:
        infos = rt.sessions()
        if args.json:
            _out(json.dumps([{"id": i.id, "status": i.status, "last_epoch": i.last_epoch, "log_bytes": i.log_bytes,
                              "backend": i.backend, "created_at": i.created_at, "labels": i.labels}
                             for i in infos], indent=2))
            return
        if not infos:
            _out("no sessions")
            return
        _out(f"{'SESSION':40} {'STATUS':8} {'EPOCH':>8} {'LOG':>10}  CREATED")
        for i in infos:
            _out(f"{i.id[:40]:40} {i.status:8} {i.last_epoch:>8} {i.log_bytes / 2**20:>8.1f}Mi  {_when(i.created_at)}")


def cmd_sessions_show(args: argparse.Namespace) -> None:
    with _runtime(args) as rt:
        i = rt.info(args.id)
        _out(f"session     {i.id}")
        _out(f"status      {i.status}")
        _out(f"backend     {i.backend}")
        _out(f"created     {_when(i.created_at)}")
        _out(f"closed      {_when(i.closed_at)}")
        _out(f"owner       {i.owner or '-'} (fencing token {i.token}, lease until {_when(i.expires_at)})")
        _out(f"last epoch  {i.last_epoch} (durable, as last recorded by the flusher)")
        _out(f"log         {i.log_bytes} bytes in {rt.session_dir(i.id)}")
        for r in rt.catalog.regions(i.id):
            _out(f"region      {r.name}: {r.kind} {r.dtype}{list(r.shape)} on {r.device} ({r.library})")
        for seg in rt.catalog.segments(i.id):
            _out(f"file        {seg.name}: {seg.kind}, offsets {seg.base_offset}..{seg.end_offset}, {seg.bytes} bytes")
        if i.labels:
            _out(f"labels      {json.dumps(i.labels)}")


def cmd_sessions_rm(args: argparse.Namespace) -> None:
    with _runtime(args) as rt:
        rt.delete(args.id)
        _out(f"deleted session {args.id}")


def cmd_gc(args: argparse.Namespace) -> None:
    with _runtime(args) as rt:
        removed = rt.gc()
        for p in removed:
            _out(f"removed {p}")
        _out(f"gc: {len(removed)} item(s) removed")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def doctor_report(args: argparse.Namespace) -> dict[str, Any]:
    from gpu_runtime.backend import open_backend
    from gpu_runtime.logring import default_ring_dir

    from ._catalog import SCHEMA_VERSION, Catalog
    from .config import RuntimeConfig

    cfg = RuntimeConfig.from_env(home=args.home, catalog_url=args.catalog)
    report: dict[str, Any] = {"home": str(cfg.home), "python": sys.version.split()[0]}
    for dist in ("concordia-agents", "numpy", "torch", "transformers", "langgraph", "sqlalchemy", "structlog",
                 "cupy-cuda13x", "cuda-bindings"):
        report[f"version:{dist}"] = _version(dist)
    try:
        backend = open_backend(args.backend or cfg.backend)
        report["backend (auto)"] = backend.name
        backend.close()
    except ConcordiaError as e:
        report["backend (auto)"] = f"unavailable: {e}"
    try:
        import torch

        report["torch cuda"] = (f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
                                if torch.cuda.is_available() else "no CUDA device")
    except Exception as e:  # noqa: BLE001 - a diagnostic, never fatal
        report["torch cuda"] = f"unavailable: {e}"
    try:
        from cuda.bindings import nvrtc

        err, major, minor = nvrtc.nvrtcVersion()
        report["nvrtc"] = f"{major}.{minor}" if int(err) == 0 else f"error {err}"
    except Exception as e:  # noqa: BLE001
        report["nvrtc"] = f"unavailable: {type(e).__name__}: {e}"
    ring_dir = cfg.ring_dir or default_ring_dir(cfg.home)
    try:
        free = shutil.disk_usage(ring_dir if ring_dir.exists() else ring_dir.parent).free
        report["ring dir"] = f"{ring_dir} ({free / 2**30:.1f} GiB free, writable={os.access(ring_dir, os.W_OK)})"
    except OSError as e:
        report["ring dir"] = f"{ring_dir}: {e}"
    try:
        cat = Catalog(cfg.catalog_url)
        report["catalog"] = f"{cat._redacted()} (schema {cat.schema_version}, code {SCHEMA_VERSION})"
        cat.dispose()
    except ConcordiaError as e:
        report["catalog"] = f"{cfg.catalog_url}: {e}"
    return report


def cmd_doctor(args: argparse.Namespace) -> None:
    report = doctor_report(args)
    width = max(map(len, report))
    for k, v in report.items():
        _out(f"{k:{width}}  {v}")


def cmd_demo(args: argparse.Namespace) -> None:
    from ._demo import run_demo, worker

    home = Path(args.home) if args.home else None
    if args.worker:
        worker(str(home), args.catalog, args.session, args.crash_at, args.backend or "auto")
        return
    from .config import RuntimeConfig

    cfg = RuntimeConfig.from_env(home=home, catalog_url=args.catalog)
    run_demo(home=cfg.home, catalog=args.catalog, backend=args.backend or cfg.backend, crash_at=args.crash_at,
             say=_out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="concordia", description="Durable GPU-resident state for LLM agents.")
    p.add_argument("--home", help="Concordia home (default: $CONCORDIA_HOME or ~/.concordia)")
    p.add_argument("--catalog", help="catalog URL (default: $CONCORDIA_CATALOG_URL or sqlite in home)")
    p.add_argument("--backend", help="auto, host or cupy (default: $CONCORDIA_BACKEND or auto)")
    sub = p.add_subparsers(dest="command", required=True)
    sessions = sub.add_parser("sessions", help="list, show or remove sessions")
    ssub = sessions.add_subparsers(dest="action", required=True)
    ls = ssub.add_parser("list", help="all sessions with status, durable epoch and log size")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_sessions_list)
    show = ssub.add_parser("show", help="one session in full")
    show.add_argument("id")
    show.set_defaults(func=cmd_sessions_show)
    rm = ssub.add_parser("rm", help="delete a session and its log")
    rm.add_argument("id")
    rm.set_defaults(func=cmd_sessions_rm)
    sub.add_parser("gc", help="remove files no session refers to").set_defaults(func=cmd_gc)
    sub.add_parser("doctor", help="backend, GPU, NVRTC, shm, home and catalog").set_defaults(func=cmd_doctor)
    demo = sub.add_parser("demo", help="crash a worker with SIGKILL and resume its session by ID")
    demo.add_argument("--crash-at", type=int, default=300)
    demo.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--session", help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConcordiaError as e:
        if os.environ.get("CONCORDIA_DEBUG"):
            raise
        sys.stderr.write(f"concordia: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("concordia: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
