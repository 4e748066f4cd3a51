"""Step 05 of a fold: the Dice regressors, trained on the fold's training cases and used on its
validation and test cases (:mod:`wmhqc_lib.qc.regression` holds the networks' data and
training; this module wires them to a fold's files).

Writes ``fold<k>/dr/<variant>/<input kind>/`` (checkpoints, history, state) and
``fold<k>/dr/dr_cases.csv`` (predicted Dice of the validation and test cases per model), then
refreshes the fold's case table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Profile
from ..data import cohort, preprocess
from ..data.folds import SPLITS
from . import out_of_fold as oof
from .steps import FoldPaths, fold_subjects, qc_images, write_case_table


@dataclass
class DiceRegressionResult:
    """The fold's Dice regressors and their predictions."""

    models: dict  # (variant, input kind) -> TrainResult
    table: pd.DataFrame  # dr_cases.csv
    n_pairs: dict  # variant -> number of training pairs

    def summary(self) -> pd.DataFrame:
        """One row per model: training pairs, epochs, best epoch and validation loss, whether
        early stopping or the epoch cap ended it, learning-rate changes, time."""
        from ..qc.regression import INPUT_LABELS

        return pd.DataFrame([{
            "input pair": INPUT_LABELS[kind], "variant": variant,
            "training pairs": self.n_pairs[variant], "epochs": r.state.get("epochs_run"),
            "best epoch": r.state.get("best_epoch"),
            "best val Huber": r.state.get("best_val_huber"),
            "stopped by": "early stopping" if r.state.get("stopped_early") else "epoch cap",
            "rate changes": int((np.diff(r.history["learning_rate"].to_numpy(float)) < 0).sum())
            if "learning_rate" in r.history else 0,
            "training s": round(float(r.history["seconds"].sum()), 1),
            "reused": r.skipped} for (variant, kind), r in self.models.items()])

    def histories(self) -> dict[str, pd.DataFrame]:
        from ..qc.regression import INPUT_LABELS

        return {f"{INPUT_LABELS[kind]} ({variant})": r.history
                for (variant, kind), r in self.models.items()}


def _case_inputs(rg, sid: str, image, mc_maps: Path, rec_maps: Path):
    """What a regressor reads of one case, from the given MC and error-map folders."""
    from ..qc.reconstruction import load_error_maps

    with np.load(mc_maps / f"{sid}.npz") as z:
        pred, mean, entropy = (z["prediction"] > 0, z["mean"].astype(np.float32),
                               z["entropy"].astype(np.float32))
    error = load_error_maps(rec_maps / f"{sid}.npz")["error"]
    return rg.CaseInputs(sid, image, pred, mean, entropy, error)


