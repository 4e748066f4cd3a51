"""``wmhqc evaluate``: one JSON object with the issue's metric names, per-fold results, chosen
thresholds; every bad input exits 2 with a message naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib.cli import main
from wmhqc_lib.qc.evaluation import evaluate_score

ISSUE_KEYS = {"n_cases", "n_failed", "n_flagged", "n_true_positive", "precision", "recall",
              "paper_precision", "paper_recall", "mean_dice_before", "mean_dice_after",
              "median_dice_before", "median_dice_after", "pearson_r", "pearson_p", "spearman_r",
              "mae", "failure_auroc", "aurc", "eaurc", "norm_aurc", "review_fraction",
              "missed_failure_fraction"}


def write_cases(path: Path, seed: int = 0, folds: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(1, folds + 1):
        for split, n in (("test", 15), ("val", 10), ("train", 4)):
            for i in range(n):
                d = float(np.clip(rng.beta(4, 1.6), 0, 1))
                rows.append({"fold": fold, "subject_id": f"f{fold}{split}{i}", "split": split,
                             "true_dice": d, "dr_error": d + rng.normal(0, 0.1),
                             "mean_entropy_lesion": 1 - d + rng.normal(0, 0.15)})
    table = pd.DataFrame(rows)
    table.to_csv(path, index=False)
    return table


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plain_table_prints_the_issue_metrics(tmp_path, capsys):
    path = tmp_path / "cases.csv"
    table = write_cases(path).drop(columns=["fold", "split"])
    table.to_csv(path, index=False)
    code, out, _ = run(capsys, str(path), "--score", "dr_error", "--threshold", "0.7",
                       "--dice-scale")
    assert code == 0
    report = json.loads(out)
    assert ISSUE_KEYS <= set(report)
    assert "per_fold" not in report and report["evaluated_rows"] == "all"
    want = evaluate_score(table, "dr_error", 0.7, dice_scale=True)
    assert {k: report[k] for k in ISSUE_KEYS} == pytest.approx(want)
    assert report["file"] == str(path) and report["threshold"] == 0.7


def test_nan_is_null_and_mae_follows_the_dice_scale(tmp_path, capsys):
    path = tmp_path / "cases.csv"
    write_cases(path)
    code, out, _ = run(capsys, str(path), "--score", "dr_error", "--threshold", "-5",
                       "--no-dice-scale")
    report = json.loads(out)
    assert code == 0 and report["n_flagged"] == 0
    assert report["precision"] is None and report["mae"] is None
    assert report["mean_dice_after"] == report["mean_dice_before"]
    # the registry says dr_error predicts Dice: without a flag, mae is reported
    code, out, _ = run(capsys, str(path), "--score", "dr_error", "--threshold", "-5")
    report = json.loads(out)
    assert code == 0 and report["dice_scale"] is True and report["mae"] > 0
    code, out, _ = run(capsys, str(path), "--score", "mean_entropy_lesion", "--threshold", "0.3")
    assert json.loads(out)["mae"] is None  # not a Dice-scale score in the registry


def test_folds_add_per_fold_results_and_their_mean_and_median(tmp_path, capsys):
    path = tmp_path / "cases.csv"
    table = write_cases(path)
    code, out, _ = run(capsys, str(path), "--score", "mean_entropy_lesion", "--threshold",
                       "0.3", "--lower-is-better")
    report = json.loads(out)
    assert code == 0 and report["evaluated_rows"] == "test" and report["n_cases"] == 45
    assert [row["fold"] for row in report["per_fold"]] == [1, 2, 3]
    for row in report["per_fold"]:
        assert ISSUE_KEYS <= set(row)
        rows = table[(table["fold"] == row["fold"]) & (table["split"] == "test")]
        assert row["n_flagged"] == evaluate_score(rows, "mean_entropy_lesion", 0.3)["n_flagged"]
    across = report["across_folds"]
    assert set(across) == {"mean", "median", "n_folds_defined"}
    assert ISSUE_KEYS <= set(across["mean"])
    recalls = [row["recall"] for row in report["per_fold"]]
    assert across["mean"]["recall"] == pytest.approx(np.mean(recalls))
    assert across["median"]["recall"] == pytest.approx(np.median(recalls))


@pytest.mark.parametrize("rule", ["f1", "youden", "recall:0.9"])
def test_select_threshold_reports_each_folds_choice(tmp_path, capsys, rule):
    path = tmp_path / "cases.csv"
    write_cases(path)
    code, out, _ = run(capsys, str(path), "--score", "dr_error", "--select-threshold", rule,
                       "--quality-threshold", "0.7", "--dice-scale")
    report = json.loads(out)
    assert code == 0 and ISSUE_KEYS <= set(report)
    selection = report["threshold_selection"]
    assert selection["rule"] == rule and selection["tuned_on"] == "val"
    assert [t["fold"] for t in selection["thresholds"]] == [1, 2, 3]
    assert [row["threshold"] for row in report["per_fold"]] == \
        [t["threshold"] for t in selection["thresholds"]]
    assert report["quality_threshold"] == 0.7 and report["mae"] is not None


def test_registered_score_takes_its_direction_from_the_registry(tmp_path, capsys):
    path = tmp_path / "cases.csv"
    write_cases(path)
    args = (str(path), "--score", "mean_entropy_lesion", "--select-threshold", "f1")
    code, plain, err = run(capsys, *args)
    assert code == 0 and err == ""
    code, explicit, err = run(capsys, *args, "--lower-is-better")
    assert code == 0 and err == ""
    plain, explicit = json.loads(plain), json.loads(explicit)
    assert plain["higher_is_better"] is False
    assert plain == explicit
    # entropy tracks 1 - Dice here, so read the right way round it ranks failures well
    assert plain["failure_auroc"] > 0.7 and plain["norm_aurc"] > 0.2


def test_an_explicit_direction_wins_over_the_registry_with_a_note(tmp_path, capsys):
    path = tmp_path / "cases.csv"
    write_cases(path)
    args = (str(path), "--score", "mean_entropy_lesion", "--threshold", "0.3")
    _, registry, _ = run(capsys, *args)
    code, flipped, err = run(capsys, *args, "--higher-is-better")
    assert code == 0 and "declares 'mean_entropy_lesion' lower-is-better" in err
    registry, flipped = json.loads(registry), json.loads(flipped)
    assert flipped["higher_is_better"] is True
    assert flipped["failure_auroc"] == pytest.approx(1 - registry["failure_auroc"])
    assert flipped["n_flagged"] + registry["n_flagged"] == registry["n_cases"]


def test_an_unknown_column_must_state_its_direction(tmp_path, capsys):
    path = tmp_path / "cases.csv"
    table = write_cases(path).rename(columns={"dr_error": "predicted_dice"})
    table.to_csv(path, index=False)
    code, out, err = run(capsys, str(path), "--score", "predicted_dice", "--threshold", "0.7")
    assert code == 2 and out == ""
    assert "'predicted_dice' is not a registered QC score" in err
    assert "--higher-is-better or --lower-is-better" in err
    code, out, _ = run(capsys, str(path), "--score", "predicted_dice", "--threshold", "0.7",
                       "--higher-is-better")
    report = json.loads(out)
    assert code == 0 and report["higher_is_better"] is True and report["mae"] is None
    want = evaluate_score(table[table["split"] == "test"], "predicted_dice", 0.7,
                          higher_is_better=True)
    assert {k: report[k] for k in ISSUE_KEYS - {"mae"}} == \
        pytest.approx({k: want[k] for k in ISSUE_KEYS - {"mae"}})
    code, out, _ = run(capsys, str(path), "--score", "predicted_dice", "--threshold", "0.7",
                       "--higher-is-better", "--dice-scale")
    assert code == 0 and json.loads(out)["mae"] > 0


def test_direction_flags_exclude_each_other(tmp_path, capsys):
    path = tmp_path / "cases.csv"
    write_cases(path)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(path), "--score", "dr_error", "--threshold", "0.7",
              "--higher-is-better", "--lower-is-better"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def _corrupt(table: pd.DataFrame, how: str) -> pd.DataFrame:
    table = table.copy()
    if how == "missing column":
        return table.drop(columns="true_dice")
    if how == "non-numeric":
        table["dr_error"] = table["dr_error"].astype(object)
        table.loc[3, "dr_error"] = "oops"
    elif how == "nan":
        table.loc[3, "dr_error"] = np.nan
    elif how == "dice outside":
        table.loc[3, "true_dice"] = 1.5
    elif how == "one row":
        return table.iloc[:1]
    elif how == "header only":
        return table.iloc[:0]
    return table


@pytest.mark.parametrize("how, message", [
    ("missing column", "missing column(s) ['true_dice']"),
    ("non-numeric", "non-numeric value 'oops'"),
    ("nan", "missing (NaN)"),
    ("dice outside", "outside [0, 1]"),
    ("one row", "only one case"),
    ("header only", "no cases"),
])
def test_bad_tables_exit_2_naming_file_and_problem(tmp_path, capsys, how, message):
    path = tmp_path / "bad.csv"
    table = write_cases(path)
    _corrupt(table, how).to_csv(path, index=False)
    code, out, err = run(capsys, str(path), "--score", "dr_error", "--threshold", "0.7")
    assert code == 2 and out == ""
    assert str(path) in err and message in err and "wmhqc: error" in err


def test_empty_and_missing_files_and_bad_rules_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, _, err = run(capsys, str(empty), "--score", "dr_error", "--threshold", "0.7")
    assert code == 2 and str(empty) in err and "empty file" in err
    missing = tmp_path / "nowhere.csv"
    code, _, err = run(capsys, str(missing), "--score", "dr_error", "--threshold", "0.7")
    assert code == 2 and str(missing) in err and "no such file" in err
    good = tmp_path / "cases.csv"
    table = write_cases(good)
    code, _, err = run(capsys, str(good), "--score", "dr_error", "--select-threshold", "f2")
    assert code == 2 and "bad threshold selection rule 'f2'" in err
    table.drop(columns="split").to_csv(good, index=False)
    code, _, err = run(capsys, str(good), "--score", "dr_error", "--select-threshold", "f1")
    assert code == 2 and str(good) in err and "'split' column" in err


def test_threshold_or_rule_is_required(tmp_path, capsys):
    path = tmp_path / "cases.csv"
    write_cases(path)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(path), "--score", "dr_error"])
    assert info.value.code == 2
    assert "--threshold" in capsys.readouterr().err


def test_without_a_quality_threshold_a_case_fails_below_lesion_dice_half(tmp_path, capsys):
    """The CLI's default is the study's lesion-Dice threshold 0.5, not the paper's two-class
    0.75: a case with Dice 0.6 has not failed."""
    path = tmp_path / "cases.csv"
    pd.DataFrame({"true_dice": [0.6, 0.6, 0.9, 0.3],
                  "dr_error": [0.1, 0.8, 0.9, 0.2]}).to_csv(path, index=False)
    code, out, _ = run(capsys, str(path), "--score", "dr_error", "--threshold", "0.5")
    report = json.loads(out)
    assert code == 0 and report["quality_threshold"] == 0.5
    assert report["n_failed"] == 1  # only Dice 0.3
    assert (report["n_flagged"], report["n_true_positive"]) == (2, 1)  # Dice 0.6 flagged: FP
    assert report["precision"] == pytest.approx(0.5) and report["recall"] == pytest.approx(1.0)
    code, out, _ = run(capsys, str(path), "--score", "dr_error", "--threshold", "0.5",
                       "--quality-threshold", "0.75")
    assert code == 0 and json.loads(out)["n_failed"] == 3  # asked for: both 0.6 cases fail


def test_help_names_the_default_quality_threshold(capsys):
    from wmhqc_lib.qc.evaluation import QUALITY_THRESHOLD

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {QUALITY_THRESHOLD:g}," in text and "default 0.75" not in text
