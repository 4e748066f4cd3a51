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

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Profile
from ..data import cohort, preprocess
from ..data.folds import SPLITS

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

    @property
    def rec_unet(self) -> Path:
        return self.root / "rec_unet"

    @property
    def rec(self) -> Path:
        return self.root / "rec"

    @property
    def dr(self) -> Path:
        return self.root / "dr"


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


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (what a bundle manifest promises)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_digest(path: str | Path) -> str:
    """SHA-256 of the weights in a saved ``.keras`` model: names, shapes and values.

    It identifies the model for cached outputs and seeds the MC samples of each case. The
    file's own bytes cannot: they hold the save time and Python object ids, so two runs that
    trained bit-identical weights drew different MC samples and reported different Dice.
    """
    import io
    import zipfile

    import h5py

    h = hashlib.sha256()
    with zipfile.ZipFile(path) as archive, \
            h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
        names: list[str] = []
        weights.visititems(lambda name, obj: names.append(name)
                           if isinstance(obj, h5py.Dataset) else None)
        for name in sorted(names):
            values = np.ascontiguousarray(weights[name][()])
            h.update(f"{name}|{values.shape}|{values.dtype.str}|".encode())
            h.update(values.tobytes())
    return h.hexdigest()


def voxel_ml(profile: Profile) -> float:
    """Volume of one profile-grid voxel in millilitres."""
    return float(np.prod(profile.preprocess.voxel_mm)) / 1000.0


def train_mc_unet(profile: Profile, results_dir: str | Path, fold: int,
                  seed: int | None = None, progress: bool = True, epoch_end=None):
    """Train (or resume, or reuse) the fold's MC-dropout U-net; returns a TrainResult.
    ``epoch_end(epoch)`` runs after each epoch's checkpoints (see ``fit_model``)."""
    from ..nets.models import UNetConfig, build_mc_unet
    from ..nets.training import fit_segmenter

    section = profile.section("mc_unet")
    data = load_fold(results_dir, fold)
    cfg = UNetConfig.from_section(section, in_channels=len(preprocess.CHANNELS))
    _check_divisible(profile, cfg.divisor, section["patch"])
    seed = profile.seed + fold if seed is None else seed
    return fit_segmenter(lambda: build_mc_unet(None, cfg), data.cases["train"],
                         data.cases["val"], FoldPaths.under(results_dir, fold).mc_unet,
                         section, seed, progress=progress, epoch_end=epoch_end)


def _check_divisible(profile: Profile, divisor: int, patch) -> None:
    for name, shape in (("preprocess.shape", profile.preprocess.shape), ("patch", patch)):
        if any(int(s) % divisor for s in shape):
            raise ValueError(f"profile {profile.name!r}: {name} {list(shape)} must be a "
                             f"multiple of {divisor} in every axis for this U-net depth")


def run_uncertainty(profile: Profile, results_dir: str | Path, fold: int, model,
                    progress: bool = True) -> pd.DataFrame:
    """MC inference on every case of the fold; writes maps, native NIfTI of the test cases,
    and the uncertainty part of the per-case table."""
    from ..qc.uncertainty import run_mc_inference

    section = profile.section("mc_unet")
    data = load_fold(results_dir, fold)
    paths = FoldPaths.under(results_dir, fold)
    cache = cohort.CohortPaths.under(results_dir).cache
    table = run_mc_inference(model, data.all_cases(), data.splits, paths.mc,
                             int(section["mc_samples"]), int(section["mc_batch"]),
                             voxel_ml(profile), fold,
                             lambda sid: preprocess.load_native_reference(cache, sid),
                             native_for=[c.subject_id for c in data.cases["test"]],
                             progress=progress,
                             model_key=weights_digest(paths.mc_unet / "best.keras"))
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


