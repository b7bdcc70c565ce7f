"""Every relative link in README.md and docs/*.md leads somewhere: the file exists, and a `#anchor` is a heading there.

Anchors follow GitHub's heading slugs: lowercase; everything but letters, digits, underscores, hyphens and spaces
dropped; spaces become hyphens; a repeated slug gets -1, -2, ... Links to http(s) and mailto are not followed.
Imports no project module.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_PARAGRAPH_CODE_SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.DOTALL)   # may wrap, not over a blank line
# [text](target) or ![alt](target), the text possibly wrapped, holding code spans or one level of brackets;
# the target up to the first space (an optional "title" follows) or the closing parenthesis.
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
_EXTERNAL = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (markdown of links and code spans reduced to their text)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)          # [text](url) -> text
    text = _CODE_SPAN.sub(lambda m: m.group(2), text)                   # `code` -> code
    text = re.sub(r"<[^>]+>", "", text)                                 # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(page: Path) -> list[str]:
    """Link targets in the page's prose (not in code blocks or code spans); a link may be wrapped over lines."""
    lines = prose_lines(page.read_text(encoding="utf-8"))
    targets = [m.group(1) for m in map(_REFERENCE.match, lines) if m]
    prose = "\n".join(line for line in lines if not _REFERENCE.match(line))
    prose = _PARAGRAPH_CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), prose)   # code goes, link text stays
    return targets + _INLINE_LINK.findall(prose)


def shown(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in links(page):
        if _EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        where = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not where.exists():
            problems.append(f"{target}: {shown(where)} does not exist")
            continue
        if anchor:
            if where.is_dir() or where.suffix.lower() != ".md":
                problems.append(f"{target}: an anchor into something that is not a markdown page")
            elif unquote(anchor).lower() not in anchors(where):
                problems.append(f"{target}: no heading in {shown(where)} has the anchor #{anchor}")
    return problems


def test_the_pages_are_there():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/README.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path):
    problems = broken_links(page)
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent.name == "docs" and p.name != "README.md"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_docs_page_is_in_the_index(page: Path):
    index = ROOT / "docs" / "README.md"
    assert page.name in {Path(t.partition("#")[0]).name for t in links(index)}, \
        f"docs/README.md does not link to {page.name}"


def test_the_checker_catches_what_it_should(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Watching a fine-tune: `/training`\n\n"
                                                "## Batch size on a GPU\n\n## Batch size on a GPU\n", encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Page\n\n"
                    "[ok](other.md) [ok](other.md#watching-a-fine-tune-training) [ok](other.md#batch-size-on-a-gpu-1)\n"
                    "[ok](#page) [ok](https://example.com/missing) [ok](mailto:someone@example.com)\n"
                    "[`code` in text](other.md) `[not a link](nowhere.md)` `wrapped\n[code](nowhere.md)`\n"
                    "[a link wrapped over\ntwo lines](missing-too.md)\n"
                    "```\n[not a link either](nowhere.md)\n```\n"
                    "[gone](missing.md) [bad anchor](other.md#no-such-heading) [bad here](#nothing)\n",
                    encoding="utf-8")
    problems = broken_links(page)
    assert len(problems) == 4, problems
    assert [p.split(":")[0] for p in problems] == ["missing-too.md", "missing.md", "other.md#no-such-heading",
                                                   "#nothing"]
    assert slug("Search at scale: `bench_search.py`") == "search-at-scale-bench_searchpy"
    assert slug("Serving: `serve-images`, the search API and the gallery") == \
        "serving-serve-images-the-search-api-and-the-gallery"
