"""What the default regime costs and buys: grid spacing x training budget (issue 22).

Two parts, both on the cohort of a finished data step (``results/<profile>/data``):

``grid``   every subject preprocessed onto each candidate grid; the reference itself, put on
           the grid as partial volume, mapped back linearly and cut at 0.5 (``roundtrip_dice``):
           median, share of subjects below the failure threshold, brain left outside the grid,
           voxels per volume. Nothing is trained; a subject's annotation is read only for the
           round trip, which is what the grid alone costs.
``train``  one fold's MC U-net trained on each chosen grid with the largest epoch budget,
           keeping the best validation checkpoint as it stood at each smaller budget
           (training is deterministic and the schedule depends on past epochs only, so that
           checkpoint is what a run with the smaller cap would have kept). Each budget's
           checkpoint then runs MC inference on the fold's test cases: median native lesion
           Dice, failure prevalence, and minutes (training up to that budget plus inference).
           Validation cases are scored the same way: a choice between settings reads the
           validation columns, the test columns only report what it gave.

    .venv/bin/python benchmarks/regime_sweep.py grid --grids 3.0:56x64x56 2.5:64x80x64
    .venv/bin/python benchmarks/regime_sweep.py train --grids 2.5:64x80x64 --caps 30 60 120
    .venv/bin/python benchmarks/regime_sweep.py train --grids 2.5:56x72x64 --caps 120 \
        --set patch=[32,32,32] --set steps_per_epoch=20 --tag patch32

Tables are printed as Markdown and written under ``results/sweep/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from wmhqc_lib.config import Profile, load_profile
from wmhqc_lib.data import cohort, preprocess


def parse_grid(spec: str) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """``2.5:64x80x64`` or ``2.5x2.5x3:64x80x48`` -> (voxel_mm, shape)."""
    vox, shape = spec.split(":")
    v = [float(x) for x in vox.split("x")]
    s = tuple(int(x) for x in shape.split("x"))
    if len(v) == 1:
        v = v * 3
    if len(v) != 3 or len(s) != 3:
        raise SystemExit(f"grid {spec!r}: use MM:XxYxZ or MMxMMxMM:XxYxZ")
    return (v[0], v[1], v[2]), (s[0], s[1], s[2])


def parse_setting(text: str) -> tuple[str, object]:
    """``key=value`` with a YAML value (numbers, lists) for an mc_unet override."""
    import yaml

    key, _, value = text.partition("=")
    if not key or not value:
        raise SystemExit(f"--set {text!r}: use KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


def grid_tag(vox, shape) -> str:
    return "x".join(f"{v:g}" for v in vox) + "mm_" + "x".join(str(n) for n in shape)


def with_grid(profile: Profile, vox, shape) -> Profile:
    """The profile with another preprocessing grid (everything else unchanged)."""
    pre = dataclasses.replace(profile.preprocess, voxel_mm=tuple(vox), shape=tuple(shape))
    sections = {**profile.sections,
                "preprocess": {**profile.sections["preprocess"], "voxel_mm": list(vox),
                               "shape": list(shape)}}
    return dataclasses.replace(profile, preprocess=pre, sections=sections)


def prepare_grid(profile: Profile, source: Path, out: Path) -> pd.DataFrame:
    """Preprocess the source run's manifest onto ``profile``'s grid under ``out/data``; the
    folds are the source run's (they depend on native lesion load only)."""
    src = cohort.CohortPaths.under(source)
    paths = cohort.CohortPaths.under(out)
    paths.root.mkdir(parents=True, exist_ok=True)
    manifest = cohort.load(source)[0]
    shutil.copyfile(src.manifest, paths.manifest)
    prep = preprocess.preprocess_cohort(manifest, paths.cache, profile.preprocess)
    prep.to_csv(paths.preprocess, index=False)
    shutil.copyfile(src.folds, paths.folds)
    return prep


def cmd_grid(args) -> None:
    profile = load_profile(args.profile)
    rows = []
    for spec in args.grids:
        vox, shape = parse_grid(spec)
        out = args.out / grid_tag(vox, shape)
        start = time.perf_counter()
        prep = prepare_grid(with_grid(profile, vox, shape), args.source, out)
        rt = prep["roundtrip_dice"].astype(float)
        rows.append({"grid": spec, "voxels": int(np.prod(shape)),
                     "x today": round(float(np.prod(shape)) / np.prod(profile.preprocess.shape),
                                      2),
                     "field of view mm": "x".join(f"{v * n:g}"
                                                  for v, n in zip(vox, shape, strict=True)),
                     "round-trip median": round(float(rt.median()), 3),
                     "below 0.5": f"{(rt < args.quality).mean():.0%}",
                     "round-trip p10": round(float(rt.quantile(0.1)), 3),
                     "max brain outside grid": round(float(
                         prep["brain_outside_grid_fraction"].max()), 4),
                     "preprocess s": round(time.perf_counter() - start, 1)})
        print(pd.DataFrame(rows[-1:]).to_markdown(index=False), flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "grid.csv", index=False)
    print(table.to_markdown(index=False))


