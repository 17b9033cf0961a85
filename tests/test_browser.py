"""Both reports, demo-sized, in headless Chromium at 1366 and 800 px, as a researcher reads them:
no horizontal page overflow, no console error, no text under 10 px (page text, and figure text at
the size the figure is shown), every image loaded, no request leaving the page.

Each page is loaded from a scratch copy with a probe injected at the top of <head>: a Content
Security Policy that blocks any request but data: images (and reports what it blocked), and a
script that measures after load and writes its findings into the DOM, which `--dump-dom` prints.
Skips where no Chromium is installed; on Debian, `apt-get install -y chromium` (what .ci/run does).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on PATH: install it (Debian: `apt-get install -y chromium`) to run the"
    " browser checks of the reports",
)
WIDTHS = (1366, 800)
MIN_TEXT_PX = 10.0
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip

PROBE = """<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:;
 style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<script>
(() => {
  const errors = [], blocked = [];
  const report = console.error.bind(console);
  console.error = (...args) => { errors.push(args.join(" ")); report(...args); };
  addEventListener("error", e => errors.push(String(e.message || e.target.src || e.type)), true);
  addEventListener("securitypolicyviolation", e => blocked.push(e.blockedURI));
  addEventListener("load", () => {
    const small = [];
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
      const node = walker.currentNode, el = node.parentElement;
      if (!node.textContent.trim() || !el) continue;
      const box = el.getBoundingClientRect(), style = getComputedStyle(el);
      if (box.width === 0 || box.height === 0 || style.visibility === "hidden") continue;
      const px = parseFloat(style.fontSize);
      if (px < MIN) small.push([px, el.tagName, node.textContent.trim().slice(0, 50)]);
    }
    const images = [...document.images].map(img => {
      const shown = img.getBoundingClientRect().width, css = +img.getAttribute("width");
      return {file: img.dataset.file, loaded: img.complete && img.naturalWidth > 0,
              font: +(img.dataset.minFontPx || 0) * shown / css};
    });
    const root = document.documentElement;
    document.body.setAttribute("data-probe", JSON.stringify({
      width: innerWidth, overflow: root.scrollWidth - root.clientWidth, small, images, errors,
      blocked, requests: performance.getEntriesByType("resource").map(r => r.name)
        .filter(name => !name.startsWith("data:")),
    }));
  });
})();
</script>"""


def measure(page: Path, width: int, scratch: Path) -> dict:
    """Load `page` (a copy with the probe) at `width` px and return the probe's findings."""
    copy = scratch / f"{page.stem}-{width}.html"
    text = page.read_text(encoding="utf-8")
    probe = PROBE.replace("MIN", str(MIN_TEXT_PX))
    copy.write_text(text.replace("<head>", "<head>\n" + probe, 1), encoding="utf-8")
    done = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={scratch / 'profile'}", f"--window-size={width},900",
         "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, f"the probe wrote nothing; chromium said: {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def problems(findings: dict, width: int) -> list[str]:
    """Every check that failed, as readable lines (empty when the page passes)."""
    lines = []
    if findings["width"] != width:
        lines.append(f"viewport is {findings['width']} px, not {width}")
    if findings["overflow"] > 0:
        lines.append(f"the page scrolls sideways by {findings['overflow']} px")
    lines += [f"console error: {e}" for e in findings["errors"]]
    lines += [f"text of {px:.1f} px in <{tag}>: {text!r}" for px, tag, text in findings["small"]]
    for img in findings["images"]:
        if not img["loaded"]:
            lines.append(f"image {img['file']} did not load")
        if img["font"] < MIN_TEXT_PX:
            lines.append(f"figure {img['file']}: smallest text {img['font']:.1f} px as shown")
    lines += [f"request left the page: {url}" for url in findings["requests"] + findings["blocked"]]
    return lines


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    """The rank report of a demo-shaped run (30 layers × 3 KV heads, head_dim 64) and two validate
    reports: a demo-like document and a GPU result file from results/ (8192 tokens, tasks)."""
    from runfolder_fixtures import synthetic_run
    from test_validate_report import RESULTS, make_doc

    from keyspace.analyze.pca import AnalyzeConfig
    from keyspace.reports.build import build_report
    from keyspace.reports.validate_report import load_validate_doc, write_validate_report

    root = tmp_path_factory.mktemp("browser")
    run = synthetic_run(root / "runs" / "demo", layers=30, heads=3, head_dim=64, tokens=1024)
    report = build_report([run], root / "reports" / "demo", AnalyzeConfig((0.9,)))
    write_validate_report(make_doc(), root / "reports" / "demo" / "validate")
    gpu = load_validate_doc(RESULTS / "tasks-smollm2-h200-8192-cal8192.json")
    write_validate_report(gpu, root / "reports" / "gpu")
    return {
        "rank": report.index,
        "validate": root / "reports" / "demo" / "validate" / "validate.html",
        "validate-gpu": root / "reports" / "gpu" / "validate.html",
    }


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", ["rank", "validate", "validate-gpu"])
def test_page_reads_well_in_chromium(pages, name, width, tmp_path):
    findings = measure(pages[name], width, tmp_path)
    assert findings["images"], "no figure on the page"
    assert problems(findings, width) == []


def test_the_probe_catches_overflow_small_text_and_requests(tmp_path):
    """The checks can fail: a page that is too wide, has 8 px text, an image that does not load
    and a request to the network is caught on every count."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><title>bad</title></head><body>"
        '<div style="width:2000px">wide</div><p style="font-size:8px">tiny</p>'
        '<img src="https://example.org/x.png" width="10" height="10" data-file="x.png">'
        "</body></html>"
    )
    found = problems(measure(bad, 800, tmp_path), 800)
    assert any("sideways by" in line for line in found)
    assert any("text of 8.0 px" in line for line in found)
    assert any("x.png did not load" in line for line in found)
    assert any("example.org" in line for line in found)
