"""The recall guarantee: its counts, its threshold's direction, and its coverage by
simulation from a known population."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from wmhqc_lib.qc import guarantee as g
from wmhqc_lib.qc.evaluation import flag_cases


def test_failures_needed_is_the_smallest_n_with_a_guarantee():
    for target, conf in [(0.9, 0.9), (0.8, 0.95), (0.95, 0.9), (0.5, 0.5)]:
        n = g.failures_needed(target, conf)
        assert target ** n <= 1 - conf < target ** (n - 1)
        assert g.allowed_misses(n, target, conf) == 0
        assert g.allowed_misses(n - 1, target, conf) is None
    assert g.failures_needed(0.9, 0.9) == 22  # 0.9**22 = 0.098, 0.9**21 = 0.109


def test_allowed_misses_grows_with_failures_and_shrinks_with_confidence():
    assert g.allowed_misses(100, 0.9, 0.9) > g.allowed_misses(50, 0.9, 0.9)
    assert g.allowed_misses(100, 0.9, 0.99) < g.allowed_misses(100, 0.9, 0.9)
    assert g.allowed_misses(0, 0.9, 0.9) is None


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_threshold_flags_all_but_the_allowed_misses(higher_is_better):
    rng = np.random.default_rng(0)
    failed = np.r_[np.ones(60, bool), np.zeros(140, bool)]
    good = np.r_[rng.normal(0.3, 0.1, 60), rng.normal(0.7, 0.1, 140)]
    scores = good if higher_is_better else -good
    res = g.guaranteed_threshold(scores, failed, 0.9, 0.9, higher_is_better)
    flags = flag_cases(scores, res.threshold, higher_is_better)
    assert res.feasible and res.allowed_misses == g.allowed_misses(60, 0.9, 0.9)
    assert int((failed & ~flags).sum()) == res.allowed_misses
    assert res.review_fraction == pytest.approx(flags.mean())


def test_too_few_failures_gives_no_threshold_and_says_how_many_are_needed():
    res = g.guaranteed_threshold(np.linspace(0, 1, 30), np.arange(30) < 5, 0.9, 0.9)
    assert not res.feasible and res.threshold is None and res.n_failures == 5
    assert "22" in res.statement() and "5" in res.statement()


def test_the_cut_lies_above_the_last_failure_it_must_flag():
    """Halfway between two adjacent floats rounds back onto the lower one, which would leave
    that failure unflagged; with no row above the last failure the cut is just above it."""
    upper = np.nextafter(1.0, 2.0)
    scores = np.r_[np.full(30, 0.1), 1.0, upper]
    failed = np.r_[np.ones(31, bool), False]
    res = g.guaranteed_threshold(scores, failed, 0.9, 0.9)
    assert res.allowed_misses == 0
    flags = flag_cases(scores, res.threshold)
    assert flags[:31].all() and not flags[31]
    alone = g.guaranteed_threshold(np.r_[np.full(30, 0.1), 1.0], np.ones(31, bool), 0.9, 0.9)
    assert alone.threshold == np.nextafter(1.0, np.inf)
    assert flag_cases(np.array([1.0, 1.0 + 1e-9]), alone.threshold).tolist() == [True, False]


def test_ties_are_flagged_together():
    scores = np.array([0.2, 0.2, 0.2, 0.5, 0.5, 0.9])
    failed = np.array([True, True, True, False, False, False])
    res = g.guaranteed_threshold(scores, failed, 0.5, 0.8)
    assert flag_cases(scores, res.threshold)[:3].all()


def test_coverage_holds_in_simulation():
    """Draw calibration sets from a known population: the population recall of the chosen
    threshold reaches the target in at least the promised share of draws (within Monte Carlo
    error), and not trivially (the share stays below 1)."""
    rng = np.random.default_rng(1)
    target, conf, n_fail, draws = 0.85, 0.8, 40, 2000
    met = 0
    for _ in range(draws):
        fails = rng.normal(0.0, 1.0, n_fail)  # failures' scores, higher = better
        res = g.guaranteed_threshold(fails, np.ones(n_fail, bool), target, conf)
        recall = 0.5 * (1 + math.erf(res.threshold / math.sqrt(2)))  # P(N(0,1) < t)
        met += recall >= target
    share = met / draws
    assert conf - 3 * math.sqrt(conf * (1 - conf) / draws) <= share < 0.99


def test_lower_bound_is_clopper_pearson():
    assert g.recall_lower_bound(10, 10, 0.9) == pytest.approx(0.1 ** 0.1)
    assert g.recall_lower_bound(0, 10, 0.9) == 0.0
    assert math.isnan(g.recall_lower_bound(0, 0, 0.9))


# ---------------------------------------------------------------------------------------------
# The study's guarantee: pooled validation rows, the cost on test rows, the simulation

import pandas as pd  # noqa: E402

from wmhqc_lib.qc import evaluation as ev  # noqa: E402


def _study(higher_is_better: bool = True, n_val: int = 16, n_test: int = 21, folds: int = 5,
           seed: int = 0) -> pd.DataFrame:
    """A synthetic study's case table: per fold, validation and test rows whose score tells
    failures (true Dice < 0.5) from successes, with overlap."""
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(1, folds + 1):
        for split, n in (("val", n_val), ("test", n_test)):
            dice = rng.uniform(0.2, 0.9, n)
            good = dice + rng.normal(0, 0.12, n)
            rows += [{"fold": fold, "split": split, "subject_id": f"s{fold}{split}{i}",
                      "true_dice": d, "pairwise_dice": s, "mean_entropy_lesion": -s}
                     for i, (d, s) in enumerate(zip(dice, good, strict=True))]
    return pd.DataFrame(rows)


def _spec(higher_is_better: bool) -> ev.QCScore:
    return ev.qc_score("pairwise_dice" if higher_is_better else "mean_entropy_lesion")


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_pooled_choice_is_the_guarantee_on_every_folds_validation_rows(higher_is_better):
    cases, spec = _study(), _spec(higher_is_better)
    val = cases[cases["split"] == "val"]
    failed = val["true_dice"].to_numpy() < 0.5
    res = g.choose_pooled(cases, spec, 0.8, 0.9)
    direct = g.guaranteed_threshold(val[spec.column].to_numpy(), failed, 0.8, 0.9,
                                    higher_is_better)
    assert res == direct and res.n_rows == len(val) and res.feasible
    per_fold = g.failures_per_fold(cases)
    assert sum(per_fold.values()) == res.n_failures == failed.sum()
    assert per_fold == {f: int((part["true_dice"] < 0.5).sum())
                        for f, part in val.groupby("fold")}


def test_a_subject_validating_several_folds_counts_once():
    """Fold 2's validation rows are fold 1's subjects again (other scores: another model);
    the pooled choice keeps the first fold's rows, and says how many rows it chose on."""
    cases = _study(folds=3, seed=3)
    val2 = (cases["fold"] == 2) & (cases["split"] == "val")
    cases.loc[val2, "subject_id"] = cases.loc[(cases["fold"] == 1) & (cases["split"] == "val"),
                                              "subject_id"].to_numpy()
    spec = _spec(True)
    res = g.choose_pooled(cases, spec, 0.7, 0.8)
    once = cases[(cases["split"] == "val") & ~val2]
    direct = g.guaranteed_threshold(once[spec.column].to_numpy(),
                                    once["true_dice"].to_numpy() < 0.5, 0.7, 0.8)
    assert res == direct and res.n_rows == 32
    kept = g.one_row_per_subject(cases[cases["split"] == "val"])
    assert set(kept["fold"]) == {1, 3} and kept["subject_id"].is_unique
    # the cost and the trade-off choose on the same rows
    assert g.tradeoff_curve(cases, spec, [0.7], 0.8)["n_val_rows"].iloc[0] == 32
    assert g.guarantee_cost(cases, spec, 0.7, 0.8, n_boot=5)["threshold"] == res.threshold


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_tradeoff_review_fraction_grows_with_the_target(higher_is_better):
    cases, spec = _study(), _spec(higher_is_better)
    targets = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]
    curve = g.tradeoff_curve(cases, spec, targets, 0.9)
    assert curve["target_recall"].tolist() == targets
    assert curve["review_fraction"].is_monotonic_increasing
    assert curve["review_fraction_val"].is_monotonic_increasing
    assert curve["review_fraction"].iloc[0] < 1.0  # the low targets do not review everything
    n_fail = int(curve["n_val_failures"].iloc[0])
    for row in curve.itertuples():  # feasible exactly where enough failures were labelled
        assert row.feasible == (row.failures_needed <= n_fail)
        if not row.feasible:
            assert row.review_fraction == 1.0 and math.isnan(row.threshold)
    assert curve["feasible"].any() and not curve["feasible"].all()  # 0.99 needs 230
    test = cases[cases["split"] == "test"]
    row = curve[curve["feasible"]].iloc[-1]  # the test flags of that threshold, recounted
    flags = flag_cases(test[spec.column], row["threshold"], higher_is_better)
    assert row["review_fraction"] == pytest.approx(flags.mean())
    assert row["recall"] == pytest.approx(flags[test["true_dice"].to_numpy() < 0.5].mean())


