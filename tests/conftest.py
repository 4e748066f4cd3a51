"""Shared fixtures: one smoke-profile synthetic cohort per test session (about 10 s)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=UserWarning, module="nilearn")


def _xdist_group(item) -> str:
    return "smoke_run" if "smoke_run" in item.fixturenames else item.nodeid.split("::")[0]


def pytest_itemcollected(item):
    """Work units for pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``): every test
    that reads the shared smoke run (the slowest fixture, built once per worker that needs it)
    in one group, every other module in its own (its module fixtures are built once)."""
    item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))


def pytest_collection_modifyitems(config, items):
    """The smoke group first, so that it starts at once; the rest keep their order."""
    items.sort(key=lambda item: _xdist_group(item) != "smoke_run")


@pytest.fixture(scope="session")
def smoke_profile():
    from wmhqc_lib.config import load_profile

    return load_profile("smoke")


@pytest.fixture(scope="session")
def smoke_cohort(tmp_path_factory, smoke_profile) -> Path:
    """A synthetic cohort written with the smoke profile, shared read-only by the tests."""
    from wmhqc_lib.data import synth

    root = tmp_path_factory.mktemp("smoke_cohort")
    synth.generate_cohort(root, smoke_profile, progress=False)
    return root


@pytest.fixture(scope="session")
def smoke_manifest(smoke_cohort):
    from wmhqc_lib.data import datasets

    return datasets.index_cohort(smoke_cohort).manifest


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for every browser test (see ``tests/browsing.py``)."""
    from browsing import launched_chromium

    with launched_chromium() as chromium:
        yield chromium


@pytest.fixture(scope="session")
def smoke_run(smoke_cohort, tmp_path_factory):
    """``make reproduce`` on the smoke cohort, fold 1 only: every chapter and the built book
    (about two minutes; shared by the pipeline and browser tests)."""
    from wmhqc_lib.study import pipeline

    results = tmp_path_factory.mktemp("results")
    code = pipeline.reproduce("smoke", data_root=smoke_cohort, results_dir=results, folds=[1])
    return code, results


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


# ---------------------------------------------------------------------------------------------
# Triage: the smoke run exported, a small BIDS dataset of smoke scans plus broken and foreign
# inputs, and one triage run over it (shared by test_triage and test_triage_report)


@pytest.fixture(scope="session")
def smoke_bundle(smoke_run, tmp_path_factory):
    code, results = smoke_run
    assert code == 0
    out = tmp_path_factory.mktemp("bundle") / "smoke-bundle"
    from wmhqc_lib.deploy import bundle

    return bundle.export_study(results, out, profile="smoke", folds=[1])


def _copy_scan(row, folder: Path, prefix: str) -> None:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    for key, suffix in (("flair", "FLAIR"), ("t1", "T1w")):
        img = nib.load(row[key])
        nib.save(img, folder / f"{prefix}_{suffix}.nii.gz")


@pytest.fixture(scope="session")
def bids_input(smoke_manifest, tmp_path_factory) -> Path:
    """sub-01 and sub-02 plain, sub-03 with two sessions, and broken or foreign scans."""
    import json

    import nibabel as nib
    import numpy as np

    root = tmp_path_factory.mktemp("bids")
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "triage test", "BIDSVersion": "1.9.0"}))
    rows = [r for _, r in smoke_manifest.iterrows()]
    _copy_scan(rows[0], root / "sub-01" / "anat", "sub-01")
    _copy_scan(rows[1], root / "sub-02" / "anat", "sub-02")
    _copy_scan(rows[2], root / "sub-03" / "ses-A" / "anat", "sub-03_ses-A")
    _copy_scan(rows[3], root / "sub-03" / "ses-B" / "anat", "sub-03_ses-B")
    flair = nib.load(rows[0]["flair"])
    data = np.asarray(flair.dataobj, dtype=np.float32)
    bad = {
        "nan": data.copy(), "empty": np.zeros_like(data), "4d": np.stack([data, data], -1),
        # noise: a brain-sized volume with no anatomy
        "noise": np.random.default_rng(0).gamma(2.0, float(data[data > 0].mean()) / 2,
                                                data.shape).astype(np.float32),
    }
    bad["nan"][tuple(s // 2 for s in data.shape)] = np.nan
    for k, (name, volume) in enumerate(bad.items()):
        label = f"bad{name}"
        _copy_scan(rows[0], root / f"sub-{label}" / "anat", f"sub-{label}")
        nib.save(nib.Nifti1Image(volume, flair.affine),
                 root / f"sub-{label}" / "anat" / f"sub-{label}_FLAIR.nii.gz")
        if name == "noise":  # its T1 is noise too
            nib.save(nib.Nifti1Image(volume[::-1].copy(), flair.affine),
                     root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz")
        assert k < 10
    # a truncated file and a FLAIR with no T1
    _copy_scan(rows[1], root / "sub-badtrunc" / "anat", "sub-badtrunc")
    path = root / "sub-badtrunc" / "anat" / "sub-badtrunc_FLAIR.nii.gz"
    path.write_bytes(path.read_bytes()[:2000])
    _copy_scan(rows[1], root / "sub-badnot1" / "anat", "sub-badnot1")
    (root / "sub-badnot1" / "anat" / "sub-badnot1_T1w.nii.gz").unlink()
    return root


@pytest.fixture(scope="session")
def triaged(smoke_bundle, bids_input, tmp_path_factory):
    """(TriageSummary, output dataset folder) of one triage run over ``bids_input``."""
    from wmhqc_lib.deploy import triage

    out = tmp_path_factory.mktemp("triage") / "derivatives"
    scans = triage.discover_bids(bids_input)
    summary = triage.run_triage(smoke_bundle, scans, out, source=str(bids_input),
                                progress=False, log=lambda _: None)
    return summary, out


