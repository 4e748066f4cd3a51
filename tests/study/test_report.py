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


def _reviewer_cases() -> pd.DataFrame:
    """Two folds; site B fails on validation, site A never, site C has no validation row. Lesion
    volume decides most failures; ``pairwise_dice`` equals true Dice (a perfect ranking)."""
    rows = []
    sites_val, sites_test = ["A", "A", "B", "B", "A", "B"], ["A", "B", "C", "A", "B", "C"]
    for fold in (1, 2):
        for split, sites in (("train", ["A", "B"]), ("val", sites_val), ("test", sites_test)):
            for i, site in enumerate(sites):
                dice = (0.3 if site == "B" else 0.8) if split == "val" else 0.1 + 0.15 * i
                rows.append({"fold": fold, "subject_id": f"s{fold}{split}{i}", "split": split,
                             "site": site, "true_dice": dice, "pairwise_dice": dice,
                             "true_lesion_ml": 10 * dice + fold, "pred_lesion_ml": 5.0 - i})
    return pd.DataFrame(rows)


def test_failure_prevalence_per_fold_and_pooled():
    cases = _reviewer_cases()
    table = report.failure_prevalence(cases, quality_threshold=0.5)
    # test Dice 0.1, 0.25, 0.4, 0.55, 0.7, 0.85 in each fold: three below 0.5
    assert list(table.index) == [1, 2, "pooled"]
    assert table.loc[1, "n_cases"] == 6 and table.loc[1, "n_failed"] == 3
    assert table.loc["pooled"].tolist() == [12, 6, 0.5]
    assert report.failure_prevalence(cases, quality_threshold=0.3).loc["pooled", "n_failed"] == 4


def test_site_score_reads_validation_rows_only():
    cases = _reviewer_cases()
    scored = report.add_site_score(cases, quality_threshold=0.5)
    test = scored[scored["split"] == "test"]
    rate = dict(zip(test["site"], test["site_failure_rate"], strict=False))
    assert rate == {"A": 0.0, "B": 1.0, "C": 0.5}  # C: the fold's pooled validation rate
    assert scored.loc[scored["split"] != "test", "site_failure_rate"].isna().all()
    # the test rows' Dice (and scores) change nothing
    shaken = cases.copy()
    is_test = shaken["split"] == "test"
    shaken.loc[is_test, "true_dice"] = 1.0 - shaken.loc[is_test, "true_dice"]
    pd.testing.assert_series_equal(
        report.add_site_score(shaken, quality_threshold=0.5)["site_failure_rate"],
        scored["site_failure_rate"])
    # ... while validation rows do
    moved = cases.copy()
    moved.loc[(moved["split"] == "val") & (moved["site"] == "A"), "true_dice"] = 0.2
    assert (report.add_site_score(moved, quality_threshold=0.5).loc[
        is_test & (cases["site"] == "A"), "site_failure_rate"] == 1.0).all()
    assert not report.SITE_SCORE.higher_is_better and report.SITE_SCORE.baseline


def test_roundtrip_dice_is_joined_from_the_preprocessing_table(monkeypatch):
    cases = _reviewer_cases()
    prep = pd.DataFrame({"subject_id": cases["subject_id"].unique()})
    prep["roundtrip_dice"] = np.linspace(0.2, 0.9, len(prep))
    monkeypatch.setattr(report.cohort, "load", lambda _: (None, prep, None))
    joined = report.add_roundtrip_dice(cases, "results")
    assert len(joined) == len(cases)
    assert joined.set_index("subject_id")["roundtrip_dice"].to_dict() == \
        prep.set_index("subject_id")["roundtrip_dice"].to_dict()
    monkeypatch.setattr(report.cohort, "load", lambda _: (None, prep.drop(
        columns="roundtrip_dice"), None))
    assert "roundtrip_dice" not in report.add_roundtrip_dice(cases, "results")  # older runs


