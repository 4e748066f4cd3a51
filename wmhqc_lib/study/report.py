"""The evaluation chapter over all folds: which QC scores exist, their comparison in the paper's
Table 1 form and in today's ranking metrics, and the figures that show them.

Everything reads the per-fold case tables (``fold<k>/cases.csv``); thresholds are chosen on
each fold's validation rows and applied to its test rows (:mod:`wmhqc_lib.qc.evaluation`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..data import cohort
from ..qc import evaluation as ev

# The paper's Figure 3 panels, in order, with the score each shows.
FIGURE3_PANELS = (("a", "uncertainty_vs"), ("b", "error_vs"), ("c", "dr_image"),
                  ("d", "dr_uncertainty"), ("e", "dr_error"))

#: What a row of the ranking is: a QC method, a baseline it must beat, or a reference line that
#: reads the annotation (never a method, never in :func:`winners` or :func:`choose_score`).
ROLE_QC, ROLE_BASELINE, ROLE_REFERENCE = ("QC method", "baseline",
                                          "reference (reads the annotation)")

#: The failure rate of the case's site among its fold's validation cases (:func:`add_site_score`):
#: higher rate, more likely failed. A baseline: it needs no annotation of the case itself.
SITE_SCORE = ev.QCScore("site_failure_rate", "site_failure_rate",
                        "site's failure rate on validation cases (baseline)", False,
                        baseline=True)
#: The baseline every score is set against in :func:`added_value_table`.
VOLUME_BASELINE = "pred_lesion_ml"
THIRDS = ("lower third", "middle third", "upper third")


def score_role(spec: ev.QCScore) -> str:
    """:data:`ROLE_REFERENCE`, :data:`ROLE_BASELINE` or :data:`ROLE_QC` for this score."""
    if spec.reads_annotation:
        return ROLE_REFERENCE
    return ROLE_BASELINE if spec.baseline else ROLE_QC


def load_all_cases(results_dir: str | Path, folds: Sequence[int] | None = None) -> pd.DataFrame:
    """Every fold's case table stacked (one row per fold and subject)."""
    root = Path(results_dir)
    paths = sorted(root.glob("fold*/cases.csv"), key=lambda p: int(p.parent.name[4:]))
    if folds:
        paths = [p for p in paths if int(p.parent.name[4:]) in set(folds)]
    if not paths:
        raise FileNotFoundError(f"{root}: no fold*/cases.csv; run the per-fold steps first")
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def available_scores(cases: pd.DataFrame, *, with_baselines: bool = True,
                     seed: int = 0) -> tuple[pd.DataFrame, list[ev.QCScore]]:
    """The registered QC scores whose column is filled on every validation and test row, plus
    the baselines (predicted lesion volume, a seeded random score)."""
    cases = ev.add_random_score(cases, seed=seed) if with_baselines else cases
    scored = cases[cases["split"].isin(["val", "test"])]
    scores = []
    for spec in ev.QC_SCORES:
        if spec.baseline and not with_baselines:
            continue
        if spec.column in scored and scored[spec.column].notna().all():
            scores.append(spec)
    return cases, scores


def compare(cases: pd.DataFrame, scores: Sequence[ev.QCScore], select: str = "f1", *,
            quality_threshold: float = ev.QUALITY_THRESHOLD,
            dice_column: str = ev.DICE_COLUMN) -> dict[str, ev.FoldEvaluation]:
    """Each score evaluated per fold with a threshold chosen on that fold's validation rows."""
    return {s.name: ev.evaluate_folds(cases, s, select=select,
                                      quality_threshold=quality_threshold,
                                      dice_column=dice_column) for s in scores}


#: The references every score's paired differences are taken against in :func:`ranking_table`
#: (column suffix): the carried score, and the predicted lesion volume a method must beat.
DELTA_REFERENCES = ("chosen", "volume")


def ranking_table(cases: pd.DataFrame, scores: Sequence[ev.QCScore], *, n_boot: int = 1000,
                  seed: int = 0, quality_threshold: float = ev.QUALITY_THRESHOLD,
                  dice_column: str = ev.DICE_COLUMN,
                  chosen: ev.QCScore | None = None) -> pd.DataFrame:
    """Threshold-free ranking metrics on all test rows pooled over folds, with bootstrap 95 %
    intervals (over cases) for :data:`~wmhqc_lib.qc.evaluation.BOOTSTRAP_METRICS`. ``role``
    says whether a row is a QC method, a baseline or a reference line (:func:`score_role`).

    Paired differences: each score minus ``chosen`` (the carried score, when given) and minus
    the predicted lesion volume (when it is among ``scores``), in failure AUROC and AURC, with
    paired, failure-stratified bootstrap 95 % intervals
    (:func:`~wmhqc_lib.qc.evaluation.paired_bootstrap_delta`; every score sees the same
    resamples): columns ``delta_<metric>_vs_<chosen|volume>`` with ``_low``/``_high``. Two
    scores' own intervals overlap far more often than their difference's interval spans 0,
    since the cases that are hard for one are hard for the other; the difference is what
    tells them apart. A score's difference to itself is left empty."""
    test = ev.scored_rows(cases)
    volume = next((s for s in scores if s.column == VOLUME_BASELINE), None)
    references = {"chosen": chosen, "volume": volume}
    rows = []
    for spec in scores:
        # AUROC, AURC, e-AURC and correlations do not depend on the threshold
        metrics = ev.evaluate_score(test, spec, threshold=float(test[spec.column].median()),
                                    quality_threshold=quality_threshold,
                                    dice_column=dice_column)
        boot = ev.bootstrap_intervals(test, spec, n_boot=n_boot, seed=seed,
                                      quality_threshold=quality_threshold,
                                      dice_column=dice_column)
        sign = 1.0 if spec.higher_is_better else -1.0
        row = {"score": spec.label, "role": score_role(spec),
               "failure_auroc": metrics["failure_auroc"],
               "aurc": metrics["aurc"], "eaurc": metrics["eaurc"],
               "norm_aurc": metrics["norm_aurc"],
               "spearman_r": metrics["spearman_r"], "pearson_r": metrics["pearson_r"],
               # rank agreement with Dice in the score's own direction (+1 = perfect)
               "spearman_oriented": sign * metrics["spearman_r"]}
        for metric in ev.BOOTSTRAP_METRICS:
            row[f"{metric}_low"] = float(boot.loc[metric, "low"])
            row[f"{metric}_high"] = float(boot.loc[metric, "high"])
        for tag, ref in references.items():
            if ref is None:
                continue
            delta = (ev.paired_bootstrap_delta(test, spec, ref, n_boot=n_boot, seed=seed,
                                               quality_threshold=quality_threshold,
                                               dice_column=dice_column)
                     if ref.column != spec.column else None)
            for metric in ev.DELTA_METRICS:
                for part, key in (("", "delta"), ("_low", "low"), ("_high", "high")):
                    row[f"delta_{metric}_vs_{tag}{part}"] = (
                        float(delta.loc[metric, key]) if delta is not None else np.nan)
        rows.append(row)
    return pd.DataFrame(rows).set_index("score")


