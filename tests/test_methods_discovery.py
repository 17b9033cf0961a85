"""A new method is one file in keyspace/loki/methods/ plus its test: the package finds the file."""

import subprocess
import sys
from pathlib import Path

import keyspace.loki.methods as methods

PROBE = """
from keyspace.loki.methods.base import Method, Style, register_method
from keyspace.loki.methods.full import full

register_method(
    Method("zz-probe", full, cost=lambda head_dim, d, k: 1.0, decode="dense",
           style=Style("k", "o", "probe"), top_k=False, in_default_grid=False)
)
"""


def test_a_method_file_registers_without_an_import_line(tmp_path):
    # A copy of the package with one more file: the original tree is never written.
    package = Path(methods.__file__).parent
    subprocess.run(["cp", "-r", str(package.parents[1]), str(tmp_path)], check=True)
    (tmp_path / "keyspace/loki/methods/zz_probe.py").write_text(PROBE)
    code = "from keyspace.loki.methods import METHODS; print(','.join(METHODS))"
    names = (
        subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .split(",")
    )
    assert names[-1] == "zz-probe"
    assert names[:-1] == list(methods.METHODS)  # the named files keep their order
