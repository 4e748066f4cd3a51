"""Out-of-fold inputs of the Dice regressors, on a copy of the shared smoke run: the maps of
every training case come from inner networks that never saw it."""

from __future__ import annotations

import json

import pandas as pd

from wmhqc_lib.config import load_profile


def test_out_of_fold_inputs_train_on_maps_from_networks_that_never_saw_the_case(smoke_run,
                                                                                 tmp_path):
    """On a copy of the smoke run: out-of-fold inputs with compare_inputs train both sources.
    Every training case's maps come from the inner networks of the inner fold that held it
    out (its id is in no inner training run of that fold), the out-of-fold targets are native
    Dice of those maps, and both sources' predictions reach the case table."""
    import copy
    import dataclasses
    import shutil

    from wmhqc_lib.qc import regression
    from wmhqc_lib.study import out_of_fold, steps

    _, results = smoke_run
    work = tmp_path / "results"
    shutil.copytree(results, work, ignore=shutil.ignore_patterns("book", "notebooks"))
    smoke = load_profile("smoke")
    sections = copy.deepcopy(smoke.sections)
    # no widened variant: six regressors instead of twelve (widening has its own tests)
    sections["dice_regression"].update(inputs="out_of_fold", compare_inputs=True, widen={})
    # one epoch for the inner networks (the outer ones are read from the smoke run, not
    # trained again): this test is about which network made which map, not their quality
    for net in ("mc_unet", "rec_unet"):
        sections[net].update(epochs=1)
    profile = dataclasses.replace(smoke, sections=sections)
    steps.train_dice_regressors(profile, work, 1, progress=False)

    split = out_of_fold.inner_split(profile, work, 1)
    train = [s for s, sp in steps.fold_subjects(work, 1).items() if sp == "train"]
    assert set(split) == set(train) and set(split.values()) == {1, 2}
    oof = pd.read_csv(work / "fold1" / "oof" / "oof_cases.csv")
    assert sorted(oof["subject_id"]) == sorted(train)
    for inner in (1, 2):
        paths = out_of_fold.InnerPaths.under(work, 1, inner)
        trained_on = json.loads(json.loads((paths.mc_unet / "state.json").read_text())["key"])
        held = set(oof.loc[oof["inner"] == inner, "subject_id"])
        assert held and not held & set(trained_on["train"])
        assert {p.stem for p in (paths.mc / "maps").glob("*.npz")} == held
        assert {p.stem for p in (paths.rec / "maps").glob("*.npz")} == held
    assert oof["true_dice"].between(0, 1).all()
    assert json.loads((work / "fold1" / "oof" / "timing.json").read_text())["seconds"] > 0
    cases = pd.read_csv(work / "fold1" / "cases.csv")
    scored = cases["split"].isin(["val", "test"])
    for kind in regression.INPUT_KINDS:
        for column in (regression.column_name(kind), regression.column_name(kind) + "_in_sample"):
            assert cases.loc[scored, column].notna().all(), column
    side = regression.input_sources_side_by_side(cases, 0.5, main_source="out_of_fold")
    assert set(side["inputs"]) == {"in_sample", "out_of_fold"}
