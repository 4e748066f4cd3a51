"""Outer-fold isolation of the shared smoke run (issue 23, item 8): no network of a fold saw
that fold's test cases, and the Dice regressors' predictions do not depend on any test target.

The second part works on a copy of the smoke run: every test target of fold 1 (true Dice and
lesion volume in every table, the cached reference masks, the raw annotation files the manifest
names) is scrambled, the fold's Dice regressors are deleted and trained again, and their
predictions must be exactly those of the shared run. Training is bitwise reproducible under the
seed (checked when this test was written: a retrain of an unscrambled copy, in this process or
another, matched the run's ``dr_cases.csv`` exactly), so any dependence on a test target shows
as a difference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib.data import cohort, datasets
from wmhqc_lib.qc import regression
from wmhqc_lib.study import regression_step, steps

FOLD = 1


def _folds(results: Path) -> list[int]:
    folds = sorted(int(p.name[4:]) for p in results.glob("fold*")
                   if p.is_dir() and p.name[4:].isdigit())
    assert folds, f"{results}: no fold folder"
    return folds


def _split_ids(results: Path, fold: int, split: str) -> set[str]:
    """The fold's subjects of one split, straight from the folds table of the data step."""
    table = pd.read_csv(cohort.CohortPaths.under(results).folds)
    return set(table.loc[(table["fold"] == fold) & (table["split"] == split), "subject_id"])


def _case_id(name: str) -> str:
    """The subject of a training pair: widened pairs are named ``<subject>:<variant>``."""
    return name.split(":")[0]


def _strings(value) -> set[str]:
    """Every string anywhere in a JSON value."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*map(_strings, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_strings, value)) if value else set()
    return set()


def _states(fold_root: Path) -> dict[str, dict]:
    """Training key of every network trained for the fold, by folder (relative to the fold)."""
    return {str(p.parent.relative_to(fold_root)):
            json.loads(json.loads(p.read_text())["key"])
            for p in sorted(fold_root.rglob("state.json"))}


def _regressor_folders(fold_root: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(fold_root))
                  for p in (fold_root / "dr").glob("*/*/state.json"))


def test_no_network_saw_a_test_case_of_its_fold(smoke_run):
    """Every network's ``state.json`` (MC U-net, reconstruction U-net, each Dice regressor, any
    inner network) names the cases it trained and validated on; none of them is a test case of
    its fold, and the two U-nets used exactly the fold's training and validation cases."""
    code, results = smoke_run
    assert code == 0
    for fold in _folds(results):
        root = steps.FoldPaths.under(results, fold).root
        test = _split_ids(results, fold, "test")
        subjects = steps.fold_subjects(results, fold)
        assert test and test.isdisjoint(subjects.keys() - test)
        keys = _states(root)
        expected = {"mc_unet", "rec_unet"} | {f"dr/main/{kind}" for kind in regression.INPUT_KINDS}
        assert expected <= keys.keys(), f"fold {fold}: state.json missing for some network"
        for folder, key in keys.items():
            assert key.get("train"), f"fold {fold} {folder}: no training ids in its key"
            leaked = {_case_id(s) for s in _strings(key)} & test
            assert not leaked, f"fold {fold} {folder}: trained or validated on test {leaked}"
        for net in ("mc_unet", "rec_unet"):
            for split in ("train", "val"):
                assert set(keys[net][split]) == {s for s, sp in subjects.items() if sp == split}
        # widening draws extra training pairs from training cases' ground truth only
        widened = {p.stem for p in root.glob("dr/widened*/*.npz")}
        assert widened <= {s for s, sp in subjects.items() if sp == "train"}