def _with_interval(value: float | None, low: float | None, high: float | None) -> str:
    """``0.812 [0.700, 0.900]``; the value alone without a finite interval; n/a without one."""
    if value is None or not np.isfinite(value):
        return "n/a"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def ranking_display(ranking: pd.DataFrame) -> pd.DataFrame:
    """:func:`ranking_table` for reading: each metric with its interval in one column, so the
    table fits the page (the numeric table stays available as CSV)."""
    shown = {"failure AUROC": "failure_auroc", "AURC": "aurc", "e-AURC": "eaurc",
             "normalised AURC": "norm_aurc", "Pearson r": "pearson_r"}
    out = pd.DataFrame({label: [_with_interval(row[m], row.get(f"{m}_low"),
                                               row.get(f"{m}_high"))
                                for _, row in ranking.iterrows()]
                        for label, m in shown.items()}, index=ranking.index)
    if "role" in ranking:
        out.insert(0, "role", ranking["role"])
    return out


def delta_display(ranking: pd.DataFrame, against: str = "chosen") -> pd.DataFrame:
    """The paired differences of :func:`ranking_table` against one reference (``chosen`` or
    ``volume``) for reading: Δ failure AUROC and Δ AURC with their intervals, "—" for the
    reference itself (a table of its own, so that each fits the page)."""
    out = pd.DataFrame(index=ranking.index)
    if "role" in ranking:
        out["role"] = ranking["role"]
    for metric, label in (("failure_auroc", "Δ failure AUROC (> 0: better)"),
                          ("aurc", "Δ AURC (< 0: better)")):
        column = f"delta_{metric}_vs_{against}"
        if column not in ranking:
            raise ValueError(f"the ranking has no paired differences against {against!r}")
        out[label] = [_with_interval(row[column], row[f"{column}_low"], row[f"{column}_high"])
                      if np.isfinite(row[column]) else "—" for _, row in ranking.iterrows()]
    return out


