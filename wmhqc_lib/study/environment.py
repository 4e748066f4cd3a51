"""The software a run used: Python, this library's code version and the packages the book's
numbers depend on, recorded into the results folder and shown on the book's first page.

The pins in ``constraints.txt`` say what ``make install`` should install; this records what a
run actually imported, so that a book made with other versions says so. Versions come from the
installed distributions' metadata, the Keras backend from Keras itself. The bundle
(``deploy``, above ``study``) stamps itself with :func:`code_version` from here.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

#: Rows of the versions table: the label shown and the distributions that provide it, first
#: installed wins (the cpu extra installs tensorflow-cpu, the gpu extra tensorflow).
PACKAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-macos")),
    ("keras", ("keras",)),
    ("jax", ("jax",)),
    ("numpy", ("numpy",)),
    ("scipy", ("scipy",)),
    ("nilearn", ("nilearn",)),
    ("nibabel", ("nibabel",)),
    ("scikit-learn", ("scikit-learn",)),
    ("pandas", ("pandas",)),
    ("plotly", ("plotly",)),
)
NOT_INSTALLED = "not installed"


def code_version() -> str:
    """The package version and, in a git checkout, the commit (``-dirty`` with local edits to
    the library), so that a page names the code that made it."""
    try:
        text = version("wmhqc")
    except PackageNotFoundError:
        text = "unknown"
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True
                                ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no", "--", "wmhqc_lib"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        text += f"+g{commit}" + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def package_version(distributions: tuple[str, ...]) -> str:
    """Version of the first installed of ``distributions``, naming it when it is not the
    first (``2.21.0 (tensorflow-cpu)``); :data:`NOT_INSTALLED` when none is."""
    for i, dist in enumerate(distributions):
        try:
            found = version(dist)
        except PackageNotFoundError:
            continue
        return found if i == 0 else f"{found} ({dist})"
    return NOT_INSTALLED


def keras_backend() -> str:
    """The backend Keras runs on in this process. Asked of Keras when it is imported already;
    otherwise read as Keras reads it (``KERAS_BACKEND``, else ``backend`` in the keras.json of
    ``KERAS_HOME`` or ``~/.keras``, else tensorflow), since importing Keras and TensorFlow
    would cost every fold step's process about 5 s of CPU."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if find_spec("keras") is None:
        return NOT_INSTALLED
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(home), "keras.json")) as fh:
            return str(json.load(fh).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def environment() -> dict[str, str]:
    """This process's versions, in the order the book's table shows them."""
    found = {"Python": platform.python_version(),
             "platform": f"{platform.system()} {platform.machine()}",
             "wmhqc": code_version()}
    for label, dists in PACKAGES:
        found[label] = package_version(dists)
        if label == "keras":
            found["keras backend"] = keras_backend()
    return found


def versions_markdown(records: dict[str, dict[str, str]], shown: str) -> str:
    """A Markdown table of the ``shown`` record; a column more for each other record (a stage
    of the run, by name) whose versions differ from it, with a note saying so."""
    main = records[shown]
    others = {name: rec for name, rec in records.items() if name != shown and rec != main}
    head = ["package", "version", *(f"{name} stage" for name in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in main:
        cells = [main[key], *(rec.get(key, "") for rec in others.values())]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if others:
        table += ("\n\n**Not one environment:** the stages named in the extra columns last ran "
                  "with other versions than the ones that built this book.")
    return table
