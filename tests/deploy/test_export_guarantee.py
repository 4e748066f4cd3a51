"""``wmhqc export --target-recall``: one guaranteed threshold for every fold, the "any" vote,
the card's guarantee and its cost, and a refusal that writes nothing when too few failures
were labelled. On the shared smoke run (fold 1), with a target its rows allow."""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib import cli
from wmhqc_lib.deploy import bundle as bundle_mod
from wmhqc_lib.qc import evaluation as ev
from wmhqc_lib.qc import guarantee as g
from wmhqc_lib.study import report

CONFIDENCE = 0.8


def _validation(results, folds=(1,)):
    cases = report.load_all_cases(results, list(folds))
    return cases, cases[cases["split"] == "val"]


def _feasible_target(n_failures: int, confidence: float) -> float:
    """The highest target (two decimals) that ``n_failures`` labelled failures can carry."""
    target = math.floor((1 - confidence) ** (1 / n_failures) * 100) / 100
    assert g.failures_needed(target, confidence) <= n_failures
    assert g.failures_needed(target + 0.01, confidence) > n_failures
    return target


def _two_fold_study(results: Path, root: Path) -> Path:
    """The smoke run's fold 1 twice, as folds 1 and 2 (the shared run trains fold 1 only):
    enough to export two folds whose pooled validation rows hold twice one fold's failures.
    Fold 2's scores are nudged by a millionth so that no two pooled rows tie, and its
    validation rows take the subject ids of as many of its test rows (and those test rows
    theirs): the pool counts each subject once, so the copy must validate other subjects."""
    study = root / "smoke"
    shutil.copytree(results / "data", study / "data")
    for fold in (1, 2):
        shutil.copytree(results / "fold1", study / f"fold{fold}")
        cases = pd.read_csv(study / f"fold{fold}" / "cases.csv").assign(fold=fold)
        if fold == 2:
            for spec in ev.QC_SCORES:
                if spec.column in cases:
                    cases[spec.column] = cases[spec.column] * (1 + 1e-6) + 1e-9
            val = cases.index[cases["split"] == "val"]
            test = cases.index[cases["split"] == "test"][:len(val)]
            assert len(test) == len(val), "the smoke fold has fewer test than validation rows"
            ids = cases["subject_id"].to_numpy().copy()
            ids[val], ids[test] = cases.loc[test, "subject_id"], cases.loc[val, "subject_id"]
            cases["subject_id"] = ids
        cases.to_csv(study / f"fold{fold}" / "cases.csv", index=False)
    return study


@pytest.fixture(scope="module")
def guaranteed(smoke_run, tmp_path_factory):
    """A two-fold copy of the smoke run exported through the command line with a guarantee
    that its pooled validation failures allow and one fold's do not: (bundle, printed line,
    target, study folder)."""
    code, results = smoke_run
    assert code == 0
    root = tmp_path_factory.mktemp("guarantee")
    study = _two_fold_study(results, root)
    _, val = _validation(study, (1, 2))
    n_failed = int((val["true_dice"] < 0.5).sum())
    assert n_failed >= 2, "the smoke run has no validation failure to guarantee anything on"
    target = _feasible_target(n_failed, CONFIDENCE)
    out = root / "bundle"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli.main(["export", "--results", str(study), "--out", str(out), "--profile",
                       "smoke", "--folds", "1", "2", "--target-recall", str(target),
                       "--confidence", str(CONFIDENCE)])
    assert rc == 0
    return bundle_mod.load_bundle(out), printed.getvalue(), target, study


