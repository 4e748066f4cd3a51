"""Dice regression: a 3D CNN that predicts a segmentation's Dice from a map and the prediction.

Three input pairs (two channels each), as in the paper:

* ``image``: FLAIR and the binary prediction;
* ``uncertainty``: the entropy map (bits) and the prediction;
* ``error``: the reconstruction error map and the prediction.

Every input is per case. FLAIR is min-max scaled inside the case's own brain mask
(:func:`wmhqc_lib.qc.reconstruction.rec_intensity`); the entropy (bits, in [0, 1]) and the signed
error (in units of the case's own FLAIR range, in [-1, 1]) keep their absolute scale: a per-case
min-max would erase exactly the magnitude that carries the QC signal, and the authors'
rescaling over all test cases of a fold (one case's input depending on the others) does not
happen here.

Targets are the true lesion Dice of the MC U-net's prediction on the fold's training cases;
validation cases choose the checkpoint; test cases are only predicted.

Widening. A fitted U-net's predictions on its own training cases are mostly good, so a
regressor trained on them rarely sees a failure. The ``widened`` variant adds, for each
*training* case, other plausible masks with their own true Dice: the MC mean probability
thresholded at other levels (larger and smaller masks) and the prediction dilated and eroded.
For the error pair the error map is recomputed with that mask zeroed (the QC path of
:mod:`wmhqc_lib.qc.reconstruction`). Validation and test cases are untouched; both variants train
for the same number of steps, so they cost the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.stats import pearsonr

from ..nets.training import TrainResult, fit_model
from .reconstruction import QCImage, array_digest, error_maps

WIDEN_VERSION = 3  # 2: true Dice of widened masks on the native grid; 3: one target rule

INPUT_KINDS = ("image", "uncertainty", "error")
INPUT_LABELS = {"image": "image-prediction", "uncertainty": "uncertainty-prediction",
                "error": "error-prediction"}
VARIANTS = ("main", "widened")


def column_name(kind: str, variant: str = "main") -> str:
    """Per-case table column of a model's predicted Dice: ``dr_<kind>[_widened]``."""
    return f"dr_{kind}" if variant == "main" else f"dr_{kind}_{variant}"


def input_pair(kind: str, prediction: np.ndarray, *, flair: np.ndarray | None = None,
               entropy: np.ndarray | None = None, error: np.ndarray | None = None
               ) -> np.ndarray:
    """One regressor input ``(X, Y, Z, 2)``: the map of ``kind`` and the binary prediction.

    ``flair`` is the case's scaled FLAIR (:class:`QCImage`), ``entropy`` the MC entropy in bits,
    ``error`` the signed error map made with this same prediction zeroed.
    """
    maps = {"image": flair, "uncertainty": entropy, "error": error}
    if kind not in maps:
        raise ValueError(f"unknown input pair {kind!r}: use one of {INPUT_KINDS}")
    first = maps[kind]
    if first is None:
        raise ValueError(f"input pair {kind!r} needs its map")
    pred = (np.asarray(prediction) > 0).astype(np.float32)
    return np.stack([np.asarray(first, dtype=np.float32), pred], axis=-1)


@dataclass
class CaseInputs:
    """What the regressors read of one case: no ground truth."""

    subject_id: str
    image: QCImage
    prediction: np.ndarray
    mean: np.ndarray  # MC mean probability (for widening on training cases)
    entropy: np.ndarray
    error: np.ndarray

    def pair(self, kind: str) -> np.ndarray:
        return input_pair(kind, self.prediction, flair=self.image.flair, entropy=self.entropy,
                          error=self.error)


# ---------------------------------------------------------------------------------------------
# Widening (training cases only)


def widen_settings(section: Mapping) -> dict:
    """The ``dice_regression`` section's widening settings; empty when widening is off (no
    ``widen`` block, or ``enabled: false``), so that ``if widen_settings(section)`` says
    whether the widened variant is trained."""
    widen = dict(section.get("widen") or {})
    return widen if widen.get("enabled", True) else {}


def n_widened_masks(settings: Mapping) -> int:
    """At most how many masks :func:`widened_masks` makes per case with these settings."""
    return len(settings.get("thresholds", ())) + int(bool(settings.get("dilate"))) + \
        int(bool(settings.get("erode")))


def widened_masks(mean: np.ndarray, prediction: np.ndarray, thresholds: Sequence[float] = (),
                  dilate: int = 0, erode: int = 0) -> dict[str, np.ndarray]:
    """Other plausible masks of one case: the MC mean thresholded at other levels, and the
    prediction dilated / eroded by a number of voxels. Masks equal to the prediction or to an
    earlier one are dropped (they would only re-weight a case)."""
    pred = np.asarray(prediction) > 0
    candidates = {f"threshold_{t:g}": np.asarray(mean) > t for t in thresholds}
    if dilate:
        candidates[f"dilate_{dilate}"] = ndi.binary_dilation(pred, iterations=int(dilate))
    if erode:
        candidates[f"erode_{erode}"] = ndi.binary_erosion(pred, iterations=int(erode))
    out: dict[str, np.ndarray] = {}
    for name, mask in candidates.items():
        if np.array_equal(mask, pred) or any(np.array_equal(mask, m) for m in out.values()):
            continue
        out[name] = mask
    return out