def table1_at_a_glance(ours: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 beside ours, one row per (QC score, metric), the mean over folds of
    each: narrow enough for the page. Precision and recall appear twice, in the paper's
    convention (its code computed TN/(TN+FP) and TN/(TN+FN)) and in the standard one
    (positive = failed case), which the paper did not report."""
    metrics = [("Pearson r", "pearson_r"), ("Dice after filtering (median)",
                                             "median_dice_after"),
               ("Precision, the paper's TN/(TN+FP)", "paper_precision"),
               ("Recall, the paper's TN/(TN+FN)", "paper_recall"),
               ("Precision, standard TP/(TP+FP)", "precision"),
               ("Recall, standard TP/(TP+FN)", "recall"),
               ("N failed segmentations identified", "n_flagged"), ("MAE", "mae")]
    rows = []
    for label in paper.columns.get_level_values(0).unique():
        for name, metric in metrics:
            theirs = paper[(label, "mean")].get(metric, np.nan) if (label, "mean") in paper \
                else np.nan
            mine = ours[(label, "mean")].get(metric, np.nan) if (label, "mean") in ours \
                else np.nan
            rows.append({"QC score": label, "metric": name, "paper": theirs, "ours": mine})
    return pd.DataFrame(rows).set_index(["QC score", "metric"])


def choose_score(cases: pd.DataFrame, scores: Sequence[ev.QCScore], *,
                 dice_column: str = ev.DICE_COLUMN) -> tuple[ev.QCScore, pd.DataFrame]:
    """The score carried into the single-score tables, chosen without any test row.

    Rule, the same for every score: pool the validation rows (``split == "val"``) of all folds
    and take the lowest AURC there. Baselines are not eligible (they are what a method must
    beat), nor are reference lines that read the annotation (no method could have them); equal
    AURCs go to the score listed first in ``scores``. Only validation rows are
    read, so nothing about the test rows, garbage included, can change the choice. Returns the
    chosen spec and a table of each candidate's validation AURC, e-AURC and normalised AURC.
    """
    if "split" not in cases.columns:
        raise ValueError("choosing a score needs a 'split' column with val rows")
    val = cases[cases["split"].astype(str) == "val"]
    candidates = [s for s in scores if not (s.baseline or s.reads_annotation)]
    if not candidates:
        raise ValueError("no eligible score: every score given is a baseline or a reference "
                         "line that reads the annotation")
    rows = []
    for position, spec in enumerate(candidates):
        # the threshold does not enter AURC, e-AURC or normalised AURC
        m = ev.evaluate_score(val, spec, threshold=0.0, dice_column=dice_column)
        rows.append({"score": spec.label, "name": spec.name, "n_val_rows": len(val),
                     "aurc_val": m["aurc"], "eaurc_val": m["eaurc"],
                     "norm_aurc_val": m["norm_aurc"], "_order": position})
    table = pd.DataFrame(rows).sort_values(["aurc_val", "_order"], kind="stable")
    chosen = candidates[int(table["_order"].iloc[0])]
    table["chosen"] = table["name"] == chosen.name
    return chosen, table.drop(columns="_order").set_index("score")


def choice_stability(cases: pd.DataFrame, scores: Sequence[ev.QCScore], *, n_boot: int = 1000,
                     seed: int = 0, dice_column: str = ev.DICE_COLUMN) -> pd.DataFrame:
    """How often each eligible score would have been chosen, over bootstrap resamples of the
    rows that choose (:func:`choose_score`'s pooled validation rows).

    Each resample draws every fold's validation rows again with replacement (as many as it
    has), pools them and applies :func:`choose_score`'s rule (lowest AURC, ties to the score
    listed first) to each candidate on the same resample. A choice that wins in most resamples
    is a finding; one that wins in half of them is a coin the validation cases happened to
    throw. Columns: ``wins`` (resamples won), ``share`` (of ``n_boot``), ``chosen`` (on all
    rows), in ``choose_score``'s candidate order, most wins first.
    """
    chosen, _ = choose_score(cases, scores, dice_column=dice_column)
    val = cases[cases["split"].astype(str) == "val"].reset_index(drop=True)
    candidates = [s for s in scores if not (s.baseline or s.reads_annotation)]
    rng = np.random.default_rng([seed, 29])
    groups = [np.flatnonzero(val["fold"].to_numpy() == f) for f in sorted(val["fold"].unique())] \
        if "fold" in val else [np.arange(len(val))]
    rows = np.concatenate([g[rng.integers(0, len(g), (n_boot, len(g)))] for g in groups], axis=1)
    aurc = np.column_stack([ev.resampled_metric(val, spec, rows, metric="aurc",
                                                dice_column=dice_column)
                            for spec in candidates])
    decided = np.isfinite(aurc).any(axis=1)  # a resample where no AURC exists decides nothing
    winner = np.argmin(np.where(np.isfinite(aurc), aurc, np.inf), axis=1)  # first on ties
    wins = np.bincount(winner[decided], minlength=len(candidates))
    table = pd.DataFrame({"score": [s.label for s in candidates], "wins": wins,
                          "share": wins / n_boot,
                          "chosen": [s.name == chosen.name for s in candidates],
                          "_order": range(len(candidates))})
    table = table.sort_values(["wins", "_order"], ascending=[False, True], kind="stable")
    table.attrs.update(n_boot=n_boot, n_rows=len(val))
    return table.drop(columns="_order").set_index("score")


def split_prevalence_note(cases: pd.DataFrame, *,
                          quality_threshold: float = ev.QUALITY_THRESHOLD,
                          dice_column: str = ev.DICE_COLUMN) -> str:
    """The failure prevalence of the validation rows (which choose) beside the test rows'
    (which report): the segmentation networks kept their checkpoints by validation quality, so
    a lower failure rate on validation rows is the optimism that choice carries."""
    parts = []
    for split in ("val", "test"):
        rows = cases[cases["split"].astype(str) == split]
        failed = int((rows[dice_column] < quality_threshold).sum())
        parts.append(f"{failed} of {len(rows)} {'validation' if split == 'val' else 'test'} "
                     f"rows failed ({failed / max(len(rows), 1):.0%})")
    return (f"Failure prevalence, lesion Dice < {quality_threshold}: " + "; ".join(parts)
            + ". The validation cases chose the networks' checkpoints as well as the score and "
            "its thresholds.")


def stability_note(stability: pd.DataFrame) -> str:
    """One sentence on how stable the choice is, from :func:`choice_stability`."""
    chosen = stability.index[stability["chosen"]][0]
    share = float(stability.loc[chosen, "share"])
    others = stability[~stability["chosen"] & (stability["wins"] > 0)]
    rivals = ", ".join(f"{name} {row['share']:.0%}" for name, row in others.head(3).iterrows())
    n_boot, n_rows = stability.attrs.get("n_boot", "?"), stability.attrs.get("n_rows", "?")
    strength = ("a stable choice" if share >= 0.8 else "a fragile choice" if share < 0.5
                else "a choice that holds in most resamples, not all")
    return (f"{chosen} wins in {share:.0%} of {n_boot} bootstrap resamples of the {n_rows} "
            f"validation rows that choose ({strength})"
            + (f"; otherwise {rivals}." if rivals else "."))


def operating_point_table(rechosen: dict, fixed: dict | None = None) -> pd.DataFrame:
    """:func:`~wmhqc_lib.qc.evaluation.operating_point` for reading: each figure with its
    interval when the thresholds are chosen again in every resample, and (given) with them
    held fixed; recall, specificity and review fraction are what a flag promises, precision
    comes with the prevalence it holds at."""
    labels = {"recall": "recall (promise)", "specificity": "specificity (promise)",
              "review_fraction": "review fraction (promise)",
              "precision": "precision (at this prevalence only)",
              "prevalence": "failure prevalence"}
    columns = {"thresholds chosen again in each resample": rechosen}
    if fixed is not None:
        columns["thresholds held fixed"] = fixed
    return pd.DataFrame({name: [_with_interval(op[m]["estimate"], op[m]["low"], op[m]["high"])
                                for m in labels] for name, op in columns.items()},
                        index=list(labels.values()))


def _paired_ties(cases: pd.DataFrame, scores: Sequence[ev.QCScore], metric: str, best: str, *,
                 n_boot: int, seed: int, quality_threshold: float, dice_column: str,
                 cache: dict) -> tuple[list[str], dict[str, tuple[float, float, float]]]:
    """Scores whose paired difference to ``best`` on ``metric`` has a 95 % interval that holds
    0 (test rows pooled), and every score's (delta, low, high) against it."""
    test = ev.scored_rows(cases)
    by_label = {s.label: s for s in scores}
    tied, deltas = [], {}
    for label, spec in by_label.items():
        if label == best:
            continue
        key = (label, best)
        if key not in cache:
            cache[key] = ev.paired_bootstrap_delta(
                test, spec, by_label[best], n_boot=n_boot, seed=seed,
                quality_threshold=quality_threshold, dice_column=dice_column,
                metrics=tuple(ev.METRIC_DIRECTION))
        d = cache[key].loc[metric]
        deltas[label] = (float(d["delta"]), float(d["low"]), float(d["high"]))
        if np.isfinite(d["low"]) and d["low"] <= 0 <= d["high"]:
            tied.append(label)
    return tied, deltas