def test_every_fold_gets_the_pooled_guaranteed_threshold(guaranteed):
    b, printed, target, study = guaranteed
    cases, val = _validation(study, (1, 2))
    q = b.info["quality_threshold"]
    chosen = g.choose_pooled(cases, b.score, target, CONFIDENCE, quality_threshold=q)
    assert chosen.feasible and b.folds == [1, 2]
    assert [b.threshold(f) for f in b.folds] == pytest.approx([chosen.threshold] * 2)
    assert b.combine() == "any" and b.info["combine"] == "any"
    one_fold = g.choose_pooled(cases[cases["fold"] == 1], b.score, target, CONFIDENCE,
                               quality_threshold=q)
    assert not one_fold.feasible  # the target needs the folds pooled
    # the threshold, chosen again here, flags at least the validation failures the guarantee
    # requires: all but the allowed misses
    failed = val["true_dice"].to_numpy() < q
    n = int(failed.sum())
    m = g.allowed_misses(n, target, CONFIDENCE)
    flags = ev.flag_cases(val[b.score.column], b.threshold(b.folds[0]), b.score.higher_is_better)
    assert int((flags & failed).sum()) >= n - m
    info = b.info["guarantee"]
    assert info["allowed_misses"] == m and info["n_failures"] == n
    assert info["n_rows"] == val["subject_id"].nunique() == info["n_validation_rows"]
    assert info["failures_per_fold"] == {"1": n // 2, "2": n // 2}  # JSON keys
    assert info["failures_needed"] == g.failures_needed(target, CONFIDENCE)
    assert info["statement"] == chosen.statement()
    assert "recall guarantee" in printed and "any fold flags" in printed


def test_card_states_the_guarantee_its_assumptions_and_cost(guaranteed):
    b, _, target, study = guaranteed
    card = b.card
    section = card["guarantee"]
    assert section["target_recall"] == target and section["confidence"] == CONFIDENCE
    assert "Angelopoulos" in section["method"] and "Wilks" in section["method"]
    assumptions = " ".join(section["assumptions"])
    for words in ("exchangeable", "ensemble", '"any"', "independent draws", "one per subject",
                  "checkpoints", "not a floor for each fold model"):
        assert words in assumptions
    cases, _ = _validation(study, (1, 2))
    test = cases[cases["split"] == "test"]
    cost = section["cost"]
    flags = ev.flag_cases(test[b.score.column], section["threshold"], b.score.higher_is_better)
    assert cost["review_fraction"]["estimate"] == pytest.approx(flags.mean())
    assert cost["n_cases"] == len(test) and cost["recall"]["lower_bound"] is not None
    assert section["profile_rule_review_fraction"] == card["test_operating_point"][
        "review_fraction"]
    # the card's own operating point stays the profile's rule, a threshold per fold
    q, rule = b.info["quality_threshold"], b.info["threshold_rule"]
    per_fold = ev.evaluate_folds(cases, b.score, select=rule, quality_threshold=q).thresholds
    assert card["test_operating_point"]["thresholds"] == {
        str(k): pytest.approx(v) for k, v in per_fold.items()}
    assert "any fold model flags" in card["flag_rule"]
    text = (b.root / bundle_mod.CARD_MD).read_text()
    for words in ("## Recall guarantee", section["statement"][1:], "It rests on these",
                  "What it costs", "## The profile's rule, for comparison",
                  "Clopper–Pearson lower bound", "any fold model flags"):
        assert words in text, words


def test_too_few_failures_refuses_names_the_counts_and_writes_nothing(smoke_run, tmp_path,
                                                                      capsys):
    _, results = smoke_run
    _, val = _validation(results)
    n = int((val["true_dice"] < 0.5).sum())
    target, confidence = 0.95, 0.95
    needed = g.failures_needed(target, confidence)
    assert needed > n
    out = tmp_path / "bundle"
    with pytest.raises(bundle_mod.BundleError) as err:
        bundle_mod.export_study(results, out, profile="smoke", folds=[1],
                                target_recall=target, confidence=confidence)
    message = str(err.value)
    for words in (f"hold {n} labelled failures", f"fold 1: {n}", f"at least {needed}",
                  "0.95", "nothing exported"):
        assert words in message, words
    assert not out.exists() and not list(tmp_path.iterdir())
    rc = cli.main(["export", "--results", str(results), "--out", str(out), "--profile", "smoke",
                   "--folds", "1", "--target-recall", "0.95", "--confidence", "0.95"])
    assert rc == 2 and f"at least {needed}" in capsys.readouterr().err
    assert not out.exists()


def test_confidence_without_target_is_a_usage_error(smoke_run, tmp_path, capsys):
    _, results = smoke_run
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "--results", str(results), "--out", str(tmp_path / "b"),
                  "--profile", "smoke", "--folds", "1", "--confidence", "0.9"])
    assert exit_.value.code == 2
    assert "--confidence needs --target-recall" in capsys.readouterr().err
    with pytest.raises(bundle_mod.BundleError, match="strictly between 0 and 1"):
        bundle_mod.export_study(results, tmp_path / "b", profile="smoke", folds=[1],
                                target_recall=1.0)
    assert not (tmp_path / "b").exists()


def test_without_a_target_the_export_is_the_profiles_rule(smoke_bundle):
    assert smoke_bundle.combine() == "half" and "guarantee" not in smoke_bundle.info
    assert "guarantee" not in smoke_bundle.card
    assert len({smoke_bundle.threshold(f) for f in smoke_bundle.folds}) == len(
        smoke_bundle.folds) or len(smoke_bundle.folds) == 1
    assert np.isfinite(smoke_bundle.threshold(smoke_bundle.folds[0]))