def test_reference_lines_are_ranked_but_never_win_or_get_chosen():
    cases = _reviewer_cases().assign(roundtrip_dice=lambda t: t["true_dice"])
    scores = [ev.qc_score("pred_lesion_ml")]
    cases, refs = report.reference_lines(cases, quality_threshold=0.5)
    assert [s.name for s in refs] == ["site_failure_rate", "true_lesion_ml", "roundtrip_dice"]
    ranking = report.ranking_table(cases, scores + refs, n_boot=50, quality_threshold=0.5)
    roles = ranking["role"].to_dict()
    assert roles[ev.qc_score("true_lesion_ml").label] == report.ROLE_REFERENCE
    assert roles[report.SITE_SCORE.label] == report.ROLE_BASELINE
    assert "role" in report.ranking_display(ranking)
    # the annotation-reading lines rank perfectly here, yet the winner is a non-reference row
    assert ranking.loc[ev.qc_score("roundtrip_dice").label, "failure_auroc"] == 1.0
    wins = report.winners(ranking, _no_table())
    refs_labels = {s.label for s in refs if s.reads_annotation}
    assert not set(wins["best score"]) & refs_labels
    assert not any(label in text for label in refs_labels
                   for text in wins["tied with"].tolist() + wins["verdict"].tolist())
    # never eligible for the carried score, even with the best validation AURC
    pair = ev.qc_score("pairwise_dice")
    spread = cases.assign(pairwise_dice=cases["pred_lesion_ml"])
    spec, table = report.choose_score(spread, [ev.qc_score("true_lesion_ml"), pair])
    assert spec == pair and list(table.index) == [pair.label]
    with pytest.raises(ValueError, match="reference line"):
        report.choose_score(cases, list(ev.REFERENCE_SCORES))


def test_auroc_within_volume_thirds():
    rng = np.random.default_rng(3)
    n = 60
    volume = np.arange(n, dtype=float)
    dice = np.where(volume < 20, 0.2, rng.uniform(0.2, 0.9, n))  # lowest third: all failed
    cases = pd.DataFrame({"fold": 1, "split": "test", "subject_id": [f"s{i}" for i in range(n)],
                          "true_dice": dice, "pairwise_dice": dice,
                          "true_lesion_ml": volume, "pred_lesion_ml": volume})
    counts = report.third_counts(cases, quality_threshold=0.5)
    assert list(counts.index) == list(report.THIRDS)
    assert counts["n_cases"].tolist() == [20, 20, 20]
    assert counts.loc["lower third", "n_failed"] == 20
    assert counts.loc["upper third", "n_failed"] == int((dice[40:] < 0.5).sum())
    assert (counts.loc["lower third", "min_ml"], counts.loc["lower third", "max_ml"]) == (0, 19)
    scores = [ev.qc_score("pairwise_dice"), ev.qc_score("pred_lesion_ml")]
    table = report.auroc_by_volume_third(cases, scores, quality_threshold=0.5)
    perfect = table.loc[scores[0].label]
    assert np.isnan(perfect["lower third"])  # one class: undefined, not 0 or 1
    assert perfect["middle third"] == perfect["upper third"] == 1.0
    assert "lower third all 20 test cases failed" in report.thirds_note(counts)
    full = report.third_counts(cases.assign(true_dice=rng.uniform(0.2, 0.9, n)),
                               quality_threshold=0.5)
    assert "every AUROC is defined" in report.thirds_note(full)


def test_added_value_against_predicted_volume():
    rng = np.random.default_rng(4)
    n = 80
    dice = rng.uniform(0.1, 0.9, n)
    cases = pd.DataFrame({"fold": 1, "split": "test", "subject_id": [f"s{i}" for i in range(n)],
                          "true_dice": dice, "pairwise_dice": dice,
                          "pred_lesion_ml": dice + rng.normal(0, 0.3, n)})
    cases["copy_of_volume"] = cases["pred_lesion_ml"]
    copy = ev.QCScore("copy", "copy_of_volume", "volume again", True)
    scores = [ev.qc_score("pairwise_dice"), ev.qc_score("pred_lesion_ml"), copy]
    table = report.added_value_table(cases, scores, n_boot=200, seed=2, quality_threshold=0.5)
    assert list(table.index) == [scores[0].label, copy.label]  # the volume itself left out
    same = table.loc[copy.label]
    assert (same[["delta_failure_auroc", "delta_failure_auroc_low", "delta_failure_auroc_high",
                  "delta_aurc", "delta_aurc_low", "delta_aurc_high"]] == 0).all()
    assert same["verdict"] == "AUROC: no difference shown; AURC: no difference shown"
    best = table.loc[scores[0].label]
    assert best["delta_failure_auroc_low"] > 0 and best["delta_aurc_high"] < 0
    assert best["verdict"] == "AUROC: better; AURC: better"
    pd.testing.assert_frame_equal(table, report.added_value_table(
        cases, scores, n_boot=200, seed=2, quality_threshold=0.5))
    shown = report.added_value_display(table)
    assert shown.loc[copy.label, "Δ failure AUROC (> 0: better)"] == "0.000 [0.000, 0.000]"
    all_failed = report.added_value_table(cases, scores, n_boot=50, quality_threshold=0.95)
    assert all_failed.loc[scores[0].label, "verdict"].startswith("AUROC: undefined")


