"""QC evaluation: every metric against scikit-learn/scipy or a hand-computed example, the NaN
rules, direction handling, AURC ties, validation-only threshold selection, folds, bootstrap."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import auc, f1_score, roc_auc_score

from wmhqc_lib.qc import evaluation as ev
from wmhqc_lib.qc.evaluation import METRIC_NAMES, evaluate_score

# Hand example, quality threshold 0.75, score higher-is-better, threshold 0.5 (flag s < 0.5):
# TP: A B H; FP: D; FN: C J; TN: E F G I. The library's default quality threshold is lesion
# Dice 0.5, so the tests built on this example pass HAND_QUALITY explicitly.
HAND_QUALITY = 0.75
HAND = pd.DataFrame({
    "subject_id": list("ABCDEFGHIJ"),
    "true_dice": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.85, 0.4, 0.88, 0.72],
    "score": [0.1, 0.3, 0.9, 0.2, 0.8, 0.7, 0.6, 0.4, 0.95, 0.99],
})


def fold_cases(seed: int = 0, n_folds: int = 3, n_test: int = 20, n_val: int = 12,
               n_train: int = 5) -> pd.DataFrame:
    """Per-fold tables like ``results/<profile>/fold<k>/cases.csv``, a score that tracks Dice."""
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(1, n_folds + 1):
        for split, n in (("test", n_test), ("val", n_val), ("train", n_train)):
            d = np.clip(rng.beta(4, 1.6, n), 0, 1)
            for i in range(n):
                rows.append({"fold": fold, "subject_id": f"f{fold}{split}{i}", "split": split,
                             "true_dice": d[i], "dr_error": float(d[i] + rng.normal(0, 0.1)),
                             "mean_entropy_lesion": float(1 - d[i] + rng.normal(0, 0.15)),
                             "pred_lesion_ml": float(rng.lognormal(2, 1))})
    return pd.DataFrame(rows)


def test_confusion_metrics_on_a_hand_example():
    m = evaluate_score(HAND, "score", 0.5, higher_is_better=True, quality_threshold=HAND_QUALITY)
    assert list(m) == list(METRIC_NAMES)
    assert (m["n_cases"], m["n_failed"], m["n_flagged"], m["n_true_positive"]) == (10, 5, 4, 3)
    assert m["precision"] == pytest.approx(3 / 4)  # TP / (TP + FP)
    assert m["recall"] == pytest.approx(3 / 5)  # TP / (TP + FN)
    assert m["paper_precision"] == pytest.approx(4 / 5)  # TN / (TN + FP), the authors' "precision"
    assert m["paper_recall"] == pytest.approx(4 / 6)  # TN / (TN + FN), the authors' "recall"
    assert m["review_fraction"] == pytest.approx(0.4)
    assert m["missed_failure_fraction"] == pytest.approx(2 / 5)
    kept = HAND["true_dice"][HAND["score"] >= 0.5]
    assert m["mean_dice_before"] == pytest.approx(HAND["true_dice"].mean())
    assert m["median_dice_before"] == pytest.approx(HAND["true_dice"].median())
    assert m["mean_dice_after"] == pytest.approx(kept.mean())
    assert m["median_dice_after"] == pytest.approx(kept.median())
    assert math.isnan(m["mae"])  # not a Dice-scale score


def test_default_quality_threshold_is_the_studys_lesion_dice():
    """Every default of the library fails a case below lesion Dice 0.5, as the study does."""
    from wmhqc_lib.config import load_profile, profile_names

    assert ev.QUALITY_THRESHOLD == 0.5
    for name in profile_names():
        assert load_profile(name).section("evaluation")["quality_threshold"] == \
            ev.QUALITY_THRESHOLD, name
    d = HAND["true_dice"]
    assert evaluate_score(HAND, "score", 0.5, higher_is_better=True)["n_failed"] == (d < 0.5).sum()


def test_ranking_metrics_match_scipy_and_sklearn():
    d, s = HAND["true_dice"], HAND["score"]
    m = evaluate_score(HAND, "score", 0.5, higher_is_better=True, dice_scale=True,
                       quality_threshold=HAND_QUALITY)
    r, p = stats.pearsonr(s, d)
    assert m["pearson_r"] == pytest.approx(r) and m["pearson_p"] == pytest.approx(p)
    assert m["spearman_r"] == pytest.approx(stats.spearmanr(s, d).statistic)
    assert m["failure_auroc"] == pytest.approx(roc_auc_score(d < HAND_QUALITY, -s))
    assert m["mae"] == pytest.approx(np.mean(np.abs(s - d)))


def _fd_shifts_aurc(confids: list[float], residuals: list[float]) -> float:
    """A plain transcription of fd-shifts' ``selective_risk_stats`` + linear ``evaluate_auc``
    (IML-DKFZ/fd-shifts, ``fd_shifts/analysis/rc_stats*.py``), loop by loop."""
    n = len(residuals)
    idx = sorted(range(n), key=lambda i: confids[i])  # ascending confidence
    res = [residuals[i] for i in idx]
    conf = [confids[i] for i in idx]
    cov, error_sum = n, sum(res)
    coverages, risks = [1.0], [error_sum / n]
    for i in range(n - 1):
        cov -= 1
        error_sum -= res[i]
        if conf[i] != conf[i + 1]:
            coverages.append(cov / n)
            risks.append(error_sum / cov)
    coverages.append(0.0)
    risks.append(risks[-1])
    area = 0.0
    for j in range(len(coverages) - 1):
        area += (coverages[j] - coverages[j + 1]) * (risks[j] + risks[j + 1]) / 2
    return area


def _fd_shifts_optimal(residuals: list[float]) -> float:
    """fd-shifts' ``aurc_optimal`` for non-binary residuals: sorted risks, distinct scores."""
    n = len(residuals)
    return _fd_shifts_aurc([1 - i / max(n - 1, 1) for i in range(n)], sorted(residuals))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 21, 60])
