"""Out-of-fold QC inputs for the Dice regressors' training cases.

The paper trains its Dice regressors on the maps of the fold's training cases, which the MC
U-net and the reconstruction U-net were fitted to: those maps are in-sample (nearly always
successes, with low uncertainty and small errors) and unlike the maps of the test cases the
regressors are asked about. With ``dice_regression.inputs: out_of_fold`` each outer fold's
training cases are dealt into ``inner_folds`` inner folds (balanced by site and load); for
each inner fold an MC U-net and a reconstruction U-net are trained on the other inner folds
(checkpoints chosen on the outer fold's validation cases, which no network trains on), and
the held-out inner fold's cases get their MC maps, native true Dice and error maps from those
networks. Validation and test cases keep the outer networks' maps, as before.

Layout under ``fold<k>/oof/``::

    inner<j>/mc_unet/, inner<j>/rec_unet/   the inner networks (as the outer ones)
    inner<j>/mc/maps/<subject>.npz          MC maps of the held-out training cases
    inner<j>/mc/mc_cases.csv                their true Dice (native grid) and QC scores
    inner<j>/rec/maps/<subject>.npz         their error maps (inner prediction zeroed)
    oof_cases.csv                           subject, inner fold, true Dice, scores
    timing.json                             seconds the inner networks and maps took when
                                            last trained (a rerun that reuses them keeps it)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import Profile
from ..data import cohort, preprocess
from ..data.folds import inner_folds
from . import steps

INPUT_SOURCES = ("in_sample", "out_of_fold")


@dataclass(frozen=True)
class InnerPaths:
    """Where one inner fold of one outer fold writes."""

    root: Path

    @classmethod
    def under(cls, results_dir: str | Path, fold: int, inner: int) -> InnerPaths:
        return cls(steps.FoldPaths.under(results_dir, fold).root / "oof" / f"inner{inner}")

    mc_unet = property(lambda self: self.root / "mc_unet")
    mc = property(lambda self: self.root / "mc")
    rec_unet = property(lambda self: self.root / "rec_unet")
    rec = property(lambda self: self.root / "rec")


def input_source(section: dict) -> str:
    """The profile's ``dice_regression.inputs``, checked."""
    source = str(section.get("inputs", "in_sample"))
    if source not in INPUT_SOURCES:
        raise ValueError(f"dice_regression.inputs must be one of {INPUT_SOURCES}, not "
                         f"{source!r}")
    return source


def inner_split(profile: Profile, results_dir: str | Path, fold: int) -> dict[str, int]:
    """Training subject -> inner fold, for the profile's ``dice_regression.inner_folds``."""
    subjects = steps.fold_subjects(results_dir, fold)
    train = [s for s, split in subjects.items() if split == "train"]
    manifest, prep, _ = cohort.load(results_dir)
    table = pd.DataFrame({"subject_id": train}).merge(
        manifest[["subject_id", "site"]], on="subject_id").merge(
        prep[["subject_id", "load_pct"]], on="subject_id")
    n = int(profile.section("dice_regression").get("inner_folds", 3))
    return inner_folds(table, n, seed=profile.seed + fold)


