"""Shared fixtures: one smoke-profile synthetic cohort and one smoke run per test session,
built by whichever pytest-xdist worker asks first and read by every worker."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # the cores shared out among the workers (and the notebook kernels they start), as
    # `make reproduce` shares them among folds: oversubscribed threads only slow each other
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)
warnings.filterwarnings("ignore", category=UserWarning, module="nilearn")

# Scheduling for ``make test`` (``-n 2 --dist loadgroup --no-loadscope-reorder``): each module
# is one work unit, so its module fixtures are built once. The module that builds the shared
# smoke run goes first, to one worker; the modules that need nothing from it follow, so the
# other worker runs them meanwhile; the modules that read the smoke run come last, when it is
# there, and both workers share them.
SMOKE_BUILDER = "tests/study/test_pipeline.py"
# modules whose session fixtures (the exported bundle, the triage run) are worth building once
GROUPS = {"tests/deploy/test_triage.py": "triage", "tests/deploy/test_triage_report.py": "triage",
          "tests/deploy/test_calibrate.py": "triage",
          # one SLURM test cluster per session (tests/slurm_cluster.py): both on one worker
          "tests/study/test_slurm_cluster.py": "slurm",
          "tests/deploy/test_triage_slurm.py": "slurm"}
#: modules that submit jobs to the SLURM test cluster: scheduled with the smoke run's readers
SLURM_MODULES = ("tests/study/test_slurm_cluster.py", "tests/deploy/test_triage_slurm.py")
SMOKE_READERS = ("smoke_run", "smoke_bundle", "triaged")
# The order of the modules that read the smoke run, for the two workers to end together. A
# worker takes another module once at most two of its tests are left, so the one that finishes
# the smoke run takes the triage group and then the browser test, while the other, when it is
# through the modules that need no smoke run, takes the out-of-fold run (three tests on one
# fixture: it takes nothing more until the run is over). Measured: 36, 30 and 48 s.
READERS_FIRST = (*SLURM_MODULES, "tests/deploy/test_triage.py",
                 "tests/deploy/test_triage_report.py", "tests/deploy/test_calibrate.py",
                 "tests/study/test_out_of_fold.py")


def _module(item) -> str:
    return item.nodeid.split("::")[0]


def pytest_itemcollected(item):
    module = _module(item)
    item.add_marker(pytest.mark.xdist_group(GROUPS.get(module, module)))


def pytest_collection_modifyitems(config, items):
    """The smoke builder first, then modules that do not read the smoke run, then those that
    do (in ``READERS_FIRST`` order); tests keep their order within a module."""
    readers = {_module(i) for i in items if set(SMOKE_READERS) & set(i.fixturenames)}
    readers |= set(SLURM_MODULES)

    def rank(item) -> tuple[int, int]:
        module = _module(item)
        if module == SMOKE_BUILDER:
            return 0, 0
        if module in readers:
            return 2, READERS_FIRST.index(module) if module in READERS_FIRST else 9
        return 1, 0

    items.sort(key=rank)


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    """A folder every worker of this test session sees (each xdist worker's base temp folder
    lies in the session's one). ``WMHQC_TEST_SHARED=DIR`` keeps it between sessions while
    developing; what was built there is reused even when the code changed since."""
    kept = os.environ.get("WMHQC_TEST_SHARED")
    if kept:  # a developer's folder kept between sessions: the smoke run is built only once
        Path(kept).mkdir(parents=True, exist_ok=True)
        return Path(kept)
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(shared: Path, name: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """``build(folder)`` run by the first worker that asks, under a file lock; the others wait
    for it and get the same folder and the JSON-able dict it returned. Readers must not write
    into the folder."""
    folder = shared / name
    done = folder / ".built.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                done.write_text(json.dumps(build(folder)))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def smoke_profile():
    from wmhqc_lib.config import load_profile

    return load_profile("smoke")


@pytest.fixture(scope="session")
def smoke_cohort(shared_tmp, smoke_profile) -> Path:
    """A synthetic cohort written with the smoke profile, shared read-only by the tests."""
    from wmhqc_lib.data import synth

    def generate(root: Path) -> dict:
        synth.generate_cohort(root, smoke_profile, progress=False)
        return {}

    return built_once(shared_tmp, "smoke_cohort", generate)[0]


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
def smoke_run(smoke_cohort, shared_tmp) -> tuple[int, Path]:
    """(exit code, results folder) of ``make reproduce`` on the smoke cohort, fold 1 only:
    every chapter and the built book (about three minutes; read-only for the tests)."""
    from wmhqc_lib.study import pipeline

    def reproduce(results: Path) -> dict:
        return {"code": pipeline.reproduce("smoke", data_root=smoke_cohort, results_dir=results,
                                           folds=[1])}

    results, info = built_once(shared_tmp, "smoke_results", reproduce)
    return info["code"], results


def sbatch_lines(text: str) -> list[str]:
    """The ``#SBATCH`` options of a job script."""
    return [line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")]


def wmhqc_command(text: str) -> list[str]:
    """The one ``wmhqc ...`` line of a job script, split as the shell would."""
    lines = [line for line in text.splitlines() if line.startswith("wmhqc ")]
    assert len(lines) == 1, text
    return shlex.split(lines[0])


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
def smoke_bundle(smoke_run):
    """The bundle that the smoke run's triage chapter exported (fold 1)."""
    code, results = smoke_run
    assert code == 0
    from wmhqc_lib.deploy import bundle

    return bundle.load_bundle(results / "triage" / "bundle")


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
    """(TriageSummary, output dataset folder) of one triage run over ``bids_input``, with two
    worker processes preprocessing the scans and drawing the report pages (the reports test
    redraws them in one process and compares the bytes)."""
    from wmhqc_lib.deploy import triage

    out = tmp_path_factory.mktemp("triage") / "derivatives"
    scans = triage.discover_bids(bids_input)
    summary = triage.run_triage(smoke_bundle, scans, out, source=str(bids_input), nprocs=2,
                                progress=False, log=lambda _: None)
    return summary, out


