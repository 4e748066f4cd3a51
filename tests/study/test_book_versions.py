"""The book's first page lists the versions the build ran with (Python, wmhqc, TensorFlow,
Keras and its backend, numpy, nilearn, ...), recorded in the results folder; a stage that ran
with other versions shows up as its own column."""

from __future__ import annotations

import json
import platform
import re
from importlib.metadata import PackageNotFoundError, version

import pytest

from wmhqc_lib.config import load_profile
from wmhqc_lib.study import pipeline
from wmhqc_lib.study.pipeline import StepResult

LISTED = ("tensorflow", "keras", "numpy", "nilearn", "nibabel", "scikit-learn", "pandas",
          "plotly")


def _installed(*dists: str) -> str:
    for dist in dists:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    pytest.skip(f"none of {dists} is installed")


def _rows(page: str) -> dict[str, list[str]]:
    """The versions table of a Markdown page: first cell -> the other cells."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "data").mkdir()
    return pipeline.RunConfig(profile=load_profile("smoke"), data_root=tmp_path / "data",
                              results_dir=tmp_path / "results", progress=False)


def test_first_page_lists_the_versions_of_the_running_interpreter(cfg):
    import keras

    stage = pipeline.stage_book(cfg)
    page = (stage / "book" / "intro.md").read_text()
    assert pipeline.VERSIONS_MARKER not in page  # replaced by the table, in place
    assert page.index("## Versions of this build") < page.index("```{tableofcontents}")
    rows = _rows(page)
    assert rows["Python"] == [platform.python_version()]
    assert rows["wmhqc"][0].startswith(version("wmhqc"))
    assert rows["keras backend"] == [keras.backend.backend()]
    tf = _installed("tensorflow", "tensorflow-cpu")
    assert rows["tensorflow"][0].split(" (")[0] == tf
    for name in LISTED[1:]:
        assert rows[name] == [version(name)], name
    assert len(rows["package"]) == 1  # one environment: one version column
    recorded = json.loads((cfg.results_dir / pipeline.ENVIRONMENT_FILE).read_text())
    assert recorded["book"]["numpy"] == version("numpy")
    assert recorded["book"]["keras backend"] == keras.backend.backend()


def test_a_stage_run_with_other_versions_gets_its_own_column(cfg):
    cfg.results_dir.mkdir(parents=True)
    mine = pipeline.record_environment(cfg, "book")["book"]
    older = {**mine, "numpy": "1.26.4"}
    (cfg.results_dir / pipeline.ENVIRONMENT_FILE).write_text(json.dumps({"folds": older}))
    page = (pipeline.stage_book(cfg) / "book" / "intro.md").read_text()
    rows = _rows(page)
    assert rows["package"] == ["version", "folds stage"]
    assert rows["numpy"] == [version("numpy"), "1.26.4"]
    assert "Not one environment" in page
    assert set(json.loads((cfg.results_dir / pipeline.ENVIRONMENT_FILE).read_text())) == \
        {"folds", "book"}


def test_a_root_page_without_the_marker_gets_the_table_at_its_end(cfg, tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "book").mkdir(parents=True)
    (root / "_config.yml").write_text("title: t\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/start\n")
    (root / "book" / "start.md").write_text("# Start\n\nA page.\n")
    monkeypatch.setattr(pipeline, "REPO_ROOT", root)
    page = (pipeline.stage_book(cfg, steps=()) / "book" / "start.md").read_text()
    assert page.startswith("# Start\n\nA page.\n\n## Versions of this build\n")
    assert _rows(page)["numpy"] == [version("numpy")]
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/missing\n")
    with pytest.raises(RuntimeError, match=r"root 'book/missing' is not a Markdown page"):
        pipeline.stage_book(cfg, steps=())


def test_a_stage_that_ran_a_step_records_its_versions(cfg, monkeypatch):
    monkeypatch.setattr(pipeline, "run_steps", lambda *a, **k: [
        StepResult("02_mc_unet", 1, "ran", 1.0)])
    code = pipeline.reproduce("smoke", data_root=cfg.data_root, results_dir=cfg.results_dir,
                              stage="folds", only=["02_mc_unet"], build=False)
    assert code == 0
    recorded = json.loads((cfg.results_dir / pipeline.ENVIRONMENT_FILE).read_text())
    assert list(recorded) == ["folds"]
    assert recorded["folds"]["plotly"] == version("plotly")
    # a stage whose steps were all skipped ran nothing: it records nothing
    monkeypatch.setattr(pipeline, "run_steps", lambda *a, **k: [
        StepResult("06_evaluation", None, "skipped")])
    (cfg.results_dir / pipeline.ENVIRONMENT_FILE).unlink()
    assert pipeline.reproduce("smoke", data_root=cfg.data_root, results_dir=cfg.results_dir,
                              stage="final", build=False) == 0
    assert not (cfg.results_dir / pipeline.ENVIRONMENT_FILE).exists()


def test_versions_name_the_distribution_that_provides_them():
    from wmhqc_lib.study.environment import NOT_INSTALLED, package_version

    assert package_version(("no-such-dist-wmhqc", "numpy")) == f"{version('numpy')} (numpy)"
    assert package_version(("no-such-dist-wmhqc",)) == NOT_INSTALLED
    assert re.fullmatch(r"\d+\.\d+.*", package_version(("numpy",)))


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["default", "keras.json", "variable"])
def test_the_backend_read_without_importing_keras_is_the_one_keras_takes(tmp_path, setting):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
    env["KERAS_HOME"] = str(tmp_path)  # keras writes its keras.json there, not in ~
    if setting == "keras.json":
        (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    elif setting == "variable":
        env["KERAS_BACKEND"] = "jax"
    probe = ("import sys; from wmhqc_lib.study.environment import keras_backend; "
             "read = keras_backend(); assert 'keras' not in sys.modules; import keras; "
             "print(read, keras.backend.backend())")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    from importlib.util import find_spec

    # wmhqc_lib picks JAX by default where TensorFlow is not installed
    default = "tensorflow" if find_spec("tensorflow") else "jax"
    assert out[0] == out[1] and out[0] == (default if setting == "default" else "jax")
