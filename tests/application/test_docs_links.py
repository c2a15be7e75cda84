"""Every relative link in the README and the docs resolves to a file or folder of the repository.

Checked: inline Markdown links and images ``[text](target)`` / ``![alt](target)`` in README.md, docs/**/*.md,
tests/**/*.md and scripts/**/*.md, outside fenced code blocks and inline code. A target's ``#anchor`` is dropped
(the file must exist; headings are not checked); web links (``http:``, ``https:``, ``mailto:``) and pure anchors
are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`+[^`]*`+")


def markdown_files(root: Path) -> list[Path]:
    """README.md and the Markdown files under docs/, tests/ and scripts/, sorted."""
    files = [root / "README.md"]
    for folder in ("docs", "tests", "scripts"):
        files += sorted((root / folder).rglob("*.md"))
    return [f for f in files if f.is_file()]


def broken_links(path: Path, root: Path) -> list[str]:
    """``"LINE: TARGET"`` for each relative link of ``path`` that does not resolve inside ``root``."""
    broken, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue
            file_part = target.split("#", 1)[0].split("?", 1)[0]
            resolved = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
            resolved = resolved.resolve()
            if not resolved.exists() or not resolved.is_relative_to(root):
                broken.append(f"{number}: {target}")
    return broken


def test_the_checker_finds_broken_links_and_passes_good_ones(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "sub" / "there.md").write_text("x")
    page = tmp_path / "docs" / "page.md"
    page.write_text("[ok](sub/there.md) [ok2](sub/there.md#a-heading) [dir](sub/) [web](https://example.org/x)\n"
                    "[gone](sub/missing.md) ![img](../nowhere.png)\n"
                    "`[in code](not/checked.md)`\n```\n[fenced](not/checked.md)\n```\n"
                    "[outside](../../etc/passwd)\n")
    assert broken_links(page, tmp_path) == ["2: sub/missing.md", "2: ../nowhere.png", "7: ../../etc/passwd"]


def test_the_pages_checked_include_the_readme_and_the_results_index():
    names = {f.relative_to(ROOT).as_posix() for f in markdown_files(ROOT)}
    assert {"README.md", "docs/design.md", "docs/results/README.md"} <= names


@pytest.mark.parametrize("path", markdown_files(ROOT), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert broken_links(path, ROOT) == []
