"""Whole-fold determinism (issue 23, item 8): fold 1's steps 02 to 05 run a second time, from the
shared smoke run's data stage alone, give the very per-case table the shared run wrote.

The second run calls the step functions the notebooks call, in this process, in a fresh results
folder holding a copy of the data stage's output (manifest, preprocessed cache, folds) and no
fold folder, so every network trains again and every map is computed again: nothing is reused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from wmhqc_lib.data import cohort
from wmhqc_lib.study import regression_step, steps

FOLD = 1


@pytest.fixture(scope="module")
def rerun(smoke_run, smoke_profile, tmp_path_factory):
    """(shared run, second run's results folder, {step: whether it reused a finished model})."""
    _, results = smoke_run
    work = tmp_path_factory.mktemp("rerun") / "results"
    work.mkdir()
    shutil.copytree(cohort.CohortPaths.under(results).root, cohort.CohortPaths.under(work).root)
    assert not steps.FoldPaths.under(work, FOLD).root.exists()
    # what notebooks 02 to 05 call, with their default seed (None: the profile's)
    mc = steps.train_mc_unet(smoke_profile, work, FOLD, progress=False)
    steps.run_uncertainty(smoke_profile, work, FOLD, mc.model, progress=False)
    rec = steps.train_rec_unet(smoke_profile, work, FOLD, progress=False)
    steps.run_error_maps(smoke_profile, work, FOLD, rec.model, progress=False)
    dr = regression_step.train_dice_regressors(smoke_profile, work, FOLD, progress=False)
    reused = {"mc_unet": mc.skipped or mc.resumed, "rec_unet": rec.skipped or rec.resumed,
              **{f"dr {name} {kind}": r.skipped or r.resumed
                 for (name, kind), r in dr.models.items()}}
    return results, work, reused


def _timing(column: str) -> bool:
    return column.endswith("_seconds")


def _relative(values: pd.Series, root: Path) -> pd.Series:
    """Absolute paths as paths relative to ``root`` (each must lie under it); others as is."""
    def rel(v):
        if isinstance(v, str) and os.path.isabs(v):
            assert Path(v).resolve().is_relative_to(root.resolve()), f"{v} not under {root}"
            return os.path.relpath(Path(v).resolve(), root.resolve())
        return v
    return values.map(rel)


def test_fold_steps_run_twice_give_the_same_case_table(rerun):
    """``fold1/cases.csv`` of the second run equals the shared run's in every column but the
    timings: true Dice, every score and every predicted Dice bit for bit; paths name the same
    file within each results folder."""
    results, work, reused = rerun
    assert not any(reused.values()), f"reused instead of trained again: {reused}"
    first = steps.read_case_table(results, FOLD)
    second = steps.read_case_table(work, FOLD)
    assert list(second.columns) == list(first.columns)
    assert second["subject_id"].tolist() == first["subject_id"].tolist()
    columns = [c for c in first.columns if not _timing(c)]
    assert {"true_dice", "uncertainty_vs", "error_vs", "dr_image"} <= set(columns)
    for column in columns:
        a, b = _relative(first[column], results), _relative(second[column], work)
        pd.testing.assert_series_equal(b, a, check_exact=True, obj=f"column {column}")


def test_fold_steps_run_twice_give_the_same_native_maps(rerun):
    """The test cases' native-space prediction and entropy maps (what the book and the triage
    bundle show) are voxel for voxel those of the shared run."""
    results, work, _ = rerun
    first = steps.read_case_table(results, FOLD).set_index("subject_id")
    second = steps.read_case_table(work, FOLD).set_index("subject_id")
    native = [c for c in first.columns if c.startswith("native_")]
    assert native
    checked = 0
    for column in native:
        for sid, path in first[column].dropna().items():
            a, b = nib.load(path), nib.load(second.at[sid, column])
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), (sid, column)
            assert np.array_equal(a.affine, b.affine)
            checked += 1
    assert checked >= (first["split"] == "test").sum()
