"""LangGraph's own test suite, with ConcordiaSaver among its checkpointers.

The tests are those of the *installed* langgraph version, taken from its source
distribution on PyPI (``pip download --no-binary :all:``, cached in
``.cache/langgraph-upstream/``; no network, no sdist: the tests fail, loudly).
No test body is changed: the harness extracts ``tests/`` and upstream's
``pyproject.toml`` (its pytest settings) into a temporary directory and appends
one import to upstream's ``tests/conftest.py``, which replaces its two
checkpointer fixtures with ``langgraph_upstream/concordia_upstream_fixtures.py``:
the same baselines upstream uses plus ConcordiaSaver. A plugin
(``langgraph_upstream/concordia_upstream_plugin.py``) keeps only the tests that
take a checkpointer fixture and reports every outcome.

One pytest run per catalog runs every module below:

* SQLite: LangGraph's InMemorySaver (``memory``), SqliteSaver / AsyncSqliteSaver
  (``sqlite``, ``sqlite_aio``) and ConcordiaSaver on a SQLite catalog.
* PostgreSQL (only with ``CONCORDIA_TEST_POSTGRES_URL``, as every PostgreSQL
  test here): PostgresSaver / AsyncPostgresSaver (``postgres``,
  ``postgres_aio``) and ConcordiaSaver, each test in a fresh schema.

A ConcordiaSaver failure fails its module's test unless the same test (same
other parameters) also fails on a LangGraph saver of the run (that one is not
ours: it is reported as a warning). A few upstream tests assert wall-clock
bounds (``FloatBetween`` on ``perf_counter`` readings, e.g. a stream chunk within
0.1 s of the start): one that fails only on ConcordiaSaver is run twice more in
a run of its own, and counts as passed (with a warning naming it) only if both
reruns pass; a scheduling stall of a loaded CI machine is not a saver's fault,
a saver that is slow every time still fails. The modules are every module of langgraph
1.2.24's suite whose tests take ``sync_checkpointer`` or
``async_checkpointer`` — the Pregel loop (sync and async), interrupts and
resume, time travel, subgraph persistence, checkpoint migration, the large
cases and DeltaChannel: 19 modules, about 1,400 tests per catalog with the
baselines. The other upstream modules never build a checkpointer from those
fixtures. ``test_modules_cover_every_checkpointer_module`` fails when a
langgraph upgrade adds one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PG_URL

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "langgraph_upstream"
CACHE = ROOT / ".cache" / "langgraph-upstream"

MODULES = (
    "test_pregel", "test_pregel_async", "test_interruption", "test_time_travel", "test_interrupt_state",
    "test_strict_resume", "test_time_travel_async", "test_subgraph_persistence", "test_subgraph_persistence_async",
    "test_checkpoint_migration", "test_large_cases", "test_large_cases_async", "test_pydantic",
    "test_delta_channel_exit_mode", "test_delta_channel_fork", "test_delta_channel_parallel_order",
    "test_delta_channel_subgraph", "test_delta_channel_to_plain", "test_delta_channel_update_state",
)
#: the checkpointers of each catalog's run; ConcordiaSaver's results are set beside the others'
RUNS = {"sqlite": ("memory", "sqlite", "sqlite_aio", "concordia_sqlite"),
        "postgres": ("postgres", "postgres_aio", "concordia_postgres")}
OURS = {"sqlite": "concordia_sqlite", "postgres": "concordia_postgres"}
#: what upstream's conftest and test modules import beyond langgraph itself (its test dependency group)
NEEDS = {"pytest_mock": "pytest-mock", "syrupy": "syrupy", "redis": "redis", "anyio": "anyio",
         "langgraph.checkpoint.sqlite": "langgraph-checkpoint-sqlite",
         "langgraph.checkpoint.postgres": "langgraph-checkpoint-postgres", "psycopg_pool": "psycopg-pool"}
_CONFTEST_EXTENSION = """

