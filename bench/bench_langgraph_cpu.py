"""LangGraph saver benchmark (CPU): ConcordiaSaver against SqliteSaver and PostgresSaver.

Workload: an append-only conversation of ``turns`` turns on one thread; each
turn invokes a one-node graph that appends the user message and a ~400-byte
reply to a ``messages`` channel (``operator.add``) and bumps a counter; a
2 KiB ``system`` channel never changes. Every turn makes two checkpoints
(input and node step), so 100 turns are 200 ``put`` calls.

Figures per saver, each baseline measured in the same run on the same
database server or disk:

* ``put`` latency: every ``put`` call timed (wall clock around the saver's own
  method), over ``repeats`` conversations after one discarded warm-up
  conversation; median, p10, p90.
* catalog bytes after one conversation: SQLite — the database file after a WAL
  checkpoint (each saver in its own file); PostgreSQL — the total relation
  size (tables, indexes, TOAST) of the saver's tables, each saver in its own
  schema.

    python bench/bench_langgraph_cpu.py [--turns 100] [--repeats 3] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from operator import add
from pathlib import Path
from typing import Annotated, Any, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_device, versions, write  # noqa: E402


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


def run_saver(make: Any, size: Any, turns: int, repeats: int) -> dict[str, Any]:
    """Warm-up conversation, ``repeats`` timed ones (fresh saver each), size after the last."""
    conversation(make(), 5, "warmup")
    puts: list[float] = []
    for r in range(repeats):
        saver = make()
        _timed(saver, puts)
        conversation(saver, turns, f"conv-{r}-{uuid.uuid4().hex[:6]}")
    puts.sort()
    q = statistics.quantiles(puts, n=10)
    return {"put_median_ms": statistics.median(puts) * 1e3, "put_p10_ms": q[0] * 1e3, "put_p90_ms": q[-1] * 1e3,
            "puts": len(puts), "catalog_bytes": size()}


def sqlite_pair(tmp: Path, turns: int, repeats: int) -> dict[str, Any]:
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    from concordia_agents import Runtime
    from integrations.langgraph import ConcordiaSaver

    out: dict[str, Any] = {}
    # Each timed conversation gets a fresh database so the size is of one conversation.
    paths: list[Path] = []

    def make_concordia() -> Any:
        d = tmp / f"concordia-{uuid.uuid4().hex[:6]}"
        paths.append(d / "catalog.db")
        return ConcordiaSaver(runtime=Runtime.open(home=d, catalog_url=f"sqlite:///{d / 'catalog.db'}",
                                                   backend="host"))

    def make_sqlite() -> Any:
        p = tmp / f"sqlitesaver-{uuid.uuid4().hex[:6]}.db"
        paths.append(p)
        return SqliteSaver(sqlite3.connect(str(p), check_same_thread=False))

    def size_of_last() -> int:
        p = paths[-1]
        con = sqlite3.connect(str(p))
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        return p.stat().st_size

    out["concordia"] = run_saver(make_concordia, size_of_last, turns, repeats)
    out["sqlitesaver"] = run_saver(make_sqlite, size_of_last, turns, repeats)
    out["settings"] = ("ConcordiaSaver: SQLAlchemy, WAL, synchronous=NORMAL, BEGIN IMMEDIATE, lease check per "
                       "write; SqliteSaver: sqlite3 defaults as shipped (rollback journal unless set)")
    return out


def postgres_pair(url: str, turns: int, repeats: int) -> dict[str, Any]:
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg import Connection
    from psycopg.rows import dict_row
    from sqlalchemy import create_engine, text

    from concordia_agents import Runtime
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

    def size_of_last() -> int:
        with admin.begin() as c:
            return int(c.execute(text(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relkind = 'r' "
                "AND c.relname NOT LIKE '%migrations' AND c.relname NOT LIKE '%schema' "
                "AND c.relname NOT IN ('concordia_sessions', 'concordia_leases', 'concordia_regions', "
                "'concordia_epochs', 'concordia_segments')"), {"s": schemas[-1]}).scalar_one())

    homes = tempfile.mkdtemp()

    def make_concordia() -> Any:
        s = fresh_schema()
        sep = "&" if "?" in url else "?"
        scoped = f"{url}{sep}options=-csearch_path%3D{s}"
        return ConcordiaSaver(runtime=Runtime.open(home=Path(homes) / s, catalog_url=scoped, backend="host"))

    def make_pg() -> Any:
        s = fresh_schema()
        conn = Connection.connect(libpq, autocommit=True, prepare_threshold=0, row_factory=dict_row,
                                  options=f"-csearch_path={s}")
        saver = PostgresSaver(conn)
        saver.setup()
        return saver

    out = {"concordia": run_saver(make_concordia, size_of_last, turns, repeats),
           "postgressaver": run_saver(make_pg, size_of_last, turns, repeats)}
    with admin.begin() as c:
        for s in schemas:
            c.execute(text(f"DROP SCHEMA {s} CASCADE"))
    admin.dispose()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--postgres", default=os.environ.get("CONCORDIA_TEST_POSTGRES_URL"),
                   help="postgresql+psycopg:// URL (default: $CONCORDIA_TEST_POSTGRES_URL); omit to skip")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lg-"))
    results: dict[str, Any] = {"sqlite": sqlite_pair(tmp, args.turns, args.repeats)}
    if args.postgres:
        results["postgres"] = postgres_pair(args.postgres, args.turns, args.repeats)
    ratios = {}
    for db, base in (("sqlite", "sqlitesaver"), ("postgres", "postgressaver")):
        if db in results:
            c, b = results[db]["concordia"], results[db][base]
            ratios[db] = {"put_latency_concordia_over_baseline": c["put_median_ms"] / b["put_median_ms"],
                          "bytes_baseline_over_concordia": b["catalog_bytes"] / c["catalog_bytes"]}
    payload = {"benchmark": "langgraph_cpu", "device": cpu_device(), "turns": args.turns, "repeats": args.repeats,
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
