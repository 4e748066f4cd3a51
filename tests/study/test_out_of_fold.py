"""Out-of-fold inputs of the Dice regressors, on a copy of the shared smoke run: the maps of
every training case come from inner networks that never saw it.

One run (the module fixture) and three tests of what it wrote. Three tests, not one, also keep
the pytest-xdist worker that takes this module from taking another one before the run is
done (tests/conftest.py orders the modules that read the smoke run)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from wmhqc_lib.config import load_profile


@pytest.fixture(scope="module")
def oof_run(smoke_run, tmp_path_factory):
    """On a copy of the smoke run, fold 1's Dice regressors trained on out-of-fold inputs,
    with ``compare_inputs`` so that the in-sample ones are trained too."""
    import copy
    import dataclasses
    import shutil

    from wmhqc_lib.study import regression_step

    _, results = smoke_run
    work = tmp_path_factory.mktemp("oof") / "results"
    shutil.copytree(results, work, ignore=shutil.ignore_patterns("book", "notebooks"))
    smoke = load_profile("smoke")
    sections = copy.deepcopy(smoke.sections)
    # no widened variant: six regressors instead of twelve (widening has its own tests)
    sections["dice_regression"].update(inputs="out_of_fold", compare_inputs=True, widen={})
    # one epoch of two-level inner networks (the outer ones are read from the smoke run, not
    # trained again): these tests are about which network made which map, not their quality
    for net in ("mc_unet", "rec_unet"):
        sections[net].update(epochs=1, encoder_filters=[8, 16], heads=2)
    profile = dataclasses.replace(smoke, sections=sections)
    regression_step.train_dice_regressors(profile, work, 1, progress=False)
    return profile, work


def test_inner_folds_split_the_training_cases(oof_run):
    from wmhqc_lib.study import out_of_fold, steps

    profile, work = oof_run
    split = out_of_fold.inner_split(profile, work, 1)
    train = [s for s, sp in steps.fold_subjects(work, 1).items() if sp == "train"]
    assert set(split) == set(train) and set(split.values()) == {1, 2}
    oof = pd.read_csv(work / "fold1" / "oof" / "oof_cases.csv")
    assert sorted(oof["subject_id"]) == sorted(train)
    assert json.loads((work / "fold1" / "oof" / "timing.json").read_text())["seconds"] > 0


def test_each_map_comes_from_networks_that_never_saw_the_case(oof_run):
    """Every training case's maps come from the inner networks of the inner fold that held it
    out (its id is in no inner training run of that fold); the targets are native Dice of
    those maps."""
    from wmhqc_lib.study import out_of_fold

    _, work = oof_run
    oof = pd.read_csv(work / "fold1" / "oof" / "oof_cases.csv")
    for inner in (1, 2):
        paths = out_of_fold.InnerPaths.under(work, 1, inner)
        trained_on = json.loads(json.loads((paths.mc_unet / "state.json").read_text())["key"])
        held = set(oof.loc[oof["inner"] == inner, "subject_id"])
        assert held and not held & set(trained_on["train"])
        assert {p.stem for p in (paths.mc / "maps").glob("*.npz")} == held
        assert {p.stem for p in (paths.rec / "maps").glob("*.npz")} == held
    assert oof["true_dice"].between(0, 1).all()


def test_both_input_sources_reach_the_case_table(oof_run):
    from wmhqc_lib.qc import regression

    _, work = oof_run
    cases = pd.read_csv(work / "fold1" / "cases.csv")
    scored = cases["split"].isin(["val", "test"])
    for kind in regression.INPUT_KINDS:
        for column in (regression.column_name(kind), regression.column_name(kind) + "_in_sample"):
            assert cases.loc[scored, column].notna().all(), column
    side = regression.input_sources_side_by_side(cases, 0.5, main_source="out_of_fold")
    assert set(side["inputs"]) == {"in_sample", "out_of_fold"}
