"""The pinned environment: `make install` passes constraints.txt to pip for every extra, the
key packages are pinned exactly, and the pins satisfy pyproject.toml's ranges."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the pins are resolved on 3.11
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
#: The packages the book's numbers depend on most; tensorflow-cpu or tensorflow.
KEY_PACKAGES = ("keras", "numpy", "nilearn", "nibabel", "pandas", "scikit-learn", "scipy")

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _name(name: str) -> str:
    """PEP 503 normal form: pip freeze writes tensorflow_cpu, pyproject tensorflow-cpu."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """Name -> pinned version of every ``name==version`` line; anything else is an error."""
    out = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        assert match, f"constraints.txt:{n}: not an exact pin: {line!r}"
        assert _name(match[1]) not in out, f"constraints.txt:{n}: {match[1]} pinned twice"
        out[_name(match[1])] = match[2]
    return out


def _install_commands(tmp_path: Path, *args: str) -> list[str]:
    """The pip lines `make install` would run into a fresh venv (make -n: nothing runs)."""
    proc = subprocess.run(["make", "-n", "-B", "--no-print-directory", "install",
                           f"VENV={tmp_path / 'venv'}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [ln for ln in proc.stdout.splitlines() if "pip install" in ln and " -e " in ln]


@needs_make
@pytest.mark.parametrize(("args", "extra"), [((), "cpu"), (("GPU=1",), "gpu"),
                                             (("BACKEND=jax",), "jax")])
def test_make_install_passes_the_constraints_file(tmp_path, args, extra):
    lines = _install_commands(tmp_path, *args)
    assert len(lines) == 1, lines
    assert f"'.[{extra},dev]'" in lines[0] and "-c constraints.txt" in lines[0]


@needs_make
def test_new_pins_reinstall_and_unpinned_is_a_choice(tmp_path):
    proc = subprocess.run(["make", "-p", "-n", "--no-print-directory", "install",
                           f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    stamp = f"{tmp_path / 'venv'}/.installed-cpu:"
    rule = next(ln for ln in proc.stdout.splitlines() if ln.startswith(stamp))
    assert "constraints.txt" in rule.split(":", 1)[1].split()
    assert "-c" not in _install_commands(tmp_path, "CONSTRAINTS=")[0].split()


@needs_make
def test_make_lock_resolves_afresh_and_rewrites_the_file():
    proc = subprocess.run(["make", "-n", "--no-print-directory", "lock"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    recipe = proc.stdout
    assert "-m venv" in recipe and "mktemp -d" in recipe  # a throwaway environment
    install = next(ln for ln in recipe.splitlines() if "pip install" in ln and "cpu,dev" in ln)
    assert "-c " not in install  # a fresh resolution, not the old pins
    assert "pip freeze --all --exclude-editable" in recipe and "> constraints.txt.new" in recipe
    assert "mv constraints.txt.new constraints.txt" in recipe


def test_key_packages_are_pinned_exactly():
    pinned = pins()
    missing = [p for p in KEY_PACKAGES if p not in pinned]
    assert not missing, f"constraints.txt pins no {missing}"
    assert "tensorflow-cpu" in pinned or "tensorflow" in pinned
    # the gpu extra's TensorFlow is the release the cpu extra pins
    assert pinned.get("tensorflow") == pinned.get("tensorflow-cpu")
    assert "wmhqc" not in pinned and "pip" not in pinned


def test_pins_satisfy_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins()
    requirements = [*project["dependencies"],
                    *(r for extra in project["optional-dependencies"].values() for r in extra)]
    checked = []
    for text in requirements:
        req = Requirement(text)
        version = pinned.get(_name(req.name))
        if version is not None:
            assert req.specifier.contains(Version(version), prereleases=True), \
                f"constraints.txt pins {req.name}=={version}, pyproject.toml wants {text!r}"
            checked.append(req.name)
    assert len(checked) >= len(project["dependencies"])


def test_readme_names_the_pins_and_how_to_update_them():
    setup = (REPO / "README.md").read_text().split("\n## ", 1)[0]
    assert "constraints.txt" in setup and "make lock" in setup
