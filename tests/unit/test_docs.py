"""The docs inside the repository stay true to the code: every route is documented, the README
stays short, and no issue numbers (which go stale) appear in docs or source."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("api", "core", "worker", "trainer", "tuneq", "tests", "bench", "migrations")
# Built from parts so that this file does not match itself.
ISSUE_NUMBER = re.compile(r"\b[Ii]ssues?[ -]?#?" + r"\d+")


def test_api_doc_lists_every_route() -> None:
    from api.main import create_app

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [
        f"{method.upper()} {path}"
        for path, operations in create_app().openapi()["paths"].items()
        for method in operations
        if f"{method.upper()} {path}" not in text
    ]
    assert not missing, f"docs/api.md does not list: {missing}"


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 150, f"README.md has {lines} lines; move detail into docs/"


def test_no_issue_numbers_in_docs_or_source() -> None:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in SOURCE_DIRS:
        files += sorted((ROOT / folder).rglob("*.py"))
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if ISSUE_NUMBER.search(line)
    ]
    assert not hits, "issue numbers go stale; say why instead:\n" + "\n".join(hits)
