"""Every relative link in README.md and docs/ names a file that exists, and every #anchor into a
markdown file names one of its headings (GitHub's slugs: lower case, punctuation dropped, spaces
to dashes). A heading renamed or a section moved must take its links with it."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings inside code
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_slug_matches_githubs_rule():
    assert slug("End to end: decode tokens/s (H100, 2026-12-07)") == (
        "end-to-end-decode-tokenss-h100-2026-12-07"
    )
    assert slug("The query-aware basis (`--basis query-aware`)") == (
        "the-query-aware-basis---basis-query-aware"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for link in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no such heading")
    assert not broken, broken
