"""Step 05 of a fold: the Dice regressors, trained on the fold's training cases and used on its
validation and test cases (:mod:`wmhqc_lib.qc.regression` holds the networks' data and
training; this module wires them to a fold's files).

Writes ``fold<k>/dr/<variant>/<input kind>/`` (checkpoints, history, state) and
``fold<k>/dr/dr_cases.csv`` (predicted Dice of the validation and test cases per model), then
refreshes the fold's case table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Profile
from ..data import cohort, preprocess
from ..data.folds import SPLITS, holdout
from . import out_of_fold as oof
from .steps import FoldPaths, fold_subjects, qc_images, write_case_table


@dataclass
class DiceRegressionResult:
    """The fold's Dice regressors and their predictions."""

    models: dict  # (variant, input kind) -> TrainResult
    table: pd.DataFrame  # dr_cases.csv
    n_pairs: dict  # variant -> number of training pairs
    stop_ids: list[str] = field(default_factory=list)  # training cases held out to stop

    def summary(self) -> pd.DataFrame:
        """One row per model: training pairs, epochs, best epoch and its Huber loss on the
        held-out training cases that stop it, whether early stopping or the epoch cap ended
        it, learning-rate changes, time."""
        from ..nets.training import rate_changes
        from ..qc.regression import INPUT_LABELS

        return pd.DataFrame([{
            "input pair": INPUT_LABELS[kind], "variant": variant,
            "training pairs": self.n_pairs[variant], "epochs": r.state.get("epochs_run"),
            "best epoch": r.state.get("best_epoch"),
            "best Huber on stop cases": r.state.get("best_val_huber"),
            "stopped by": "early stopping" if r.state.get("stopped_early") else "epoch cap",
            "rate changes": len(rate_changes(r.history)),
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

    Targets are the true Dice of the fold's training cases; a share of them
    (``dice_regression.stop_fraction``, :func:`~wmhqc_lib.data.folds.holdout`) is held out to
    stop each regressor (best checkpoint, plateau schedule, early stopping), so the validation
    cases, which choose the carried score and the thresholds, never also stopped a regressor:
    they are only predicted, as the test cases are. No test target is read. Widening uses the
    fitted training cases only. The training
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
    # neither validation nor test targets are read here
    fit_ids, stop_ids = holdout(ids["train"], float(section.get("stop_fraction", 0.0)))
    if not stop_ids:
        raise ValueError(f"fold {fold}: dice_regression.stop_fraction "
                         f"{section.get('stop_fraction')} holds out no training case to stop "
                         f"the regressors ({len(ids['train'])} training cases); validation "
                         "cases only choose, they never stop a model")

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
    steps = section.get("steps_per_epoch") or max(1, int(np.ceil(len(fit_ids) / batch)))

    def build():
        return build_dice_regressor(shape, 2, section["filters"],
                                    int(section.get("input_pool", 1)),
                                    float(section.get("negative_slope", 0.3)))

    models, n_pairs, predicted = {}, {}, {}
    for src in sources:
        suffix = "" if src == source else f"_{src}"
        if src == "in_sample":
            train_inputs = {sid: outer[sid] for sid in ids["train"]}
            targets = mc_table.loc[ids["train"], "true_dice"]
            rec_folders = dict.fromkeys(ids["train"], paths.rec_unet)
        else:
            folders = oof.map_folders(results_dir, fold, ids["train"])
            train_inputs = {sid: _case_inputs(rg, sid, images[sid], *folders[sid])
                            for sid in ids["train"]}
            targets = oof.out_of_fold_targets(results_dir, fold).loc[ids["train"]]
            rec_folders = {sid: oof.rec_model_of(results_dir, fold, sid)
                           for sid in ids["train"]}
        extra: dict[str, dict] = {}
        if "widened" in variants:
            loaded: dict[Path, keras.Model] = {}
            for sid in fit_ids:  # ground truth of fitted training cases only
                folder = rec_folders[sid]
                if folder not in loaded:
                    loaded[folder] = keras.models.load_model(folder / "best.keras",
                                                             compile=False)
                meta = preprocess.load_case(cache, sid).meta
                reference = preprocess.load_native_reference(cache, sid)

                def true_dice(volume, meta=meta, reference=reference):
                    return preprocess.native_dice(volume, meta, reference)

                extra[sid] = rg.widened_pairs(
                    loaded[folder], train_inputs[sid], true_dice, widen,
                    paths.dr / f"widened{suffix}" / f"{sid}.npz", model_tag(folder),
                    int(rec_section.get("infer_batch", 4)))
            del loaded
        for kind in rg.INPUT_KINDS:
            main = rg.RegressionSet(np.stack([train_inputs[s].pair(kind) for s in fit_ids]),
                                    targets.loc[fit_ids].to_numpy(np.float32), fit_ids)
            stop = rg.RegressionSet(np.stack([train_inputs[s].pair(kind) for s in stop_ids]),
                                    targets.loc[stop_ids].to_numpy(np.float32), stop_ids)
            val_x = np.stack([outer[s].pair(kind) for s in ids["val"]])
            test_x = np.stack([outer[s].pair(kind) for s in ids["test"]])
            for variant in variants:
                train = main
                if variant == "widened":
                    xs, ys, names = [main.x], [main.y], list(main.ids)
                    for sid in fit_ids:
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
                result = rg.fit_dice_regressor(build, train, stop, paths.dr / name / kind,
                                               section, seed, steps=int(steps),
                                               progress=progress)
                models[(name, kind)] = result
                column = rg.column_name(kind, variant) + suffix
                predicted[column] = dict(zip(ids["val"], rg.predict_dice(result.model, val_x),
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
    return DiceRegressionResult(models, table, n_pairs, stop_ids)
