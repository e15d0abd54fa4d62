"""The README and docs cite only benchmark files and scripts that exist, and
bench/results/INDEX.md accounts for every result file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A repository path under bench/ or scripts/, possibly a glob (``bench/results/gpu-*.json``).
_PATH = re.compile(r"(?<![\w/.-])((?:bench|scripts)/[\w./*-]*[\w*])")
# A result file named without its folder (``gpu-20261127T191919Z.json``, ``profile_commit_gpu-*.json``):
# a stamp or a glob, then .json or .log.
_RESULT_NAME = re.compile(r"(?<![\w/.-])([\w.-]*(?:\d{8}T\d{4,6}Z|\*)[\w.-]*\.(?:json|log))\b")
# A relative Markdown link target.
_LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)#\s]+)")


def _resolves(base: Path, pattern: str) -> bool:
    return any(base.glob(pattern)) if "*" in pattern else (base / pattern).exists()


def _cases() -> list[tuple[str, str, Path, str]]:
    """(doc, cited text, base folder, pattern) for every citation in README.md and docs/*.md."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        rel = doc.relative_to(ROOT).as_posix()
        for m in _PATH.finditer(text):
            out.append((rel, m.group(1), ROOT, m.group(1).rstrip(".")))
        for m in _RESULT_NAME.finditer(text):
            out.append((rel, m.group(1), RESULTS, m.group(1)))
        for m in _LINK.finditer(text):
            out.append((rel, m.group(1), doc.parent, m.group(1)))
    return out


CASES = _cases()


def test_the_docs_cite_benchmark_files():
    """The scan finds the citations it is meant to check (a broken pattern would pass everything)."""
    cited = {c[1] for c in CASES}
    assert "scripts/gpu_suite.sh" in cited
    assert any(c.startswith("bench/results/") for c in cited)
    assert any(re.fullmatch(r"[\w.-]+-\d{8}T\d{4,6}Z[\w.-]*\.json", c) for c in cited)


@pytest.mark.parametrize(("doc", "cited", "base", "pattern"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_cited_path_exists(doc: str, cited: str, base: Path, pattern: str):
    """Each bench/, scripts/ or result-file citation and each relative link names an existing file."""
    assert _resolves(base, pattern), f"{doc} cites {cited!r}, which does not exist"


def test_index_lists_exactly_the_result_files():
    """bench/results/INDEX.md has one row per result file, and no row for a file that is gone."""
    index = (RESULTS / "INDEX.md").read_text()
    rows = set(re.findall(r"^\| `([^`]+)` \|", index, flags=re.MULTILINE))
    files = {p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "INDEX.md"}
    assert not files - rows, f"result files missing from INDEX.md: {sorted(files - rows)}"
    assert not rows - files, f"INDEX.md rows for files that do not exist: {sorted(rows - files)}"