@pytest.mark.parametrize("kind", ["distinct", "ties", "all tied", "tied risks"])
def test_aurc_matches_a_transcription_of_fd_shifts(seed, n, kind):
    rng = np.random.default_rng([seed, n])
    risk = rng.random(n)
    conf = rng.random(n)
    if kind == "ties":
        conf = rng.integers(0, max(n // 3, 2), n).astype(float)
    elif kind == "all tied":
        conf = np.full(n, 0.4)
    elif kind == "tied risks":
        risk = rng.integers(0, 4, n) / 4
    want = _fd_shifts_aurc(conf.tolist(), risk.tolist())
    optimal = _fd_shifts_optimal(risk.tolist())
    assert ev._aurc(risk, conf) == pytest.approx(want, abs=1e-12)
    assert ev._oracle_aurc(risk) == pytest.approx(optimal, abs=1e-12)
    aurc, eaurc, norm = ev._aurc_family(risk, conf)
    assert eaurc == pytest.approx(want - optimal, abs=1e-12)
    random = float(np.mean(risk))
    if abs(random - optimal) > 1e-9:
        assert norm == pytest.approx((random - want) / (random - optimal), abs=1e-9)
    else:
        assert math.isnan(norm)
    # the batched form used by the bootstrap gives the same, row by row
    batch = ev._aurc(np.vstack([risk, risk[::-1]]), np.vstack([conf, conf[::-1]]))
    assert batch == pytest.approx([want, want], abs=1e-12)


def test_aurc_on_a_hand_example():
    cases = pd.DataFrame({"true_dice": [0.9, 0.5, 0.7], "score": [3.0, 2.0, 1.0]})
    m = evaluate_score(cases, "score", 0.0, higher_is_better=True)
    # risks in confidence order 0.1, 0.5, 0.3: selective risk 0.3 (all kept), 0.3 (two), 0.1
    # (one), 0.1 at coverage 0; trapezoids of width 1/3: 0.1 + 0.2/3 + 0.1/3 = 0.2
    assert m["aurc"] == pytest.approx(0.2)
    # oracle 0.3, 0.2, 0.1, 0.1: 0.25/3 + 0.15/3 + 0.1/3 = 1/6
    assert m["eaurc"] == pytest.approx(0.2 - 1 / 6)
    assert m["norm_aurc"] == pytest.approx((0.3 - 0.2) / (0.3 - 1 / 6))  # random = mean risk
    curve = ev.risk_coverage_curve(cases, "score", higher_is_better=True)
    assert curve["coverage"].tolist() == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert curve["n_kept"].tolist() == [3, 2, 1, 0]
    assert curve["selective_risk"].tolist() == pytest.approx([0.3, 0.3, 0.1, 0.1])
    assert -np.trapezoid(curve["selective_risk"], curve["coverage"]) == pytest.approx(m["aurc"])
    best = ev.risk_coverage_curve(cases, "score", higher_is_better=True, oracle=True)
    assert best["selective_risk"].tolist() == pytest.approx([0.3, 0.2, 0.1, 0.1])
    # a tie: the two most trusted cases leave in one step, so no point at coverage 1/3
    tied = cases.assign(score=[1.0, 1.0, 0.0])
    m = evaluate_score(tied, "score", 0.5, higher_is_better=True)
    curve = ev.risk_coverage_curve(tied, "score", higher_is_better=True)
    assert curve["coverage"].tolist() == pytest.approx([1, 2 / 3, 0])
    assert m["aurc"] == pytest.approx(0.3) and m["norm_aurc"] == pytest.approx(0.0)


def test_eaurc_and_norm_aurc_against_the_oracle_and_random_orders():
    rng = np.random.default_rng(3)
    for n in (2, 5, 21, 80):
        dice = rng.random(n)  # distinct Dice, distinct scores
        oracle = pd.DataFrame({"true_dice": dice, "score": dice})
        m = evaluate_score(oracle, "score", 0.5, higher_is_better=True)
        assert m["eaurc"] == pytest.approx(0.0, abs=1e-12)
        assert m["norm_aurc"] == pytest.approx(1.0)
        worst = evaluate_score(oracle.assign(score=-dice), "score", 0.5, higher_is_better=True)
        assert worst["norm_aurc"] < 0 < worst["eaurc"]
        for _ in range(50):
            m = evaluate_score(oracle.assign(score=rng.random(n)), "score", 0.5,
                               higher_is_better=True)
            assert m["eaurc"] >= -1e-12
    # over every order of six distinct scores the mean normalised AURC is exactly 0:
    # the mean risk is the expected AURC of a random order
    dice = np.array([0.9, 0.2, 0.75, 0.6, 0.95, 0.4])
    norms = [ev._aurc_family(1 - dice, np.array(p, dtype=float))[2]
             for p in itertools.permutations(range(6))]
    assert np.mean(norms) == pytest.approx(0.0, abs=1e-12)
    assert np.std(norms) > 0.1
    # and about 0 for random scores on larger tables
    draws = [ev._aurc_family(1 - rng.random(40), rng.random(40))[2] for _ in range(400)]
    assert abs(np.mean(draws)) < 0.06
    flat = pd.DataFrame({"true_dice": [0.8] * 4, "score": [1.0, 2.0, 3.0, 4.0]})
    assert math.isnan(evaluate_score(flat, "score", 0.5, higher_is_better=True)["norm_aurc"])


def test_ties_can_undercut_the_oracle_as_fd_shifts_warns():
    """A tied step is a straight chord; the oracle's steps follow the curve case by case, so
    a score with ties can come out below the oracle (negative e-AURC)."""
    cases = pd.DataFrame({"true_dice": [0.0, 1.0, 0.0, 0.0, 0.0],
                          "score": [0.0, 1.0, 0.0, 0.0, 0.0]})
    m = evaluate_score(cases, "score", 0.5, higher_is_better=True)
    assert m["aurc"] == pytest.approx(0.8 * 0.8 / 2)
    assert m["eaurc"] < 0


def test_aurc_ignores_row_order_with_ties():
    rng = np.random.default_rng(4)
    dice = rng.random(30)
    cases = pd.DataFrame({"true_dice": dice, "score": np.round(dice + rng.normal(0, .2, 30), 1)})
    want = evaluate_score(cases, "score", 0.5, higher_is_better=True)
    for seed in range(5):
        shuffled = cases.sample(frac=1.0, random_state=seed)
        got = evaluate_score(shuffled, "score", 0.5, higher_is_better=True)
        for name in ("aurc", "eaurc", "norm_aurc"):
            assert got[name] == pytest.approx(want[name], abs=1e-12)


def test_empty_denominators_are_nan_never_zero_or_one():
    none = evaluate_score(HAND, "score", -1.0, higher_is_better=True)  # flags nothing
    assert none["n_flagged"] == 0 and math.isnan(none["precision"])
    assert none["recall"] == 0.0 and none["mean_dice_after"] == none["mean_dice_before"]
    every = evaluate_score(HAND, "score", 2.0, higher_is_better=True)  # flags everything
    assert math.isnan(every["paper_recall"]) and math.isnan(every["mean_dice_after"])
    assert math.isnan(every["median_dice_after"]) and every["review_fraction"] == 1.0
    good = HAND.assign(true_dice=HAND["true_dice"].clip(lower=0.8))  # no failed case
    m = evaluate_score(good, "score", 0.5, higher_is_better=True, quality_threshold=HAND_QUALITY)
    assert math.isnan(m["recall"]) and math.isnan(m["missed_failure_fraction"])
    assert math.isnan(m["failure_auroc"]) and m["precision"] == 0.0
    bad = HAND.assign(true_dice=HAND["true_dice"].clip(upper=0.7))  # only failed cases
    m = evaluate_score(bad, "score", 0.5, higher_is_better=True, quality_threshold=HAND_QUALITY)
    assert math.isnan(m["paper_precision"]) and math.isnan(m["failure_auroc"])
    flat = HAND.assign(score=0.5)
    m = evaluate_score(flat, "score", 0.4, higher_is_better=True)
    assert math.isnan(m["pearson_r"]) and math.isnan(m["spearman_r"])


@pytest.mark.parametrize("threshold", [0.35, 0.5, 0.85])
def test_negated_score_with_flipped_direction_gives_the_same_metrics(threshold):
    up = evaluate_score(HAND, "score", threshold, higher_is_better=True)
    down = evaluate_score(HAND.assign(score=-HAND["score"]), "score", -threshold,
                          higher_is_better=False)
    for name in METRIC_NAMES:
        want = -up[name] if name in ("pearson_r", "spearman_r") else up[name]
        assert down[name] == pytest.approx(want, nan_ok=True), name


def test_registry_direction_is_used_for_known_columns():
    cases = fold_cases()
    cases = cases[cases["split"] == "test"]
    by_name = evaluate_score(cases, "mean_entropy_lesion", 0.3)
    explicit = evaluate_score(cases, "mean_entropy_lesion", 0.3, higher_is_better=False)
    assert by_name == explicit
    assert evaluate_score(cases, ev.qc_score("dr_error"), 0.75)["mae"] > 0
    with pytest.raises(ValueError, match="higher_is_better"):
        evaluate_score(HAND, "score", 0.5)


def test_registry_and_paper_table():
    names = [s.name for s in ev.QC_SCORES]
    assert len(set(names)) == len(names)
    assert {s.name for s in ev.QC_SCORES if s.paper_table1} == set(ev.PAPER_TABLE1)
    assert not ev.qc_score("mean_entropy_lesion").higher_is_better
    assert ev.qc_score("uncertainty_vs").paper_threshold == 1100
    assert all(ev.qc_score(n).dice_scale for n in ("dr_image", "dr_uncertainty", "dr_error"))
    paper = ev.paper_table1()
    assert paper.loc["paper_precision", ("VS uncertainty", "mean")] == 0.929
    assert paper.loc["n_flagged", ("DR error-pred", "median")] == 3.0
    assert set(paper.index) <= set(METRIC_NAMES)


def test_failure_roc_and_workload_curves():
    cases = fold_cases()
    test = ev.scored_rows(cases)
    roc = ev.failure_roc_curve(test, "dr_error")
    m = evaluate_score(test, "dr_error", 0.7)
    assert auc(roc["fpr"], roc["tpr"]) == pytest.approx(m["failure_auroc"])
    work = ev.workload_curve(test, "dr_error")
    assert work["review_fraction"].iloc[0] == 0 and work["review_fraction"].iloc[-1] == 1
    assert work["missed_failure_fraction"].iloc[0] == 1
    assert work["missed_failure_fraction"].iloc[-1] == 0
    assert work["review_fraction"].is_monotonic_increasing
    for _, row in work.iloc[[3, 10, 25]].iterrows():  # each point is an actual threshold
        at = evaluate_score(test, "dr_error", row["threshold"])
        assert at["review_fraction"] == pytest.approx(row["review_fraction"])
        assert at["missed_failure_fraction"] == pytest.approx(row["missed_failure_fraction"])
    curve = ev.risk_coverage_curve(test, "dr_error")
    assert -np.trapezoid(curve["selective_risk"], curve["coverage"]) == pytest.approx(m["aurc"])
    assert curve["coverage"].is_monotonic_decreasing
    best = ev.risk_coverage_curve(test, "dr_error", oracle=True)
    assert -np.trapezoid(best["selective_risk"], best["coverage"]) == \
        pytest.approx(m["aurc"] - m["eaurc"])


def _brute_force_threshold(d: np.ndarray, s: np.ndarray, rule: str,
                           quality: float = 0.75) -> float:
    """Try every candidate; best criterion, then fewest flagged (scikit-learn's F1)."""
    u = np.unique(s)
    cands = [u[0], *((u[:-1] + u[1:]) / 2), np.nextafter(u[-1], np.inf)]
    failed = d < quality
    best = None
    for t in cands:
        flagged = s < t
        tp = np.sum(flagged & failed)
        if rule == "f1":
            value = f1_score(failed, flagged, zero_division=0.0)
        elif rule == "youden":
            value = tp / failed.sum() - np.sum(flagged & ~failed) / (~failed).sum()
        else:
            value = -flagged.sum() if tp >= 0.8 * failed.sum() - 1e-9 else -np.inf
        key = (value, -flagged.sum())
        if best is None or key > best[0]:
            best = (key, t)
    return float(best[1])


@pytest.mark.parametrize("rule", ["f1", "youden", "recall:0.8"])
def test_threshold_selection_matches_brute_force(rule):
    for seed in range(4):
        val = fold_cases(seed=seed, n_folds=1)
        val = val[val["split"] == "val"]
        chosen = ev.select_threshold(val, "dr_error", rule, quality_threshold=0.75)
        want = _brute_force_threshold(val["true_dice"].to_numpy(), val["dr_error"].to_numpy(),
                                      rule, 0.75)
        assert chosen == pytest.approx(want)
        flipped = ev.select_threshold(val.assign(dr_error=-val["dr_error"]), "dr_error", rule,
                                      higher_is_better=False, quality_threshold=0.75)
        assert flipped == pytest.approx(-chosen)


def test_recall_rule_is_the_smallest_burden_reaching_the_recall():
    val = fold_cases(seed=1, n_folds=1)
    val = val[val["split"] == "val"]
    t = ev.select_threshold(val, "dr_error", "recall:0.8")
    at = evaluate_score(val, "dr_error", t)
    assert at["recall"] >= 0.8
    work = ev.workload_curve(val, "dr_error")
    enough = work[1 - work["missed_failure_fraction"] >= 0.8 - 1e-9]
    assert at["n_flagged"] == enough["n_flagged"].min()


def test_one_class_validation_flags_none_or_all():
    val = HAND.assign(true_dice=0.9)
    t = ev.select_threshold(val, "score", "f1", higher_is_better=True)
    assert evaluate_score(val, "score", t, higher_is_better=True)["n_flagged"] == 0
    val = HAND.assign(true_dice=0.1)
    t = ev.select_threshold(val, "score", "youden", higher_is_better=True)
    assert evaluate_score(val, "score", t, higher_is_better=True)["n_flagged"] == len(HAND)


@pytest.mark.parametrize("rule", ["f2", "recall", "recall:", "recall:abc", "recall:0",
                                  "recall:1.5", ""])
def test_bad_rules_are_refused(rule):
    with pytest.raises(ValueError, match="selection rule"):
        ev.parse_rule(rule)


def test_threshold_selection_uses_validation_rows_only():
    cases = fold_cases(seed=2)
    first = ev.evaluate_folds(cases, "dr_error", select="f1")
    changed = cases.copy()
    test = changed["split"] == "test"
    rng = np.random.default_rng(9)
    changed.loc[test, "dr_error"] = rng.random(test.sum())
    changed.loc[test, "true_dice"] = rng.random(test.sum())
    changed.loc[changed["split"] == "train", "dr_error"] = np.nan  # train rows are not used
    second = ev.evaluate_folds(changed, "dr_error", select="f1")
    assert first.thresholds == second.thresholds
    assert first.pooled != second.pooled
    changed.loc[changed["split"] == "val", "dr_error"] += 0.05
    assert ev.evaluate_folds(changed, "dr_error", select="f1").thresholds != first.thresholds


def test_fold_evaluation_and_aggregation():
    cases = fold_cases(seed=3)
    result = ev.evaluate_folds(cases, "dr_error", select="youden")
    assert list(result.per_fold.index) == [1, 2, 3]
    for fold, t in result.thresholds.items():
        rows = cases[(cases["fold"] == fold) & (cases["split"] == "test")]
        want = evaluate_score(rows, "dr_error", t)
        got = result.per_fold.loc[fold, list(METRIC_NAMES)].to_dict()
        assert got == pytest.approx(want, nan_ok=True)
        val = cases[(cases["fold"] == fold) & (cases["split"] == "val")]
        assert t == ev.select_threshold(val, "dr_error", "youden")
    summary = result.across_folds()
    for name in METRIC_NAMES:
        column = result.per_fold[name].astype(float)
        assert summary.loc["mean", name] == pytest.approx(column.mean(), nan_ok=True)
        assert summary.loc["median", name] == pytest.approx(column.median(), nan_ok=True)
    assert result.pooled["n_cases"] == 60 and result.evaluated_rows == "test"
    fixed = ev.evaluate_folds(cases, "dr_error", threshold=0.7)
    assert fixed.pooled == evaluate_score(ev.scored_rows(cases), "dr_error", 0.7)
    table = ev.table1([result, fixed], metrics=["precision", "paper_precision"],
                      labels=["youden", "fixed"])
    assert table.shape == (2, 4)
    assert table.loc["precision", ("fixed", "median")] == summary_of(fixed, "median")
    with pytest.raises(ValueError, match="distinct label"):
        ev.table1([result, fixed])


def summary_of(result: ev.FoldEvaluation, stat: str) -> float:
    return result.across_folds().loc[stat, "precision"]


def test_across_folds_skips_undefined_folds():
    cases = fold_cases(seed=4)
    result = ev.evaluate_folds(cases, "dr_error", threshold=0.0)  # flags nothing anywhere
    summary = result.across_folds()
    assert math.isnan(summary.loc["mean", "precision"])
    assert summary.loc["n_folds_defined", "precision"] == 0
    assert summary.loc["n_folds_defined", "recall"] == 3


def test_tuned_on_test_is_marked_and_at_least_as_good_on_test():
    cases = fold_cases(seed=5)
    honest = ev.evaluate_folds(cases, "dr_error", select="f1")
    leaky = ev.evaluate_folds_tuned_on_test(cases, "dr_error", "f1")
    assert leaky.tuned_on == "test"
    assert "optimistic" in leaky.to_dict()["threshold_selection"]["tuned_on"]

    def f1(row):
        tp, fl, fa = row["n_true_positive"], row["n_flagged"], row["n_failed"]
        return 2 * tp / (fl + fa)

    for fold in honest.thresholds:
        assert f1(leaky.per_fold.loc[fold]) >= f1(honest.per_fold.loc[fold]) - 1e-12


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    test = ev.scored_rows(fold_cases(seed=6, n_test=40))
    a = ev.bootstrap_intervals(test, "dr_error", n_boot=150, seed=1)
    b = ev.bootstrap_intervals(test, "dr_error", n_boot=150, seed=1)
    c = ev.bootstrap_intervals(test, "dr_error", n_boot=150, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert list(a.index) == list(ev.BOOTSTRAP_METRICS)
    assert ((a["low"] <= a["estimate"]) & (a["estimate"] <= a["high"])).all()
    point = evaluate_score(test, "dr_error", 0.7)
    assert a.loc["failure_auroc", "estimate"] == point["failure_auroc"]
    assert a.loc["aurc", "estimate"] == point["aurc"]


def test_baselines_and_quality_threshold_sweep():
    cases = fold_cases(seed=7)
    with_random = ev.add_random_score(cases, seed=3)
    again = ev.add_random_score(cases, seed=3)
    assert with_random[ev.RANDOM_COLUMN].equals(again[ev.RANDOM_COLUMN])
    random = ev.evaluate_folds(with_random, "random_score", select="f1")
    volume = ev.evaluate_folds(cases, "pred_lesion_ml", select="f1")
    assert random.score.baseline and volume.score.baseline
    sweep = ev.quality_threshold_sensitivity(cases, "dr_error", select="f1")
    assert list(sweep.index) == list(ev.QUALITY_SWEEP)
    at = ev.evaluate_folds(cases, "dr_error", select="f1", quality_threshold=0.75).pooled
    assert sweep.loc[0.75].to_dict() == pytest.approx(at, nan_ok=True)
    assert sweep["n_failed"].is_monotonic_increasing


@pytest.mark.parametrize("change, message", [
    (lambda c: c.drop(columns="true_dice"), "missing column"),
    (lambda c: c.astype({"score": object}).assign(score=["x", *c["score"][1:]]),
     "non-numeric value 'x' at row 1 \\(A\\)"),
    (lambda c: c.assign(score=[np.nan, *c["score"][1:]]), "missing \\(NaN\\)"),
    (lambda c: c.assign(true_dice=[1.2, *c["true_dice"][1:]]), "outside \\[0, 1\\]"),
    (lambda c: c.iloc[:0], "empty table"),
    (lambda c: c.iloc[:1], "only one case"),
    (lambda c: c.assign(split="holdout"), "'split' has values"),
])
def test_bad_input_is_a_clear_value_error(change, message):
    cases = change(HAND.copy())
    cases.attrs["source"] = "my_cases.csv"
    with pytest.raises(ValueError, match=message) as info:
        evaluate_score(cases, "score", 0.5, higher_is_better=True)
    assert "my_cases.csv" in str(info.value)


def test_fold_problems_name_the_fold():
    cases = fold_cases(seed=8)
    no_val = cases[~((cases["fold"] == 2) & (cases["split"] == "val"))]
    with pytest.raises(ValueError, match="fold 2 has 0 val"):
        ev.evaluate_folds(no_val, "dr_error", select="f1")
    with pytest.raises(ValueError, match="split"):
        ev.evaluate_folds(cases.drop(columns="split"), "dr_error", select="f1")
    with pytest.raises(ValueError, match="exactly one"):
        ev.evaluate_folds(cases, "dr_error", threshold=0.5, select="f1")


def test_bootstrap_replicates_equal_sklearn_and_scipy():
    """The vectorised per-resample metrics are the library ones (ties and one class too)."""
    rng = np.random.default_rng(0)
    d = rng.random(30)
    s = np.round(d + rng.normal(0, 0.2, 30), 1)  # many ties
    idx = np.vstack([np.arange(30), rng.integers(0, 30, 30), np.zeros(30, dtype=int)])
    got = ev._resampled_metrics(d, s, True, 0.75, idx)
    for row, ix in zip(got, idx, strict=True):
        dd, ss = d[ix], s[ix]
        one_class = (dd < 0.75).all() or (dd >= 0.75).all()
        want_auc = math.nan if one_class else roc_auc_score(dd < 0.75, -ss)
        assert row[0] == pytest.approx(want_auc, nan_ok=True)
        table = pd.DataFrame({"true_dice": dd, "s": ss})
        m = evaluate_score(table, "s", 0.5, higher_is_better=True)
        assert list(ev.BOOTSTRAP_METRICS) == ["failure_auroc", "aurc", "eaurc", "norm_aurc",
                                              "pearson_r"]
        assert row[1:4] == pytest.approx([m["aurc"], m["eaurc"], m["norm_aurc"]], nan_ok=True)
        if np.ptp(ss) > 0:
            assert row[4] == pytest.approx(stats.pearsonr(ss, dd).statistic)
        else:
            assert math.isnan(row[4])


def test_reference_scores_read_the_annotation_and_get_no_threshold():
    names = {s.name for s in ev.REFERENCE_SCORES}
    assert names == {"true_lesion_ml", "roundtrip_dice"}
    assert not names & {s.name for s in ev.QC_SCORES}  # never among the QC scores
    for spec in ev.REFERENCE_SCORES:
        assert spec.reads_annotation and "reads the annotation" in spec.label
        assert spec.higher_is_better  # small lesions, a lossy grid <-> low Dice
        assert ev.qc_score(spec.name) == spec and ev.resolve_score(spec.column) == spec
    cases = fold_cases(seed=8).assign(true_lesion_ml=lambda t: t["pred_lesion_ml"])
    with pytest.raises(ValueError, match="reference line"):
        ev.select_threshold(ev.scored_rows(cases), "true_lesion_ml", "f1")
    with pytest.raises(ValueError, match="reference line"):
        ev.evaluate_folds(cases, "true_lesion_ml", select="youden")
    # threshold-free ranking metrics are fine
    assert np.isfinite(ev.failure_auroc(ev.scored_rows(cases), "true_lesion_ml",
                                        quality_threshold=0.75))


def test_failure_auroc_matches_evaluate_score_and_is_nan_for_one_class():
    test = ev.scored_rows(fold_cases(seed=9))
    for name in ("dr_error", "mean_entropy_lesion"):
        assert ev.failure_auroc(test, name) == evaluate_score(test, name, 0.5)["failure_auroc"]
    assert ev.failure_auroc(HAND, "score", higher_is_better=True,
                            quality_threshold=HAND_QUALITY) == pytest.approx(
        roc_auc_score(HAND["true_dice"] < HAND_QUALITY, -HAND["score"]))
    good = HAND[HAND["true_dice"] >= HAND_QUALITY]
    assert math.isnan(ev.failure_auroc(good, "score", higher_is_better=True,
                                       quality_threshold=HAND_QUALITY))
    assert math.isnan(ev.failure_auroc(HAND.iloc[:1], "score", higher_is_better=True))


def test_paired_delta_of_a_score_against_itself_is_exactly_zero():
    test = ev.scored_rows(fold_cases(seed=10))
    same = ev.paired_bootstrap_delta(test, "dr_error", "dr_error", n_boot=200, seed=4)
    assert list(same.index) == list(ev.DELTA_METRICS)
    assert (same[["delta", "low", "high"]] == 0.0).all().all()
    assert (same["n_valid"] == 200).all()


def test_paired_delta_is_paired_stratified_and_seeded():
    test = ev.scored_rows(fold_cases(seed=11, n_test=15))
    a = ev.paired_bootstrap_delta(test, "dr_error", "pred_lesion_ml", n_boot=300, seed=5)
    pd.testing.assert_frame_equal(
        a, ev.paired_bootstrap_delta(test, "dr_error", "pred_lesion_ml", n_boot=300, seed=5))
    # point estimate: the plain difference of the two scores' metrics on all rows
    mine, base = (evaluate_score(test, s, 0.5) for s in ("dr_error", "pred_lesion_ml"))
    for metric in ev.DELTA_METRICS:
        assert a.loc[metric, "delta"] == pytest.approx(mine[metric] - base[metric])
        assert a.loc[metric, "low"] <= a.loc[metric, "delta"] <= a.loc[metric, "high"]
    # the same resamples for both: swapping the scores mirrors every interval exactly
    b = ev.paired_bootstrap_delta(test, "pred_lesion_ml", "dr_error", n_boot=300, seed=5)
    assert b["delta"].to_numpy() == pytest.approx(-a["delta"].to_numpy())
    assert b["low"].to_numpy() == pytest.approx(-a["high"].to_numpy())
    # stratified by failure: even with two failed cases every resample has an AUROC
    few = test.assign(true_dice=np.where(np.arange(len(test)) < 2, 0.2, 0.95))
    rare = ev.paired_bootstrap_delta(few, "dr_error", "pred_lesion_ml", n_boot=300, seed=5)
    assert rare.loc["failure_auroc", "n_valid"] == 300
    # a score that orders the cases perfectly beats a random-looking volume on both metrics
    perfect = test.assign(dr_error=test["true_dice"])
    win = ev.paired_bootstrap_delta(perfect, "dr_error", "pred_lesion_ml", n_boot=300, seed=5)
    assert win.loc["failure_auroc", "low"] > 0 and win.loc["aurc", "high"] < 0