def _paired_cases(n: int = 400, seed: int = 3) -> pd.DataFrame:
    """One fold, val and test rows; ``pairwise_dice`` tracks Dice, ``dr_error`` is the same
    score with a little extra noise: worse on every resample, although the two scores' own
    intervals overlap widely (they share which cases are hard)."""
    rng = np.random.default_rng(seed)
    dice = rng.uniform(0.0, 1.0, n)
    base = dice + rng.normal(0, 0.15, n)
    return pd.DataFrame({"fold": 1, "subject_id": [f"s{i}" for i in range(n)],
                         "split": np.where(np.arange(n) % 2, "test", "val"),
                         "true_dice": dice, "pairwise_dice": base,
                         "dr_error": base + rng.normal(0, 0.2, n),
                         "pred_lesion_ml": dice + rng.normal(0, 1.0, n)})


def test_ties_come_from_paired_differences_not_overlapping_intervals():
    cases = _paired_cases()
    scores = [ev.qc_score(n) for n in ("pairwise_dice", "dr_error", "pred_lesion_ml")]
    pair, err = (s.label for s in scores[:2])
    ranking = report.ranking_table(cases, scores, n_boot=400, quality_threshold=0.5,
                                   chosen=scores[0])
    # the unpaired intervals overlap: the old rule called this a tie
    assert ranking.loc[err, "aurc_low"] <= ranking.loc[pair, "aurc_high"]
    unpaired = report.winners(ranking, _no_table()).set_index("metric")
    assert err in unpaired.loc["aurc", "tied with"]
    # the paired difference excludes 0: no tie
    assert ranking.loc[err, "delta_aurc_vs_chosen_low"] > 0
    paired = report.winners(ranking, _no_table(), cases, scores, n_boot=400,
                            quality_threshold=0.5).set_index("metric")
    assert paired.loc["aurc", "best score"] == pair
    assert err not in paired.loc["aurc", "tied with"]
    assert "paired" in paired.loc["aurc", "verdict"]
    # the chosen score's difference to itself is empty; the columns match the paired bootstrap
    assert np.isnan(ranking.loc[pair, "delta_aurc_vs_chosen"])
    direct = ev.paired_bootstrap_delta(ev.scored_rows(cases), scores[1], scores[2], n_boot=400,
                                       quality_threshold=0.5)
    assert ranking.loc[err, "delta_failure_auroc_vs_volume_low"] == \
        pytest.approx(direct.loc["failure_auroc", "low"])
    shown = report.delta_display(ranking)
    column = "Δ AURC (< 0: better)"
    assert shown.loc[pair, column] == "—" and shown.loc[err, column].startswith("0.")
    with pytest.raises(ValueError, match="no paired differences"):
        report.delta_display(ranking.drop(columns=[c for c in ranking if "_vs_" in c]))


def test_choice_stability_counts_wins_over_resampled_validation_rows():
    cases = _paired_cases()
    scores = [ev.qc_score(n) for n in ("dr_error", "pairwise_dice", "pred_lesion_ml")]
    clear = report.choice_stability(cases, scores, n_boot=300, seed=1)
    pair = ev.qc_score("pairwise_dice").label
    assert clear.index[0] == pair and clear.loc[pair, "chosen"]
    assert clear.loc[pair, "share"] > 0.6 and clear["wins"].sum() == 300
    assert ev.qc_score("pred_lesion_ml").label not in clear.index  # baselines never chosen
    assert pair in report.stability_note(clear)
    # two scores in the same order everywhere: the first listed wins every resample (ties)
    same = cases.assign(dr_error=cases["pairwise_dice"] * 2)
    tied = report.choice_stability(same, scores, n_boot=100, seed=1)
    assert tied.loc[ev.qc_score("dr_error").label, "share"] == 1.0
    # a near-coin: pairwise Dice and its noisy copy, noise small enough to swap them often
    close = cases.assign(dr_error=cases["pairwise_dice"]
                         + np.random.default_rng(5).normal(0, 0.01, len(cases)))
    coin = report.choice_stability(close, scores, n_boot=300, seed=1)
    assert 0.1 < coin.loc[pair, "share"] < 0.9
    # only validation rows are read: garbage in the test rows changes nothing
    garbage = cases.copy()
    garbage.loc[garbage["split"] == "test", ["pairwise_dice", "dr_error"]] = np.nan
    pd.testing.assert_frame_equal(clear, report.choice_stability(garbage, scores, n_boot=300,
                                                                 seed=1))


