"""Cross-validation folds: sizes, disjoint splits, stratification by site and load, seeding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib.data.folds import (
    FOLD_COLUMNS,
    SPLITS,
    fold_split,
    fold_summary,
    load_bins,
    make_folds,
)

PAPER_SITES = {"Utrecht": 20, "Singapore": 20, "GE3T": 20, "ISBI": 5, "Center_01": 5,
               "Center_07": 5, "Ljubljana": 30}


def subjects(site_counts: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """A subject table with log-normal lesion volumes, shuffled so order carries no site."""
    rng = np.random.default_rng(seed)
    rows = [{"subject_id": f"{site}_{k:02d}", "site": site,
             "lesion_ml": float(rng.lognormal(2.0, 1.0))}
            for site, n in site_counts.items() for k in range(n)]
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def odd_sites(n: int) -> dict[str, int]:
    """``n`` subjects over three uneven sites."""
    a, b = n // 2, n // 3
    return {"A": a, "B": b, "C": n - a - b}


@pytest.fixture(scope="module")
def paper() -> pd.DataFrame:
    return subjects(PAPER_SITES)


@pytest.fixture(scope="module")
def paper_folds(paper) -> pd.DataFrame:
    return make_folds(paper, seed=3)


def split_counts(folds: pd.DataFrame) -> pd.DataFrame:
    return folds.groupby(["fold", "split"]).size().unstack(fill_value=0)


# ---------------------------------------------------------------------------------------------
# Sizes and coverage


def test_paper_fold_sizes(paper_folds):
    assert list(paper_folds.columns) == FOLD_COLUMNS
    assert sorted(paper_folds["fold"].unique()) == [1, 2, 3, 4, 5]
    counts = split_counts(paper_folds)
    assert (counts["train"] == 68).all()
    assert (counts["val"] == 16).all()
    assert (counts["test"] == 21).all()
    assert len(paper_folds) == 5 * 105


def test_every_subject_tested_exactly_once(paper, paper_folds):
    test = paper_folds[paper_folds["split"] == "test"]
    assert test["subject_id"].value_counts().eq(1).all()
    assert set(test["subject_id"]) == set(paper["subject_id"])


def test_splits_disjoint_and_covering_in_each_fold(paper, paper_folds):
    everyone = set(paper["subject_id"])
    for fold in range(1, 6):
        parts = [set(fold_split(paper_folds, fold, s)) for s in SPLITS]
        assert sum(len(p) for p in parts) == len(everyone)
        assert set().union(*parts) == everyone
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_fold_rows_carry_site_and_bin(paper, paper_folds):
    site = paper.set_index("subject_id")["site"]
    assert (paper_folds["site"].to_numpy() == site[paper_folds["subject_id"]].to_numpy()).all()
    # A subject's load bin is the same in every fold and follows its lesion volume.
    per_subject = paper_folds.groupby("subject_id")["load_bin"].nunique()
    assert (per_subject == 1).all()
    first = paper_folds[paper_folds["fold"] == 1].set_index("subject_id")
    lesion = paper.set_index("subject_id")["lesion_ml"]
    means = lesion.groupby(first["load_bin"]).mean()
    assert means.is_monotonic_increasing and len(means) == 3


@pytest.mark.parametrize("n", [14, 37, 52])
def test_proportional_sizes_for_other_cohorts(n):
    table = subjects(odd_sites(n), seed=n)
    folds = make_folds(table, seed=1)
    counts = split_counts(folds)
    assert counts["test"].sum() == n
    assert counts["test"].max() - counts["test"].min() <= 1
    for fold, row in counts.iterrows():
        rest = n - row["test"]
        assert row["val"] == round(0.1905 * rest), fold
        assert row["train"] == rest - row["val"]
        assert row["train"] > row["val"] > 0


def test_three_folds_and_val_fraction():
    table = subjects(odd_sites(30), seed=5)
    folds = make_folds(table, n_folds=3, val_fraction=0.25, seed=2)
    counts = split_counts(folds)
    assert list(counts.index) == [1, 2, 3]
    assert (counts["test"] == 10).all()
    assert (counts["val"] == 5).all() and (counts["train"] == 15).all()


def test_smallest_cohort_keeps_one_training_subject():
    table = subjects({"A": 3, "B": 2}, seed=1)
    folds = make_folds(table, n_folds=5)
    counts = split_counts(folds)
    assert (counts["test"] == 1).all()
    assert (counts["train"] >= 1).all()
    two = make_folds(subjects({"A": 2}), n_folds=2)
    counts = split_counts(two)
    assert (counts["test"] == 1).all() and (counts["train"] == 1).all()
    assert "val" not in counts or (counts["val"] == 0).all()


# ---------------------------------------------------------------------------------------------
# Stratification


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_test_folds_balance_sites(paper, seed):
    folds = make_folds(paper, seed=seed)
    test = folds[folds["split"] == "test"]
    per_site = test.groupby(["fold", "site"]).size().unstack(fill_value=0)
    expected = pd.Series(PAPER_SITES) / 5
    assert ((per_site - expected[per_site.columns]).abs() <= 1).all().all()


def test_test_folds_balance_sites_for_odd_sizes():
    for n in (14, 37):
        sites = odd_sites(n)
        folds = make_folds(subjects(sites, seed=n), seed=4)
        test = folds[folds["split"] == "test"]
        per_site = test.groupby(["fold", "site"]).size().unstack(fill_value=0)
        per_site = per_site.reindex(index=range(1, 6), fill_value=0)
        expected = pd.Series(sites) / 5
        assert ((per_site - expected[per_site.columns]).abs() < 1).all().all(), (n, per_site)


def test_test_folds_balance_each_site_and_load_bin(paper_folds):
    """Inside each (site, load bin) group, test subjects are dealt evenly to the folds."""
    test = paper_folds[paper_folds["split"] == "test"]
    cells = test.groupby(["site", "load_bin", "fold"]).size().unstack(fill_value=0)
    cells = cells.reindex(columns=range(1, 6), fill_value=0)
    assert (cells.max(axis=1) - cells.min(axis=1) <= 1).all()


@pytest.mark.parametrize("seed", [0, 3])
def test_test_folds_balance_load_bins(paper, seed):
    folds = make_folds(paper, seed=seed)
    test = folds[folds["split"] == "test"]
    per_bin = test.groupby(["fold", "load_bin"]).size().unstack(fill_value=0)
    expected = pd.Series(np.bincount(load_bins(paper["lesion_ml"], 3))) / 5
    assert ((per_bin - expected).abs() <= 1).all().all(), per_bin


def test_validation_spreads_over_sites(paper_folds):
    val = paper_folds[paper_folds["split"] == "val"]
    assert (val.groupby("fold")["site"].nunique() >= 4).all()
    assert (val.groupby("fold")["load_bin"].nunique() == 3).all()
    # Over all folds, every site gives validation subjects.
    assert set(val["site"]) == set(PAPER_SITES)


# ---------------------------------------------------------------------------------------------
# Seeding


def test_same_seed_same_table(paper):
    pd.testing.assert_frame_equal(make_folds(paper, seed=9), make_folds(paper, seed=9))


def test_input_order_does_not_matter_for_the_split_sizes(paper):
    shuffled = paper.sample(frac=1.0, random_state=1)
    assert split_counts(make_folds(shuffled, seed=9)).equals(split_counts(make_folds(paper,
                                                                                    seed=9)))


def test_other_seed_other_assignment(paper):
    def tests_of(folds: pd.DataFrame) -> pd.Series:
        test = folds[folds["split"] == "test"]
        return test.set_index("subject_id")["fold"].sort_index()

    a, b = make_folds(paper, seed=9), make_folds(paper, seed=10)
    assert not tests_of(a).equals(tests_of(b))
    val_a = set(a.loc[a["split"] == "val", "subject_id"] + a.loc[a["split"] == "val", "fold"]
                .astype(str))
    val_b = set(b.loc[b["split"] == "val", "subject_id"] + b.loc[b["split"] == "val", "fold"]
                .astype(str))
    assert val_a != val_b


def test_load_column_choice(paper):
    renamed = paper.rename(columns={"lesion_ml": "load_pct"})
    a = make_folds(paper, seed=2)
    b = make_folds(renamed, seed=2, load_column="load_pct")
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ValueError, match="load_pct"):
        make_folds(paper, load_column="load_pct")


# ---------------------------------------------------------------------------------------------
# Errors


def test_duplicate_ids_rejected(paper):
    bad = pd.concat([paper, paper.iloc[[4]]], ignore_index=True)
    with pytest.raises(ValueError, match="duplicate subject ids") as err:
        make_folds(bad)
    assert paper.iloc[4]["subject_id"] in str(err.value)


@pytest.mark.parametrize("column", ["subject_id", "site", "lesion_ml"])
def test_missing_column_rejected(paper, column):
    with pytest.raises(ValueError, match=f"lacks columns.*{column}"):
        make_folds(paper.drop(columns=[column]))


def test_too_few_subjects_or_folds(paper):
    with pytest.raises(ValueError, match="cannot make 5 folds from 4 subjects"):
        make_folds(paper.head(4), n_folds=5)
    with pytest.raises(ValueError, match="cannot make 1 folds"):
        make_folds(paper, n_folds=1)


# ---------------------------------------------------------------------------------------------
# fold_split, fold_summary, load_bins


def test_fold_split_matches_table(paper_folds):
    ids = fold_split(paper_folds, 2, "val")
    expected = paper_folds[(paper_folds["fold"] == 2) & (paper_folds["split"] == "val")]
    assert ids == expected["subject_id"].tolist()
    assert len(ids) == 16 and all(isinstance(i, str) for i in ids)


def test_fold_split_errors(paper_folds):
    with pytest.raises(ValueError, match="split must be one of"):
        fold_split(paper_folds, 1, "validation")
    with pytest.raises(ValueError, match=r"fold 6 not in folds table \(has \[1, 2, 3, 4, 5\]\)"):
        fold_split(paper_folds, 6, "test")
    with pytest.raises(ValueError, match="fold 0"):
        fold_split(paper_folds, 0, "train")


def test_fold_summary(paper_folds):
    summary = fold_summary(paper_folds)
    assert list(summary.columns) == list(SPLITS)
    assert list(summary.index) == [1, 2, 3, 4, 5]
    assert (summary.to_numpy() == np.array([[68, 16, 21]] * 5)).all()


def test_fold_summary_fills_absent_split(paper_folds):
    no_val = paper_folds[paper_folds["split"] != "val"]
    summary = fold_summary(no_val)
    assert list(summary.columns) == list(SPLITS)
    assert (summary["val"] == 0).all() and (summary["test"] == 21).all()


@pytest.mark.parametrize("n", [3, 10, 37, 105])
def test_load_bins_balanced_and_ordered(n):
    values = pd.Series(np.random.default_rng(n).lognormal(0.0, 1.0, n))
    bins = load_bins(values, 3)
    counts = np.bincount(bins, minlength=3)
    assert counts.sum() == n and len(counts) == 3
    assert counts.max() - counts.min() <= 1
    order = np.argsort(values.to_numpy())
    assert (np.diff(bins[order]) >= 0).all()


def test_load_bins_ties_and_degenerate_cases():
    ties = load_bins(pd.Series([1.0] * 9), 3)
    assert np.bincount(ties).tolist() == [3, 3, 3]
    assert load_bins(pd.Series([5.0, 1.0]), 3).tolist() == [0, 0]
    assert load_bins(pd.Series([5.0, 1.0, 3.0]), 1).tolist() == [0, 0, 0]
    assert load_bins(pd.Series([5.0, 1.0, 3.0]), 3).tolist() == [2, 0, 1]


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_missing_load_rejected(paper):
    bad = paper.copy()
    bad.loc[3, "lesion_ml"] = np.nan
    with pytest.raises(ValueError, match=str(bad.loc[3, "subject_id"])):
        make_folds(bad)


def test_inner_folds_cover_the_training_subjects_once_balanced_and_seeded(paper, paper_folds):
    from wmhqc_lib.data.folds import inner_folds

    train = paper_folds[(paper_folds["fold"] == 1) & (paper_folds["split"] == "train")]
    table = train[["subject_id", "site"]].merge(paper[["subject_id", "lesion_ml"]])
    inner = inner_folds(table, 3, seed=4, load_column="lesion_ml")
    assert set(inner) == set(table["subject_id"]) and set(inner.values()) == {1, 2, 3}
    sizes = pd.Series(inner).value_counts()
    assert sizes.max() - sizes.min() <= 1  # 68 training subjects: 23/23/22
    per_site = table.assign(inner=table["subject_id"].map(inner)).groupby(
        ["site", "inner"]).size().unstack(fill_value=0)
    assert (per_site.max(axis=1) - per_site.min(axis=1)).max() <= 1
    assert inner == inner_folds(table, 3, seed=4, load_column="lesion_ml")
    assert inner != inner_folds(table, 3, seed=5, load_column="lesion_ml")
    with pytest.raises(ValueError, match="inner folds"):
        inner_folds(table.head(2), 3, load_column="lesion_ml")


def test_holdout_keeps_sites_in_share_and_never_empties_the_fit():
    from wmhqc_lib.data.folds import holdout

    ids = [f"{site}_{i}" for site in "ABCD" for i in range(17)]  # 68, as in a paper fold
    fit, stop = holdout(ids, 0.15)
    assert len(stop) == 10 and len(fit) == 58
    assert set(fit).isdisjoint(stop) and sorted(fit + stop) == sorted(ids)
    per_site = {s: sum(x.startswith(s) for x in stop) for s in "ABCD"}
    assert max(per_site.values()) - min(per_site.values()) <= 1  # evenly spaced over sites
    assert holdout(ids, 0.15) == (fit, stop)  # deterministic
    assert holdout(list("abcde"), 0.15)[1] == ["c"]  # at least one held out
    assert len(holdout(list("abc"), 0.9)[0]) == 2  # at least two left to fit
    assert holdout(list("ab"), 0.5) == (["a", "b"], [])
    assert holdout(ids, 0.0) == (ids, [])
    with pytest.raises(ValueError, match="holdout fraction"):
        holdout(ids, 1.0)