class _Snapshots:
    """Copies ``best.keras`` to ``best_at_<E>.keras`` at the end of each capped epoch E."""

    def __init__(self, folder: Path, caps: list[int]):
        self.folder, self.caps = folder, set(caps)

    def __call__(self, epoch: int) -> None:
        if epoch in self.caps and (self.folder / "best.keras").exists():
            shutil.copyfile(self.folder / "best.keras", self.folder / f"best_at_{epoch}.keras")


def cmd_train(args) -> None:
    import keras

    from wmhqc_lib.nets.models import ChannelPReLU, InstanceNormalization, MCDropout
    from wmhqc_lib.qc.uncertainty import case_seed, mc_samples, reseed, uncertainty_maps
    from wmhqc_lib.study import steps

    base = load_profile(args.profile)
    caps = sorted(args.caps)
    rows = []
    for spec in args.grids:
        vox, shape = parse_grid(spec)
        out = args.out / (grid_tag(vox, shape) + (f"_{args.tag}" if args.tag else ""))
        profile = with_grid(base, vox, shape)
        section = {**profile.sections["mc_unet"], "epochs": caps[-1],
                   **dict(parse_setting(x) for x in args.set)}
        profile = dataclasses.replace(profile, sections={**profile.sections,
                                                         "mc_unet": section})
        prep = prepare_grid(profile, args.source, out)
        rt = prep.set_index("subject_id")["roundtrip_dice"]
        folder = steps.FoldPaths.under(out, args.fold).mc_unet
        start = time.perf_counter()
        result = steps.train_mc_unet(profile, out, args.fold,
                                     epoch_end=_Snapshots(folder, caps))
        train_s = time.perf_counter() - start
        history = result.history
        data = steps.load_fold(out, args.fold)
        cache = cohort.CohortPaths.under(out).cache
        custom = {"MCDropout": MCDropout, "InstanceNormalization": InstanceNormalization,
                  "ChannelPReLU": ChannelPReLU}
        for cap in caps:
            path = folder / f"best_at_{cap}.keras"
            if not path.exists():  # stopped early before this cap: the final best is it
                path = folder / "best.keras"
            model = keras.models.load_model(path, custom_objects=custom, compile=False)
            ran = history[history["epoch"] <= cap]
            best = ran.loc[ran["val_dice"].idxmax()]
            start = time.perf_counter()
            dices: dict[str, list[float]] = {"val": [], "test": []}
            for split, values in dices.items():
                for case in data.cases[split]:
                    reseed(model, case_seed("sweep", cap, case.subject_id))
                    maps = uncertainty_maps(mc_samples(model, case.image,
                                                       int(section["mc_samples"]),
                                                       int(section["mc_batch"])))
                    values.append(preprocess.native_dice(
                        maps.mean, case, preprocess.load_native_reference(cache,
                                                                          case.subject_id)))
            n_cases = sum(len(v) for v in dices.values())
            infer_s = time.perf_counter() - start
            v, d = np.asarray(dices["val"]), np.asarray(dices["test"])
            share = len(ran) / max(len(history), 1)
            rows.append({
                "grid": spec, "settings": " ".join(args.set) or "profile", "epoch cap": cap,
                "epochs run": int(ran["epoch"].max()),
                "stopped early": bool(len(ran) < cap),
                "best epoch": int(best["epoch"]), "best val Dice": round(float(best["val_dice"]),
                                                                         3),
                "training min": round(train_s * share / 60.0, 1),
                "MC-20 s per case": round(infer_s / n_cases, 2),
                # the choice between settings reads this column: validation rows, not test
                "val median native Dice": round(float(np.median(v)), 3),
                "val failed": f"{int((v < args.quality).sum())}/{len(v)}",
                "test median native Dice": round(float(np.median(d)), 3),
                "test failed": f"{int((d < args.quality).sum())}/{len(d)}",
                "prevalence": round(float((d < args.quality).mean()), 2),
                "round-trip median": round(float(rt.median()), 3)})
            print(pd.DataFrame(rows[-1:]).to_markdown(index=False), flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    name = (f"train_fold{args.fold}_" + "_".join(grid_tag(*parse_grid(g)) for g in args.grids)
            + (f"_{args.tag}" if args.tag else ""))
    table.to_csv(args.out / f"{name}.csv", index=False)
    (args.out / f"{name}.json").write_text(json.dumps({"caps": caps, "fold": args.fold}))
    print(table.to_markdown(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("grid", "train"):
        p = sub.add_parser(name)
        p.add_argument("--profile", default="cpu")
        p.add_argument("--source", type=Path, default=Path("results/cpu"),
                       help="a finished data step (manifest, folds)")
        p.add_argument("--out", type=Path, default=Path("results/sweep"))
        p.add_argument("--grids", nargs="+", required=True, metavar="MM:XxYxZ")
        p.add_argument("--quality", type=float, default=0.5, help="failure threshold")
        if name == "train":
            p.add_argument("--fold", type=int, default=1)
            p.add_argument("--caps", type=int, nargs="+", default=[30, 60, 120])
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override an mc_unet setting (YAML value), e.g. patience=12 "
                                "or patch=[32,32,32]; repeatable")
            p.add_argument("--tag", default="", help="suffix of the run folder and table")
    args = parser.parse_args()
    {"grid": cmd_grid, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    main()
