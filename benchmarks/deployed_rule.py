"""The deployed triage rule measured on new synthetic scans from the study's sites, against
the model card's promise.

The study's test folds measure one fold model per case; triage lets every fold model vote on
the ensemble's segmentation and adds an out-of-distribution rule. Only new scans can measure
that rule. This draws ``--batches`` x ``--per-batch`` new scans from the study's own sites
(each batch planned with its own seed, ``profile.seed + --seed-offset + batch``, never the
study's), triages them with the exported bundle, scores each delivered mask against its truth
on the native grid and prints the realised recall, specificity, review fraction and precision
(with the failure prevalence) beside the card's figures, with Wilson 95 % intervals.

``--write`` stores the measurement in the bundle as ``deployed_check.json`` (listed in its
manifest; the card's Markdown is rewritten to show it): the figures a site reads.

Not part of ``make reproduce``: 200 scans take about 30 minutes on a 2-core CPU.

    .venv/bin/python benchmarks/deployed_rule.py --results results/cpu \
        --bundle results/cpu/triage/bundle --write
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pandas as pd

from wmhqc_lib.config import load_profile
from wmhqc_lib.data import synth
from wmhqc_lib.deploy import bundle as bundle_mod
from wmhqc_lib.deploy import triage
from wmhqc_lib.deploy.calibrate import wilson


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="the study's results folder")
    parser.add_argument("--bundle", required=True, help="the exported bundle")
    parser.add_argument("--profile", default=None, help="default: the results folder's name")
    parser.add_argument("--work", default=None,
                        help="where scans and outputs go (default RESULTS/deployed_check)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--per-batch", type=int, default=50)
    parser.add_argument("--seed-offset", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", action="store_true",
                        help="store the measurement in the bundle (deployed_check.json)")
    args = parser.parse_args()

    prof = load_profile(args.profile or Path(args.results).resolve().name)
    model = bundle_mod.load_bundle(args.bundle)
    q = float(model.info["quality_threshold"])
    work = Path(args.work or Path(args.results) / "deployed_check")
    parts, errors = [], []
    start = time.perf_counter()
    for b in range(args.batches):
        seed = prof.seed + args.seed_offset + b
        folder = work / f"batch{b}"
        if not (folder / "truth" / "new_scans.csv").is_file():
            synth.generate_new_scans(folder / "scans", folder / "truth", prof, seed,
                                     n_known=args.per_batch, n_unseen=0, n_artefact=0,
                                     workers=args.workers)
        new = pd.read_csv(folder / "truth" / "new_scans.csv")
        triage.run_triage(model, triage.discover_bids(folder / "scans"), folder / "output",
                          source=str(folder / "scans"), nprocs=args.workers, progress=False,
                          log=lambda _: None)
        scored, _ = triage.score_against_truth(folder / "output",
                                               new[["participant_id", "kind", "site",
                                                    "truth"]], q)
        scored.insert(0, "batch", b)
        table = triage.group_table(folder / "output")
        errors.extend(f"batch {b} {row.participant_id}: {row.reason}"
                      for row in table[table["status"] != "ok"].itertuples())
        parts.append(scored)
        print(f"batch {b} (seed {seed}): {len(scored)} scans scored, "
              f"{time.perf_counter() - start:.0f} s so far", flush=True)
    scored = pd.concat(parts, ignore_index=True)
    scored.drop(columns=["record"], errors="ignore").to_csv(work / "scored.csv", index=False)
    measured = measure(scored, n_error=len(errors))
    for line in errors:
        print(f"in error (a person sees it, counted as flagged below): {line}")
    measured.update({"seeds": [prof.seed + args.seed_offset + b for b in range(args.batches)],
                     "quality_threshold": q, "seconds": round(time.perf_counter() - start)})
    print(json.dumps(measured, indent=1))
    print(compare_with_card(model.card, measured).to_markdown())
    if args.write:
        write = getattr(bundle_mod, "add_deployed_check", None)
        if write is None:
            raise SystemExit("this wmhqc cannot store a deployed check in a bundle")
        write(model.root, measured)
        print(f"stored in {model.root / 'deployed_check.json'}")


def measure(scored: pd.DataFrame, n_error: int = 0) -> dict:
    """Realised figures of the flags on scans with known failure, each with its interval.

    ``scored`` holds the scans triage finished. ``n_error`` scans ended in error: a person
    sees those too, so they count as flagged in the review fraction (their true Dice is
    unknown, so they enter no other figure); ``n_error`` is reported."""
    flagged = scored["flagged"].astype(bool).to_numpy()
    failed = scored["failed"].astype(bool).to_numpy()
    counts = {"recall": ((flagged & failed).sum(), failed.sum()),
              "specificity": ((~flagged & ~failed).sum(), (~failed).sum()),
              "review_fraction": (flagged.sum() + n_error, len(flagged) + n_error),
              "precision": ((flagged & failed).sum(), flagged.sum()),
              "prevalence": (failed.sum(), len(failed))}
    out = {"n_scans": len(scored) + n_error, "n_scored": len(scored), "n_error": n_error,
           "n_failed": int(failed.sum()), "n_flagged": int(flagged.sum())}
    for name, (k, n) in counts.items():
        low, high = wilson(int(k), int(n))
        out[name] = {"estimate": k / n if n else math.nan, "low": low, "high": high,
                     "k": int(k), "n": int(n)}
    if "out_of_distribution" in scored:
        out["n_out_of_distribution"] = int(scored["out_of_distribution"].astype(bool).sum())
    return out


def compare_with_card(card: dict, measured: dict) -> pd.DataFrame:
    """The card's test-fold figures of the rule the bundle deploys (its guaranteed threshold
    where it carries one) beside the deployed rule's realised ones."""
    op, rule = bundle_mod.deployed_operating_point(card)

    def show(d: dict | None) -> str:
        if not d or d.get("estimate") is None or not math.isfinite(d["estimate"]):
            return "n/a"
        return f"{d['estimate']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    names = ["recall", "specificity", "review_fraction", "precision", "prevalence"]
    return pd.DataFrame({
        f"card (study test folds, {rule})": [show(op.get(n)) for n in names],
        "deployed rule (new scans)": [show(measured.get(n)) for n in names]}, index=names)


if __name__ == "__main__":
    main()