def _overlapping(ranking: pd.DataFrame, metric: str, best: str) -> list[str] | None:
    """Scores whose bootstrap interval of ``metric`` overlaps the best score's; None when the
    ranking has no interval for it."""
    low, high = f"{metric}_low", f"{metric}_high"
    if low not in ranking or high not in ranking:
        return None
    lo, hi = ranking.loc[best, low], ranking.loc[best, high]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    others = ranking.drop(index=best)
    overlap = (others[low] <= hi) & (others[high] >= lo)
    return list(others.index[overlap.fillna(False).to_numpy(dtype=bool)])


def winners(ranking: pd.DataFrame, table: pd.DataFrame, cases: pd.DataFrame | None = None,
            scores: Sequence[ev.QCScore] | None = None, *, n_boot: int = 1000, seed: int = 0,
            quality_threshold: float = ev.QUALITY_THRESHOLD,
            dice_column: str = ev.DICE_COLUMN) -> pd.DataFrame:
    """Which score is best on each metric (computed, not typed), and whether it really is.

    On the test rows pooled over folds: lowest AURC / e-AURC, highest normalised AURC, failure
    AUROC and Spearman in the score's direction. With ``cases`` and ``scores``, a tie is called
    from paired differences: every other score minus the pick on the same bootstrap resamples
    (:func:`~wmhqc_lib.qc.evaluation.paired_bootstrap_delta`), and ``tied with`` lists each
    score whose difference's 95 % interval holds 0; the verdict says "tie" when any does.
    Without them (or for Spearman, which has no paired interval), the older, cruder rule:
    overlapping unpaired intervals of :func:`ranking_table`, labelled as such. In the Table 1
    form (means over folds, no interval): highest recall and precision, highest median Dice
    after filtering, fewest cases reviewed. Reference lines (``role``
    :data:`ROLE_REFERENCE`) are left out: they read the annotation, so they are no method that
    could win, and they neither win nor tie.
    """
    if "role" in ranking:
        ranking = ranking[ranking["role"] != ROLE_REFERENCE]
    paired = cases is not None and scores is not None
    eligible = [s for s in scores or () if s.label in ranking.index]
    cache: dict = {}
    picks = []
    for metric, best in (("aurc", "min"), ("eaurc", "min"), ("norm_aurc", "max"),
                         ("failure_auroc", "max"), ("spearman_oriented", "max")):
        if metric not in ranking:
            continue
        col = ranking[metric].dropna()
        if not len(col):
            continue
        name = col.idxmin() if best == "min" else col.idxmax()
        has_interval = f"{metric}_low" in ranking
        low = float(ranking.loc[name, f"{metric}_low"]) if has_interval else np.nan
        high = float(ranking.loc[name, f"{metric}_high"]) if has_interval else np.nan
        if paired and metric in ev.METRIC_DIRECTION:
            tied, _ = _paired_ties(cases, eligible, metric, name, n_boot=n_boot, seed=seed,
                                   quality_threshold=quality_threshold,
                                   dice_column=dice_column, cache=cache)
            verdict = (f"tie: {name} with {', '.join(tied)} (paired 95 % intervals of the "
                       "difference hold 0)" if tied else
                       f"{name} (every paired difference's 95 % interval excludes 0)")
        else:
            tied = _overlapping(ranking, metric, name)
            if tied is None:
                verdict = f"{name} (point estimate; no interval)"
            elif tied:
                verdict = (f"tie: {name} with {', '.join(tied)} (overlapping unpaired 95 % "
                           "intervals)")
            else:
                verdict = f"{name} (its unpaired 95 % interval overlaps no other score's)"
        picks.append({"metric": metric, "basis": "test cases pooled over folds",
                      "best score": name, "value": float(col[name]), "low": low, "high": high,
                      "tied with": ", ".join(tied or []), "verdict": verdict})
    has_means = "mean" in table.columns.get_level_values("across folds")
    means = table.xs("mean", axis=1, level="across folds") if has_means else pd.DataFrame()
    for metric, best in (("recall", "max"), ("precision", "max"),
                         ("median_dice_after", "max"), ("review_fraction", "min")):
        if metric in means.index:
            row = means.loc[metric].dropna()
            if len(row):
                name = row.idxmin() if best == "min" else row.idxmax()
                picks.append({"metric": metric, "basis": "mean over folds, val-chosen threshold",
                              "best score": name, "value": float(row[name]), "low": np.nan,
                              "high": np.nan, "tied with": "",
                              "verdict": f"{name} (point estimate; no interval)"})
    return pd.DataFrame(picks)


