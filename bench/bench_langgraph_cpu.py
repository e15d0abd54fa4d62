"""LangGraph saver benchmark (CPU): ConcordiaSaver against SqliteSaver and PostgresSaver.

Workload: an append-only conversation of ``turns`` turns on one thread; each
turn invokes a one-node graph that appends the user message and a ~400-byte
reply to a ``messages`` channel (``operator.add``) and bumps a counter; a
2 KiB ``system`` channel never changes. Every turn makes three checkpoints
(input, start, node step), so 100 turns are 300 ``put`` calls.

Figures per saver, each baseline measured in the same run on the same
database server or disk:

* ``put`` latency: every ``put`` call timed (wall clock around the saver's own
  method), over ``repeats`` conversations after one discarded warm-up
  conversation per saver; median, p10, p90. The savers' conversations
  alternate (ConcordiaSaver, baseline, baseline, ConcordiaSaver, ...), so a
  change in the machine's load during the run falls on both.
* catalog bytes after one conversation: SQLite — the database file after a WAL
  checkpoint (each conversation in its own file); PostgreSQL — the total
  relation size (tables, indexes, TOAST) of the saver's tables, each
  conversation in its own schema.

Every saver is closed after its conversation (ConcordiaSaver lets its lease go
and stops its runtime's threads).

    python bench/bench_langgraph_cpu.py [--turns 100] [--repeats 3] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from operator import add
from pathlib import Path
from typing import Annotated, Any, TypedDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_device, versions, write


class Chat(TypedDict):
    messages: Annotated[list[str], add]
    system: str
    turns: int


def _graph(saver: Any) -> Any:
    from langgraph.graph import END, START, StateGraph

    def reply(state: Chat) -> dict:
        n = state["turns"]
        return {"messages": [f"assistant {n}: " + ("lorem ipsum " * 33)], "turns": n + 1}

    b = StateGraph(Chat)
    b.add_node("reply", reply)
    b.add_edge(START, "reply")
    b.add_edge("reply", END)
    return b.compile(checkpointer=saver)


def _timed(saver: Any, sink: list[float]) -> None:
    """Time every put of this saver instance (the graph calls saver.put)."""
    inner = saver.put

    def put(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            sink.append(time.perf_counter() - t)

    saver.put = put


def conversation(saver: Any, turns: int, thread: str) -> None:
    app = _graph(saver)
    cfg = {"configurable": {"thread_id": thread}}
    app.invoke({"messages": ["user 0"], "system": "You are terse. " * 146, "turns": 0}, cfg, durability="sync")
    for t in range(1, turns):
        app.invoke({"messages": [f"user {t}: " + "question " * 10]}, cfg, durability="sync")


def run_pair(savers: dict[str, Any], turns: int, repeats: int) -> dict[str, dict[str, Any]]:
    """``savers``: name -> ``make()`` returning ``(saver, size(), close())``. A warm-up
    conversation each, then ``repeats`` timed ones each (a fresh saver every time), in
    alternating order; the size is of each saver's last conversation."""
    for make in savers.values():
        saver, _, close = make()
        conversation(saver, 5, "warmup")
        close()
    puts: dict[str, list[float]] = {name: [] for name in savers}
    sizes: dict[str, int] = {}
    names = list(savers)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            saver, size, close = savers[name]()
            _timed(saver, puts[name])
            conversation(saver, turns, f"conv-{r}-{uuid.uuid4().hex[:6]}")
            close()
            sizes[name] = size()
    out = {}
    for name, times in puts.items():
        times.sort()
        q = statistics.quantiles(times, n=10)
        out[name] = {"put_median_ms": statistics.median(times) * 1e3, "put_p10_ms": q[0] * 1e3,
                     "put_p90_ms": q[-1] * 1e3, "puts": len(times), "catalog_bytes": sizes[name]}
    return out


def sqlite_pair(tmp: Path, turns: int, repeats: int) -> dict[str, Any]:
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    from integrations.langgraph import ConcordiaSaver

    def file_size(p: Path) -> Any:
        def size() -> int:
            con = sqlite3.connect(str(p))
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            con.close()
            return p.stat().st_size
        return size

    def make_concordia() -> Any:
        d = tmp / f"concordia-{uuid.uuid4().hex[:6]}"
        saver = ConcordiaSaver.from_conn_string(f"sqlite:///{d / 'catalog.db'}", home=str(d))
        return saver, file_size(d / "catalog.db"), saver.close

    def make_sqlite() -> Any:
        p = tmp / f"sqlitesaver-{uuid.uuid4().hex[:6]}.db"
        conn = sqlite3.connect(str(p), check_same_thread=False)
        return SqliteSaver(conn), file_size(p), conn.close

    out: dict[str, Any] = run_pair({"concordia": make_concordia, "sqlitesaver": make_sqlite}, turns, repeats)
    out["settings"] = ("ConcordiaSaver: raw sqlite3 connection, WAL, synchronous=NORMAL, BEGIN IMMEDIATE, lease "
                       "check per write; SqliteSaver: sqlite3 defaults as shipped (rollback journal unless set)")
    return out