# Appended by Concordia's tests/test_langgraph_upstream.py: the checkpointer fixtures, with ConcordiaSaver.
from concordia_upstream_fixtures import async_checkpointer, sync_checkpointer  # noqa: E402,F401
"""
_FAILED = ("failed", "error")


def _sdist(version: str) -> Path:
    """The langgraph sdist of ``version``, downloaded once into the cache."""
    path = CACHE / f"langgraph-{version}.tar.gz"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            "--disable-pip-version-check", f"langgraph=={version}", "-d", tmp],
                           capture_output=True, text=True, timeout=600)
        got = Path(tmp) / path.name
        if r.returncode != 0 or not got.exists():
            pytest.fail(f"could not download the langgraph {version} sdist (its tests are the upstream suite): "
                        f"pip exited {r.returncode}, expected {path.name}; stderr:\n{r.stderr[-3000:]}")
        os.replace(got, path)
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Upstream's ``tests/`` and ``pyproject.toml`` for the installed langgraph,
    its conftest extended with the ConcordiaSaver fixtures."""
    missing = sorted(pkg for mod, pkg in NEEDS.items() if importlib.util.find_spec(mod.split(".")[0]) is None
                     or importlib.util.find_spec(mod) is None)
    if missing:
        pytest.fail(f"LangGraph's test suite needs {', '.join(missing)}: expected them installed (test extra), "
                    f"found none; pip install {' '.join(missing)}")
    version = importlib.metadata.version("langgraph")
    top = f"langgraph-{version}"
    dest = tmp_path_factory.mktemp("langgraph-upstream")
    with tarfile.open(_sdist(version)) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(f"{top}/tests/") or m.name == f"{top}/pyproject.toml"]
        tar.extractall(dest, members=members, filter="data")
    root = dest / top
    conftest = root / "tests" / "conftest.py"
    if not conftest.exists():
        pytest.fail(f"langgraph {version} sdist: expected tests/conftest.py, found {sorted(os.listdir(root))}")
    with conftest.open("a") as f:
        f.write(_CONFTEST_EXTENSION)
    return root


def _run(root: Path, catalog: str, report: Path, targets: list[str] | None = None) -> dict[str, Any]:
    """One pytest run of every module (or of ``targets``, node IDs) in a subprocess
    (upstream's ``tests`` package must be the ``tests`` it imports); returns the
    plugin's report."""
    env = {**os.environ, "NO_DOCKER": "true",  # upstream's switch: no Redis cache, no PostgreSQL store
           "CONCORDIA_UPSTREAM_CHECKPOINTERS": ",".join(RUNS[catalog]), "CONCORDIA_UPSTREAM_REPORT": str(report),
           # this checkout's Concordia (not whatever is installed), and the fixture and plugin modules
           "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", *(targets or [f"tests/{m}.py" for m in MODULES]), "-c", "pyproject.toml",
           "--rootdir", ".", "-p", "concordia_upstream_plugin", "-p", "no:cacheprovider", "-q",
           "--timeout", "300", "--tb=short"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3000)
    if r.returncode not in (0, 1) or not report.exists():  # 1: some test failed; anything else: the run did not
        pytest.fail(f"upstream run on {catalog} did not complete (pytest exited {r.returncode}):\n"
                    f"{r.stdout[-6000:]}\n{r.stderr[-3000:]}")
    out = json.loads(report.read_text())
    out["summary"] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return out