# ---------------------------------------------------------------------------------------------
# Reconstruction U-net and Dice regression (notebooks 04 and 05)
#
#   fold<k>/rec_unet/        best.keras, last.keras, history.csv, state.json
#   fold<k>/rec/maps/        <subject>.npz: reconstruction, error, abs_error (float16)
#   fold<k>/rec/rec_cases.csv error scores and reconstruction quality of every case
#   fold<k>/dr/<variant>/<input>/  one Dice regressor each (main / widened x 3 input pairs)
#   fold<k>/dr/widened/      <subject>.npz: extra training pairs of training cases (cache)
#   fold<k>/dr/dr_cases.csv  predicted Dice of validation and test cases per model


def fold_subjects(results_dir: str | Path, fold: int) -> dict[str, str]:
    """Subject -> split of one fold (cases whose preprocessing failed left out), read from the
    folds table alone: no image and no ground truth is loaded."""
    _, prep, folds = cohort.load(results_dir)
    failed = set(prep.loc[prep["status"] == "failed", "subject_id"])
    table = folds[(folds["fold"] == fold) & ~folds["subject_id"].isin(failed)]
    if table.empty:
        raise ValueError(f"fold {fold} has no cases in {results_dir}")
    order = {s: i for i, s in enumerate(SPLITS)}
    table = table.sort_values("split", key=lambda s: s.map(order), kind="stable")
    return dict(zip(table["subject_id"], table["split"], strict=True))


def mc_predictions(results_dir: str | Path, fold: int, subjects) -> dict[str, np.ndarray]:
    """The MC U-net's binary predictions (``fold<k>/mc/maps``) of the given subjects."""
    maps = FoldPaths.under(results_dir, fold).mc / "maps"
    out = {}
    for sid in subjects:
        path = maps / f"{sid}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run the uncertainty step (notebook 03)")
        with np.load(path) as z:
            out[sid] = z["prediction"] > 0
    return out


def qc_images(results_dir: str | Path, subjects) -> list:
    """FLAIR and brain of the given subjects, read without their ground truth."""
    from ..qc.reconstruction import load_qc_image

    cache = cohort.CohortPaths.under(results_dir).cache
    return [load_qc_image(cache, sid) for sid in subjects]


def rec_config(profile: Profile):
    from ..nets.models import UNetConfig

    return UNetConfig.from_section(profile.section("rec_unet"), in_channels=1)


def train_rec_unet(profile: Profile, results_dir: str | Path, fold: int,
                   seed: int | None = None, progress: bool = True):
    """Train (or resume, or reuse) the fold's reconstruction U-net; returns a TrainResult.

    Training zeroes the ground-truth lesions of the fold's training cases; validation (model
    choice) zeroes the validation cases' MC predictions, as QC will.
    """
    from ..nets.models import build_rec_unet
    from ..qc.reconstruction import fit_rec_unet

    section = profile.section("rec_unet")
    cfg = rec_config(profile)
    _check_divisible(profile, cfg.divisor, section["patch"])
    seed = profile.seed + fold if seed is None else seed
    subjects = fold_subjects(results_dir, fold)
    cache = cohort.CohortPaths.under(results_dir).cache
    train = [preprocess.load_case(cache, s) for s, split in subjects.items() if split == "train"]
    val_ids = [s for s, split in subjects.items() if split == "val"]
    return fit_rec_unet(lambda: build_rec_unet(None, cfg), train, qc_images(results_dir, val_ids),
                        mc_predictions(results_dir, fold, val_ids),
                        FoldPaths.under(results_dir, fold).rec_unet, section, seed,
                        progress=progress)


def run_error_maps(profile: Profile, results_dir: str | Path, fold: int, model,
                   progress: bool = True) -> pd.DataFrame:
    """Error maps of every case of the fold with its MC prediction zeroed; writes the maps,
    ``rec/rec_cases.csv`` and the fold's per-case table. Never reads a ground-truth mask."""
    from ..qc.reconstruction import model_tag
    from ..qc.reconstruction import run_error_maps as _run

    paths = FoldPaths.under(results_dir, fold)
    subjects = fold_subjects(results_dir, fold)
    table = _run(model, qc_images(results_dir, subjects), mc_predictions(results_dir, fold,
                                                                         subjects),
                 subjects, paths.rec, fold, profile.section("rec_unet"),
                 tag=model_tag(paths.rec_unet), progress=progress)
    table = table.drop(columns=["model_tag", "prediction_digest"], errors="ignore")
    table.to_csv(paths.rec / "rec_cases.csv", index=False)
    write_case_table(results_dir, fold)
    return table


