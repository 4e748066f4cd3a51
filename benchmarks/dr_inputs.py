"""In-sample against out-of-fold training inputs for the Dice regressors, on a finished run.

Copies a finished run's results (without its book and notebooks) to ``--work``, trains the
regressors of the given folds with ``dice_regression.inputs: out_of_fold`` and
``compare_inputs: true`` (so both sources are trained, the in-sample columns suffixed
``_in_sample``), and prints per input pair and source, on the test rows of those folds pooled:
Pearson r, MAE, failure AUROC and AURC with bootstrap 95 % intervals, and the minutes the
out-of-fold networks added per fold. The finished run itself is not touched. Prints figures;
asserts nothing.

    .venv/bin/python benchmarks/dr_inputs.py --results results/cpu --work /tmp/dr-inputs \\
        --folds 1 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from wmhqc_lib.config import load_profile
from wmhqc_lib.qc import evaluation as ev
from wmhqc_lib.qc import regression as rg
from wmhqc_lib.study import regression_step, report, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--results", required=True)
    parser.add_argument("--work", required=True, help="a copy of the results goes here")
    parser.add_argument("--folds", type=int, nargs="+", default=None)
    parser.add_argument("--inner-folds", type=int, default=None)
    args = parser.parse_args()
    base = load_profile(args.profile)
    sections = copy.deepcopy(base.sections)
    sections["dice_regression"].update(inputs="out_of_fold", compare_inputs=True)
    if args.inner_folds:
        sections["dice_regression"]["inner_folds"] = args.inner_folds
    profile = dataclasses.replace(base, sections=sections)
    work = Path(args.work)
    if not work.exists():
        shutil.copytree(args.results, work, ignore=shutil.ignore_patterns("book", "notebooks"))
    folds = args.folds or list(range(1, base.folds.n_folds + 1))
    minutes = {}
    for fold in folds:
        start = time.perf_counter()
        regression_step.train_dice_regressors(profile, work, fold, progress=False)
        oof = json.loads((steps.FoldPaths.under(work, fold).root / "oof" / "timing.json")
                         .read_text())["seconds"] / 60
        minutes[fold] = {"out_of_fold networks and maps (min)": round(oof, 1),
                         "whole regression step (min)": round((time.perf_counter() - start)
                                                               / 60, 1)}
        print(f"fold {fold}: {minutes[fold]}", flush=True)
    cases = report.load_all_cases(work, folds)
    q = float(base.section("evaluation")["quality_threshold"])
    test = cases[cases["split"] == "test"]
    rows = []
    for kind in rg.INPUT_KINDS:
        for variant in rg.VARIANTS:
            for suffix, source in (("_in_sample", "in_sample"), ("", "out_of_fold")):
                column = rg.column_name(kind, variant) + suffix
                spec = ev.resolve_score(column, higher_is_better=True, dice_scale=True)
                m = ev.evaluate_score(test, spec, threshold=float(test[column].median()),
                                      quality_threshold=q)
                boot = ev.bootstrap_intervals(test, spec, n_boot=1000, seed=base.seed,
                                              quality_threshold=q)
                def interval(metric: str, m=m, boot=boot) -> str:
                    return (f"{m[metric]:.3f} [{boot.loc[metric, 'low']:.3f}, "
                            f"{boot.loc[metric, 'high']:.3f}]")

                rows.append({
                    "input pair": rg.INPUT_LABELS[kind], "variant": variant, "inputs": source,
                    "pearson_r": round(m["pearson_r"], 3), "mae": round(m["mae"], 3),
                    "failure_auroc": interval("failure_auroc"), "aurc": interval("aurc")})
    print(f"\n{len(test)} test cases of folds {folds}, failure = lesion Dice < {q}\n")
    print(pd.DataFrame(rows).to_markdown(index=False))
    print("\n" + pd.DataFrame(minutes).T.to_markdown())


if __name__ == "__main__":
    main()