@pytest.fixture(scope="module")
def upstream_run(upstream: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``run(catalog)``: that catalog's results, run once per session."""
    @functools.cache
    def run(catalog: str) -> dict[str, Any]:
        res = _run(upstream, catalog, tmp_path_factory.mktemp(f"report-{catalog}") / "report.json")
        _save_summary(catalog, res)
        return res

    return run


#: a test body that reads the wall clock and bounds it (upstream's stream-timing tests)
_WALL_CLOCK = re.compile(r"perf_counter\(\)[\s\S]*FloatBetween\(")


def _wall_clock_tests(root: Path, nodeids: list[str]) -> list[str]:
    """Those of ``nodeids`` whose test function asserts wall-clock bounds."""
    chosen = []
    for nodeid in nodeids:
        path, name = nodeid.split("::")[0], nodeid.split("::")[-1].split("[")[0]
        body = re.search(rf"^(?:async )?def {re.escape(name)}\(.*?(?=^(?:async )?def |^class |\Z)",
                         (root / path).read_text(), re.S | re.M)
        if body and _WALL_CLOCK.search(body.group(0)):
            chosen.append(nodeid)
    return chosen


def _rerun_passes(root: Path, catalog: str, nodeids: list[str], report_dir: Path) -> set[str]:
    """The node IDs that pass in each of two further runs of their own."""
    passed = set(nodeids)
    for i in range(2):
        if not passed:
            break
        res = _run(root, catalog, report_dir / f"rerun-{i}.json", targets=sorted(passed))
        passed = {n for n in passed if res["tests"].get(n, {}).get("outcome") == "passed"}
    return passed


def _save_summary(catalog: str, res: dict[str, Any]) -> None:
    """Counts per module and checkpointer, in the cache (for the record; not read back)."""
    counts: dict[str, dict[str, Counter[str]]] = {}
    for nodeid, t in res["tests"].items():
        module = nodeid.split("::")[0].removeprefix("tests/").removesuffix(".py")
        counts.setdefault(module, {}).setdefault(t["checkpointer"], Counter())[t["outcome"]] += 1
    (CACHE / "results").mkdir(parents=True, exist_ok=True)
    (CACHE / "results" / f"{catalog}.json").write_text(json.dumps(
        {"summary": res["summary"], "counts": counts,
         "failed": {n: t["outcome"] for n, t in res["tests"].items() if t["outcome"] in _FAILED}}, indent=1))


def test_modules_cover_every_checkpointer_module(upstream: Path):
    """MODULES is exactly the set of upstream test modules that take a checkpointer fixture."""
    uses = re.compile(r"\b(sync_checkpointer|async_checkpointer)\b")
    found = {p.stem for p in (upstream / "tests").glob("test_*.py") if uses.search(p.read_text())}
    assert found == set(MODULES), (f"expected the upstream modules using a checkpointer fixture to be MODULES; "
                                   f"only upstream: {sorted(found - set(MODULES))}, "
                                   f"only MODULES: {sorted(set(MODULES) - found)}")


@pytest.mark.timeout(3600)  # the first test of a catalog waits for that catalog's whole run
@pytest.mark.parametrize("catalog", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("module", MODULES)
def test_upstream_module_passes_on_concordia_as_on_langgraphs_savers(upstream, upstream_run, module: str,
                                                                    catalog: str, tmp_path: Path):
    """Every test of the module that passes on LangGraph's own savers passes on ConcordiaSaver."""
    if catalog == "postgres" and not PG_URL:
        pytest.skip("CONCORDIA_TEST_POSTGRES_URL is not set: no PostgreSQL to test against")
    tests = {n: t for n, t in upstream_run(catalog)["tests"].items() if n.startswith(f"tests/{module}.py::")}
    by_key: dict[str, dict[str, dict[str, Any]]] = {}
    for nodeid, t in tests.items():
        by_key.setdefault(t["key"], {})[t["checkpointer"]] = {**t, "nodeid": nodeid}
    ours = OURS[catalog]
    mine = {k: v[ours] for k, v in by_key.items() if ours in v}
    theirs = {k for k, v in by_key.items() if set(v) - {ours}}
    assert mine, f"{module}: expected tests parametrized with {ours}, found none (upstream's fixtures changed?)"
    assert set(mine) == theirs, f"{module}: tests without a counterpart: {sorted(set(mine) ^ theirs)[:10]}"
    only_ours, not_ours = [], []
    for key, t in sorted(mine.items()):
        if t["outcome"] not in _FAILED:
            continue
        also = sorted(cp for cp, o in by_key[key].items() if cp != ours and o["outcome"] in _FAILED)
        (not_ours if also else only_ours).append((t, also))
    if not_ours:
        warnings.warn(f"{module} on {catalog}: {len(not_ours)} failing on ConcordiaSaver also fail on LangGraph's "
                      "savers: " + "; ".join(f"{t['nodeid']} (also {', '.join(a)})" for t, a in not_ours),
                      stacklevel=1)
    timing = _wall_clock_tests(upstream, [t["nodeid"] for t, _ in only_ours])
    stalled = _rerun_passes(upstream, catalog, timing, tmp_path) if timing else set()
    if stalled:
        warnings.warn(f"{module} on {catalog}: wall-clock test(s) failed once on ConcordiaSaver and passed twice "
                      "when rerun alone: " + "; ".join(sorted(stalled)), stacklevel=1)
        only_ours = [(t, a) for t, a in only_ours if t["nodeid"] not in stalled]
    assert not only_ours, f"{module}: {len(only_ours)} of {len(mine)} fail only on ConcordiaSaver ({catalog}):\n" + \
        "\n\n".join(f"{t['nodeid']}: {t['outcome']}\n{t['message'][-1500:]}" for t, _ in only_ours)