def dice_by_grid(cases: pd.DataFrame) -> pd.DataFrame:
    """Per fold, on test rows: median lesion Dice on the subject's native grid (``true_dice``)
    and on the profile grid (``true_dice_grid``), and how many references are empty.

    Shows what exists: a column the case tables lack (older runs) is left out, not invented.
    """
    test = ev.scored_rows(cases)
    if "fold" not in test:
        test = test.assign(fold="all")
    out = pd.DataFrame(index=pd.Index(sorted(test["fold"].unique()), name="fold"))
    groups = test.groupby("fold")
    out["n_test"] = groups.size()
    for column, label in (("true_dice", "median Dice, native grid"),
                          ("true_dice_grid", "median Dice, profile grid")):
        if column in test:
            out[label] = groups[column].median()
    if "true_dice" in test and "true_dice_grid" in test:
        out["native - grid"] = out["median Dice, native grid"] - out["median Dice, profile grid"]
    if "reference_empty" in test:
        empty = test["reference_empty"].astype(str).str.lower().isin(["true", "1", "1.0"])
        out["empty reference"] = empty.groupby(test["fold"]).sum().astype(int)
    return out


def dice_grid_note(grid: pd.DataFrame) -> str:
    """One computed sentence on what measuring Dice on the profile grid changes."""
    native, coarse = "median Dice, native grid", "median Dice, profile grid"
    if native in grid and coarse in grid:
        diff = float((grid[native] - grid[coarse]).mean())
        text = (f"Averaged over folds, the median test Dice is {grid[native].mean():.3f} on the "
                f"native grid and {grid[coarse].mean():.3f} on the profile grid: judged on the "
                f"native grid a segmentation scores {abs(diff):.3f} "
                f"{'higher' if diff > 0 else 'lower'} than on the profile grid.")
    else:
        text = ("These case tables have no profile-grid Dice (`true_dice_grid`, written by newer "
                "runs): only the Dice they hold is shown.")
    if "empty reference" in grid:
        text += f" {int(grid['empty reference'].sum())} test case(s) have an empty reference."
    return text


# ---------------------------------------------------------------------------------------------
# What a reviewer asks next: how many failed, what lesion load and site alone explain


def _test_dice(cases: pd.DataFrame, dice_column: str, quality_threshold: float
               ) -> tuple[pd.DataFrame, np.ndarray]:
    """The test rows (checked) and which of them failed."""
    test = ev.check_cases(ev.scored_rows(cases), [dice_column], dice_column=dice_column)
    return test, test[dice_column].to_numpy(dtype=float) < quality_threshold


def failure_prevalence(cases: pd.DataFrame, *, quality_threshold: float = ev.QUALITY_THRESHOLD,
                       dice_column: str = ev.DICE_COLUMN) -> pd.DataFrame:
    """Per fold and pooled over folds, on test rows: cases, failed cases, prevalence.

    Read next to Table 1: precision, recall and Dice after filtering mean little without it (a
    flagger that flags at random has precision equal to the prevalence).
    """
    test, failed = _test_dice(cases, dice_column, quality_threshold)
    fold = test["fold"].to_numpy() if "fold" in test else np.full(len(test), "all")
    frame = pd.DataFrame({"fold": fold, "failed": failed})
    out = frame.groupby("fold")["failed"].agg(n_cases="size", n_failed="sum")
    if "fold" in test:
        out.loc["pooled"] = [len(frame), int(failed.sum())]
    out = out.astype(int)
    out["prevalence"] = out["n_failed"] / out["n_cases"]
    out.index.name = "fold"
    return out


def add_site_score(cases: pd.DataFrame, *, quality_threshold: float = ev.QUALITY_THRESHOLD,
                   dice_column: str = ev.DICE_COLUMN,
                   column: str = SITE_SCORE.column) -> pd.DataFrame:
    """A copy with each test row's site failure rate (:data:`SITE_SCORE`), made without test rows.

    Per fold, the rate is the share of that fold's **validation** rows from the case's site whose
    Dice is below the quality threshold; a site with no validation row in the fold gets the
    fold's validation failure rate over all sites. Validation rather than training rows: the
    segmentation network was fitted to its training rows, so their Dice flatters it, while
    validation rows are held out from fitting and fail as new cases do. Test rows are never
    read, so the score could be known before any test case is segmented. Other rows get NaN:
    on a validation row the rate would include that row's own Dice.
    """
    out = cases.copy()
    out[column] = np.nan
    split = cases["split"].astype(str)
    for _, part in cases.groupby("fold"):
        val = part[split.loc[part.index] == "val"]
        failed = pd.to_numeric(val[dice_column], errors="coerce") < quality_threshold
        pooled = float(failed.mean()) if len(val) else np.nan
        by_site = failed.groupby(val["site"]).mean()
        test = part.index[split.loc[part.index] == "test"]
        out.loc[test, column] = cases.loc[test, "site"].map(by_site).fillna(pooled).astype(float)
    return out