def target_volume(name: str, mask: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The grid volume whose cut at 0.5 is ``mask``, for its true Dice (:func:`widened_pairs`).

    One rule for every training target: the true Dice of a mask is measured on the native
    grid by mapping back, linearly, the grid volume that was cut to make the mask, and cutting
    it at the same level there. The main pair's mask is the MC mean cut at 0.5, so its target
    maps back the mean (the study's ``true_dice``); the mask at level ``t`` is the mean cut at
    ``t``, so its target maps back ``mean + 0.5 - t`` (cut at 0.5, the same as the mapped mean
    cut at ``t``: linear resampling commutes with a constant shift); a dilated or eroded mask
    has no underlying probability, so the mask itself (0/1) is mapped back."""
    if name.startswith("threshold_"):
        level = float(name.removeprefix("threshold_"))
        return np.asarray(mean, dtype=np.float32) + np.float32(0.5 - level)
    return np.asarray(mask, dtype=np.float32)


def widened_pairs(rec_model: keras.Model, case: CaseInputs,
                  true_dice: Callable[[np.ndarray], float], settings: Mapping,
                  cache: Path | None = None, tag: str = "", batch: int = 4
                  ) -> dict[str, object]:
    """Extra training pairs of one *training* case: masks, their true Dice against the case's
    ground truth, and the error maps with each mask zeroed. ``true_dice(volume)`` maps a grid
    volume back to the native grid, cuts it at 0.5 and scores it, as the main pairs' targets
    are (:func:`target_volume` gives each mask's volume). Cached in ``cache`` (an npz) when the
    reconstruction model ``tag`` and the masks are unchanged."""
    masks = widened_masks(case.mean, case.prediction, settings.get("thresholds", ()),
                          int(settings.get("dilate", 0)), int(settings.get("erode", 0)))
    names = list(masks)
    stack = np.stack([masks[n] for n in names]) if names else \
        np.zeros((0, *case.prediction.shape), bool)
    stamp = f"{WIDEN_VERSION}|{tag}|{array_digest(stack)}"
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            if str(z["stamp"]) == stamp:
                return {"names": names, "masks": stack, "dice": z["dice"],
                        "error": z["error"].astype(np.float32)}
    scores = np.array([true_dice(target_volume(n, m, case.mean))
                       for n, m in zip(names, stack, strict=True)],
                      dtype=np.float32)
    errors = np.stack([m.error for m in error_maps(rec_model, case.image, stack, batch)]) \
        if names else np.zeros((0, *case.prediction.shape), np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, stamp=stamp, dice=scores, error=errors.astype(np.float16))
        tmp.replace(cache)
    return {"names": names, "masks": stack, "dice": scores, "error": errors}


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class RegressionSet:
    """Inputs ``(N, X, Y, Z, 2)``, targets ``(N,)`` and a name per row."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str]

    def __post_init__(self):
        self.x = np.asarray(self.x, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.float32)
        if not (len(self.x) == len(self.y) == len(self.ids)):
            raise ValueError("inputs, targets and ids differ in length")

    def digest(self) -> str:
        return array_digest(self.x, self.y)


class PairDataset(keras.utils.PyDataset):
    """Seeded batches of whole-volume pairs, shuffled per epoch, randomly flipped left-right;
    batch ``i`` of epoch ``e`` depends only on ``(seed, e, i)`` (resume sees the same data)."""

    def __init__(self, data: RegressionSet, batch_size: int, steps: int, seed: int,
                 flip: bool = True, start_epoch: int = 0):
        super().__init__(workers=1, use_multiprocessing=False)
        if len(data.x) == 0:
            raise ValueError("no training pairs")
        self.data = data
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.flip = flip
        self.epoch = start_epoch

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        n = len(self.data.x)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        pick = order[np.arange(index * self.batch_size, (index + 1) * self.batch_size) % n]
        x = self.data.x[pick].copy()
        if self.flip:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            flips = rng.random(len(pick)) < 0.5
            x[flips] = x[flips, ::-1]
        return x, self.data.y[pick, None]

    def on_epoch_end(self) -> None:
        self.epoch += 1


def predict_dice(model: keras.Model, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Predicted Dice per input, ``(N,)`` (not clipped: a linear output, as in the paper)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        return np.zeros(0, np.float32)
    # direct calls: no graph traced per batch size and model (six models per fold)
    return np.concatenate([np.asarray(model(x[i:i + batch], training=False))[:, 0]
                           for i in range(0, len(x), batch)])


def fit_dice_regressor(build: Callable[[], keras.Model], train: RegressionSet,
                       val: RegressionSet, folder: str | Path, section: dict, seed: int,
                       steps: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume, or reuse) one Dice regressor: Huber loss (``huber_delta``), Adam,
    validation Huber loss each epoch (``val_huber``), best checkpoint, early stopping.

    ``steps`` per epoch default to one pass over ``train``; the widened variant passes the
    main variant's count so that both cost the same.
    """
    batch = int(section["batch_size"])
    steps = steps or max(1, math.ceil(len(train.x) / batch))
    loss = keras.losses.Huber(delta=float(section.get("huber_delta", 1.0)))
    key = {"section": section, "seed": seed, "steps": steps, "train": train.ids,
           "val": val.ids, "data": [train.digest(), val.digest()]}

    def score(model: keras.Model) -> float:
        pred = predict_dice(model, val.x)
        return float(np.mean(np.asarray(loss(val.y[:, None], pred[:, None]))))

    return fit_model(build, folder, section, seed, key=key,
                     make_dataset=lambda start: PairDataset(train, batch, steps, seed,
                                                            bool(section.get("flip", True)),
                                                            start),
                     loss=loss, score=score, score_name="val_huber", mode="min",
                     progress=progress)


# ---------------------------------------------------------------------------------------------
# Reporting


def regression_metrics(table: pd.DataFrame, columns: Sequence[str], split: str = "test",
                       dice_column: str = "true_dice") -> pd.DataFrame:
    """MAE and Pearson r of predicted against true Dice per column, on one split."""
    rows = []
    part = table[table["split"] == split] if "split" in table.columns else table
    for column in columns:
        data = part[[column, dice_column]].dropna()
        pred, true = data[column].to_numpy(float), data[dice_column].to_numpy(float)
        ok = len(data) > 2 and np.ptp(pred) > 0 and np.ptp(true) > 0
        rows.append({"column": column, "split": split, "n": len(data),
                     "mae": float(np.mean(np.abs(pred - true))) if len(data) else math.nan,
                     "pearson_r": float(pearsonr(pred, true)[0]) if ok else math.nan})
    return pd.DataFrame(rows)


def metrics_side_by_side(table: pd.DataFrame, split: str = "test",
                         dice_column: str = "true_dice") -> pd.DataFrame:
    """MAE and Pearson r of every regressor, main and widened variant side by side, one row
    per input pair (variants missing from the table are left out)."""
    parts = []
    for variant in VARIANTS:
        columns = [column_name(k, variant) for k in INPUT_KINDS]
        if not all(c in table.columns for c in columns):
            continue
        m = regression_metrics(table, columns, split, dice_column)
        m.index = [INPUT_LABELS[k] for k in INPUT_KINDS]
        parts.append(m[["mae", "pearson_r"]].add_prefix(f"{variant} "))
    out = pd.concat(parts, axis=1)
    out.index.name = f"input pair ({split}, n = {int((table['split'] == split).sum())})"
    return out


def input_sources_side_by_side(table: pd.DataFrame, quality_threshold: float,
                               split: str = "test", dice_column: str = "true_dice",
                               main_source: str | None = None) -> pd.DataFrame:
    """Every regressor trained on in-sample and on out-of-fold inputs, one row per input pair,
    source and variant: Pearson r, MAE, failure AUROC and AURC on one split. ``main_source``
    is the source of the unsuffixed columns (the profile's ``dice_regression.inputs``; by
    default the one without suffixed columns); sources missing from the table are left out."""
    from . import evaluation as ev

    suffixes = {"_in_sample": "in_sample", "_out_of_fold": "out_of_fold"}
    present = {name for suffix, name in suffixes.items()
               if any(c.endswith(suffix) for c in table.columns)}
    if main_source is None:
        main_source = next((n for n in suffixes.values() if n not in present), None)
    part = table[table["split"] == split]
    rows = []
    for kind in INPUT_KINDS:
        for variant in VARIANTS:
            for suffix, source in [("", main_source)] + list(suffixes.items()):
                column = column_name(kind, variant) + suffix
                if source is None or column not in part or part[column].isna().all():
                    continue
                spec = ev.resolve_score(column, higher_is_better=True, dice_scale=True)
                data = part.dropna(subset=[column, dice_column])
                m = ev.evaluate_score(data, spec, threshold=float(data[column].median()),
                                      quality_threshold=quality_threshold,
                                      dice_column=dice_column)
                rows.append({"input pair": INPUT_LABELS[kind], "inputs": source,
                             "variant": variant, "n": len(data),
                             "pearson_r": m["pearson_r"], "mae": m["mae"],
                             "failure_auroc": m["failure_auroc"], "aurc": m["aurc"]})
    return pd.DataFrame(rows)


def write_table(rows: Sequence[dict], path: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return table


def save_summary(summary: Mapping, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, default=float))
