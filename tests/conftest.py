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
