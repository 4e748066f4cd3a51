"""The evaluation chapter's headline numbers recomputed by an independent path (issue 23, item 8).

From the shared smoke run's ``evaluation/cases_all_folds.csv``, this module recomputes, without
the library's metric code, every number of ``ranking_test_pooled.csv`` (failure AUROC, AURC,
e-AURC, normalised AURC, Pearson and Spearman r on the test rows of all folds) and of
``table1_ours.csv`` (per fold on its test rows, with the threshold chosen on its validation
rows, then mean and median over folds). Only the score registry (column, direction, Dice scale)
and the profile's settings are read from the project; the metrics come from scikit-learn,
SciPy and the few lines below, written from the definitions in the evaluation module's
docstrings:

- a case fails when its true Dice is below the quality threshold; failure AUROC ranks cases
  by badness (minus the score for a higher-is-better score), NaN with one class;
- AURC as fd-shifts: risk = 1 - Dice, a point of the risk-coverage curve after each group of
  tied confidences, the curve closed flat to coverage 0, trapezoid area; e-AURC subtracts the
  oracle's (cases ordered by true risk, one per step); normalised AURC is
  (mean risk - AURC) / (mean risk - oracle AURC);
- the ``f1`` rule: candidate thresholds below the lowest validation score, midway between
  neighbouring distinct scores and just above the highest; the largest F1 (positive = failed)
  wins, ties to the fewest flagged; no failed validation case: flag none, only failed: flag all.

In the smoke run every test case fails at the profile's quality threshold, so failure AUROC is
undefined there (both sides must say NaN) and the validation rows never mix the two classes.
The last test therefore also runs the chapter's ranking and Table 1 at a quality threshold that
splits the test rows, and compares them with the same independent numbers.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from wmhqc_lib.qc import evaluation as ev
from wmhqc_lib.study import report

RTOL, ATOL = 1e-9, 1e-12
#: every score the chapter may rank, by its label: the registry, the reference lines, the site
REGISTRY = {s.label: s for s in (*ev.QC_SCORES, *ev.REFERENCE_SCORES, report.SITE_SCORE)}


@pytest.fixture(scope="module")
def evaluation(smoke_run, smoke_profile):
    """(results folder, all-fold case table, quality threshold, rule) of the shared run."""
    code, results = smoke_run
    assert code == 0
    settings = smoke_profile.section("evaluation")
    cases = pd.read_csv(results / "evaluation" / "cases_all_folds.csv")
    return results, cases, float(settings["quality_threshold"]), str(settings["select"])


# ---------------------------------------------------------------------------------------------
# independent metrics


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.pearsonr(x, y)[0])


def _auroc(dice: np.ndarray, good: np.ndarray, q: float) -> float:
    failed = dice < q
    if failed.all() or not failed.any():
        return math.nan
    return float(roc_auc_score(failed, -good))


def _area(points: list[tuple[float, float]]) -> float:
    """Trapezoid area of (coverage, selective risk) points, closed flat to coverage 0."""
    points = sorted(points)
    coverage = np.array([0.0] + [c for c, _ in points])
    risk = np.array([points[0][1]] + [r for _, r in points])
    return float(np.sum(np.diff(coverage) * (risk[1:] + risk[:-1]) / 2))


def _aurc(risk: np.ndarray, confidence: np.ndarray) -> float:
    """One curve point per distinct confidence: the cases at least that confident."""
    n = len(risk)
    return _area([(np.sum(confidence >= c) / n, float(np.mean(risk[confidence >= c])))
                  for c in np.unique(confidence)])


def _oracle_aurc(risk: np.ndarray) -> float:
    r = np.sort(risk)
    return _area([(k / len(r), float(np.mean(r[:k]))) for k in range(1, len(r) + 1)])


def ranking_metrics(dice: np.ndarray, score: np.ndarray, spec: ev.QCScore,
                    q: float) -> dict[str, float]:
    good = score if spec.higher_is_better else -score
    risk = 1.0 - dice
    aurc, oracle, random = _aurc(risk, good), _oracle_aurc(risk), float(np.mean(risk))
    span = random - oracle
    spearman = _pearson(stats.rankdata(score), stats.rankdata(dice))
    return {"failure_auroc": _auroc(dice, good, q), "aurc": aurc, "eaurc": aurc - oracle,
            "norm_aurc": (random - aurc) / span if abs(span) > 1e-12 else math.nan,
            "pearson_r": _pearson(score, dice), "spearman_r": spearman,
            "spearman_oriented": spearman if spec.higher_is_better else -spearman}


def f1_threshold(dice: np.ndarray, good: np.ndarray, q: float) -> float:
    """A validation-chosen threshold in higher-is-better units: flag ``good < threshold``."""
    u = np.unique(good)
    candidates = [u[0], *((a + b) / 2 for a, b in zip(u[:-1], u[1:], strict=True)),
                  np.nextafter(u[-1], np.inf)]
    failed = dice < q
    if not failed.any():
        return float(candidates[0])
    if failed.all():
        return float(candidates[-1])
    best, pick = -1.0, None
    for t in candidates:  # ascending: more flagged further on, so ">" keeps the fewest
        flagged = good < t
        tp = int(np.sum(flagged & failed))
        f1 = 2 * tp / (2 * tp + int(np.sum(flagged & ~failed)) + int(np.sum(~flagged & failed)))
        if f1 > best:
            best, pick = f1, t
    return float(pick)


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def fold_metrics(test: pd.DataFrame, val: pd.DataFrame, spec: ev.QCScore,
                 q: float) -> dict[str, float]:
    """Table 1's metrics of one fold: threshold from its validation rows, on its test rows."""
    sign = 1.0 if spec.higher_is_better else -1.0
    threshold = f1_threshold(val["true_dice"].to_numpy(float),
                             sign * val[spec.column].to_numpy(float), q)
    dice, score = test["true_dice"].to_numpy(float), test[spec.column].to_numpy(float)
    flagged, failed = sign * score < threshold, dice < q
    tp, fp = int(np.sum(flagged & failed)), int(np.sum(flagged & ~failed))
    fn, tn = int(np.sum(~flagged & failed)), int(np.sum(~flagged & ~failed))
    kept = dice[~flagged]
    out = {"mean_dice_before": float(np.mean(dice)),
           "mean_dice_after": float(np.mean(kept)) if len(kept) else math.nan,
           "median_dice_after": float(np.median(kept)) if len(kept) else math.nan,
           "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
           "paper_precision": _ratio(tn, tn + fp), "paper_recall": _ratio(tn, tn + fn),
           "n_flagged": float(tp + fp), "n_true_positive": float(tp),
           "mae": float(np.mean(np.abs(score - dice))) if spec.dice_scale else math.nan}
    ranking = ranking_metrics(dice, score, spec, q) if len(dice) > 1 else {}
    out |= {m: ranking.get(m, math.nan)
            for m in ("pearson_r", "failure_auroc", "aurc", "eaurc", "norm_aurc")}
    return out


