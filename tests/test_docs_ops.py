"""docs/ops.md is the project's op reference: every "docs/ops.md §n" citation in the tree
names one of its sections, and the README links it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED_IN = ("src", "include", "kernels", "python", "tests", "docs")
SUFFIXES = {".py", ".h", ".cpp", ".cu", ".cuh", ".md"}


def _sections() -> set[int]:
    text = (ROOT / "docs" / "ops.md").read_text()
    return {int(n) for n in re.findall(r"(?m)^## (\d+)\. ", text)}


def _citations() -> list[tuple[str, int]]:
    found = []
    for folder in CITED_IN:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in SUFFIXES or not path.is_file():
                continue
            text = path.read_text(errors="replace")
            # "docs/ops.md §1-3", "ops.md) §3–4", "docs/ops.md`` §1, §6": every number cited
            for cite in re.findall(r"ops\.md\W{0,4}((?:§\d+(?:[-–]\d+)?(?:, )?)+)", text):
                for number in re.findall(r"\d+", cite):
                    found.append((str(path.relative_to(ROOT)), int(number)))
    return found


def test_every_citation_names_a_section():
    sections = _sections()
    assert sections == set(range(11)), sections
    citations = _citations()
    assert len(citations) > 30, "the tree cites docs/ops.md throughout"
    dangling = [(where, n) for where, n in citations if n not in sections]
    assert not dangling, dangling


def test_no_citation_of_the_old_spec_and_the_readme_links_the_reference():
    stale = [
        str(p.relative_to(ROOT))
        for folder in CITED_IN
        for p in (ROOT / folder).rglob("*")
        if p.suffix in SUFFIXES
        and p.is_file()
        and p.name != "test_docs_ops.py"
        and "OPS.md" in p.read_text(errors="replace")
    ]
    assert not stale, stale
    assert "(docs/ops.md)" in (ROOT / "README.md").read_text()
