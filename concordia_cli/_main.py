"""The ``concordia`` command line (``concordia_cli.main``; ``python -m concordia_cli``).

    concordia sessions list [--json]
    concordia sessions show ID
    concordia sessions recover ID [--allow-rollback]
    concordia sessions rm ID
    concordia resume ID --app module:attr
    concordia gc [--dry-run]
    concordia doctor
    concordia demo [--synthetic]

Global options (before or after the command): ``--home``, ``--catalog``,
``--backend``; they default to the environment (see README). Given on both
sides, the one after the command wins. Errors print one line and exit
with status 1; no tracebacks unless ``CONCORDIA_DEBUG`` is set
(``concordia_agents.config.show_tracebacks``).

Only ``demo`` creates a home or a catalog. Every other command opens them with
``create=False``: a mistyped ``--home`` or ``--catalog`` is reported as not
existing, and nothing is made (or, for ``gc``, deleted) there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import inspect
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from concordia_agents import CatalogNotFound, ConcordiaError, CorruptLogError, Runtime, RuntimeConfig
from concordia_agents._names import TASK_SEP, check_session_id, parent_of
from concordia_agents.config import locate, show_tracebacks

__all__ = ["build_parser", "main"]


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _runtime(args: argparse.Namespace) -> Runtime:
    """An existing home and catalog: a command that finds none says so and
    creates nothing (only ``demo`` creates them)."""
    return Runtime.open(home=args.home, catalog_url=args.catalog, backend=args.backend or "host", create=False)


def _session_id(args: argparse.Namespace) -> str:
    """The ID argument, refused in one line where neither catalog could store it."""
    check_session_id(args.id)
    return str(args.id)


def _kind(i: Any) -> str:
    return str(i.labels.get("kind") or ("task" if parent_of(i.id) else "state"))


def _shown(session_id: str) -> str:
    """An ID as the table prints it: as is, or as a Python literal where it holds
    characters that would break the row (a newline, a tab)."""
    return session_id if session_id.isprintable() else repr(session_id)


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
        rows: list[tuple[str, Any]] = []
        for i in infos:
            if parent_of(i.id) in ids:
                continue  # shown under its parent
            rows.append((_shown(i.id), i))
            rows += [("  └ " + _shown(TASK_SEP + c.id.rpartition(TASK_SEP)[2]), c) for c in children.get(i.id, [])]
        # As wide as the longest name: an ID is never cut (a cut one could name another session).
        width = max(len("SESSION"), *(len(name) for name, _ in rows))
        _out(f"{'SESSION':{width}} {'KIND':6} {'STATUS':8} {'EPOCH':>8} {'LOG':>10}  CREATED")
        for name, i in rows:
            _out(f"{name:{width}} {_kind(i):6} {i.status:8} {i.last_epoch:>8} {i.log_bytes / 2**20:>8.1f}Mi  "
                 f"{_when(i.created_at)}")


def cmd_sessions_show(args: argparse.Namespace) -> None:
    from concordia_agents._catalog._objects import durability, objects

    session_id = _session_id(args)
    with _runtime(args) as rt:
        i = rt.info(session_id)
        _out(f"session     {_shown(i.id)}")
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
        level = durability(rt.catalog, i.id)
        if level is not None:
            remote = (f"; remote epoch {level.remote_epoch} ({i.last_epoch - level.remote_epoch} behind the durable "
                      f"epoch), as of {_when(level.remote_at)}") if level.level == "remote" else ""
            _out(f"durability  {level.level}{remote}")
        for o in objects(rt.catalog, i.id):
            _out(f"object      {o.key}: {o.kind}, {o.state}, {o.bytes} bytes, sha256 {o.sha256[:16]}...")
        if i.labels:
            _out(f"labels      {json.dumps(i.labels)}")


def cmd_sessions_rm(args: argparse.Namespace) -> None:
    session_id = _session_id(args)
    with _runtime(args) as rt:
        rt.delete(session_id)
        _out(f"deleted session {_shown(session_id)}")


def cmd_sessions_recover(args: argparse.Namespace) -> None:
    """Check a session's log against the catalog; with ``--allow-rollback``,
    open a damaged one at its newest intact epoch and say what was given up.

    Without the flag nothing changes: ``Runtime.verify`` reads and verifies
    every record (payloads included) and compares the newest intact epoch with
    the catalog's. With it, the rollback is recorded and the session is
    released idle, resumable from that epoch."""
    session_id = _session_id(args)
    with _runtime(args) as rt:
        info = rt.info(session_id)
        if info.labels.get("kind") == "graph":
            raise ConcordiaError(f"session {session_id!r} is a graph thread: its checkpoints are catalog rows, it "
                                 "holds no region log to recover (its task sessions, ID#task:..., do)")
        if not args.allow_rollback:
            check = rt.verify(session_id)  # reads and verifies every record; takes no lease, writes nothing
            if not check.ok:
                raise CorruptLogError(str(check))
            _out(str(check))
            return
        s = rt.session(session_id, create=False, allow_rollback=True)
        rollback, epoch = s.rollback, s.epoch
        if rollback is None:
            s.cancel()  # nothing to record: given back as found
            _out(f"session {_shown(session_id)}: log intact, newest epoch {epoch}; nothing was given up")
        else:
            s.release()  # the rollback is recorded; the session stays resumable (idle) from `epoch`
            _out(f"session {_shown(session_id)}: {rollback}")


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


def _call_factory(spec: str, factory: Any, runtime: Any) -> Any:
    """``factory(runtime=runtime)`` if it takes ``runtime`` (or ``**kwargs``),
    ``factory()`` if it needs no argument; anything else is refused before the
    call, naming the signature expected."""
    expected = f"--app {spec}: expected a graph, or a factory taking runtime= (or no arguments) that returns one"
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        raise ConcordiaError(f"{expected}; found {factory!r}, whose signature cannot be read") from None
    params = sig.parameters.values()
    takes_runtime = any(p.kind is p.VAR_KEYWORD or (p.name == "runtime" and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                          p.KEYWORD_ONLY))
                        for p in params)
    required = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and not (takes_runtime and p.name == "runtime")]
    if required:
        raise ConcordiaError(f"{expected}; found {getattr(factory, '__name__', type(factory).__name__)}{sig}, "
                             f"which needs {', '.join(required)}")
    return factory(runtime=runtime) if takes_runtime else factory()


def cmd_resume(args: argparse.Namespace) -> None:
    """Resume a graph thread: ``--app`` names a wrapped graph, a StateGraph
    builder, a compiled graph, or a factory returning one of those, called
    with ``runtime=`` if it takes that parameter, else with no argument.

    Any other session (one that holds a region log, a task session) is refused
    before the app is imported and before anything changes: resuming it as a
    graph would rewrite its backend and labels."""
    from integrations.langgraph import DurableGraph, wrap

    session_id = _session_id(args)
    with _runtime(args) as rt:
        info = rt.info(session_id)  # SessionNotFound before any import work
        if info.labels.get("kind") != "graph":
            raise ConcordiaError(
                f"session {session_id!r} is a {_kind(info)} session (backend {info.backend!r}), expected a graph "
                "thread (labels kind 'graph'); `concordia resume` resumes graph threads only, nothing was changed; "
                "resume other sessions in Python with Runtime.resume(ID)")
        target = _load_app(args.app)
        if callable(target) and not hasattr(target, "invoke") and not hasattr(target, "compile"):
            target = _call_factory(args.app, target, rt)
        app = target if isinstance(target, DurableGraph) and target.runtime is rt else wrap(target, runtime=rt)
        _out(f"resuming {_shown(session_id)} ({info.status}, "
             f"{len(rt.catalog.list(prefix=session_id + TASK_SEP))} task session(s))")
        state = app.resume(session_id)
        _out(f"finished {_shown(session_id)}: {rt.info(session_id).status}")
        if isinstance(state, dict):
            for k, v in state.items():
                text = repr(v)
                _out(f"  {k}: {text[:200]}{'...' if len(text) > 200 else ''}")


def cmd_gc(args: argparse.Namespace) -> None:
    """Remove only what ``Runtime.gc`` proves orphaned; print each item removed
    (or, with ``--dry-run``, that would be) and each kept, with the reason."""
    with _runtime(args) as rt:
        report = rt.gc(dry_run=args.dry_run, upload_age=args.upload_age)
    verb = "would remove" if args.dry_run else "removed"
    for item in report.removed:
        _out(f"{verb} {item.path}: {item.reason}")
    for item in report.kept:
        _out(f"kept {item.path}: {item.reason}")
    if args.dry_run:
        _out(f"gc --dry-run: {len(report.removed)} item(s) would be removed, {len(report.kept)} kept; "
             "nothing was removed")
    else:
        _out(f"gc: {len(report.removed)} item(s) removed, {len(report.kept)} kept")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _home_state(home: Path) -> tuple[str, bool]:
    """What ``doctor`` says about the home, and whether it is usable. A home that
    does not exist yet is usable if it can be created (``demo`` does)."""
    if home.is_dir():
        writable = os.access(home, os.W_OK | os.X_OK)
        return f"{home} (writable={writable})", writable
    if home.exists():
        return f"{home}: expected a directory, found a file", False
    parent = next(p for p in home.parents if p.exists())
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return f"{home} (does not exist yet: the first command that writes, e.g. concordia demo, creates it)", True
    return f"{home}: does not exist, and {parent} is not writable to create it", False


def _remote_state(cfg: RuntimeConfig) -> str:
    """The remote's URL and whether its bucket answers (a HEAD request, nothing written)."""
    from concordia_agents._store import open_store

    assert cfg.remote is not None
    where = f"{cfg.remote}{f' at {cfg.remote_endpoint}' if cfg.remote_endpoint else ''}"
    try:
        open_store(cfg.remote, endpoint_url=cfg.remote_endpoint, **{**cfg.remote_options, "max_attempts": 1}).ping()
    except ConcordiaError as e:
        return f"{where}: unreachable: {e}"
    return f"{where}: reachable"


