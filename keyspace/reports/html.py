"""The one HTML assembly of every report: escaped fragments (tables, figures, sections) poured
into the page template. Images are embedded as base64 data URIs, so a page is a single
self-contained file; the only links that leave it point to a sibling report (see `relink`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from string import Template

from keyspace.errors import KeyspaceError
from keyspace.reports.template import PAGE, RELATED_END, RELATED_START
from keyspace.runfolder.files import read_regular, write_bytes_atomic, write_text_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUMBER = re.compile(r"[-+−]?\.?\d")
BLANKS = ("", "-", "–", "n/a")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def attributes(attrs: dict[str, object] | None) -> str:
    return "".join(f' {esc(k)}="{esc(v)}"' for k, v in (attrs or {}).items())


def plural(count: int, word: str) -> str:
    """'1 window', '2 windows'."""
    return f"{count} {word if count == 1 else word + 's'}"


def is_number(cell: object) -> bool:
    """Cells that right-align: numbers, with any unit or bracket after them, and blanks."""
    return bool(NUMBER.match(str(cell))) or str(cell) in BLANKS


def header_cell(header: str, text: bool) -> str:
    """A <th>; long headers wrap at spaces only (never after a hyphen), and not into slivers."""
    classes = ["text"] * text + ["long"] * (len(header) > 12 and " " in header)
    cls = f' class="{" ".join(classes)}"' if classes else ""
    words = (
        f'<span class="nowrap">{esc(w)}</span>' if "-" in w else esc(w) for w in header.split(" ")
    )
    return f"<th{cls}>{' '.join(words)}</th>"


def table(
    headers: list[str],
    rows: list[list[object]],
    css_class: str,
    attrs: dict[str, object] | None = None,
    row_attrs: list[dict] | None = None,
    tall: bool = False,
    csv_name: str | None = None,
) -> str:
    """An HTML table in its own scroll box, so a wide or long table never widens the page, with
    a link to its cells as CSV (`csv_name`.csv, default the css class).

    Every cell is escaped; row_attrs[i] adds attributes to row i; tall caps the box's height
    on screen (printed, every row shows).
    """
    text = [not all(is_number(row[j]) for row in rows) for j in range(len(headers))]
    cls = [' class="text"' if t else "" for t in text]
    head = "".join(header_cell(h, c) for h, c in zip(headers, text, strict=True))
    body = []
    for i, row in enumerate(rows):
        extra = attributes(row_attrs[i]) if row_attrs else ""
        cells = "".join(f"<td{c}>{esc(v)}</td>" for v, c in zip(row, cls, strict=True))
        body.append(f"<tr{extra}>{cells}</tr>")
    box = "table-box tall" if tall else "table-box"
    csv_link = download(f"{csv_name or css_class}.csv", csv_text(headers, rows), "text/csv", "CSV")
    return (
        f'<div class="{box}"><table class="{esc(css_class)}"{attributes(attrs)}>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        f'<div class="data-links">This table as {csv_link}</div>'
    )


def csv_text(headers: list[str], rows: list[list[object]]) -> bytes:
    """The table's cells as CSV (UTF-8), exactly as the page shows them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def download(name: str, data: bytes, mime: str, label: str) -> str:
    """A link that saves `data` as `name`: a data URI, so the page stays one file."""
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<a class="data" download="{esc(name)}" href="{uri}">{esc(label)}</a>'


@dataclass(frozen=True)
class Fact:
    """One line of a page's provenance block: a label, its value, and an optional tooltip (the
    full value where the line shows it shortened). `link` is HTML from `download`, shown after."""

    label: str
    value: str
    tooltip: str | None = None
    link: str = ""


def provenance(facts: list[Fact]) -> str:
    """Where a page's numbers come from, as a compact definition list."""
    items = []
    for fact in facts:
        title = f' title="{esc(fact.tooltip)}"' if fact.tooltip else ""
        missing = ' class="missing"' if fact.value.startswith("not recorded") else ""
        link = f" {fact.link}" if fact.link else ""
        items.append(
            f"<dt>{esc(fact.label)}</dt><dd{missing}><span{title}>{esc(fact.value)}</span>{link}</dd>"
        )
    return f'<details class="provenance" open><summary>Provenance</summary><dl>{"".join(items)}</dl></details>'