def train_dice_regressors(profile: Profile, results_dir: str | Path, fold: int,
                          seed: int | None = None, progress: bool = True
                          ) -> DiceRegressionResult:
    """Train (or reuse) the three Dice regressors of the fold, main and widened variant;
    predict validation and test cases; write ``dr/dr_cases.csv`` and the per-case table.

    Targets are the true Dice of the fold's training cases (validation cases choose the
    checkpoint); no test target is read. Widening uses training cases only. The training
    cases' inputs are in-sample (the outer networks' maps, the paper's design) or out-of-fold
    (:mod:`wmhqc_lib.study.out_of_fold`), as ``dice_regression.inputs`` says; with
    ``compare_inputs`` the other source is trained too, its columns suffixed with its name.
    """
    import keras

    from ..nets.models import build_dice_regressor
    from ..nets.training import log_progress
    from ..qc import regression as rg
    from ..qc.reconstruction import model_tag

    section = profile.section("dice_regression")
    rec_section = profile.section("rec_unet")
    source = oof.input_source(section)
    sources = [source] + ([s for s in oof.INPUT_SOURCES if s != source]
                          if section.get("compare_inputs") else [])
    seed = profile.seed + fold if seed is None else seed
    paths = FoldPaths.under(results_dir, fold)
    subjects = fold_subjects(results_dir, fold)
    ids = {s: [sid for sid, sp in subjects.items() if sp == s] for s in SPLITS}
    mc_table = pd.read_csv(paths.mc / "mc_cases.csv").set_index("subject_id")
    val_targets = mc_table.loc[ids["val"], "true_dice"].to_numpy(np.float32)
    # test targets are never read here

    images = {im.subject_id: im for im in qc_images(results_dir, subjects)}
    outer = {sid: _case_inputs(rg, sid, images[sid], paths.mc / "maps", paths.rec / "maps")
             for sid in subjects}
    if "out_of_fold" in sources:
        oof.run_out_of_fold(profile, results_dir, fold, progress=progress)
    cache = cohort.CohortPaths.under(results_dir).cache
    widen = rg.widen_settings(section)
    variants = ["main"] + (["widened"] if widen else [])
    shape = tuple(profile.preprocess.shape)
    batch = int(section["batch_size"])
    steps = section.get("steps_per_epoch") or max(1, int(np.ceil(len(ids["train"]) / batch)))

    def build():
        return build_dice_regressor(shape, 2, section["filters"],
                                    int(section.get("input_pool", 1)),
                                    float(section.get("negative_slope", 0.3)))

    models, n_pairs, predicted = {}, {}, {}
    for src in sources:
        suffix = "" if src == source else f"_{src}"
        if src == "in_sample":
            train_inputs = {sid: outer[sid] for sid in ids["train"]}
            train_targets = mc_table.loc[ids["train"], "true_dice"].to_numpy(np.float32)
            rec_folders = dict.fromkeys(ids["train"], paths.rec_unet)
        else:
            folders = oof.map_folders(results_dir, fold, ids["train"])
            train_inputs = {sid: _case_inputs(rg, sid, images[sid], *folders[sid])
                            for sid in ids["train"]}
            train_targets = oof.out_of_fold_targets(results_dir, fold).loc[
                ids["train"]].to_numpy(np.float32)
            rec_folders = {sid: oof.rec_model_of(results_dir, fold, sid)
                           for sid in ids["train"]}
        extra: dict[str, dict] = {}
        if "widened" in variants:
            loaded: dict[Path, keras.Model] = {}
            for sid in ids["train"]:  # ground truth of training cases only
                folder = rec_folders[sid]
                if folder not in loaded:
                    loaded[folder] = keras.models.load_model(folder / "best.keras",
                                                             compile=False)
                meta = preprocess.load_case(cache, sid).meta
                reference = preprocess.load_native_reference(cache, sid)

                def true_dice(mask, meta=meta, reference=reference):
                    return preprocess.native_dice(mask.astype(np.float32), meta, reference)

                extra[sid] = rg.widened_pairs(
                    loaded[folder], train_inputs[sid], true_dice, widen,
                    paths.dr / f"widened{suffix}" / f"{sid}.npz", model_tag(folder),
                    int(rec_section.get("infer_batch", 4)))
            del loaded
        for kind in rg.INPUT_KINDS:
            main = rg.RegressionSet(np.stack([train_inputs[s].pair(kind) for s in ids["train"]]),
                                    train_targets, list(ids["train"]))
            val = rg.RegressionSet(np.stack([outer[s].pair(kind) for s in ids["val"]]),
                                   val_targets, list(ids["val"]))
            test_x = np.stack([outer[s].pair(kind) for s in ids["test"]])
            for variant in variants:
                train = main
                if variant == "widened":
                    xs, ys, names = [main.x], [main.y], list(main.ids)
                    for sid in ids["train"]:
                        e, case = extra[sid], train_inputs[sid]
                        for j, name in enumerate(e["names"]):
                            maps = {"flair": case.image.flair, "entropy": case.entropy,
                                    "error": e["error"][j]}
                            xs.append(rg.input_pair(kind, e["masks"][j], **maps)[None])
                            ys.append(e["dice"][j:j + 1])
                            names.append(f"{sid}:{name}")
                    train = rg.RegressionSet(np.concatenate(xs), np.concatenate(ys), names)
                name = f"{variant}{suffix}"
                n_pairs[name] = len(train.ids)
                if progress:
                    log_progress(f"Dice regressor {rg.INPUT_LABELS[kind]}, {name}: "
                                 f"{len(train.ids)} training pairs")
                result = rg.fit_dice_regressor(build, train, val, paths.dr / name / kind,
                                               section, seed, steps=int(steps),
                                               progress=progress)
                models[(name, kind)] = result
                column = rg.column_name(kind, variant) + suffix
                predicted[column] = dict(zip(ids["val"], rg.predict_dice(result.model, val.x),
                                             strict=True))
                predicted[column].update(zip(ids["test"],
                                             rg.predict_dice(result.model, test_x),
                                             strict=True))
                del train

    rows = [{"fold": fold, "subject_id": sid, "split": split,
             **{c: float(v[sid]) if sid in v else np.nan for c, v in predicted.items()}}
            for sid, split in subjects.items()]
    table = rg.write_table(rows, paths.dr / "dr_cases.csv")
    write_case_table(results_dir, fold)
    return DiceRegressionResult(models, table, n_pairs)