def test_dice_regressors_fit_and_stop_on_training_cases_only(smoke_run):
    """A regressor fits on some training cases and stops (best checkpoint, early stopping) on
    the others: no validation case, which chooses the carried score and the thresholds, and no
    test case is among either."""
    _, results = smoke_run
    for fold in _folds(results):
        root = steps.FoldPaths.under(results, fold).root
        train = _split_ids(results, fold, "train")
        folders = _regressor_folders(root)
        assert len(folders) >= len(regression.INPUT_KINDS)
        keys = _states(root)
        for folder in folders:
            fit, stop = ({_case_id(s) for s in keys[folder][part]} for part in ("train", "val"))
            assert fit and stop and fit.isdisjoint(stop), folder
            assert fit | stop <= train, f"fold {fold} {folder}: fitted or stopped on " \
                                        f"{(fit | stop) - train}, not training cases"


# ---------------------------------------------------------------------------------------------
# Test targets scrambled on a copy, Dice regressors trained again


#: What a case's annotation says, wherever a table keeps it: true Dice of every kind, lesion
#: and ignore volumes, the empty-reference flag, the grid's round-trip Dice, the lesion load.
TARGET_PREFIX = "true_"
TARGET_COLUMNS = ("reference_empty", "lesion_ml", "lesion_ml_grid", "ignore_ml",
                  "roundtrip_dice", "load_pct")


def _is_target(column: str) -> bool:
    return column.startswith(TARGET_PREFIX) or column in TARGET_COLUMNS


def _scramble_value(column: str, value, rng: np.random.Generator):
    if column == "reference_empty":
        return not (str(value).lower() == "true")
    if column.endswith("_ml") or column == "load_pct":
        return float(value) + 1.0 + float(rng.uniform(0.0, 50.0))
    return float((float(value) + 0.25 + rng.uniform(0.0, 0.5)) % 1.0)  # another Dice in [0, 1)


def _scramble_tables(work: Path, fold: int, test: set[str], rng: np.random.Generator) -> int:
    """Every per-case CSV and cached per-case row of the copy: the test cases' rows (of this
    fold, where a table has a fold column) get other targets. Returns how many values changed."""
    changed = 0
    manifest = cohort.CohortPaths.under(work).manifest
    for path in sorted(work.rglob("*.csv")):
        if path == manifest:
            continue  # read with its own dtypes in _scramble_annotations
        table = pd.read_csv(path)
        if "subject_id" not in table:
            continue
        rows = table["subject_id"].isin(test)
        if "fold" in table:
            rows &= table["fold"] == fold
        for column in filter(_is_target, table.columns):
            if table[column].dtype == bool:
                table[column] = table[column].astype(object)
            table.loc[rows, column] = [_scramble_value(column, v, rng)
                                       for v in table.loc[rows, column]]
            changed += int(rows.sum())
        table.to_csv(path, index=False)
    for path in work.rglob("rows/*.json"):
        row = json.loads(path.read_text())
        if row.get("subject_id") in test and row.get("fold", fold) == fold:
            row.update({k: _scramble_value(k, v, rng) for k, v in row.items() if _is_target(k)})
            path.write_text(json.dumps(row))
            changed += 1
    return changed


def _scramble_annotations(work: Path, test: set[str], rng: np.random.Generator) -> None:
    """The test cases' reference masks in the preprocessed cache (profile and native grid) and
    the annotation files the copy's manifest names: random masks of the same shape."""
    import nibabel as nib

    paths = cohort.CohortPaths.under(work)
    for sid in sorted(test):
        folder = paths.cache / sid
        with np.load(folder / "case.npz") as z:
            arrays = dict(z)
        arrays["lesion"] = (rng.random(arrays["lesion"].shape) < 0.05).astype(
            arrays["lesion"].dtype)
        arrays["ignore"] = np.zeros_like(arrays["ignore"])
        np.savez_compressed(folder / "case.npz", **arrays)
        with np.load(folder / "native.npz") as z:
            native = dict(z)
        native["lesion"] = (rng.random(native["lesion"].shape) < 0.05).astype(
            native["lesion"].dtype)
        np.savez_compressed(folder / "native.npz", **native)
    manifest = datasets.read_manifest(paths.manifest)
    out = work / "scrambled_annotations"
    for i in manifest.index[manifest["subject_id"].isin(test)]:
        for column in ("mask", "rater_masks"):
            new = []
            for j, name in enumerate(p for p in manifest.at[i, column].split(";") if p):
                img = nib.load(name)
                target = out / manifest.at[i, "subject_id"] / f"{column}{j}_{Path(name).name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                labels = (rng.random(img.shape) < 0.05).astype(np.uint8)
                nib.save(nib.Nifti1Image(labels, img.affine), target)
                new.append(str(target))
            manifest.at[i, column] = ";".join(new)
        manifest.at[i, "lesion_ml"] = _scramble_value("lesion_ml", manifest.at[i, "lesion_ml"],
                                                      rng)
    datasets.write_manifest(manifest, paths.manifest)