def add_roundtrip_dice(cases: pd.DataFrame, results_dir: str | Path) -> pd.DataFrame:
    """A copy with ``roundtrip_dice`` joined from the data step's preprocessing table, per
    subject (the grid's cost does not depend on the fold); unchanged when the table has no such
    column (older runs) or the cases already hold it."""
    if "roundtrip_dice" in cases:
        return cases
    _, prep, _ = cohort.load(results_dir)
    if "roundtrip_dice" not in prep:
        return cases
    per_subject = prep[["subject_id", "roundtrip_dice"]].drop_duplicates("subject_id")
    out = cases.merge(per_subject, on="subject_id", how="left", validate="many_to_one")
    out.attrs.update(cases.attrs)
    return out


def reference_lines(cases: pd.DataFrame, results_dir: str | Path | None = None, *,
                    quality_threshold: float = ev.QUALITY_THRESHOLD,
                    dice_column: str = ev.DICE_COLUMN
                    ) -> tuple[pd.DataFrame, list[ev.QCScore]]:
    """The cases with the site score (and round-trip Dice from ``results_dir``) added, and the
    extra ranking rows whose column is filled on every test row: the site baseline, then the
    reference lines that read the annotation (true lesion volume, round-trip Dice). Pass them to
    :func:`ranking_table` beside the QC scores, never to :func:`compare` or
    :func:`choose_score`: the predicted lesion volume is already among the baselines."""
    if results_dir is not None:
        cases = add_roundtrip_dice(cases, results_dir)
    if {"site", "fold", "split"} <= set(cases.columns):
        cases = add_site_score(cases, quality_threshold=quality_threshold,
                               dice_column=dice_column)
    test = ev.scored_rows(cases)
    specs = [spec for spec in (SITE_SCORE, *ev.REFERENCE_SCORES)
             if spec.column in test and pd.to_numeric(test[spec.column], errors="coerce")
             .notna().all()]
    return cases, specs


def volume_thirds(cases: pd.DataFrame, *, column: str = "true_lesion_ml",
                  dice_column: str = ev.DICE_COLUMN) -> pd.Series:
    """Which third of lesion volume each test row is in (index: the test rows' index).

    Tertiles of the pooled test rows' ``column``: lower up to the 1/3 quantile, middle up to the
    2/3 quantile, upper above it. Many equal volumes (empty references) can make thirds unequal;
    :func:`third_counts` shows the sizes.
    """
    test = ev.check_cases(ev.scored_rows(cases), [column, dice_column], dice_column=dice_column)
    volume = test[column].to_numpy(dtype=float)
    q1, q2 = np.quantile(volume, [1 / 3, 2 / 3])
    third = np.where(volume <= q1, 0, np.where(volume <= q2, 1, 2))
    return pd.Series(pd.Categorical.from_codes(third, THIRDS), index=test.index,
                     name="volume third")


def third_counts(cases: pd.DataFrame, *, column: str = "true_lesion_ml",
                 quality_threshold: float = ev.QUALITY_THRESHOLD,
                 dice_column: str = ev.DICE_COLUMN) -> pd.DataFrame:
    """Per third of true lesion volume (:func:`volume_thirds`): its volume range, test cases,
    failed cases and prevalence."""
    third = volume_thirds(cases, column=column, dice_column=dice_column)
    test, failed = _test_dice(cases, dice_column, quality_threshold)
    volume = pd.to_numeric(test[column])
    frame = pd.DataFrame({"third": third, "volume": volume, "failed": failed})
    out = frame.groupby("third", observed=False).agg(
        min_ml=("volume", "min"), max_ml=("volume", "max"), n_cases=("volume", "size"),
        n_failed=("failed", "sum"))
    out["n_failed"] = out["n_failed"].astype(int)
    out["prevalence"] = out["n_failed"] / out["n_cases"].where(out["n_cases"] > 0)
    return out


def auroc_by_volume_third(cases: pd.DataFrame, scores: Sequence[ev.QCScore], *,
                          column: str = "true_lesion_ml",
                          quality_threshold: float = ev.QUALITY_THRESHOLD,
                          dice_column: str = ev.DICE_COLUMN) -> pd.DataFrame:
    """Each score's failure AUROC within each third of true lesion volume (test rows pooled).

    Lesion load drives both Dice and most scores, so a pooled AUROC can come from telling small
    lesions from large ones alone; within a third that is mostly taken away. NaN where a third
    has no failure or no success (nothing to separate). Rows: score labels, with ``role``.
    """
    third = volume_thirds(cases, column=column, dice_column=dice_column)
    test = ev.scored_rows(cases).loc[third.index]
    rows = {}
    for spec in scores:
        row: dict[str, object] = {"role": score_role(spec)}
        for name in THIRDS:
            row[name] = ev.failure_auroc(test[third == name], spec,
                                         quality_threshold=quality_threshold,
                                         dice_column=dice_column)
        rows[spec.label] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "score"
    return out


def thirds_note(counts: pd.DataFrame) -> str:
    """One computed sentence naming the thirds where AUROC is undefined, and why."""
    undefined = []
    for name, row in counts.iterrows():
        if row["n_failed"] in (0, row["n_cases"]):
            what = "no test case" if row["n_cases"] == 0 else (
                f"all {int(row['n_cases'])} test cases failed" if row["n_failed"]
                else f"none of {int(row['n_cases'])} test cases failed")
            undefined.append(f"in the {name} {what}")
    if not undefined:
        return "Every third holds failed and successful test cases, so every AUROC is defined."
    return ("AUROC is undefined (NaN) where a third holds one class only: "
            + "; ".join(undefined) + ".")


