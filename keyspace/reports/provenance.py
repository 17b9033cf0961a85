"""Where a page's numbers come from: the calibration run, its corpus, tokens and window, the model
identity (short, the full hash in a tooltip), the keyspace versions, the date and the command line.

A fact a document does not hold is shown as "not recorded", never guessed.
"""

from __future__ import annotations

import re
import shlex
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

from keyspace.reports.html import Fact

MISSING = "not recorded"
HASH = re.compile(r"[0-9a-f]{40,}")


def short_identity(identity: str) -> str:
    """'gguf:b179c9523d0e…' for 'gguf:<64 hex>': a long hash cut to 12 digits."""
    return HASH.sub(lambda m: m.group(0)[:12] + "…", identity)


def identity_fact(identity: str | None) -> Fact:
    if not identity:
        return Fact("Model identity", MISSING)
    shown = short_identity(identity)
    return Fact("Model identity", shown, identity if shown != identity else None)


def renderer_version() -> str:
    try:
        return metadata.version("keyspace")
    except metadata.PackageNotFoundError:  # a source tree without an install
        return MISSING


def command_line(argv: list[str] | None = None) -> str | None:
    """The keyspace command that is running, as a user would type it; None from other programs
    (a test, a notebook), whose command line would say nothing about the page."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else ""
    if program == "keyspace" or argv[0:1] and argv[0].endswith(("keyspace/__main__.py",)):
        return shlex.join(["keyspace", *argv[1:]])
    return None


def rendered_fact(argv: list[str] | None = None) -> list[Fact]:
    """The date and the command line of this rendering, and the keyspace that rendered it."""
    command = command_line(argv)
    return [
        Fact("Page rendered", f"{date.today().isoformat()} by keyspace {renderer_version()}"),
        Fact("Command", command or f"{MISSING} (rendered from Python, not the keyspace CLI)"),
    ]


def value(x: object) -> str:
    return MISSING if x is None or x == "" else str(x)


def corpus(spec: object, split: object) -> str:
    if spec is None:
        return MISSING
    return f"{spec} ({split})" if split and str(split) not in str(spec) else str(spec)


def run_facts(manifest: dict, path: str | Path, label: str = "Run") -> list[Fact]:
    """A run folder's own facts, from its manifest document."""
    data = manifest.get("dataset") or {}
    tokens, window = manifest.get("tokens"), manifest.get("window")
    return [
        Fact(label, str(path)),
        Fact(f"{label} corpus", corpus(data.get("spec"), data.get("split"))),
        Fact(f"{label} tokens", f"{value(tokens)} in windows of {value(window)} tokens"),
        Fact(f"{label} collected by", f"keyspace {value(manifest.get('keyspace_version'))}"),
    ]


def validate_facts(doc: dict, calibration: dict | None) -> list[Fact]:
    """validate.json's provenance; `calibration`: the calibration run's manifest when its folder
    could be read, else None (its corpus and tokens are then not recorded)."""
    run = doc.get("run")
    facts = [Fact("Calibration run", value(run))]
    if calibration is not None:
        facts += run_facts(calibration, run, "Calibration")[1:3]
    else:
        window = doc.get("calibration_window")
        facts += [
            Fact("Calibration corpus", f"{MISSING} (the run folder is not here)"),
            Fact("Calibration window", f"{window} tokens" if window else MISSING),
        ]
    data = doc.get("dataset") or {}
    windows, window = data.get("windows"), data.get("window")
    facts += [
        Fact("Evaluated on", f"{corpus(data.get('spec'), data.get('split'))}, {value(windows)} × {value(window)} tokens"),
        Fact("Model", value((doc.get("model") or {}).get("spec"))),
        identity_fact((doc.get("model") or {}).get("identity")),
        Fact("Device", f"{value(doc.get('device'))}, {value(doc.get('dtype'))}, selection per {value(doc.get('gqa_select'))}"),
        Fact("validate.json written by", f"keyspace {value(doc.get('keyspace_version'))}"),
    ]  # fmt: skip
    return facts + rendered_fact()
