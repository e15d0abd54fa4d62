"""The ``concordia`` command line.

    concordia sessions list [--json]
    concordia sessions show ID
    concordia sessions rm ID
    concordia resume ID --app module:attr
    concordia gc
    concordia doctor
    concordia demo [--synthetic]

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

from ._names import TASK_SEP, parent_of
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


def _kind(i: Any) -> str:
    return str(i.labels.get("kind") or ("task" if parent_of(i.id) else "state"))


def cmd_sessions_list(args: argparse.Namespace) -> None:
    """Sessions oldest first; a task session (``parent#task:...``) is listed
    under its parent, e.g. a graph thread's generation sessions."""
    with _runtime(args) as rt:
        infos = rt.sessions()
        if args.json:
            _out(json.dumps([{"id": i.id, "kind": _kind(i), "parent": parent_of(i.id), "status": i.status,
                              "last_epoch": i.last_epoch, "log_bytes": i.log_bytes, "backend": i.backend,
                              "created_at": i.created_at, "labels": i.labels} for i in infos], indent=2))
            return
        if not infos:
            _out("no sessions")
            return
        ids = {i.id for i in infos}
        children: dict[str, list[Any]] = {}
        for i in infos:
            if (p := parent_of(i.id)) in ids:
                children.setdefault(p, []).append(i)
        _out(f"{'SESSION':48} {'KIND':6} {'STATUS':8} {'EPOCH':>8} {'LOG':>10}  CREATED")

        def row(i: Any, name: str) -> None:
            _out(f"{name[:48]:48} {_kind(i):6} {i.status:8} {i.last_epoch:>8} {i.log_bytes / 2**20:>8.1f}Mi  "
                 f"{_when(i.created_at)}")

        for i in infos:
            if parent_of(i.id) in ids:
                continue  # shown under its parent
            row(i, i.id)
            for c in children.get(i.id, []):
                row(c, "  └ " + TASK_SEP + c.id.rpartition(TASK_SEP)[2])


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


def _load_app(spec: str) -> Any:
    import importlib

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConcordiaError(f"--app: expected module:attribute (e.g. mypkg.agent:app), found {spec!r}")
    sys.path.insert(0, os.getcwd())  # like `python -m`: the current directory's modules are importable
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ConcordiaError(f"--app: cannot import module {module!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConcordiaError(f"--app: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def cmd_resume(args: argparse.Namespace) -> None:
    """Resume a graph thread: ``--app`` names a wrapped graph, a StateGraph
    builder, a compiled graph, or a factory called with ``runtime=`` that
    returns one of those."""
    from integrations.langgraph import DurableGraph, wrap

    with _runtime(args) as rt:
        info = rt.info(args.id)  # SessionNotFound before any import work
        target = _load_app(args.app)
        if callable(target) and not hasattr(target, "invoke") and not hasattr(target, "compile"):
            target = target(runtime=rt)
        app = target if isinstance(target, DurableGraph) and target.runtime is rt else wrap(target, runtime=rt)
        _out(f"resuming {args.id} ({info.status}, {len(rt.catalog.list(prefix=args.id + TASK_SEP))} task "
             "session(s))")
        state = app.resume(args.id)
        _out(f"finished {args.id}: {rt.info(args.id).status}")
        if isinstance(state, dict):
            for k, v in state.items():
                text = repr(v)
                _out(f"  {k}: {text[:200]}{'...' if len(text) > 200 else ''}")


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
    from .config import RuntimeConfig

    cfg = RuntimeConfig.from_env(home=Path(args.home) if args.home else None, catalog_url=args.catalog)
    if args.agent_worker:
        from integrations.langgraph._demo import agent_worker

        agent_worker(str(cfg.home), args.catalog, args.session, args.crash_at or 100)
        return
    if args.worker:
        from ._demo import worker

        worker(str(cfg.home), args.catalog, args.session, args.crash_at or 300, args.backend or "auto")
        return
    if args.synthetic:
        from ._demo import run_demo

        run_demo(home=cfg.home, catalog=args.catalog, backend=args.backend or cfg.backend,
                 crash_at=args.crash_at or 300, say=_out)
        return
    from integrations.langgraph._demo import run_agent_demo

    run_agent_demo(home=cfg.home, catalog=args.catalog, crash_at=args.crash_at or 100, say=_out)


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
    res = sub.add_parser("resume", help="resume a crashed LangGraph thread by its session ID")
    res.add_argument("id")
    res.add_argument("--app", required=True,
                     help="module:attr of the graph (wrapped, builder, compiled, or a factory taking runtime=)")
    res.set_defaults(func=cmd_resume)
    sub.add_parser("gc", help="remove files no session refers to").set_defaults(func=cmd_gc)
    sub.add_parser("doctor", help="backend, GPU, NVRTC, shm, home and catalog").set_defaults(func=cmd_doctor)
    demo = sub.add_parser("demo", help="kill an agent inside its LLM node with SIGKILL and resume it by ID")
    demo.add_argument("--crash-at", type=int, default=0,
                      help="tokens (agent demo, default 100) or steps (--synthetic, default 300) before the kill")
    demo.add_argument("--synthetic", action="store_true",
                      help="the runtime-only demo: NumPy regions committed per step, no model or graph")
    demo.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--agent-worker", action="store_true", help=argparse.SUPPRESS)
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
