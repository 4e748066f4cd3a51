"""Per-fold steps of the study and the files they write, so each notebook is a few calls.

Layout under one results folder, per fold ``k``::

    fold<k>/mc_unet/        best.keras, last.keras, history.csv, state.json (training)
    fold<k>/mc/maps/        <subject>.npz: mean, prediction, entropy, mutual information,
                            variance on the profile grid (float16)
    fold<k>/mc/native/      <subject>_prediction.nii.gz, <subject>_entropy.nii.gz (test cases)
    fold<k>/mc/mc_cases.csv true Dice and uncertainty scores of every case of the fold
    fold<k>/cases.csv       the fold's per-case table: every part joined with site and split

Every case of the fold (train, val, test) gets a row with its split, so later steps can train
on training rows, choose on validation rows and report on test rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import cohort, preprocess
from .config import Profile
from .folds import SPLITS

CASE_TABLE_PARTS = ("mc/mc_cases.csv", "rec/rec_cases.csv", "dr/dr_cases.csv")


@dataclass(frozen=True)
class FoldPaths:
    """Where one fold's steps write."""

    root: Path
    fold: int

    @classmethod
    def under(cls, results_dir: str | Path, fold: int) -> FoldPaths:
        return cls(Path(results_dir) / f"fold{fold}", fold)

    @property
    def mc_unet(self) -> Path:
        return self.root / "mc_unet"

    @property
    def mc(self) -> Path:
        return self.root / "mc"

    @property
    def cases(self) -> Path:
        return self.root / "cases.csv"


@dataclass
class FoldData:
    """The preprocessed cases of one fold, by split."""

    fold: int
    cases: dict[str, list[preprocess.PreprocessedCase]]
    splits: dict[str, str]  # subject -> split

    def all_cases(self) -> list[preprocess.PreprocessedCase]:
        return [c for split in SPLITS for c in self.cases[split]]


def load_fold(results_dir: str | Path, fold: int) -> FoldData:
    """Read the folds table and the preprocessed cache written by the data step."""
    _, prep, folds = cohort.load(results_dir)
    paths = cohort.CohortPaths.under(results_dir)
    table = folds[folds["fold"] == fold]
    if table.empty:
        raise ValueError(f"fold {fold} is not in {paths.folds} "
                         f"(folds: {sorted(folds['fold'].unique())})")
    failed = set(prep.loc[prep["status"] == "failed", "subject_id"])
    cases = {s: [preprocess.load_case(paths.cache, sid)
                 for sid in table.loc[table["split"] == s, "subject_id"] if sid not in failed]
             for s in SPLITS}
    splits = dict(zip(table["subject_id"], table["split"], strict=True))
    return FoldData(fold, cases, splits)


def voxel_ml(profile: Profile) -> float:
    """Volume of one profile-grid voxel in millilitres."""
    return float(np.prod(profile.preprocess.voxel_mm)) / 1000.0


def train_mc_unet(profile: Profile, results_dir: str | Path, fold: int,
                  seed: int | None = None, progress: bool = True):
    """Train (or resume, or reuse) the fold's MC-dropout U-net; returns a TrainResult."""
    from .models import UNetConfig, build_mc_unet
    from .training import fit_segmenter

    section = profile.section("mc_unet")
    data = load_fold(results_dir, fold)
    cfg = UNetConfig.from_section(section, in_channels=len(preprocess.CHANNELS))
    _check_divisible(profile, cfg.divisor, section["patch"])
    seed = profile.seed + fold if seed is None else seed
    return fit_segmenter(lambda: build_mc_unet(None, cfg), data.cases["train"],
                         data.cases["val"], FoldPaths.under(results_dir, fold).mc_unet,
                         section, seed, progress=progress)


def _check_divisible(profile: Profile, divisor: int, patch) -> None:
    for name, shape in (("preprocess.shape", profile.preprocess.shape), ("patch", patch)):
        if any(int(s) % divisor for s in shape):
            raise ValueError(f"profile {profile.name!r}: {name} {list(shape)} must be a "
                             f"multiple of {divisor} in every axis for this U-net depth")


def run_uncertainty(profile: Profile, results_dir: str | Path, fold: int, model,
                    progress: bool = True) -> pd.DataFrame:
    """MC inference on every case of the fold; writes maps, native NIfTI of the test cases,
    and the uncertainty part of the per-case table."""
    from .uncertainty import run_mc_inference

    section = profile.section("mc_unet")
    data = load_fold(results_dir, fold)
    paths = FoldPaths.under(results_dir, fold)
    table = run_mc_inference(model, data.all_cases(), data.splits, paths.mc,
                             int(section["mc_samples"]), int(section["mc_batch"]),
                             voxel_ml(profile), fold,
                             native_for=[c.subject_id for c in data.cases["test"]],
                             progress=progress)
    write_case_table(results_dir, fold)
    return table


def write_case_table(results_dir: str | Path, fold: int) -> pd.DataFrame:
    """Join the fold's per-case parts (MC, reconstruction, Dice regression: whichever exist)
    with dataset and site into ``fold<k>/cases.csv``."""
    paths = FoldPaths.under(results_dir, fold)
    manifest, _, folds = cohort.load(results_dir)
    table = folds.loc[folds["fold"] == fold, ["fold", "subject_id", "split"]]
    table = table.merge(manifest[["subject_id", "dataset", "site", "synthetic"]],
                        on="subject_id")
    for part in CASE_TABLE_PARTS:
        path = paths.root / part
        if path.exists():
            extra = pd.read_csv(path).drop(columns=["fold", "split"], errors="ignore")
            table = table.merge(extra, on="subject_id", how="left")
    table.to_csv(paths.cases, index=False)
    return table


def read_case_table(results_dir: str | Path, fold: int) -> pd.DataFrame:
    path = FoldPaths.under(results_dir, fold).cases
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the uncertainty step (notebook 03)")
    return pd.read_csv(path)
