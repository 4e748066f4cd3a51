"""The data step's tables: the per-site cohort table (paper Table 2), example cases, file layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib.data import cohort, datasets


@pytest.fixture(scope="module")
def prep(smoke_manifest) -> pd.DataFrame:
    """A preprocessing-like table: brain volume and load per subject, in another row order."""
    rng = np.random.default_rng(5)
    n = len(smoke_manifest)
    brain = rng.uniform(900.0, 1600.0, n)
    table = pd.DataFrame({"subject_id": smoke_manifest["subject_id"], "brain_ml": brain,
                          "load_pct": 100.0 * smoke_manifest["lesion_ml"].to_numpy() / brain,
                          "status": "ok"})
    return table.iloc[::-1].reset_index(drop=True)


@pytest.fixture(scope="module")
def table(smoke_manifest, prep) -> pd.DataFrame:
    return cohort.cohort_table(smoke_manifest, prep)


def test_one_row_per_site_and_an_all_row(smoke_manifest, table):
    sites = smoke_manifest[["dataset", "site"]].drop_duplicates()
    assert len(table) == len(sites) + 1
    body = table.iloc[:-1]
    assert set(zip(body["dataset"], body["site"], strict=True)) == \
        set(zip(sites["dataset"], sites["site"], strict=True))
    assert table.iloc[-1][["dataset", "site"]].tolist() == ["all", "all"]
    assert body["subjects"].sum() == table.iloc[-1]["subjects"] == len(smoke_manifest)
    expected = smoke_manifest.groupby(["dataset", "site"]).size()
    for _, row in body.iterrows():
        assert row["subjects"] == expected[(row["dataset"], row["site"])]


def test_load_statistics_match_pandas(smoke_manifest, prep, table):
    merged = smoke_manifest.merge(prep, on="subject_id")
    for _, row in table.iloc[:-1].iterrows():
        group = merged[(merged["dataset"] == row["dataset"]) & (merged["site"] == row["site"])]
        assert row["load_pct_mean"] == pytest.approx(group["load_pct"].mean())
        assert row["load_pct_sd"] == pytest.approx(np.std(group["load_pct"], ddof=1))
        assert row["brain_ml_mean"] == pytest.approx(group["brain_ml"].mean())
        assert row["lesion_ml_mean"] == pytest.approx(group["lesion_ml"].mean())
    total = table.iloc[-1]
    assert total["load_pct_mean"] == pytest.approx(merged["load_pct"].mean())
    assert total["load_pct_sd"] == pytest.approx(np.std(merged["load_pct"], ddof=1))
    assert total["brain_ml_mean"] == pytest.approx(merged["brain_ml"].mean())
    # The "all" mean is subject-weighted, not the mean of the site means.
    site_mean = table.iloc[:-1]["load_pct_mean"].mean()
    assert total["load_pct_mean"] != pytest.approx(site_mean)


def test_grid_columns_describe_each_site(smoke_manifest, table):
    for _, row in table.iloc[:-1].iterrows():
        group = smoke_manifest[(smoke_manifest["dataset"] == row["dataset"])
                               & (smoke_manifest["site"] == row["site"])]
        for column in ("flair_voxel_mm", "flair_shape", "t1_voxel_mm", "t1_shape"):
            values = group[column].unique()
            assert len(values) == 1  # one protocol per synthetic site
            assert row[column] == values[0]
    assert table.iloc[-1]["flair_shape"] == ""
    msseg = table[table["dataset"] == "msseg16"]
    assert (msseg["flair_shape"] != msseg["t1_shape"]).any()


def test_mixed_grids_name_the_common_one(smoke_manifest, prep):
    manifest = smoke_manifest.copy()
    ljub = manifest.index[manifest["dataset"] == "ljubljana"]
    manifest.loc[ljub[0], "flair_shape"] = "1x2x3"
    row = cohort.cohort_table(manifest, prep).set_index("site").loc["Ljubljana"]
    common = smoke_manifest.loc[ljub[1], "flair_shape"]
    assert row["flair_shape"] == f"{common} (+1)"


def test_subjects_without_preprocessing_are_left_out(smoke_manifest, prep):
    kept = prep[~prep["subject_id"].str.startswith("isbi15")]
    table = cohort.cohort_table(smoke_manifest, kept)
    assert "isbi15" not in set(table["dataset"])
    assert table.iloc[-1]["subjects"] == len(kept)


def test_single_subject_site_has_no_sd(smoke_manifest, prep):
    keep = smoke_manifest[smoke_manifest["site"] != "ISBI"]
    one = smoke_manifest[smoke_manifest["site"] == "ISBI"].head(1)
    table = cohort.cohort_table(pd.concat([keep, one]), prep)
    isbi = table[table["site"] == "ISBI"].iloc[0]
    assert isbi["subjects"] == 1 and np.isnan(isbi["load_pct_sd"])
    assert not np.isnan(table.iloc[-1]["load_pct_sd"])


# ---------------------------------------------------------------------------------------------
# Example cases


def test_example_cases_span_the_range():
    loads = pd.DataFrame({"subject_id": [f"s{i}" for i in range(9)],
                          "load_pct": [0.9, 0.1, 5.0, 0.3, 2.0, 1.1, 8.0, 1.5, 0.2]})
    picks = cohort.example_cases(loads)
    assert list(picks) == ["small", "medium", "large"]
    # thirds: {0.1, 0.2, 0.3}, {0.9, 1.1, 1.5}, {2.0, 5.0, 8.0} -> the median of each
    assert picks == {"small": "s8", "medium": "s5", "large": "s2"}


def test_example_cases_on_the_smoke_manifest(smoke_manifest, prep):
    merged = smoke_manifest.merge(prep, on="subject_id")
    picks = cohort.example_cases(merged)
    load = merged.set_index("subject_id")["load_pct"]
    assert load[picks["small"]] < load[picks["medium"]] < load[picks["large"]]
    assert set(picks.values()) <= set(merged["subject_id"])
    by_volume = cohort.example_cases(merged, column="lesion_ml")
    volume = merged.set_index("subject_id")["lesion_ml"]
    assert volume[by_volume["small"]] < volume[by_volume["medium"]] < volume[by_volume["large"]]


def test_example_cases_three_subjects_and_ties():
    three = pd.DataFrame({"subject_id": ["c", "a", "b"], "load_pct": [3.0, 1.0, 2.0]})
    assert cohort.example_cases(three) == {"small": "a", "medium": "b", "large": "c"}
    tied = pd.DataFrame({"subject_id": ["z", "y", "x", "w", "v", "u"],
                         "load_pct": [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]})
    assert cohort.example_cases(tied) == {"small": "y", "medium": "w", "large": "u"}


@pytest.mark.parametrize("n", [0, 1, 2])
def test_example_cases_need_three_subjects(n):
    few = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)],
                        "load_pct": [float(i) for i in range(n)]})
    with pytest.raises(ValueError, match=f"at least 3 subjects.*have {n}"):
        cohort.example_cases(few)


# ---------------------------------------------------------------------------------------------
# Files


def test_cohort_paths_layout(tmp_path):
    paths = cohort.CohortPaths.under(tmp_path / "results" / "smoke")
    root = tmp_path / "results" / "smoke" / "data"
    assert paths.root == root
    assert paths.manifest == root / "manifest.csv"
    assert paths.preprocess == root / "preprocess.csv"
    assert paths.cache == root / "cache"
    assert paths.folds == root / "folds.csv"
    assert paths.cohort_table == root / "cohort_table.csv"
    assert cohort.CohortPaths.under(str(tmp_path)).root == Path(tmp_path) / "data"


def test_load_names_the_missing_file(tmp_path, smoke_manifest, prep):
    paths = cohort.CohortPaths.under(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.csv: missing"):
        cohort.load(tmp_path)
    datasets.write_manifest(smoke_manifest, paths.manifest)
    with pytest.raises(FileNotFoundError, match="preprocess.csv: missing") as err:
        cohort.load(tmp_path)
    assert str(paths.preprocess) in str(err.value)
    prep.to_csv(paths.preprocess, index=False)
    with pytest.raises(FileNotFoundError, match="folds.csv: missing"):
        cohort.load(tmp_path)
    folds = pd.DataFrame({"fold": [1, 1], "subject_id": ["a", "b"], "site": ["x", "y"],
                          "load_bin": [0, 1], "split": ["train", "test"]})
    folds.to_csv(paths.folds, index=False)

    manifest, prep_back, folds_back = cohort.load(tmp_path)
    pd.testing.assert_frame_equal(manifest, smoke_manifest, check_dtype=False)
    assert manifest["synthetic"].dtype == bool
    pd.testing.assert_frame_equal(prep_back, prep, check_dtype=False)
    pd.testing.assert_frame_equal(folds_back, folds)


def test_grid_volume_check_counts_empty_references_and_ratios():
    prep = pd.DataFrame({
        "subject_id": ["a", "b", "c", "d"], "site": ["s1", "s1", "s2", "s2"],
        "status": ["computed", "computed", "cached", "failed"],
        "lesion_ml": [10.0, 4.0, 0.0, 3.0], "lesion_ml_grid": [9.9, 4.1, 0.0, 0.0],
        "reference_empty": [False, False, True, False],
        "roundtrip_dice": [0.9, 0.3, 1.0, 0.5]})
    table = cohort.grid_volume_check(prep).set_index("site")
    assert table.loc["all", "subjects"] == 3  # the failed case is left out
    assert table.loc["all", "empty_references"] == 1
    assert table.loc["s2", "empty_references"] == 1 and np.isnan(table.loc["s2", "grid_ratio_min"])
    assert table.loc["all", "grid_ratio_min"] == pytest.approx(0.99)
    assert table.loc["all", "grid_ratio_max"] == pytest.approx(1.025)
    assert table.loc["s1", "roundtrip_dice_median"] == pytest.approx(0.6)


def test_grid_cost_counts_subjects_the_grid_alone_fails():
    prep = pd.DataFrame({
        "subject_id": list("abcdef"), "status": ["computed"] * 5 + ["failed"],
        "site": ["s1", "s1", "s1", "s2", "s2", "s2"],
        "roundtrip_dice": [0.9, 0.45, 0.8, 1.0, 0.3, np.nan],
        "reference_empty": [False, False, False, True, False, False]})
    cost = cohort.grid_cost(prep, quality_threshold=0.5).set_index("site")
    # the empty reference (d) and the failed case (f) are left out
    assert cost.loc["all", "subjects"] == 4
    assert cost.loc["all", "failed_by_grid"] == 2
    assert cost.loc["all", "failed_by_grid_share"] == pytest.approx(0.5)
    assert cost.loc["s1", "failed_by_grid"] == 1 and cost.loc["s2", "failed_by_grid"] == 1
    assert cost.loc["s1", "roundtrip_median"] == pytest.approx(0.8)
    assert cost.loc["s2", "roundtrip_min"] == pytest.approx(0.3)
    # a stricter threshold fails more of the same subjects
    assert cohort.grid_cost(prep, 0.85).set_index("site").loc["all", "failed_by_grid"] == 3
