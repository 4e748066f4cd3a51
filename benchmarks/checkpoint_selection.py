"""Does validation with dropout off rank MC U-net checkpoints as the MC mean does?

QC reads the mean of N Monte Carlo passes, so the checkpoint should be chosen on that mean.
Scoring every epoch with N passes on every validation case costs N times the validation time,
so training scores each epoch with dropout off (one deterministic pass, the usual
approximation of the MC mean) instead. This benchmark trains one fold's MC U-net at the
profile's sizes and, after every epoch, scores the validation cases three ways: one stochastic
pass (the rule before), dropout off (the rule now) and the MC mean of the profile's N passes
(what QC uses). It prints the per-epoch scores, the Spearman correlation of each rule with the
MC mean over epochs, and the epoch each rule would keep. Needs the data step of a run
(``results/<profile>/data``). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/checkpoint_selection.py --results results/cpu --fold 1
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pandas as pd
from scipy import stats

from wmhqc_lib.config import load_profile
from wmhqc_lib.data import preprocess
from wmhqc_lib.nets.models import UNetConfig, build_mc_unet
from wmhqc_lib.nets.training import deterministic, fit_segmenter, predict_volume
from wmhqc_lib.qc.metrics import dice
from wmhqc_lib.qc.uncertainty import mc_samples
from wmhqc_lib.study import steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--results", default=None, help="results folder (default results/P)")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    results = args.results or f"results/{args.profile}"
    section = dict(profile.section("mc_unet"))
    if args.epochs:
        section["epochs"] = args.epochs
    section["patience"] = int(section["epochs"])  # score every epoch, no early stop
    n, batch = int(section["mc_samples"]), int(section["mc_batch"])
    data = steps.load_fold(results, args.fold)
    val = data.cases["val"]
    rows: list[dict] = []

    def score(model) -> float:
        start = time.perf_counter()
        one = [dice(predict_volume(model, c) > 0.5, c.lesion, c.ignore) for c in val]
        off = [dice(predict_volume(deterministic(model), c) > 0.5, c.lesion, c.ignore)
               for c in val]
        mc = [dice(mc_samples(model, c.image, n, batch).mean(axis=0) > 0.5, c.lesion, c.ignore)
              for c in val]
        rows.append({"epoch": len(rows) + 1, "one_pass": float(np.mean(one)),
                     "dropout_off": float(np.mean(off)), f"mc_mean_{n}": float(np.mean(mc)),
                     "scoring_s": round(time.perf_counter() - start, 1)})
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in rows[-1].items()), flush=True)
        return float(np.mean(off))

    cfg = UNetConfig.from_section(section, in_channels=len(preprocess.CHANNELS))
    with tempfile.TemporaryDirectory() as folder:
        fit_segmenter(lambda: build_mc_unet(None, cfg), data.cases["train"], val, folder,
                      section, profile.seed + args.fold, progress=False, score=score)
    table = pd.DataFrame(rows).set_index("epoch")
    print(table.round(4).to_string())
    reference = table[f"mc_mean_{n}"]
    print(f"\n{len(val)} validation cases, fold {args.fold}, profile {profile.name}, "
          f"MC mean of {n} passes as the reference")
    for rule in ("one_pass", "dropout_off"):
        rho = stats.spearmanr(table[rule], reference).statistic
        pick = int(table[rule].idxmax())
        print(f"{rule:>12}: Spearman with the MC mean over epochs {rho:.3f}; keeps epoch "
              f"{pick} (MC-mean Dice there {reference[pick]:.4f}; best MC-mean epoch "
              f"{int(reference.idxmax())}, {reference.max():.4f})")


if __name__ == "__main__":
    main()
