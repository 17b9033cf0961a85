"""The one page template of every keyspace report (string.Template placeholders, see html.page).

Kept as a Python constant so it ships with the package without package-data configuration.
Inline CSS only: a report is a single file that renders offline, moved or mailed.
The related-reports slot sits between two marker comments so that a report written later can
add its link to an earlier sibling (html.relink) without re-rendering it.
"""

RELATED_START = "<!-- keyspace:related -->"
RELATED_END = "<!-- /keyspace:related -->"

CSS = """
  :root { --fg: #1d1f21; --muted: #5f6368; --line: #d9dce0; --band: #f5f6f8; --accent: #1f5fa8;
          --warn: #b35c00; --warn-bg: #fff5e6; --key-bg: #eef4fb; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); }
  main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
  h1 { font-size: 1.6em; margin: 0 0 4px; overflow-wrap: anywhere; }
  h2 { font-size: 1.25em; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
  h3 { font-size: 1.05em; margin: 24px 0 6px; }
  .subtitle, .note, figcaption, footer { color: var(--muted); }
  .subtitle { overflow-wrap: anywhere; }
  .note { font-size: 0.92em; margin: 6px 0; max-width: 900px; }
  .headline { font-size: 1.12em; margin: 16px 0 10px; padding: 10px 14px; background: var(--key-bg);
              border-left: 4px solid var(--accent); max-width: 960px; }
  .warning { margin: 8px 0; padding: 8px 14px; background: var(--warn-bg); border-left: 4px solid var(--warn);
             max-width: 960px; }
  .warning strong { color: var(--warn); }
  nav { margin: 12px 0 8px; font-size: 0.92em; }
  nav.related { margin: 4px 0; }
  a { color: var(--accent); text-decoration: none; }
  a:hover { text-decoration: underline; }
  .table-box { max-width: 100%; overflow: auto; margin: 8px 0 16px; }
  .table-box.tall { max-height: 460px; border: 1px solid var(--line); display: inline-block; }
  table { border-collapse: collapse; font-size: 0.9em; font-variant-numeric: tabular-nums; }
  th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: right; white-space: nowrap; }
  th { background: var(--band); position: sticky; top: 0; white-space: normal; vertical-align: bottom; }
  th.long { min-width: 7.5em; }
  .nowrap { white-space: nowrap; }
  tr.group td { border-top: 2px solid #9aa3ad; }
  td.text, th.text { text-align: left; }
  tbody tr:nth-child(even) { background: #fafbfc; }
  tr.ours td { font-weight: 600; }
  tr.baseline td { background: #f0f3f6; }
  figure { margin: 14px 0 22px; }
  figure img { max-width: 100%; height: auto; display: block; }
  .panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 8px 16px; }
  .panels.wide { grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); }
  figcaption { font-size: 0.9em; margin-top: 4px; max-width: 900px; }
  footer { margin-top: 48px; font-size: 0.85em; max-width: 900px; }
  .tipped { position: relative; display: block; width: fit-content; max-width: 100%; }
  svg.tips { position: absolute; inset: 0; width: 100%; height: 100%; }
  svg.tips circle { fill: transparent; pointer-events: all; }
  svg.tips circle:hover { fill: rgba(0, 0, 0, 0.25); }
  .data-links { font-size: 0.85em; margin: -10px 0 16px; color: var(--muted); }
  .provenance { margin: 8px 0 4px; font-size: 0.88em; color: var(--muted); max-width: 960px; }
  .provenance summary { cursor: pointer; color: var(--fg); }
  .provenance dl { display: grid; grid-template-columns: max-content minmax(0, 1fr);
                   gap: 1px 14px; margin: 6px 0 0; }
  .provenance dt { font-weight: 600; }
  .provenance dd { margin: 0; overflow-wrap: anywhere; }
  .provenance dd.missing { font-style: italic; }
  .provenance span[title] { text-decoration: underline dotted; cursor: help; }
  @media print {
    main { max-width: none; padding: 0; }
    .table-box, .table-box.tall { max-height: none; overflow: visible; display: block; border: 0; }
    th { position: static; }
    nav, .data-links, a.data { display: none; }
    figure, tr { break-inside: avoid; }
  }
"""

PAGE = (
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="$generator">
<title>$title</title>
<style>"""
    + CSS
    + """</style>
</head>
<body>
<main>
<h1>$title</h1>
<div class="subtitle">$subtitle</div>
"""
    + RELATED_START
    + "$related"
    + RELATED_END
    + """
<p class="headline">$headline</p>
$warnings
$provenance
<nav>$nav</nav>
$body
$footer
</main>
</body>
</html>
"""
)