def expected_table1(cases: pd.DataFrame, specs: list[ev.QCScore], q: float) -> pd.DataFrame:
    """Our Table 1: per score, each metric's mean and median over folds (NaN folds left out)."""
    columns = {}
    for spec in specs:
        per_fold = pd.DataFrame([
            fold_metrics(part[part["split"] == "test"], part[part["split"] == "val"], spec, q)
            for _, part in cases.groupby("fold")])
        columns[(spec.label, "mean")] = per_fold.mean()
        columns[(spec.label, "median")] = per_fold.median()
    return pd.DataFrame(columns)


def expected_site_rate(cases: pd.DataFrame, q: float) -> np.ndarray:
    """The site score of each row: on a test row, the share of its fold's validation rows of
    the same site that failed (of all its fold's validation rows for a site without one);
    NaN on every other row."""
    expected = []
    for _, row in cases.iterrows():
        val = cases[(cases["fold"] == row["fold"]) & (cases["split"] == "val")]
        same = val[val["site"] == row["site"]]
        rate = float(np.mean((same if len(same) else val)["true_dice"] < q))
        expected.append(rate if row["split"] == "test" else np.nan)
    return np.array(expected)


def expected_ranking(cases: pd.DataFrame, specs: list[ev.QCScore], q: float) -> pd.DataFrame:
    test = cases[cases["split"] == "test"]
    return pd.DataFrame({spec.label: ranking_metrics(test["true_dice"].to_numpy(float),
                                                     test[spec.column].to_numpy(float), spec, q)
                         for spec in specs}).T


