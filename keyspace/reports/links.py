"""Where the two reports sit relative to each other, and the links between them.

The rule: a folder holds the rank report as `index.html` and the validate report as
`validate/validate.html` (what `make demo` writes). Each writer links to the other page when
that file exists and is a keyspace report, and puts its own link into the other page's
related-reports slot, so the order in which the two are written does not matter. Nothing is
linked when the sibling is missing, or when it (or the folder between the pages) is a symbolic
link: relinking it would write outside the folder. The links are relative, so the pair can move
together. Every page is written by `keyspace.runfolder.files.write_text_atomic` (an unpredictable
temp name, then a rename).
"""

from __future__ import annotations

from pathlib import Path

from keyspace.reports import html

RANK_PAGE = "index.html"
VALIDATE_SUBDIR = "validate"
VALIDATE_PAGE = "validate.html"
RANK_LABEL = "Rank report (key dimensionality)"
VALIDATE_LABEL = "Validate report (Loki accuracy and speed)"
RULE = (
    f"Related reports: a rank report at DIR/{RANK_PAGE} and a validate report at "
    f"DIR/{VALIDATE_SUBDIR}/{VALIDATE_PAGE} link to each other when both exist."
)


def cross_link(sibling: Path, to_sibling: str, sibling_label: str, back: str, own_label: str):
    """Links for a page whose sibling report may sit at `sibling`; also links the sibling back.

    to_sibling / back: relative hrefs from the page to the sibling and from the sibling to the page.
    """
    if _through_link(sibling) or not html.relink(sibling, [(back, own_label)]):
        return []
    return [(to_sibling, sibling_label)]


def _through_link(sibling: Path) -> bool:
    """True when the sibling page, or the folder between the two pages, is a symbolic link:
    rewriting its links would write outside the report folder, so the pages stay unlinked."""
    return sibling.is_symlink() or sibling.parent.is_symlink()


def rank_page_links(out: Path) -> list[tuple[str, str]]:
    """For `out/index.html`: the validate report in `out/validate/`, when there is one."""
    href = f"{VALIDATE_SUBDIR}/{VALIDATE_PAGE}"
    return cross_link(out / href, href, VALIDATE_LABEL, f"../{RANK_PAGE}", RANK_LABEL)


def validate_page_links(out: Path) -> list[tuple[str, str]]:
    """For `out/validate.html`: the rank report one folder up, when `out` is its validate/."""
    if Path(out).resolve().name != VALIDATE_SUBDIR:
        return []
    href = f"../{RANK_PAGE}"
    return cross_link(
        out / href, href, RANK_LABEL, f"{VALIDATE_SUBDIR}/{VALIDATE_PAGE}", VALIDATE_LABEL
    )
