"""The numbers a reviewer asks of a finished study, from its per-case tables.

Per fold: test cases, median test lesion Dice on the native grid and on the profile grid,
failed cases, empty references. Per QC score (test rows of all folds pooled): failure AUROC,
AURC with its bootstrap 95 % interval, e-AURC, and the lesion-volume baseline beside them.
Writes nothing; prints Markdown tables (for notes and before/after comparisons).

``--native-from-files`` recomputes native-grid Dice of test cases from the saved native
predictions (``native_prediction``) for runs made before the tables carried it.

    .venv/bin/python benchmarks/study_summary.py --results results/cpu
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from wmhqc_lib.config import load_profile
from wmhqc_lib.data import cohort, datasets
from wmhqc_lib.qc.metrics import dice
from wmhqc_lib.study import report


def native_dice_from_files(results: str, cases: pd.DataFrame) -> pd.Series:
    """Lesion Dice of each test row's saved native prediction against its native mask."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    manifest = cohort.load(results)[0].set_index("subject_id")
    out = {}
    for i, row in cases[cases["split"] == "test"].iterrows():
        images = datasets.load_subject(manifest.loc[row["subject_id"]].to_dict()
                                       | {"subject_id": row["subject_id"]})
        pred = nib.load(row["native_prediction"])
        truth, ignore = images.lesion, images.ignore
        if truth.shape != pred.shape or not np.allclose(truth.affine, pred.affine):
            truth = resample_to_img(truth, pred, interpolation="nearest")
            ignore = None if ignore is None else resample_to_img(ignore, pred,
                                                                 interpolation="nearest")
        out[i] = dice(np.asarray(pred.dataobj) > 0.5, np.asarray(truth.dataobj) > 0,
                      None if ignore is None else np.asarray(ignore.dataobj) > 0)
    return pd.Series(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", required=True)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--native-from-files", action="store_true")
    parser.add_argument("--bootstrap", type=int, default=None)
    args = parser.parse_args()
    profile = load_profile(args.profile)
    settings = profile.section("evaluation")
    q = float(settings["quality_threshold"])
    n_boot = args.bootstrap or int(settings["bootstrap_samples"])
    cases, scores = report.available_scores(report.load_all_cases(args.results),
                                            seed=profile.seed)
    if args.native_from_files:
        cases["true_dice_grid"] = cases["true_dice"]
        native = native_dice_from_files(args.results, cases)
        cases.loc[native.index, "true_dice"] = native
    test = cases[cases["split"] == "test"]
    per_fold = test.groupby("fold").agg(
        cases=("subject_id", "size"),
        median_dice_native=("true_dice", "median"),
        median_dice_grid=("true_dice_grid", "median") if "true_dice_grid" in test else
        ("true_dice", lambda s: np.nan),
        failed=("true_dice", lambda s: int((s < q).sum())),
        empty_references=("reference_empty", "sum") if "reference_empty" in test else
        ("true_dice", lambda s: np.nan))
    total = {"cases": len(test), "median_dice_native": test["true_dice"].median(),
             "median_dice_grid": test["true_dice_grid"].median()
             if "true_dice_grid" in test else np.nan,
             "failed": int((test["true_dice"] < q).sum()),
             "empty_references": test["reference_empty"].sum()
             if "reference_empty" in test else np.nan}
    per_fold.loc["all"] = total
    where = "native grid" if "true_dice_grid" in test else "the table's own grid"
    print(f"## {args.results}: failure = lesion Dice ({where}) < {q}\n")
    print(per_fold.round(3).to_markdown())
    spec, _ = report.choose_score(cases, scores)
    ranking = report.ranking_table(cases, scores, n_boot=n_boot, seed=profile.seed,
                                   quality_threshold=q, chosen=spec)
    ranking["aurc_95"] = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in
                          zip(ranking["aurc"], ranking["aurc_low"], ranking["aurc_high"],
                              strict=True)]
    ranking["auroc_95"] = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in
                           zip(ranking["failure_auroc"], ranking["failure_auroc_low"],
                               ranking["failure_auroc_high"], strict=True)]
    for tag in report.DELTA_REFERENCES:
        for metric, short in (("failure_auroc", "dauroc"), ("aurc", "daurc")):
            c = f"delta_{metric}_vs_{tag}"
            ranking[f"{short}_vs_{tag}"] = [
                f"{a:+.3f} [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(a) else "-"
                for a, lo, hi in zip(ranking[c], ranking[f"{c}_low"], ranking[f"{c}_high"],
                                     strict=True)]
    columns = ["auroc_95", "aurc_95", "eaurc"] + \
        [c for c in ("norm_aurc",) if c in ranking]
    print("\n" + ranking.sort_values("aurc")[columns].round(3).to_markdown())
    deltas = [f"{s}_vs_{t}" for t in report.DELTA_REFERENCES for s in ("dauroc", "daurc")]
    print("\nPaired differences (score minus reference, failure-stratified bootstrap 95 %):\n")
    print(ranking.sort_values("aurc")[deltas].to_markdown())
    print_chosen(cases, scores, settings, q, n_boot, profile.seed)
    print_triage(args.results, q)


