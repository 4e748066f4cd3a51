"""What importing wmhqc_lib does to the process: the slow and unused import it skips."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
{first}
import wmhqc_lib
import nbformat, plotly.io
plotly.io.renderers  # what a notebook's first figure loads: nbformat, then jsonschema
nbformat.validate(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]))
print(json.dumps({{"jsonschema": "jsonschema" in sys.modules,
                  "rfc3987_syntax": repr(sys.modules.get("rfc3987_syntax"))}}))
"""


def _probe(first: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_plotly_and_notebook_validation_load_without_the_iri_parser():
    seen = _probe()
    assert seen["jsonschema"] and seen["rfc3987_syntax"] == "None"


def test_a_process_that_loaded_jsonschema_first_keeps_its_iri_checks():
    seen = _probe("import jsonschema")
    assert seen["rfc3987_syntax"].startswith("<module 'rfc3987_syntax'")
