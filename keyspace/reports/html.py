"""HTML assembly: escaped fragments (tables, figures, sections) poured into one page template.

Images are embedded as base64 data URIs, so index.html is a single self-contained file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from string import Template

from keyspace.reports.template import PAGE


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def attributes(attrs: dict[str, object] | None) -> str:
    return "".join(f' {esc(k)}="{esc(v)}"' for k, v in (attrs or {}).items())


def table(
    headers: list[str],
    rows: list[list[object]],
    css_class: str,
    attrs: dict[str, object] | None = None,
    row_attrs: list[dict] | None = None,
) -> str:
    """An HTML table; every cell is escaped. row_attrs[i] adds attributes to row i."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        extra = attributes(row_attrs[i]) if row_attrs else ""
        body.append(f"<tr{extra}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    return f'<table class="{esc(css_class)}"{attributes(attrs)}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def figure(png: Path, caption: str) -> str:
    """An embedded PNG with its caption; the caption is also the alt text."""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}" data-file="{esc(Path(png).name)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def paragraph(text: str, css_class: str = "") -> str:
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return f"<p{cls}>{esc(text)}</p>"


def section(title: str, parts: list[str], anchor: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


def wide(content: str) -> str:
    """Scroll sideways inside the page rather than widening it."""
    return f'<div class="wide">{content}</div>'


def scroll_box(content: str) -> str:
    return f'<div class="scroll">{content}</div>'


def page(title: str, subtitle: str, sections: list[str], navigation: list[tuple[str, str]]) -> str:
    """The whole document. navigation: (anchor, label) pairs for the contents line."""
    nav = " · ".join(f'<a href="#{esc(a)}">{esc(label)}</a>' for a, label in navigation)
    return Template(PAGE).substitute(
        title=esc(title), subtitle=esc(subtitle), nav=nav, body="\n".join(sections)
    )
