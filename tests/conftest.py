"""Shared fixtures: one smoke-profile synthetic cohort per test session (about 10 s)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=UserWarning, module="nilearn")


@pytest.fixture(scope="session")
def smoke_profile():
    from wmhqc_lib.config import load_profile

    return load_profile("smoke")


@pytest.fixture(scope="session")
def smoke_cohort(tmp_path_factory, smoke_profile) -> Path:
    """A synthetic cohort written with the smoke profile, shared read-only by the tests."""
    from wmhqc_lib import synth

    root = tmp_path_factory.mktemp("smoke_cohort")
    synth.generate_cohort(root, smoke_profile, progress=False)
    return root


@pytest.fixture(scope="session")
def smoke_manifest(smoke_cohort):
    from wmhqc_lib import datasets

    return datasets.index_cohort(smoke_cohort).manifest


@pytest.fixture(scope="session")
def smoke_run(smoke_cohort, tmp_path_factory):
    """``make reproduce`` on the smoke cohort, fold 1 only: every chapter and the built book
    (about two minutes; shared by the pipeline and browser tests)."""
    from wmhqc_lib import pipeline

    results = tmp_path_factory.mktemp("results")
    code = pipeline.reproduce("smoke", data_root=smoke_cohort, results_dir=results, folds=[1])
    return code, results


def run_on_jax(script: str) -> str:
    """Run ``script`` in a fresh interpreter with the JAX backend (Keras picks its backend at
    import, so it cannot switch inside this process); returns stdout, fails with stderr."""
    import subprocess
    import sys

    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def write_test_notebook(path, body: str) -> None:
    """A two-cell notebook (a tagged ``parameters`` cell, then ``body``) for pipeline tests that
    must not run the real chapters."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile_name = "smoke"\ndata_root = ""\n'
                                       'results_dir = ""\nseed = None\nfold = 0')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)