def assert_same(got: pd.DataFrame, want: pd.DataFrame, what: str) -> None:
    """Every cell of ``want`` in ``got`` (same rows and columns), equal within RTOL/ATOL, NaN
    where ``want`` is NaN; all mismatches named at once."""
    assert list(got.index) == list(want.index), f"{what}: rows differ"
    bad = []
    for column in want.columns:
        a = got[column].to_numpy(float)
        b = want[column].to_numpy(float)
        for row, x, y in zip(want.index, a, b, strict=True):
            if not (np.isnan(x) and np.isnan(y)) and not np.isclose(x, y, rtol=RTOL, atol=ATOL):
                bad.append(f"{row} / {column}: file {x!r}, recomputed {y!r}")
    assert not bad, f"{what}: {len(bad)} cell(s) differ:\n" + "\n".join(bad)


def _ranked_specs(cases: pd.DataFrame) -> list[ev.QCScore]:
    """The scores the chapter ranks: every registered score filled on all validation and test
    rows (the baselines among them), then the reference lines and the site score present."""
    scored = cases[cases["split"].isin(["val", "test"])]
    test = cases[cases["split"] == "test"]
    found = [s for s in ev.QC_SCORES if s.column in cases and scored[s.column].notna().all()]
    return found + [s for s in (report.SITE_SCORE, *ev.REFERENCE_SCORES)
                    if s.column in cases and test[s.column].notna().all()]


# ---------------------------------------------------------------------------------------------
# tests


def test_evaluation_cases_are_the_fold_tables(evaluation):
    """The table every headline number is computed from is the folds' case tables stacked, with
    the site score made from validation rows only and the grid's round-trip Dice joined."""
    results, cases, q, _ = evaluation
    folds = sorted(int(p.name[4:]) for p in results.glob("fold*") if p.name[4:].isdigit())
    stacked = pd.concat([pd.read_csv(results / f"fold{k}" / "cases.csv") for k in folds],
                        ignore_index=True)
    assert len(cases) == len(stacked) and set(cases["fold"]) == set(folds)
    assert cases["subject_id"].tolist() == stacked["subject_id"].tolist()
    for column in stacked.columns:
        values = stacked[column]
        if values.map(lambda v: isinstance(v, str) and os.path.isabs(v)).any():
            values = values.map(lambda v: os.path.relpath(v, results.resolve())
                                if isinstance(v, str) else v)
        pd.testing.assert_series_equal(cases[column], values, check_exact=True,
                                       check_dtype=False, obj=f"column {column}")
    np.testing.assert_array_equal(cases[report.SITE_SCORE.column].to_numpy(float),
                                  expected_site_rate(cases, q))
    prep = pd.read_csv(results / "data" / "preprocess.csv").set_index("subject_id")
    np.testing.assert_array_equal(cases["roundtrip_dice"].to_numpy(float),
                                  prep.loc[cases["subject_id"], "roundtrip_dice"].to_numpy(float))


def test_ranking_recomputed_independently(evaluation):
    """Every score of ``ranking_test_pooled.csv`` (and no other) with its failure AUROC, AURC,
    e-AURC, normalised AURC, Pearson and Spearman r as recomputed on the pooled test rows."""
    results, cases, q, _ = evaluation
    ranking = pd.read_csv(results / "evaluation" / "ranking_test_pooled.csv", index_col="score")
    specs = _ranked_specs(cases)
    assert {"VS uncertainty", "DR image-pred"} <= {s.label for s in specs}
    assert list(ranking.index) == [s.label for s in specs]
    assert all(REGISTRY[label].column in cases for label in ranking.index)
    want = expected_ranking(cases, specs, q)
    assert want[["aurc", "pearson_r"]].notna().any().all()
    assert_same(ranking[list(want.columns)], want, "ranking_test_pooled.csv")


