"""Does the recall guarantee hold? Calibration sets drawn again and again from a known
population: in each draw the threshold is chosen by ``qc.guarantee.guaranteed_threshold`` and
its realised recall is measured on the whole population; the share of the draws that gave a
guarantee whose recall reaches the target must reach the promised confidence (PASS within two
Monte Carlo standard errors).

``--results DIR``: the population is the study's pooled out-of-fold cases (validation rows,
each subject once, and test rows of every fold, each scored by a fold model that never trained
on it) with the carried
score (lowest AURC on the pooled validation rows); calibration sizes, targets, confidences and
draws come from the profile's ``guarantee`` section. Without it, a parametric **synthetic**
population (no study needed): scores of successes ~ N(0.75, 0.10), of failures ~ N(0.45, 0.15),
failure prevalence 0.29, so it runs anywhere. Prints a Markdown table; exits 1 when a row fails.

    .venv/bin/python benchmarks/guarantee.py --results results/cpu
    .venv/bin/python benchmarks/guarantee.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from wmhqc_lib.config import load_profile, profile_names
from wmhqc_lib.qc import guarantee
from wmhqc_lib.study import report

COLUMNS = ["target_recall", "confidence", "calibration", "mean_failures", "share_infeasible",
           "median_recall", "p05_recall", "share_met", "share_met_feasible", "n_feasible",
           "mc_se", "mean_review_fraction"]


def synthetic_population(n: int, prevalence: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A parametric synthetic population (higher score = better segmentation)."""
    rng = np.random.default_rng([seed, 37])
    failed = rng.random(n) < prevalence
    scores = np.where(failed, rng.normal(0.45, 0.15, n), rng.normal(0.75, 0.10, n))
    return scores, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=None,
                        help="results/<profile> of a finished study (default: synthetic)")
    parser.add_argument("--profile", default=None,
                        help="profile of the study and of the settings (default: the results "
                             "folder's name, else cpu)")
    parser.add_argument("--draws", type=int, default=None, help="default: the profile's")
    parser.add_argument("--seed", type=int, default=None, help="default: the profile's")
    parser.add_argument("--population", type=int, default=5000,
                        help="synthetic population size (without --results)")
    parser.add_argument("--n-validation", type=int, default=58,
                        help="the size 'validation' stands for without --results (default: "
                             "the synthetic cpu study's pooled validation cases, each subject "
                             "once)")
    parser.add_argument("--n-all", type=int, default=163,
                        help="the size 'all' stands for without --results (default: those "
                             "and the cpu study's 105 test cases)")
    args = parser.parse_args()
    name = args.profile or (args.results.resolve().name if args.results is not None
                            and args.results.resolve().name in profile_names() else "cpu")
    profile = load_profile(name)
    settings = profile.section("guarantee")
    q = float(profile.section("evaluation")["quality_threshold"])
    draws = args.draws or int(settings["draws"])
    seed = profile.seed if args.seed is None else args.seed
    common = {"targets": settings["simulation_targets"],
              "confidences": settings["simulation_confidences"], "draws": draws, "seed": seed}
    if args.results is not None:
        cases, scores = report.available_scores(report.load_all_cases(args.results),
                                                seed=profile.seed)
        score, _ = report.choose_score(cases, scores)
        oof = pd.concat([guarantee.one_row_per_subject(cases[cases["split"] == "val"]),
                         cases[cases["split"] == "test"]])
        print(f"Population: the {len(oof)} pooled out-of-fold cases of {args.results}, "
              "validation cases each subject once "
              f"(profile {name}; {int((oof['true_dice'] < q).sum())} failed, lesion Dice < {q}),"
              f" score {score.label}" + (", synthetic cohort" if oof["synthetic"].astype(str)
                                          .str.lower().eq("true").all() else "") + ".")
        table = guarantee.simulate_study(cases, score, sizes=settings["calibration_sizes"],
                                         quality_threshold=q, **common)
    else:
        scores, failed = synthetic_population(args.population, 0.29, seed)
        print(f"Population: parametric synthetic, {args.population} cases, {int(failed.sum())} "
              "failed (no study).")
        sizes = guarantee.calibration_sizes(settings["calibration_sizes"], args.n_validation,
                                            args.n_all)
        table = guarantee.simulate_guarantee(scores, failed, sizes=sizes, **common)
    verdict = table["passed"].map({True: "PASS", False: "FAIL"}).fillna("no feasible draw")
    shown = table[COLUMNS].assign(result=verdict)
    print(f"{draws} draws per row, seed {seed}.\n")
    print(pd.DataFrame(shown).to_markdown(index=False, floatfmt=".3f"))
    return 0 if table["passed"].eq(True).all() else 1


if __name__ == "__main__":
    sys.exit(main())
