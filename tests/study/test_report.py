"""The evaluation chapter's composition: available scores, comparison, ranking, winners, figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib.qc import evaluation as ev
from wmhqc_lib.study import report


@pytest.fixture(scope="module")
def cases() -> pd.DataFrame:
    """Three folds of 30 cases; pairwise Dice tracks true Dice closely, VS loosely, the
    uncertainty VS of train rows is missing (allowed: only val and test rows are scored)."""
    rng = np.random.default_rng(0)
    rows = []
    for fold in (1, 2, 3):
        for i in range(30):
            dice = float(np.clip(rng.beta(2, 2), 0, 1))
            split = "train" if i < 14 else ("val" if i < 20 else "test")
            rows.append({"fold": fold, "subject_id": f"s{fold}_{i}", "split": split,
                         "site": "A", "true_dice": dice,
                         "true_dice_paper": (1 + dice) / 2,
                         "pairwise_dice": dice + rng.normal(0, 0.02),
                         "uncertainty_vs": np.nan if split == "train" else
                         1000 * dice + rng.normal(0, 300),
                         "mean_entropy_lesion": 1 - dice + rng.normal(0, 0.1),
                         "pred_lesion_ml": rng.lognormal()})
    return pd.DataFrame(rows)


def test_available_scores_adds_baselines_and_skips_missing(cases):
    table, scores = report.available_scores(cases.drop(columns="mean_entropy_lesion"))
    names = [s.name for s in scores]
    assert {"pairwise_dice", "uncertainty_vs", "pred_lesion_ml", "random"} <= set(names)
    assert "mean_entropy_lesion" not in names and "dr_image" not in names
    assert ev.RANDOM_COLUMN in table


def test_comparison_ranking_and_winners_are_computed(cases):
    table, scores = report.available_scores(cases)
    evaluations = report.compare(table, scores, quality_threshold=0.5)
    assert set(evaluations) == {s.name for s in scores}
    assert all(len(e.per_fold) == 3 for e in evaluations.values())
    ranking = report.ranking_table(table, scores, n_boot=200, quality_threshold=0.5)
    best_aurc = ranking["aurc"].idxmin()
    assert best_aurc == ev.qc_score("pairwise_dice").label
    assert ranking.loc[best_aurc, "aurc_low"] <= ranking.loc[best_aurc, "aurc"] <= \
        ranking.loc[best_aurc, "aurc_high"]
    # a lower-is-better score is judged in its own direction
    entropy = ev.qc_score("mean_entropy_lesion").label
    assert ranking.loc[entropy, "spearman_oriented"] > 0.5 > ranking.loc[entropy, "spearman_r"]
    wins = report.winners(ranking, ev.table1(list(evaluations.values())))
    by_metric = dict(zip(wins["metric"], wins["best score"], strict=True))
    assert by_metric["aurc"] == by_metric["failure_auroc"] == best_aurc
    random_label = ev.qc_score("random").label
    assert random_label not in {by_metric["aurc"], by_metric["eaurc"]}


def test_figures_have_one_trace_per_score(cases):
    table, scores = report.available_scores(cases)
    evaluations = report.compare(table, scores, quality_threshold=0.5)
    rc = report.risk_coverage_figure(table, scores, " (synthetic cohort)")
    assert len(rc.data) == len(scores) + 1  # plus the oracle
    assert "synthetic" in rc.layout.title.text
    roc = report.roc_figure(table, scores, quality_threshold=0.5)
    assert len(roc.data) == len(scores) + 1
    work = report.workload_figure(table, scores, evaluations, quality_threshold=0.5)
    assert len(work.data) == 2 * len(scores)
    panels = report.figure3_panels(table)
    assert len(panels.layout.annotations) == 1  # only uncertainty VS of Figure 3 is present
    assert report.per_fold_figure(evaluations, "recall").data


def test_load_all_cases_reads_every_fold(tmp_path, cases):
    for fold, group in cases.groupby("fold"):
        (tmp_path / f"fold{fold}").mkdir()
        group.to_csv(tmp_path / f"fold{fold}" / "cases.csv", index=False)
    assert len(report.load_all_cases(tmp_path)) == len(cases)
    assert set(report.load_all_cases(tmp_path, folds=[2])["fold"]) == {2}
    with pytest.raises(FileNotFoundError):
        report.load_all_cases(tmp_path / "nothing")


def _val_test_disagree(garbage: bool = False) -> pd.DataFrame:
    """Validation rows favour score X (tracks Dice there), test rows favour score Y."""
    rng = np.random.default_rng(1)
    rows = []
    for fold in (1, 2):
        for split, n in (("train", 4), ("val", 15), ("test", 15)):
            for i in range(n):
                dice = float(rng.uniform(0.1, 0.95))
                noise = rng.uniform(0, 1)
                x, y = (dice, noise) if split == "val" else (noise, dice)
                if garbage and split == "test":
                    x, y = np.nan, "garbage"
                rows.append({"fold": fold, "subject_id": f"s{fold}{split}{i}", "split": split,
                             "true_dice": dice, "pairwise_dice": x, "dr_error": y,
                             "pred_lesion_ml": dice})  # a baseline perfect everywhere
    return pd.DataFrame(rows)


def test_choose_score_uses_validation_rows_only():
    scores = [ev.qc_score(n) for n in ("dr_error", "pairwise_dice", "pred_lesion_ml")]
    cases = _val_test_disagree()
    spec, table = report.choose_score(cases, scores)
    assert spec.name == "pairwise_dice"  # X wins on val although Y wins on test
    test = ev.scored_rows(cases)
    assert ev.evaluate_score(test, "dr_error", 0.5)["aurc"] < \
        ev.evaluate_score(test, "pairwise_dice", 0.5)["aurc"]
    assert table["chosen"].sum() == 1 and table.loc[spec.label, "chosen"]
    assert ev.qc_score("pred_lesion_ml").label not in table.index  # baselines not eligible
    assert (table["n_val_rows"] == 30).all()
    val = cases[cases["split"] == "val"]
    assert table.loc[spec.label, "aurc_val"] == \
        pytest.approx(ev.evaluate_score(val, spec, 0.5)["aurc"])
    # test rows holding NaN and text in the scores change nothing
    spec2, table2 = report.choose_score(_val_test_disagree(garbage=True), scores)
    assert spec2 == spec
    pd.testing.assert_frame_equal(table, table2)


def test_choose_score_breaks_ties_by_the_order_given_and_needs_a_candidate():
    cases = _val_test_disagree()
    cases["dr_error"] = cases["pairwise_dice"] * 2  # the same order: the same AURC
    pair, err = ev.qc_score("pairwise_dice"), ev.qc_score("dr_error")
    assert report.choose_score(cases, [pair, err])[0] == pair
    assert report.choose_score(cases, [err, pair])[0] == err
    with pytest.raises(ValueError, match="baseline"):
        report.choose_score(cases, [ev.qc_score("pred_lesion_ml")])
    with pytest.raises(ValueError, match="split"):
        report.choose_score(cases.drop(columns="split"), [pair])


def _ranking(**intervals: tuple[float, float, float]) -> pd.DataFrame:
    rows = {name: {"aurc": v, "aurc_low": lo, "aurc_high": hi}
            for name, (v, lo, hi) in intervals.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def _no_table() -> pd.DataFrame:
    return pd.DataFrame(columns=pd.MultiIndex.from_tuples([], names=["score", "across folds"]))


def test_winners_list_scores_whose_intervals_overlap():
    ranking = _ranking(A=(0.10, 0.08, 0.12), B=(0.13, 0.115, 0.15), C=(0.20, 0.121, 0.3),
                       D=(0.11, np.nan, np.nan))
    wins = report.winners(ranking, _no_table()).set_index("metric")
    row = wins.loc["aurc"]
    assert row["best score"] == "A" and row["value"] == 0.10
    assert (row["low"], row["high"]) == (0.08, 0.12)
    assert row["tied with"] == "B"  # C starts above A's upper end; D has no interval
    assert row["verdict"].startswith("tie: A with B")
    alone = report.winners(_ranking(A=(0.10, 0.08, 0.12), B=(0.2, 0.13, 0.3)), _no_table())
    assert alone.loc[0, "tied with"] == "" and "tie" not in alone.loc[0, "verdict"]
    touching = report.winners(_ranking(A=(0.10, 0.08, 0.12), B=(0.2, 0.12, 0.3)), _no_table())
    assert touching.loc[0, "tied with"] == "B"  # closed intervals: a shared end is overlap


def test_winners_on_a_real_ranking_show_intervals(cases):
    table, scores = report.available_scores(cases)
    ranking = report.ranking_table(table, scores, n_boot=200, quality_threshold=0.5)
    for metric in ev.BOOTSTRAP_METRICS:
        assert (ranking[f"{metric}_low"] <= ranking[f"{metric}_high"]).all()
    wins = report.winners(ranking, ev.table1(list(report.compare(
        table, scores, quality_threshold=0.5).values()))).set_index("metric")
    for metric in ("aurc", "eaurc", "norm_aurc", "failure_auroc"):
        row = wins.loc[metric]
        assert row["low"] <= row["value"] <= row["high"]
        tied = [t for t in row["tied with"].split(", ") if t]
        assert ("tie" in row["verdict"]) == bool(tied)
        assert row["best score"] not in tied
    assert np.isnan(wins.loc["recall", "low"])


def test_dice_by_grid_shows_what_exists(cases):
    plain = report.dice_by_grid(cases)
    assert list(plain.columns) == ["n_test", "median Dice, native grid"]
    assert list(plain.index) == [1, 2, 3] and (plain["n_test"] == 10).all()
    test = cases[cases["split"] == "test"]
    assert plain.loc[2, "median Dice, native grid"] == \
        pytest.approx(test[test["fold"] == 2]["true_dice"].median())
    richer = cases.assign(true_dice_grid=cases["true_dice"] + 0.05,
                          reference_empty=cases["subject_id"].isin(["s1_25", "s1_27", "s3_29",
                                                                    "s1_3"]))
    full = report.dice_by_grid(richer)
    assert full["native - grid"].to_numpy() == pytest.approx([-0.05] * 3)
    assert full["empty reference"].tolist() == [2, 0, 1]  # s1_3 is a train row