@dataclass(frozen=True)
class Png:
    """A rendered figure: the file name it gets beside the page, its bytes, and the pixel ratio
    it was drawn at (2 = drawn at twice its CSS size, sharp on high-density screens).

    tips: (x, y, radius, text) in CSS pixels of the image, one hover target per marked point;
    min_font_px: its smallest text at its CSS size (a page test scales it to the shown width)."""

    name: str
    data: bytes
    ratio: int = 1
    tips: tuple[tuple[float, float, float, str], ...] = ()
    min_font_px: float = 0.0

    def __post_init__(self) -> None:
        if self.data[:8] != PNG_MAGIC:
            raise ValueError(f"{self.name} is not a PNG")

    @property
    def size(self) -> tuple[int, int]:
        """CSS (width, height): the PNG's pixel size over `ratio`."""
        width, height = struct.unpack(">II", self.data[16:24])
        return width // self.ratio, height // self.ratio

    def write(self, folder: Path) -> Path:
        path = Path(folder) / self.name
        write_bytes_atomic(path, self.data)  # a full disk leaves no truncated PNG; no link followed
        return path


def image(png: Png, alt: str) -> str:
    """The PNG as a data URI; points with tips get an SVG overlay of <title>d circles, which
    scales with the image, so hovering a point names it at any width."""
    data = base64.b64encode(png.data).decode("ascii")
    width, height = png.size
    img = (
        f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}"'
        f' alt="{esc(alt)}" data-file="{esc(png.name)}" data-min-font-px="{png.min_font_px:.1f}">'
    )
    if not png.tips:
        return img
    circles = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}"><title>{esc(text)}</title></circle>'
        for x, y, r, text in png.tips
    )
    overlay = f'<svg class="tips" viewBox="0 0 {width} {height}" aria-hidden="true">{circles}</svg>'
    return f'<span class="tipped">{img}{overlay}</span>'


def figure(pngs: Png | list[Png], caption: str, wide: bool = False) -> str:
    """Embedded PNGs with one caption (also their alt text). Several PNGs flow as panels that
    wrap onto more rows on narrow screens; wide panels take half a wide screen each."""
    if isinstance(pngs, Png) or len(pngs) == 1:
        png = pngs if isinstance(pngs, Png) else pngs[0]
        return f"<figure>{image(png, caption)}<figcaption>{esc(caption)}</figcaption></figure>"
    panels = "".join(image(p, caption) for p in pngs)
    grid = "panels wide" if wide else "panels"
    return f'<figure><div class="{grid}">{panels}</div><figcaption>{esc(caption)}</figcaption></figure>'


def paragraph(text: str, css_class: str = "") -> str:
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return f"<p{cls}>{esc(text)}</p>"


def warning(text: str, label: str = "Warning") -> str:
    return f'<div class="warning"><strong>{esc(label)}:</strong> {esc(text)}</div>'


def section(title: str, parts: list[str], anchor: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


def related_nav(links: list[tuple[str, str]]) -> str:
    """Links to sibling reports: (relative href, label) pairs; empty when there are none."""
    if not links:
        return ""
    items = " · ".join(f'<a href="{esc(href)}">{esc(label)}</a>' for href, label in links)
    return f'<nav class="related">Related report: {items}</nav>'


def page(
    *,
    title: str,
    subtitle: str,
    headline: str,
    sections: list[str],
    navigation: list[tuple[str, str]],
    generator: str,
    facts: list[Fact] = (),
    footer: str = "",
    warnings: list[tuple[str, str]] = (),
    related: list[tuple[str, str]] = (),
) -> str:
    """The whole document. navigation: (anchor, label) pairs for the contents line; facts: the
    provenance block under the headline; warnings: (label, text) boxes shown under the headline;
    related: (href, label) sibling reports; footer: a closing note, none when empty."""
    nav = " · ".join(f'<a href="#{esc(a)}">{esc(label)}</a>' for a, label in navigation)
    return Template(PAGE).substitute(
        title=esc(title),
        subtitle=esc(subtitle),
        headline=esc(headline),
        warnings="\n".join(warning(text, label) for label, text in warnings),
        nav=nav,
        related=related_nav(list(related)),
        body="\n".join(sections),
        provenance=provenance(list(facts)) if facts else "",
        footer=f"<footer>{esc(footer)}</footer>" if footer else "",
        generator=esc(generator),
    )


def report_text(path: Path) -> str | None:
    """The text of a page written by this module (it carries the related-reports slot), else None.

    Only a regular file is read (`read_regular`): a FIFO or a link in its place is no report."""
    try:
        text = read_regular(path).decode("utf-8")
    except (KeyspaceError, UnicodeDecodeError):
        return None
    return text if RELATED_START in text and RELATED_END in text else None


def relink(path: Path, links: list[tuple[str, str]]) -> bool:
    """Set the related-reports links of an existing report page; False when `path` is no report.

    Only the marked slot changes, so a report written earlier learns of a sibling written later.
    """
    text = report_text(path)
    if text is None:
        return False
    head, rest = text.split(RELATED_START, 1)
    _, tail = rest.split(RELATED_END, 1)
    updated = f"{head}{RELATED_START}{related_nav(links)}{RELATED_END}{tail}"
    if updated != text:
        write_text_atomic(path, updated)
    return True
