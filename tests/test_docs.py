"""The documentation matches the code: generated catalogues are current, and nothing cites a file
outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qcompile.tools import catalogue

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("filename", sorted(catalogue.CATALOGUES))
def test_checked_in_catalogue_is_what_the_registries_say(filename: str) -> None:
    checked_in = (ROOT / "docs" / filename).read_text(encoding="utf-8")
    assert checked_in == catalogue.CATALOGUES[filename](), (
        f"docs/{filename} is stale: run `python -m qcompile.tools.catalogue docs/`"
    )


def _project_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("qcompile", "passes", "backends", "benchmarks", "tests"):
        files += sorted((ROOT / folder).rglob("*.py")) + sorted((ROOT / folder).rglob("*.toml"))
    return files


# Documents that live outside this repository (the project's planning notes); code and docs cite
# docs/ inside the tree instead.
OUTSIDE = re.compile(r"\b(METHODS\.md|DESIGN\.md|STYLE\.md|BENCHMARKS_ORT\.md)\b|\.\./shared/docs")


def test_nothing_cites_a_document_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in _project_files()
        if path.name != "test_docs.py"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if OUTSIDE.search(line)
    ]
    assert offenders == []


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for path in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert broken == []