def print_chosen(cases: pd.DataFrame, scores, settings: dict, q: float, n_boot: int,
                 seed: int) -> None:
    """The score the evaluation chapter carries (chosen on pooled validation rows), how stable
    that choice is, and its pooled test figures at each fold's validation-chosen threshold
    with intervals (thresholds re-chosen in each resample, and held fixed)."""
    from wmhqc_lib.qc import evaluation as ev

    spec, choice = report.choose_score(cases, scores)
    stability = report.choice_stability(cases, scores, n_boot=n_boot, seed=seed)
    print("\n" + report.stability_note(stability))
    operating = {r: ev.operating_point(cases, spec, str(settings["select"]), n_boot=n_boot,
                                       seed=seed, rechoose=r, quality_threshold=q)
                 for r in (True, False)}
    print("\n" + report.operating_point_table(operating[True], operating[False]).to_markdown())
    honest = report.compare(cases, [spec], select=str(settings["select"]),
                            quality_threshold=q)[spec.name]
    pooled = honest.pooled
    test = cases[cases["split"] == "test"]
    print(f"\nChosen on pooled validation rows: **{spec.label}** (validation AURC "
          f"{choice.loc[spec.label, 'aurc_val']:.3f}; next "
          + ", ".join(f"{name} {row['aurc_val']:.3f}" for name, row in
                      choice.iloc[1:3].iterrows())
          + f"). Pooled test rows at the validation-chosen thresholds (rule "
          f"`{settings['select']}`): review fraction {pooled.get('review_fraction', np.nan):.3f}, "
          f"recall {pooled.get('recall', np.nan):.3f}, precision "
          f"{pooled.get('precision', np.nan):.3f} at prevalence "
          f"{float((test['true_dice'] < q).mean()):.3f}.")


def print_triage(results: str, q: float) -> None:
    """Chapter 07's new scans: how many were flagged, and how many of those failed."""
    from pathlib import Path

    from wmhqc_lib.deploy import triage

    work = Path(results) / "triage"
    if not (work / "output").exists():
        return
    table = triage.group_table(work / "output")
    flagged = table["flagged"].eq(True)
    line = f"\nTriage of {len(table)} new scans: {int(flagged.sum())} flagged"
    truth_table = work / "truth" / "new_scans.csv"  # written by synth.generate_new_scans
    if truth_table.exists():
        truth = pd.read_csv(truth_table)
        scored, _ = triage.score_against_truth(work / "output", truth[["participant_id",
                                                                      "truth"]], q)
        failed = scored["failed"]
        hit = scored["flagged"].eq(True) & failed
        line += (f"; {int(failed.sum())} of {len(scored)} scored scans failed (lesion Dice "
                 f"< {q}), {int(hit.sum())} of them flagged; flagged by kind: "
                 + ", ".join(f"{kind} {int(g['flagged'].eq(True).sum())}/{len(g)}"
                             for kind, g in scored.merge(truth[["participant_id", "kind"]],
                                                         on="participant_id")
                             .groupby("kind")))
    print(line + ".")


if __name__ == "__main__":
    main()