def postgres_pair(url: str, turns: int, repeats: int, tmp: Path) -> dict[str, Any]:
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg import Connection
    from psycopg.rows import dict_row
    from sqlalchemy import create_engine, text

    from integrations.langgraph import ConcordiaSaver

    admin = create_engine(url)
    schemas: list[str] = []
    libpq = url.replace("postgresql+psycopg://", "postgresql://")

    def fresh_schema() -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        with admin.begin() as c:
            c.execute(text(f"CREATE SCHEMA {name}"))
        schemas.append(name)
        return name

    def schema_size(schema: str) -> Any:
        def size() -> int:
            with admin.begin() as c:
                return int(c.execute(text(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relkind = 'r' "
                    "AND c.relname NOT LIKE '%migrations' AND c.relname NOT LIKE '%schema' "
                    "AND c.relname NOT IN ('concordia_sessions', 'concordia_leases', 'concordia_regions', "
                    "'concordia_epochs', 'concordia_segments', 'concordia_catalog_id')"), {"s": schema}).scalar_one())
        return size

    homes = tmp / "homes"
    ours: list[str] = []

    def make_concordia() -> Any:
        s = fresh_schema()
        ours.append(s)
        sep = "&" if "?" in url else "?"
        saver = ConcordiaSaver.from_conn_string(f"{url}{sep}options=-csearch_path%3D{s}", home=str(homes / s))
        return saver, schema_size(s), saver.close

    def make_pg() -> Any:
        s = fresh_schema()
        conn = Connection.connect(libpq, autocommit=True, prepare_threshold=0, row_factory=dict_row,
                                  options=f"-csearch_path={s}")
        saver = PostgresSaver(conn)
        saver.setup()
        return saver, schema_size(s), conn.close

    out: dict[str, Any] = run_pair({"concordia": make_concordia, "postgressaver": make_pg}, turns, repeats)
    out["settings"] = ("ConcordiaSaver: psycopg, autocommit, one statement per put checking the lease token under "
                       "FOR SHARE, blobs TOAST-compressed with lz4 where the server has it; PostgresSaver: one "
                       "autocommit connection, prepare_threshold=0 (as its from_conn_string), pglz")
    with admin.begin() as c:
        out["server"] = c.execute(text("SELECT version()")).scalar_one()
        method = c.execute(text(
            "SELECT attcompression FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) AND attname = 'blob'"),
            {"t": f"{ours[-1]}.concordia_lg_blobs"}).scalar_one()
        out["concordia_blob_compression"] = {"l": "lz4", "p": "pglz"}.get(method, "server default")
        for s in schemas:
            c.execute(text(f"DROP SCHEMA {s} CASCADE"))
    admin.dispose()
    return out


def code_version() -> str:
    """The commit of the saver measured, ``+modified`` if its files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+modified" if git("status", "--porcelain", "--", "integrations/langgraph") else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--postgres", default=os.environ.get("CONCORDIA_TEST_POSTGRES_URL"),
                   help="postgresql+psycopg:// URL (default: $CONCORDIA_TEST_POSTGRES_URL); omit to skip")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lg-"))
    try:
        results: dict[str, Any] = {"sqlite": sqlite_pair(tmp, args.turns, args.repeats)}
        if args.postgres:
            results["postgres"] = postgres_pair(args.postgres, args.turns, args.repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {}
    for db, base in (("sqlite", "sqlitesaver"), ("postgres", "postgressaver")):
        if db in results:
            c, b = results[db]["concordia"], results[db][base]
            ratios[db] = {"put_latency_concordia_over_baseline": c["put_median_ms"] / b["put_median_ms"],
                          "bytes_baseline_over_concordia": b["catalog_bytes"] / c["catalog_bytes"]}
    payload = {"benchmark": "langgraph_cpu", "device": cpu_device(), "code": code_version(), "turns": args.turns,
               "repeats": args.repeats,
               "versions": versions("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite",
                                    "langgraph-checkpoint-postgres", "psycopg"),
               "results": results, "ratios": ratios}
    path = write("langgraph_cpu", payload)
    for db, r in results.items():
        for name, fig in r.items():
            if isinstance(fig, dict):
                print(f"{db:8} {name:14} put median {fig['put_median_ms']:.2f} ms (p90 {fig['put_p90_ms']:.2f}), "
                      f"{fig['catalog_bytes'] / 1024:.0f} KiB after {args.turns} turns")
    for db, r in ratios.items():
        print(f"{db}: put latency x{r['put_latency_concordia_over_baseline']:.2f} of the baseline; "
              f"baseline stores x{r['bytes_baseline_over_concordia']:.1f} the bytes")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