def doctor_report(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """``(report, problems)``: every check's line, and the names of those that
    make Concordia unusable here (the backend asked for, the configuration, the
    home, the ring directory, the catalog). Read-only: it creates nothing."""
    from concordia_agents._catalog import SCHEMA_VERSION, Catalog, redact_url
    from concordia_agents._home import bind_catalog, catalog_missing, read_home_marker
    from gpu_runtime.backend import open_backend
    from gpu_runtime.logring import default_ring_dir

    problems: list[str] = []
    home, url = locate(home=args.home, catalog_url=args.catalog)
    report: dict[str, Any] = {"home": str(home), "python": sys.version.split()[0]}
    try:
        cfg: RuntimeConfig | None = RuntimeConfig.from_env(home=home, catalog_url=url)
        report["configuration"] = "ok"
    except ConcordiaError as e:
        cfg = None
        report["configuration"] = f"invalid: {e}"
        problems.append("configuration")
    for dist in ("concordia-agents", "numpy", "torch", "transformers", "langgraph", "sqlalchemy", "structlog",
                 "psycopg", "cupy-cuda13x", "cuda-bindings"):
        report[f"version:{dist}"] = _version(dist)
    requested = args.backend or (cfg.backend if cfg else "auto")
    try:
        backend = open_backend(requested)
        report[f"backend ({requested})"] = backend.name
        backend.close()
    except ConcordiaError as e:
        report[f"backend ({requested})"] = f"unavailable: {e}"
        problems.append("backend")
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
    if cfg is not None and cfg.remote:
        report["remote"] = _remote_state(cfg)
        if not report["remote"].endswith("reachable"):
            problems.append("remote")
    report["home"], usable = _home_state(home)
    if not usable:
        problems.append("home")
    ring_dir = (cfg.ring_dir if cfg else None) or default_ring_dir(home)
    if ring_dir.is_dir():
        free = shutil.disk_usage(ring_dir).free
        writable = os.access(ring_dir, os.W_OK | os.X_OK)
        report["ring dir"] = f"{ring_dir} ({free / 2**30:.1f} GiB free, writable={writable})"
        if not writable:
            problems.append("ring dir")
    else:
        report["ring dir"] = f"{ring_dir} (does not exist yet: made in the home when a session opens)"
    try:
        marker = read_home_marker(home) if home.is_dir() else None
        try:
            cat = Catalog(url, create=False)
        except CatalogNotFound as e:
            if marker is not None:
                raise catalog_missing(home, marker, redact_url(url), e) from e
            report["catalog"] = (f"{redact_url(url)}: none yet (the first command that writes, e.g. concordia demo, "
                                 "creates it)")
        else:
            try:
                report["catalog"] = f"{cat._redacted()} (schema {cat.schema_version}, code {SCHEMA_VERSION})"
                if home.is_dir():
                    bind_catalog(home, cat, marker, write=False)
            finally:
                cat.dispose()
    except ConcordiaError as e:
        report["catalog"] = f"{redact_url(url)}: {e}"
        problems.append("catalog")
    return report, problems


def cmd_doctor(args: argparse.Namespace) -> None:
    """The whole report on stdout; then, if anything is unusable, one error line
    (status 1) naming what."""
    report, problems = doctor_report(args)
    width = max(map(len, report))
    for k, v in report.items():
        _out(f"{k:{width}}  {' '.join(str(v).split())}")
    if problems:
        raise ConcordiaError(f"doctor: {len(problems)} problem(s): {', '.join(problems)} (see the report above)")


def cmd_demo(args: argparse.Namespace) -> None:
    cfg = RuntimeConfig.from_env(home=Path(args.home) if args.home else None, catalog_url=args.catalog)
    if args.agent_worker:
        from ._agent_demo import agent_worker

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
    from ._agent_demo import run_agent_demo

    run_agent_demo(home=cfg.home, catalog=args.catalog, crash_at=args.crash_at or 100, say=_out)


def _global_options(p: argparse.ArgumentParser, *, default: Any) -> None:
    p.add_argument("--home", default=default, help="Concordia home (default: $CONCORDIA_HOME or ~/.concordia)")
    p.add_argument("--catalog", default=default,
                   help="catalog URL (default: $CONCORDIA_CATALOG_URL or sqlite in home)")
    p.add_argument("--backend", default=default, help="auto, host or cupy (default: $CONCORDIA_BACKEND or auto)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="concordia", description="Durable GPU-resident state for LLM agents.")
    _global_options(p, default=None)
    # Each command takes them too (`concordia demo --home X` as well as `concordia --home X demo`): a
    # command's own copy leaves the value alone unless given there (SUPPRESS), so either place works.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    sessions = sub.add_parser("sessions", parents=[common], help="list, show, recover or remove sessions")
    ssub = sessions.add_subparsers(dest="action", required=True)
    ls = ssub.add_parser("list", parents=[common], help="all sessions with status, durable epoch and log size")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_sessions_list)
    show = ssub.add_parser("show", parents=[common], help="one session in full")
    show.add_argument("id")
    show.set_defaults(func=cmd_sessions_show)
    rec = ssub.add_parser("recover", parents=[common],
                          help="check a session's log against the catalog; roll a damaged one back only with "
                               "--allow-rollback")
    rec.add_argument("id")
    rec.add_argument("--allow-rollback", action="store_true",
                     help="open a damaged log at its newest intact epoch, giving up the epochs after it, and say which")
    rec.set_defaults(func=cmd_sessions_recover)
    rm = ssub.add_parser("rm", parents=[common], help="delete a session and its log")
    rm.add_argument("id")
    rm.set_defaults(func=cmd_sessions_rm)
    res = sub.add_parser("resume", parents=[common], help="resume a crashed LangGraph thread by its session ID")
    res.add_argument("id")
    res.add_argument("--app", required=True,
                     help="module:attr of the graph (wrapped, builder, compiled, or a factory taking runtime= "
                          "or no arguments)")
    res.set_defaults(func=cmd_resume)
    gc = sub.add_parser("gc", parents=[common], help="remove files provably orphaned; list what is kept and why")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed and kept; remove nothing")
    gc.add_argument("--upload-age", type=float, default=3600.0, metavar="SECONDS",
                    help="with a remote: abort unfinished multipart uploads older than this (default 3600)")
    gc.set_defaults(func=cmd_gc)
    doctor = sub.add_parser("doctor", parents=[common], help="backend, GPU, NVRTC, shm, home and catalog")
    doctor.set_defaults(func=cmd_doctor)
    demo = sub.add_parser("demo", parents=[common],
                          help="kill an agent inside its LLM node with SIGKILL and resume it by ID")
    demo.add_argument("--crash-at", type=int, default=0,
                      help="tokens (agent demo, default 100) or steps (--synthetic, default 300) before the kill")
    demo.add_argument("--synthetic", action="store_true",
                      help="the runtime-only demo: NumPy regions committed per step, no model or graph")
    demo.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--agent-worker", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--session", help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)
    return p