def test_cost_is_the_test_flags_with_a_clopper_pearson_bound_and_rechosen_intervals():
    cases, spec = _study(), _spec(True)
    cost = g.guarantee_cost(cases, spec, 0.8, 0.9, n_boot=300, seed=3)
    row = g.tradeoff_curve(cases, spec, [0.8], 0.9).iloc[0]
    assert cost["threshold"] == pytest.approx(row["threshold"])
    for name in ("review_fraction", "recall", "precision"):
        assert cost[name]["estimate"] == pytest.approx(row[name])
        assert cost[name]["low"] <= cost[name]["high"]
    assert cost["recall"]["lower_bound"] == pytest.approx(
        g.recall_lower_bound(cost["n_caught"], cost["n_failed"], 0.9))
    assert cost["recall"]["lower_bound"] < cost["recall"]["estimate"]
    assert g.guarantee_cost(cases, spec, 0.8, 0.9, n_boot=300, seed=3) == cost  # seeded
    assert cost["n_boot"] == 300 and cost["n_infeasible_resamples"] == 0
    # the threshold is chosen again on every resample's validation rows: at a target that needs
    # about as many failures as the rows hold, some resamples hold too few and review all
    short = g.guarantee_cost(cases, spec, 0.9, 0.9, n_boot=300, seed=3)
    assert 0 < short["n_infeasible_resamples"] < 300 and short["review_fraction"]["high"] == 1.0