def test_operating_point_intervals_carry_the_thresholds_own_variance(cases):
    spec = ev.qc_score("pairwise_dice")
    noisy = cases.assign(pairwise_dice=cases["pairwise_dice"]
                         + np.random.default_rng(2).normal(0, 0.15, len(cases)))
    point = ev.evaluate_folds(noisy, spec, select="f1", quality_threshold=0.5)
    rechosen = ev.operating_point(noisy, spec, "f1", n_boot=300, seed=4, quality_threshold=0.5)
    fixed = ev.operating_point(noisy, spec, "f1", n_boot=300, seed=4, rechoose=False,
                               quality_threshold=0.5)
    for name in ("recall", "precision", "review_fraction"):
        assert rechosen[name]["estimate"] == pytest.approx(point.pooled[name])
        assert fixed[name]["estimate"] == rechosen[name]["estimate"]
    assert rechosen["thresholds"] == pytest.approx(point.thresholds)
    test = noisy[noisy["split"] == "test"]
    assert rechosen["prevalence"]["estimate"] == pytest.approx((test["true_dice"] < 0.5).mean())
    assert rechosen["specificity"]["estimate"] == pytest.approx(
        1 - point.pooled["n_flagged"] / len(test) * (1 - point.pooled["precision"])
        / (1 - rechosen["prevalence"]["estimate"]))
    width = {k: (d[k]["high"] - d[k]["low"]) for d in (rechosen,) for k in ("review_fraction",)}
    assert width["review_fraction"] > fixed["review_fraction"]["high"] - \
        fixed["review_fraction"]["low"]
    assert ev.operating_point(noisy, spec, "f1", n_boot=300, seed=4,
                              quality_threshold=0.5) == rechosen  # seeded


def test_operating_point_chooses_every_threshold_on_one_folds_validation_rows(cases,
                                                                              monkeypatch):
    """A spy on the threshold choice: in the point estimate and in every resample, each call
    sees validation rows of a single fold only (a leak from test rows would show here)."""
    calls = []
    real = ev.select_threshold

    def spy(rows, *args, **kwargs):
        calls.append((set(rows["split"]), set(rows["fold"]),
                      set(rows["subject_id"])))
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(ev, "select_threshold", spy)
    ev.operating_point(cases, ev.qc_score("pairwise_dice"), "f1", n_boot=20, seed=1,
                       quality_threshold=0.5)
    n_folds = cases["fold"].nunique()
    assert len(calls) == n_folds * (1 + 20)
    val_ids = set(cases.loc[cases["split"] == "val", "subject_id"])
    for splits, folds, ids in calls:
        assert splits == {"val"} and len(folds) == 1 and ids <= val_ids


def test_choice_stability_counts_no_win_where_no_aurc_exists():
    cases = _paired_cases(n=40)
    scores = [ev.qc_score(n) for n in ("dr_error", "pairwise_dice")]
    table = report.choice_stability(cases, scores, n_boot=50, seed=1)
    assert table["wins"].sum() == 50
    blank = cases.assign(dr_error=np.nan, pairwise_dice=np.nan)
    blank.loc[blank["split"] == "val", ["dr_error", "pairwise_dice"]] = 0.5
    # constant scores still give an AURC (one step): every resample decides, the first wins
    assert report.choice_stability(blank, scores, n_boot=50, seed=1)["wins"].sum() == 50


def test_split_prevalence_note_counts_each_split():
    cases = _paired_cases(n=40)
    note = report.split_prevalence_note(cases, quality_threshold=0.5)
    val = cases[cases["split"] == "val"]
    assert f"{int((val['true_dice'] < 0.5).sum())} of {len(val)} validation rows" in note