@pytest.fixture(scope="module")
def scrambled_rerun(smoke_run, smoke_profile, tmp_path_factory):
    """(shared run, its copy with fold 1's test targets scrambled and its Dice regressors
    trained again from scratch, the retrain's result, fold 1's test ids)."""
    _, results = smoke_run
    work = tmp_path_factory.mktemp("scrambled") / "results"
    shutil.copytree(results, work, ignore=shutil.ignore_patterns("book", "notebooks"))
    test = _split_ids(results, FOLD, "test")
    rng = np.random.default_rng(23)
    assert _scramble_tables(work, FOLD, test, rng) > 0
    _scramble_annotations(work, test, rng)
    shutil.rmtree(steps.FoldPaths.under(work, FOLD).dr)  # nothing to reuse: all retrain
    result = regression_step.train_dice_regressors(smoke_profile, work, FOLD, progress=False)
    return results, work, result, test


def test_scrambled_test_targets_change_no_dice_prediction(scrambled_rerun):
    """Every Dice regressor trained again (none reused) on the scrambled copy predicts every
    validation and test case exactly as in the shared run."""
    results, work, result, test = scrambled_rerun
    assert result.models and not any(r.skipped or r.resumed for r in result.models.values())
    before = pd.read_csv(steps.FoldPaths.under(results, FOLD).mc / "mc_cases.csv")
    after = pd.read_csv(steps.FoldPaths.under(work, FOLD).mc / "mc_cases.csv")
    rows = before["subject_id"].isin(test)
    assert (before.loc[rows, "true_dice"].to_numpy()
            != after.loc[rows, "true_dice"].to_numpy()).all(), "the scramble changed nothing"

    original = pd.read_csv(steps.FoldPaths.under(results, FOLD).dr / "dr_cases.csv")
    again = pd.read_csv(steps.FoldPaths.under(work, FOLD).dr / "dr_cases.csv")
    columns = [c for c in original if c.startswith("dr_")]
    assert columns and columns == [c for c in again if c.startswith("dr_")]
    assert original["subject_id"].tolist() == again["subject_id"].tolist()
    tested = original["subject_id"].isin(test)
    assert original.loc[tested, columns].notna().all().all()
    pd.testing.assert_frame_equal(again[["subject_id", *columns]],
                                  original[["subject_id", *columns]], check_exact=True)


def test_regressor_keys_and_training_ignore_test_targets(scrambled_rerun):
    """The retrained regressors' cache keys (which decide whether a finished model is reused)
    and their training curves are those of the shared run: no test target enters either."""
    results, work, _, _ = scrambled_rerun
    folders = _regressor_folders(steps.FoldPaths.under(results, FOLD).root)
    assert folders == _regressor_folders(steps.FoldPaths.under(work, FOLD).root)
    for folder in folders:
        old, new = (json.loads((steps.FoldPaths.under(r, FOLD).root / folder / "state.json")
                               .read_text()) for r in (results, work))
        assert new["key"] == old["key"], folder
        assert ([{k: v for k, v in e.items() if k != "seconds"} for e in new["history"]]
                == [{k: v for k, v in e.items() if k != "seconds"} for e in old["history"]])