def test_simulation_matches_the_coverage_of_a_known_population():
    """All rows failed, scores uniform: a calibration set of n failures leaves m unflagged and
    cuts midway between its (n - m)-th and (n - m + 1)-th smallest scores, so the population
    recall is the mean of two uniform order statistics, whose law is computed here apart from
    the library (from exponential spacings). Wilks' bound, P(U_(n-m) >= target), is the
    guarantee; the midpoint only adds to it. One miss more or fewer would be far off."""
    rng = np.random.default_rng(5)
    scores = rng.random(20000)
    target, conf, n, draws = 0.85, 0.8, 40, 3000
    table = g.simulate_guarantee(scores, np.ones_like(scores, bool), targets=[target],
                                 confidences=[conf], sizes=[n], draws=draws, seed=2)
    row = table.iloc[0]
    m = g.allowed_misses(n, target, conf)
    assert stats.beta.sf(target, n - m, m + 1) >= conf  # Wilks: the promise itself
    spacings = np.cumsum(rng.exponential(size=(200_000, n + 1)), axis=1)
    uniform = spacings[:, :n] / spacings[:, n:]  # sorted uniforms, 200,000 sets of n
    k = n - m
    expected = np.mean((uniform[:, k - 1] + uniform[:, k]) / 2 >= target)
    assert abs(row["share_met"] - expected) < 4 * math.sqrt(expected * (1 - expected) / draws)
    for wrong in (m - 1, m + 1):  # the same law with one miss more or fewer
        other = np.mean((uniform[:, n - wrong - 1] + uniform[:, n - wrong]) / 2 >= target)
        assert abs(other - expected) > 0.03
    assert row["mean_failures"] == n and row["share_infeasible"] == 0 and row["passed"]


def test_simulation_meets_the_confidence_and_counts_infeasible_draws():
    rng = np.random.default_rng(7)
    failed = rng.random(4000) < 0.3
    scores = np.where(failed, rng.normal(0.4, 0.15, 4000), rng.normal(0.75, 0.1, 4000))
    table = g.simulate_guarantee(scores, failed, targets=[0.8, 0.9], confidences=[0.9],
                                 sizes={"small": 60, "large": 300}, draws=800, seed=4)
    assert len(table) == 4 and set(table["calibration"]) == {"small", "large"}
    assert table["passed"].all()
    assert (table["share_met_feasible"] >= table["confidence"] - 3 * table["mc_se"]).all()
    # the standard error is that of the draws that gave a guarantee
    assert table["mc_se"].tolist() == pytest.approx(
        np.sqrt(0.9 * 0.1 / table["n_feasible"]).tolist())
    small90 = table[(table["calibration"] == "small") & (table["target_recall"] == 0.9)].iloc[0]
    large90 = table[(table["calibration"] == "large") & (table["target_recall"] == 0.9)].iloc[0]
    # 60 rows hold about 18 failures, fewer than the 22 recall 0.9 needs: most draws abstain
    assert small90["mean_failures"] == pytest.approx(60 * failed.mean(), rel=0.1)
    assert small90["share_infeasible"] > 0.5 and large90["share_infeasible"] == 0
    assert small90["mean_review_fraction"] > large90["mean_review_fraction"]
    assert table["share_met"].min() < 1.0  # not trivially met
    with pytest.raises(ValueError, match="no failure"):
        g.simulate_guarantee(scores, np.zeros(4000, bool), targets=[0.8], confidences=[0.9],
                             sizes=[10])


def test_calibration_sizes_name_the_studys_counts():
    assert g.calibration_sizes(["validation", "all", 50], 80, 185) == {
        "validation (80)": 80, "all (185)": 185, "50": 50}
    with pytest.raises(ValueError, match="'half'"):
        g.calibration_sizes(["half"], 80, 185)


def test_simulate_study_uses_every_out_of_fold_row():
    cases = _study(folds=2)
    table = g.simulate_study(cases, _spec(True), targets=[0.7], confidences=[0.8],
                             sizes=["validation", "all"], draws=50)
    assert table["calibration"].tolist() == ["validation (32)", "all (74)"]
    none = g.simulate_guarantee(np.linspace(0, 1, 50), np.arange(50) < 5, targets=[0.9],
                                confidences=[0.9], sizes=[20], draws=30)
    assert none["n_feasible"].iloc[0] == 0 and none["passed"].iloc[0] is None