def rec_example_images(results_dir: str | Path, fold: int, subject_id: str) -> dict:
    """One case's reconstruction input, reconstruction, original FLAIR, error maps and
    prediction as NIfTI on the profile grid, for figures."""
    import nibabel as nib

    from ..qc.reconstruction import load_error_maps, zero_region

    paths = FoldPaths.under(results_dir, fold)
    image = qc_images(results_dir, [subject_id])[0]
    with np.load(preprocess.case_dir(cohort.CohortPaths.under(results_dir).cache, subject_id)
                 / "case.npz") as z:
        affine = z["affine"]
    pred = mc_predictions(results_dir, fold, [subject_id])[subject_id]
    maps = load_error_maps(paths.rec / "maps" / f"{subject_id}.npz")
    volumes = {"input": zero_region(image.flair, pred), "reconstruction": maps["reconstruction"],
               "original": image.flair, "error": maps["error"],
               "abs_error": maps["abs_error"], "darker": np.clip(-maps["error"], 0.0, None),
               "prediction": pred.astype(np.uint8), "brain": image.brain.astype(np.uint8)}
    return {k: nib.Nifti1Image(np.asarray(v, dtype=np.float32), affine)
            for k, v in volumes.items()}


def figure2_panels(results_dir: str | Path, fold: int, examples: dict[str, str]
                   ) -> dict[str, list[tuple]]:
    """The paper's Figure 2 for this fold, in each subject's own (native FLAIR) space.

    One row per example case (``{"small": subject_id, ...}``), seven columns: T1, FLAIR with
    the ground truth, FLAIR with the prediction, the entropy map, the reconstruction input
    (prediction blanked), the reconstruction and the signed error map (reconstruction -
    original, diverging colours: red where the reconstruction is brighter). Profile-grid maps are
    brought back with :func:`preprocess.map_to_native`. Rows are panels for
    :func:`plots.plot_map_panels`; the fold's uncertainty and reconstruction steps must have run.
    """
    import nibabel as nib

    from ..data import datasets

    manifest = cohort.load(results_dir)[0].set_index("subject_id")
    cases = read_case_table(results_dir, fold).set_index("subject_id")
    cache = cohort.CohortPaths.under(results_dir).cache
    rows = {}
    for size, sid in examples.items():
        images = datasets.load_subject(manifest.loc[sid].to_dict() | {"subject_id": sid})
        case = cases.loc[sid]
        if not isinstance(case.get("native_prediction"), str):
            raise ValueError(f"{sid}: no native prediction in fold {fold}'s case table "
                             "(only test cases have one): run 03_uncertainty for this fold")
        meta = preprocess.load_case(cache, sid).meta
        rec = rec_example_images(results_dir, fold, sid)
        native = {k: preprocess.map_to_native(np.asarray(rec[k].dataobj), meta)
                  for k in ("input", "reconstruction", "error")}
        pred = nib.load(case["native_prediction"])
        rows[f"{size} load, Dice {case['true_dice']:.2f}\n{sid}"] = [
            ("T1", images.t1, None, "anat"),
            ("ground truth", images.flair, images.lesion, "contour"),
            ("prediction", images.flair, pred, "contour"),
            ("uncertainty (entropy)", images.flair, nib.load(case["native_entropy"]), "heat"),
            ("rec. input", native["input"], pred, "contour"),
            ("reconstruction", native["reconstruction"], None, "anat"),
            ("error: rec. - orig.\n(red > 0, blue < 0)", images.flair, native["error"],
             "diverging"),
        ]
    return rows
