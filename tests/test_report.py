"""The evaluation chapter's composition: available scores, comparison, ranking, winners, figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib import evaluation as ev
from wmhqc_lib import report


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