def _one_line(e: BaseException, args: argparse.Namespace) -> str:
    """The error line: whitespace collapsed whatever the message holds (a
    driver's multi-line text), and for a damaged log the command that can
    roll it back, unless the message or the command already did."""
    text = " ".join(str(e).split())
    if isinstance(e, CorruptLogError) and "sessions recover" not in text and not getattr(args, "allow_rollback",
                                                                                          False):
        # `resume` names a graph thread; the damaged log is most likely one of its task sessions'.
        sid = args.id if getattr(args, "func", None) is cmd_sessions_recover else "SESSION"
        text += (f"; `concordia sessions recover {sid} --allow-rollback` opens a damaged log at its newest intact "
                 "epoch, giving up the epochs after it")
    return text


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        try:
            args.func(args)
        except (ConcordiaError, OSError) as e:
            if show_tracebacks() or isinstance(e, BrokenPipeError):
                raise
            sys.stderr.write(f"concordia: error: {_one_line(e, args)}\n")
            return 1
    except BrokenPipeError:
        # The reader went away (`concordia sessions list | head -1`): stop quietly, as a Unix tool
        # killed by SIGPIPE would. stdout goes to /dev/null so that the interpreter's last flush
        # does not report the same broken pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE
    except KeyboardInterrupt:
        sys.stderr.write("concordia: interrupted\n")
        return 130
    return 0