def test_table1_recomputed_independently(evaluation):
    """Every cell of ``table1_ours.csv``: each fold's threshold chosen by the F1 rule on its
    validation rows, its test rows flagged, counted and scored, then mean and median over
    folds."""
    results, cases, q, select = evaluation
    assert select == "f1", "the independent threshold choice here is the f1 rule's"
    table = pd.read_csv(results / "evaluation" / "table1_ours.csv", header=[0, 1], index_col=0)
    specs = [s for s in _ranked_specs(cases) if s in ev.QC_SCORES]
    assert [label for label, _ in table.columns[::2]] == [s.label for s in specs], \
        "Table 1's scores or their labels differ"
    want = expected_table1(cases, specs, q).loc[list(table.index)]
    assert {"n_flagged", "precision", "mae", "pearson_r", "aurc"} <= set(table.index)
    assert want.loc["n_flagged"].notna().all()
    assert_same(table[list(want.columns)], want, "table1_ours.csv")


def _more_folds(cases: pd.DataFrame, q: float) -> pd.DataFrame:
    """The run's table and three more folds made from its first, so that the folds' metrics
    differ (a mean over four folds is not their median) and the threshold rule meets a tie:

    - its test rows' true Dice rotated by one place;
    - its validation and test rows' roles swapped;
    - its test rows twice, once as validation rows whose Dice (below ``q`` for the 1st and 4th
      lowest VS uncertainty, above for the others) makes F1 tie between flagging one and four
      of them: the rule must take the one that flags the fewest.
    """
    first = cases[cases["fold"] == cases["fold"].min()]
    test = (first["split"] == "test").to_numpy()
    top = cases["fold"].max()
    rotated = first.assign(fold=top + 1)
    rotated.loc[test, "true_dice"] = np.roll(first.loc[test, "true_dice"].to_numpy(), 1)
    swapped = first.assign(fold=top + 2,
                           split=first["split"].replace({"val": "test", "test": "val"}))
    tied = first[test].assign(fold=top + 3, split="val")
    assert len(tied) >= 4 and tied["uncertainty_vs"].is_unique
    ascending = np.argsort(tied["uncertainty_vs"].to_numpy())
    failed = np.zeros(len(tied), dtype=bool)
    failed[ascending[[0, 3]]] = True
    tied["true_dice"] = np.where(failed, q / 2, (1 + q) / 2)
    return pd.concat([cases, rotated, swapped, tied, first[test].assign(fold=top + 3)],
                     ignore_index=True)


def test_chapter_metrics_where_both_classes_exist(evaluation):
    """The chapter's own site score, ranking and Table 1 (report.reference_lines,
    report.ranking_table, report.compare, evaluation.table1) at a quality threshold that splits
    the run's test rows in two (failure AUROC defined, validation rows of both classes), on the
    run's table with more folds derived from its first (:func:`_more_folds`): the same numbers
    as the independent path."""
    _, cases, _, select = evaluation
    test = np.unique(cases.loc[cases["split"] == "test", "true_dice"].to_numpy(float))
    middle = len(test) // 2
    q = float((test[middle - 1] + test[middle]) / 2)
    assert 0 < q <= 1 and test[middle - 1] < q < test[middle]
    cases, _ = report.reference_lines(_more_folds(cases, q).drop(
        columns=report.SITE_SCORE.column), quality_threshold=q)
    np.testing.assert_array_equal(cases[report.SITE_SCORE.column].to_numpy(float),
                                  expected_site_rate(cases, q))
    specs = _ranked_specs(cases)
    ranking = report.ranking_table(cases, specs, n_boot=20, quality_threshold=q)
    want = expected_ranking(cases, specs, q)
    assert want["failure_auroc"].notna().all()
    assert_same(ranking[list(want.columns)], want, f"ranking at quality threshold {q}")

    qc = [s for s in specs if s in ev.QC_SCORES]
    table = ev.table1(list(report.compare(cases, qc, select=select, quality_threshold=q)
                           .values()))
    assert [label for label, _ in table.columns[::2]] == [s.label for s in qc]
    want = expected_table1(cases, qc, q).loc[list(table.index)]
    assert (want.xs("mean", axis=1, level=1) != want.xs("median", axis=1, level=1)).any().any()
    assert_same(table[list(want.columns)], want, f"Table 1 at quality threshold {q}")
