"""Every Markdown file the code cites is in the repository (a reader of a docstring can open it in a clone),
and every section of docs/method.md that the code cites by number exists there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["lpo", "scripts", "workflow", "config"]
OUTPUTS = {"report.md"}  # files the pipeline writes (results/<name>/report.md), not documents


def cited(pattern: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix not in {".py", ".smk", ".yaml", ".rst"} or not path.is_file():
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for match in re.findall(pattern, line):
                    found.setdefault(match, []).append(f"{path.relative_to(REPO)}:{n}")
    return found


def test_every_cited_markdown_file_exists():
    names = cited(r"(?<![\w/])((?:docs/)?[A-Za-z0-9_-]+\.md)\b")
    assert "docs/method.md" in names  # the walk is not vacuous
    missing = {name: where[:3] for name, where in names.items()
               if name not in OUTPUTS and not (REPO / name).is_file()}
    assert not missing, f"cited but not in the repository: {missing}"


def test_every_cited_section_of_the_method_notes_exists():
    sections = set(re.findall(r"^## (\d+)\.", (REPO / "docs" / "method.md").read_text(), flags=re.M))
    numbers = cited(r"docs/method\.md (?:section|§) ?(\d+)")
    assert numbers, "no numbered citation found: the pattern is stale"
    missing = {n: where[:3] for n, where in numbers.items() if n not in sections}
    assert not missing, f"docs/method.md has no section {sorted(missing)} (cited at {missing})"
