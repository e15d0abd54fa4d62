"""pytest plugin for the upstream run (``-p concordia_upstream_plugin``).

* Keeps only the tests parametrized by a checkpointer fixture
  (``sync_checkpointer`` / ``async_checkpointer``): the others never touch a
  saver, so running them here would test LangGraph, not ConcordiaSaver.
* Writes ``CONCORDIA_UPSTREAM_REPORT`` (JSON): one entry per test with its
  checkpointer, the test's identity without the checkpointer (so a
  ConcordiaSaver result can be set beside the baselines' results for the same
  test and the same other parameters), and its outcome.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_FIXTURES = ("sync_checkpointer", "async_checkpointer")
_results: dict[str, dict[str, Any]] = {}
_meta: dict[str, dict[str, Any]] = {}


def _checkpointer_of(item: pytest.Item) -> tuple[str, str] | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    for fixture in _FIXTURES:
        if fixture in params:
            others = {k: repr(v) for k, v in sorted(params.items()) if k != fixture}
            return str(params[fixture]), json.dumps([item.nodeid.split("[")[0], others])
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        found = _checkpointer_of(item)
        if found is None:
            drop.append(item)
        else:
            keep.append(item)
            _meta[item.nodeid] = {"checkpointer": found[0], "key": found[1]}
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    meta = _meta.get(report.nodeid)
    if meta is None:
        return
    entry = _results.setdefault(report.nodeid, {**meta, "outcome": "passed", "message": ""})
    if report.failed and entry["outcome"] not in ("failed", "error"):  # the first failure says why
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["message"] = report.longreprtext[-3000:]
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.when == "call" and hasattr(report, "wasxfail"):
        entry["outcome"] = "xpassed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("CONCORDIA_UPSTREAM_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"exitstatus": int(exitstatus), "tests": _results}, f, indent=1)