def added_value_table(cases: pd.DataFrame, scores: Sequence[ev.QCScore], *,
                      against: str | ev.QCScore = VOLUME_BASELINE, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95,
                      quality_threshold: float = ev.QUALITY_THRESHOLD,
                      dice_column: str = ev.DICE_COLUMN) -> pd.DataFrame:
    """Does each score add anything beyond the predicted lesion volume? Test rows pooled.

    Per score, :func:`~wmhqc_lib.qc.evaluation.paired_bootstrap_delta` against ``against``:
    score minus predicted volume in failure AUROC (positive = better) and in AURC (negative =
    better), with paired, failure-stratified bootstrap intervals; every score sees the same
    resamples (one ``seed``). ``verdict`` reads both intervals: better or worse where an
    interval excludes 0, "no difference shown" where it spans 0, undefined for an AUROC when
    every case failed or none did.
    """
    base = ev.resolve_score(against)
    test = ev.scored_rows(cases)
    rows = {}
    for spec in scores:
        if spec.column == base.column:
            continue
        delta = ev.paired_bootstrap_delta(test, spec, base, n_boot=n_boot, seed=seed,
                                          level=level, quality_threshold=quality_threshold,
                                          dice_column=dice_column)
        row: dict[str, object] = {"role": score_role(spec)}
        verdicts = []
        for metric, label in (("failure_auroc", "AUROC"), ("aurc", "AURC")):
            d = delta.loc[metric]
            row[f"delta_{metric}"] = d["delta"]
            row[f"delta_{metric}_low"] = d["low"]
            row[f"delta_{metric}_high"] = d["high"]
            sign = 1.0 if ev.DELTA_METRICS[metric] == "higher" else -1.0
            if not np.isfinite(d["delta"]):
                verdicts.append(f"{label}: undefined (one class only)")
            elif sign * d["low"] > 0 and sign * d["high"] > 0:
                verdicts.append(f"{label}: better")
            elif sign * d["low"] < 0 and sign * d["high"] < 0:
                verdicts.append(f"{label}: worse")
            else:
                verdicts.append(f"{label}: no difference shown")
        row["verdict"] = "; ".join(verdicts)
        rows[spec.label] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = f"score minus {base.label}"
    return out