def run_out_of_fold(profile: Profile, results_dir: str | Path, fold: int,
                    progress: bool = True) -> pd.DataFrame:
    """Train the inner networks of one outer fold and compute every training case's maps with
    networks that never saw it; returns (and writes) ``oof/oof_cases.csv``. Finished inner
    networks and maps are reused, as the outer steps reuse theirs."""
    import keras

    from ..nets.models import UNetConfig, build_mc_unet, build_rec_unet
    from ..nets.training import fit_segmenter, log_progress
    from ..qc.reconstruction import fit_rec_unet, model_tag, run_error_maps
    from ..qc.uncertainty import run_mc_inference

    start = time.perf_counter()
    paths = steps.FoldPaths.under(results_dir, fold)
    cache = cohort.CohortPaths.under(results_dir).cache
    split = inner_split(profile, results_dir, fold)
    subjects = steps.fold_subjects(results_dir, fold)
    val_ids = [s for s, sp in subjects.items() if sp == "val"]
    val_cases = [preprocess.load_case(cache, s) for s in val_ids]
    val_images = steps.qc_images(results_dir, val_ids)
    val_predictions = steps.mc_predictions(results_dir, fold, val_ids)  # outer networks'
    mc_section, rec_section = profile.section("mc_unet"), profile.section("rec_unet")
    mc_cfg = UNetConfig.from_section(mc_section, in_channels=len(preprocess.CHANNELS))
    rec_cfg = steps.rec_config(profile)
    tables, reused = [], []
    for inner in sorted(set(split.values())):
        where = InnerPaths.under(results_dir, fold, inner)
        held = [s for s, j in split.items() if j == inner]
        train = [preprocess.load_case(cache, s) for s, j in split.items() if j != inner]
        seed = profile.seed + 1000 * fold + inner
        if progress:
            log_progress(f"fold {fold}, inner fold {inner}: networks trained on {len(train)} "
                         f"cases, maps of {len(held)} held-out training cases")
        mc = fit_segmenter(lambda: build_mc_unet(None, mc_cfg), train, val_cases,
                           where.mc_unet, mc_section, seed, progress=False)
        held_cases = [preprocess.load_case(cache, s) for s in held]
        table = run_mc_inference(
            mc.model, held_cases, {s: "train" for s in held}, where.mc,
            int(mc_section["mc_samples"]), int(mc_section["mc_batch"]),
            steps.voxel_ml(profile), fold,
            lambda sid: preprocess.load_native_reference(cache, sid), progress=progress,
            model_key=steps.weights_digest(where.mc_unet / "best.keras"))
        del held_cases
        rec = fit_rec_unet(lambda: build_rec_unet(None, rec_cfg), train, val_images,
                           val_predictions, where.rec_unet, rec_section, seed, progress=False)
        del train
        run_error_maps(rec.model, steps.qc_images(results_dir, held), _predictions(where.mc, held),
                       {s: "train" for s in held}, where.rec, fold, rec_section,
                       tag=model_tag(where.rec_unet), progress=progress)
        tables.append(table.assign(inner=inner))
        reused.append(mc.skipped and rec.skipped)
        keras.backend.clear_session()
    out = pd.concat(tables, ignore_index=True)
    out.to_csv(paths.root / "oof" / "oof_cases.csv", index=False)
    timing = paths.root / "oof" / "timing.json"
    if not (all(reused) and timing.exists()):  # a rerun that reused everything keeps the cost
        seconds = round(time.perf_counter() - start, 1)
        timing.write_text(json.dumps({"seconds": seconds}))
    return out


def _predictions(mc_dir: Path, subjects) -> dict:
    import numpy as np

    out = {}
    for sid in subjects:
        with np.load(mc_dir / "maps" / f"{sid}.npz") as z:
            out[sid] = z["prediction"] > 0
    return out


def map_folders(results_dir: str | Path, fold: int, subjects) -> dict[str, tuple[Path, Path]]:
    """Per training subject: the (MC maps, error maps) folders of its out-of-fold inputs."""
    table = pd.read_csv(steps.FoldPaths.under(results_dir, fold).root / "oof" / "oof_cases.csv")
    inner = dict(zip(table["subject_id"], table["inner"], strict=True))
    missing = [s for s in subjects if s not in inner]
    if missing:
        raise FileNotFoundError(f"fold {fold}: no out-of-fold maps for {missing[:3]}; run "
                                "the out-of-fold step (dice_regression.inputs: out_of_fold)")
    return {s: (InnerPaths.under(results_dir, fold, inner[s]).mc / "maps",
                InnerPaths.under(results_dir, fold, inner[s]).rec / "maps") for s in subjects}


def out_of_fold_targets(results_dir: str | Path, fold: int) -> pd.Series:
    """True Dice (native grid) of each training case's out-of-fold prediction."""
    table = pd.read_csv(steps.FoldPaths.under(results_dir, fold).root / "oof" / "oof_cases.csv")
    return table.set_index("subject_id")["true_dice"]


def rec_model_of(results_dir: str | Path, fold: int, subject: str):
    """The inner reconstruction U-net that made a training subject's out-of-fold error map."""
    table = pd.read_csv(steps.FoldPaths.under(results_dir, fold).root / "oof" / "oof_cases.csv")
    inner = int(table.set_index("subject_id").loc[subject, "inner"])
    return InnerPaths.under(results_dir, fold, inner).rec_unet