def added_value_display(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`added_value_table` for reading: each delta with its interval in one column."""
    out = pd.DataFrame(index=table.index)
    out["role"] = table["role"]
    for metric, label in (("failure_auroc", "Δ failure AUROC (> 0: better)"),
                          ("aurc", "Δ AURC (< 0: better)")):
        out[label] = [_with_interval(row[f"delta_{metric}"], row[f"delta_{metric}_low"],
                                     row[f"delta_{metric}_high"])
                      for _, row in table.iterrows()]
    out["verdict"] = table["verdict"]
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def _label(spec: ev.QCScore) -> str:
    return spec.label


def figure3_panels(cases: pd.DataFrame, note: str = "",
                   dice_column: str = ev.DICE_COLUMN) -> go.Figure:
    """The paper's Figure 3 across folds: each available score against true Dice, test rows,
    one colour per fold, Pearson r in each panel title (identity line on Dice-scale panels)."""
    from scipy.stats import pearsonr

    test = ev.scored_rows(cases)
    panels = [(letter, ev.qc_score(name)) for letter, name in FIGURE3_PANELS
              if name in test and test[name].notna().all()]
    if not panels:
        raise ValueError("no Figure 3 score is available in the case tables")
    titles = []
    for letter, spec in panels:
        r = pearsonr(test[spec.column], test[dice_column])[0] if len(test) > 2 else np.nan
        titles.append(f"({letter}) {spec.label}: r = {r:.2f}")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, vertical_spacing=0.18)
    palette = px.colors.qualitative.Plotly
    for i, (_, spec) in enumerate(panels, start=1):
        row, col = (i - 1) // cols + 1, (i - 1) % cols + 1
        for j, (fold, group) in enumerate(test.groupby("fold")):
            fig.add_trace(go.Scatter(x=group[spec.column], y=group[dice_column], mode="markers",
                                     name=f"fold {fold}", legendgroup=f"fold {fold}",
                                     showlegend=i == 1,
                                     marker={"color": palette[j % len(palette)], "size": 6},
                                     text=group["subject_id"]), row=row, col=col)
        if spec.dice_scale:
            fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", showlegend=False,
                                     line={"dash": "dot", "color": "grey"}), row=row, col=col)
        fig.update_xaxes(title_text=spec.label, row=row, col=col)
        if col == 1:
            fig.update_yaxes(title_text="true lesion Dice", row=row, col=col)
    # no fixed width: the figure takes the page's content column
    fig.update_layout(title=f"QC scores against true Dice, test cases of all folds{note}",
                      height=330 * rows + 60, margin={"t": 80})
    return fig


def _curve_figure(curves: dict[str, pd.DataFrame], x: str, y: str, title: str,
                  xlabel: str, ylabel: str, extra: list[go.Scatter] | None = None) -> go.Figure:
    fig = go.Figure()
    for label, curve in curves.items():
        fig.add_trace(go.Scatter(x=curve[x], y=curve[y], mode="lines", name=label))
    for trace in extra or []:
        fig.add_trace(trace)
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, height=420,
                      margin={"t": 60})
    return fig


def risk_coverage_figure(cases: pd.DataFrame, scores: Sequence[ev.QCScore], note: str = "",
                         **kw) -> go.Figure:
    """Selective risk (1 - Dice of kept cases) against coverage, with the oracle's curve: the
    curves whose areas are the AURC (tied scores leave in one step)."""
    test = ev.scored_rows(cases)
    curves = {s.label: ev.risk_coverage_curve(test, s, **kw) for s in scores}
    best = ev.risk_coverage_curve(test, scores[0], oracle=True, **kw)
    oracle = go.Scatter(x=best["coverage"], y=best["selective_risk"], mode="lines",
                        name="oracle (true Dice order)", line={"dash": "dot", "color": "black"})
    return _curve_figure(curves, "coverage", "selective_risk",
                         f"Risk-coverage, test cases of all folds{note}", "coverage",
                         "selective risk (mean 1 - Dice of kept cases)", [oracle])


def roc_figure(cases: pd.DataFrame, scores: Sequence[ev.QCScore], note: str = "",
               **kw) -> go.Figure:
    """Failure-detection ROC curves (positive class: failed case)."""
    test = ev.scored_rows(cases)
    curves = {s.label: ev.failure_roc_curve(test, s, **kw) for s in scores}
    chance = go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                        line={"dash": "dot", "color": "grey"})
    return _curve_figure(curves, "fpr", "tpr", f"Failure detection ROC{note}",
                         "false-positive rate", "true-positive rate (recall of failures)",
                         [chance])


def workload_figure(cases: pd.DataFrame, scores: Sequence[ev.QCScore],
                    evaluations: dict[str, ev.FoldEvaluation], note: str = "",
                    **kw) -> go.Figure:
    """Fraction of cases sent to review against fraction of failures missed; each score's
    validation-chosen operating point (pooled over folds) marked on its curve."""
    test = ev.scored_rows(cases)
    curves = {s.label: ev.workload_curve(test, s, **kw) for s in scores}
    points = []
    for s in scores:
        pooled = evaluations[s.name].pooled
        points.append(go.Scatter(x=[pooled["review_fraction"]],
                                 y=[pooled["missed_failure_fraction"]], mode="markers",
                                 marker={"size": 10, "symbol": "x"},
                                 name=f"{s.label}: chosen threshold"))
    fig = _curve_figure(curves, "review_fraction", "missed_failure_fraction",
                        f"Review workload against missed failures{note}",
                        "fraction of cases sent to review",
                        "fraction of failures missed", points)
    fig.add_vline(x=0.155, line_dash="dot",
                  annotation_text="paper: 15.5 % reviewed (84.5 % need no review)")
    return fig


def per_fold_figure(evaluations: dict[str, ev.FoldEvaluation], metric: str,
                    note: str = "") -> go.Figure:
    """One metric per fold and score (the paper's SI Figures 4-5 form)."""
    rows = []
    for ev_ in evaluations.values():
        for fold, row in ev_.per_fold.iterrows():
            rows.append({"score": ev_.score.label, "fold": str(row.get("fold", fold)),
                         metric: row[metric]})
    frame = pd.DataFrame(rows)
    fig = px.bar(frame, x="score", y=metric, color="fold", barmode="group",
                 title=f"{metric} per fold (validation-chosen thresholds){note}")
    fig.update_layout(height=380, margin={"t": 60})
    return fig


#: The evaluation chapter's numbers, written as CSV beside the results (``evaluation/``) and
#: shipped with the book (``_static/tables``), so a reader can download what a figure shows.
TABLE_FILES = {"cases": "cases_all_folds.csv", "table1_ours": "table1_ours.csv",
               "table1_paper": "table1_paper.csv", "ranking": "ranking_test_pooled.csv",
               "prevalence": "failure_prevalence.csv",
               "volume_third_counts": "volume_thirds.csv",
               "volume_thirds": "auroc_by_volume_third.csv",
               "added_value": "delta_vs_predicted_volume.csv",
               "choice_stability": "choice_stability.csv",
               "operating_point": "operating_point_carried_score.csv"}


def write_tables(results_dir: str | Path, tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Write the named tables (keys of :data:`TABLE_FILES`) under ``results/<p>/evaluation``.

    File paths inside a table (the per-case NIfTI columns) are made relative to the results
    folder, so no path of the building machine leaves with the book."""
    root = Path(results_dir).resolve()
    folder = Path(results_dir) / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, table in tables.items():
        table = table.copy()
        for column in table.select_dtypes(include="object").columns:
            values = table[column]
            is_path = values.map(lambda v: isinstance(v, str) and os.path.isabs(v))
            if is_path.any():
                table[column] = values.where(~is_path, values.map(
                    lambda v: os.path.relpath(v, root) if isinstance(v, str) else v))
        path = folder / TABLE_FILES[name]
        table.to_csv(path, index=table.index.name is not None or not isinstance(
            table.index, pd.RangeIndex))
        out[name] = path
    return out


def table_links(paths: dict[str, Path], prefix: str = "../_static/tables/") -> str:
    """Markdown links to the book's copies of :func:`write_tables`' files."""
    labels = {"cases": "per-case table of all folds", "table1_ours": "Table 1, ours",
              "table1_paper": "Table 1, the paper's", "ranking": "ranking with intervals",
              "prevalence": "failure prevalence",
              "volume_third_counts": "thirds of lesion volume",
              "volume_thirds": "AUROC within thirds of lesion volume",
              "added_value": "difference from predicted lesion volume",
              "choice_stability": "how often each score wins the choice",
              "operating_point": "the carried score's operating point"}
    return "Download: " + ", ".join(f"[{labels[k]} (CSV)]({prefix}{p.name})"
                                    for k, p in paths.items())
