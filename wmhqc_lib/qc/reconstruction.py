"""Reconstruction U-net: inpainting the lesion region of FLAIR, and the error maps QC reads.

The network sees a case's FLAIR with a region set to zero and is trained to give back the
original FLAIR. In training the zeroed region is the ground-truth lesion mask and the target is
the original FLAIR, lesions included: the network is trained to restore the original
intensities, lesion intensities too, inside the hole (every hole it saw in training was a
lesion). The error is reconstruction - original inside the brain; at QC time the *predicted*
mask is zeroed, and for a network that has learnt this task:

* a correctly predicted lesion is filled with lesion-like intensity: error near 0;
* a false-positive region (predicted lesion on normal tissue) is filled as if a lesion were
  there, brighter than the tissue it hides: error positive;
* a missed lesion is not zeroed, stays in the input and is passed through: error near 0, so a
  missed lesion is invisible to the error map whatever its size.

A network that has not learnt the fill leaves the hole too dark: the error is then negative
across the whole predicted region, true and false positives alike, and says only where the hole
was. :func:`error_by_region` measures which of these a run shows (the reconstruction chapter
prints it next to Figure 2). The signed sum over the brain is the paper's error VS, one QC score
per case; it also sums any brain-wide bias of the reconstruction.

Two paths, kept apart on purpose:

* **Training** (the fold's training cases only) zeroes the *ground-truth* lesion mask: the
  network must learn what normal tissue under a lesion looks like.
* **QC** (every case whose error map feeds a QC score or the Dice regressor: validation, test,
  and training cases) zeroes the MC U-net's *predicted* mask. The authors' code used the ground
  truth here, which a QC method can never have. The QC path takes a :class:`QCImage` (FLAIR and
  brain mask, nothing else) and a prediction; :func:`load_qc_image` reads only those two arrays
  from the cache, so no ground truth is in memory on that path, and :func:`error_maps` refuses
  anything that is not a :class:`QCImage`.

Intensities. Preprocessed channels are z-scored inside the brain (about -3..5) and 0 outside;
a ReLU output cannot be negative. Each case's FLAIR is therefore min-max scaled to [0, 1] inside
its own brain mask (:func:`rec_intensity`: the minimum and maximum are those of the
percentile-clipped channel, taken from this case alone), 0 outside. A zeroed region then reads
as the darkest possible value, and errors are in units of the case's own intensity range
(between -1 and 1 per voxel). The paper min-max scaled to [0, 255] instead, so its error VS
(threshold -100,000 at 1 mm) and ours differ in scale.

SSIM (loss 1 - SSIM) is written with ``keras.ops`` only: a separable Gaussian window, ``valid``
borders like ``tf.image.ssim``, constants ``(0.01 L)^2`` and ``(0.03 L)^2`` with data range
L = 1. Mode ``3d`` (default) smooths along all three axes; ``2d`` only within each axial slice,
which is the paper's per-slice SSIM.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from keras import ops

from ..data.preprocess import CHANNELS, PreprocessedCase, case_dir
from ..nets.training import PatchDataset, TrainResult, fit_model
from .case_cache import cached_case_rows

FLAIR = CHANNELS.index("flair")
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ---------------------------------------------------------------------------------------------
# Per-case intensities and inputs


def rec_intensity(flair: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """FLAIR min-max scaled to [0, 1] inside this case's brain mask, 0 outside.

    Uses nothing but this case's own voxels, so no other case changes it.
    """
    brain = np.asarray(brain) > 0
    flair = np.asarray(flair, dtype=np.float32)
    out = np.zeros(flair.shape, dtype=np.float32)
    if not brain.any():
        return out
    lo, hi = float(flair[brain].min()), float(flair[brain].max())
    if hi > lo:
        out[brain] = (flair[brain] - lo) / (hi - lo)
    return out


def zero_region(flair: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reconstruction input: ``flair`` with the voxels of ``mask`` set to 0."""
    return np.where(np.asarray(mask) > 0, 0.0, flair).astype(np.float32)


@dataclass(frozen=True)
class QCImage:
    """What the QC path may see of a case: its scaled FLAIR and brain mask. No lesion mask."""

    subject_id: str
    flair: np.ndarray  # (X, Y, Z) float32 in [0, 1] (rec_intensity), 0 outside the brain
    brain: np.ndarray  # (X, Y, Z) bool

    @classmethod
    def from_arrays(cls, subject_id: str, flair_channel: np.ndarray, brain: np.ndarray
                    ) -> QCImage:
        """From the preprocessed (z-scored) FLAIR channel and the brain mask."""
        brain = np.asarray(brain) > 0
        return cls(subject_id, rec_intensity(flair_channel, brain), brain)


def load_qc_image(cache_dir: str | Path, subject_id: str) -> QCImage:
    """Read only the image and brain arrays of a cached case (never its lesion or ignore)."""
    with np.load(case_dir(cache_dir, subject_id) / "case.npz") as z:
        return QCImage.from_arrays(subject_id, z["image"][FLAIR], z["brain"])


def training_case(case: PreprocessedCase) -> PreprocessedCase:
    """Training view of a case: the scaled FLAIR as the only channel; its ground-truth lesion
    stays, as the region to zero. For the fold's training cases only."""
    return replace(case, image=rec_intensity(case.image[FLAIR], case.brain)[None])


class RecPatchDataset(PatchDataset):
    """Augmented patches of training cases: input = FLAIR with the ground-truth lesion zeroed,
    target = the FLAIR. Cases come from :func:`training_case`; seeding as in PatchDataset."""

    def __getitem__(self, index: int):
        image, target = super().__getitem__(index)
        # zero where the voxel is mostly lesion, as QC zeroes a binary prediction (mean > 0.5)
        return image * (target[..., :1] < 0.5), image


# ---------------------------------------------------------------------------------------------
# SSIM with keras.ops (any backend)


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def _blur(x, window: np.ndarray, axes: Sequence[int]):
    """Separable Gaussian smoothing of ``(N, X, Y, Z, 1)`` along the given spatial axes
    (0, 1, 2 = X, Y, Z), with ``valid`` borders."""
    for axis in axes:
        shape = [1, 1, 1, 1, 1]  # kernel (kx, ky, kz, in, out)
        shape[axis] = len(window)
        kernel = ops.cast(ops.reshape(ops.convert_to_tensor(window), shape), x.dtype)
        x = ops.conv(x, kernel, strides=1, padding="valid")
    return x


def ssim(x, y, window: int = 7, sigma: float = 1.5, mode: str = "3d", data_range: float = 1.0):
    """Mean SSIM per sample of two batches ``(N, X, Y, Z, 1)``; returns shape ``(N,)``.

    ``mode="3d"``: Gaussian window in all three axes; ``"2d"``: within each axial slice only
    (the paper's per-slice SSIM; every slice has the same size, so the mean over voxels is the
    mean over slices).
    """
    if mode not in ("3d", "2d"):
        raise ValueError(f"unknown SSIM mode {mode!r}: use 3d or 2d")
    x = ops.convert_to_tensor(x)
    y = ops.cast(ops.convert_to_tensor(y), x.dtype)
    axes = (0, 1, 2) if mode == "3d" else (0, 1)
    for axis in axes:
        if x.shape[axis + 1] is not None and x.shape[axis + 1] < window:
            raise ValueError(f"SSIM window {window} is larger than the volume {x.shape}")
    n = ops.shape(x)[0]
    # the five local statistics in one pass: stacked along the batch axis
    stats = _blur(ops.concatenate([x, y, x * x, y * y, x * y], axis=0),
                  gaussian_window(window, sigma), axes)
    mu_x, mu_y, xx, yy, xy = (stats[i * n:(i + 1) * n] for i in range(5))
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    s = ((2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)) / \
        ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ops.mean(s, axis=(1, 2, 3, 4))


def make_ssim_loss(window: int = 7, sigma: float = 1.5, mode: str = "3d"):
    """Loss 1 - SSIM per sample."""
    def ssim_loss(y_true, y_pred):
        return 1.0 - ssim(y_pred, y_true, window, sigma, mode)
    ssim_loss.__name__ = f"ssim{mode}_loss"
    return ssim_loss


def _ssim_settings(section: Mapping) -> dict:
    return {"window": int(section.get("ssim_window", 7)),
            "sigma": float(section.get("ssim_sigma", 1.5)),
            "mode": str(section.get("ssim_mode", "3d"))}


def volume_ssim(a: np.ndarray, b: np.ndarray, section: Mapping | None = None) -> float:
    """SSIM of two whole volumes ``(X, Y, Z)`` with the profile's window settings."""
    a = np.asarray(a, np.float32)[None, ..., None]
    b = np.asarray(b, np.float32)[None, ..., None]
    out = ssim(a, b, **_ssim_settings(section or {}))
    return float(np.asarray(out)[0])


# ---------------------------------------------------------------------------------------------
# QC path: error maps from a prediction, never from ground truth


@dataclass
class ErrorMaps:
    """Reconstruction and error maps of one case on the profile grid."""

    reconstruction: np.ndarray  # (X, Y, Z) float32, 0 outside the brain
    error: np.ndarray  # reconstruction - original, inside the brain (0 outside)
    abs_error: np.ndarray


def reconstruct(model: keras.Model, inputs: np.ndarray, batch: int = 4) -> np.ndarray:
    """Forward passes for ``(N, X, Y, Z)`` inputs, ``batch`` at a time."""
    inputs = np.asarray(inputs, dtype=np.float32)
    out = [np.asarray(model.predict_on_batch(inputs[i:i + batch, ..., None]))[..., 0]
           for i in range(0, len(inputs), batch)]
    return np.concatenate(out, axis=0)


def _check_qc_image(image) -> QCImage:
    if not isinstance(image, QCImage):
        raise TypeError(f"the QC path takes a QCImage (FLAIR and brain only), not "
                        f"{type(image).__name__}: error maps must never see a ground-truth "
                        f"lesion mask")
    return image


def error_maps_from(reconstruction: np.ndarray, image: QCImage) -> ErrorMaps:
    """Signed and absolute error of a reconstruction against the original, inside the brain."""
    image = _check_qc_image(image)
    rec = np.where(image.brain, reconstruction, 0.0).astype(np.float32)
    error = np.where(image.brain, rec - image.flair, 0.0).astype(np.float32)
    return ErrorMaps(rec, error, np.abs(error))


def error_maps(model: keras.Model, image: QCImage, masks: np.ndarray, batch: int = 4
               ) -> ErrorMaps | list[ErrorMaps]:
    """Error maps of one case with a predicted mask ``(X, Y, Z)`` zeroed, or one per mask for
    a stack ``(K, X, Y, Z)`` (run in batches). Takes a :class:`QCImage` only."""
    image = _check_qc_image(image)
    masks = np.asarray(masks)
    single = masks.ndim == 3
    stack = masks[None] if single else masks
    recs = reconstruct(model, np.stack([zero_region(image.flair, m) for m in stack]), batch)
    out = [error_maps_from(r, image) for r in recs]
    return out[0] if single else out


def error_scores(maps: ErrorMaps, image: QCImage, prediction: np.ndarray,
                 section: Mapping | None = None) -> dict:
    """QC scores of one case (no ground truth needed):

    * ``error_vs``: voxel-wise sum of the signed error (the paper's error VS);
    * ``error_vs_abs``: sum of the absolute error;
    * ``mean_abs_error_lesion``: mean absolute error inside the predicted lesion, i.e. how far
      the inpainted region is from what was there. An empty prediction zeroes nothing, so there
      is no inpainting error: 0 by convention (such cases show as ``pred_lesion_ml == 0``);
    * ``rec_ssim``, ``rec_mae``: reconstruction quality (SSIM of the whole volume, mean
      absolute error inside the brain) with the predicted mask zeroed.
    """
    pred = np.asarray(prediction) > 0
    brain = image.brain
    return {
        "error_vs": float(maps.error.sum(dtype=np.float64)),
        "error_vs_abs": float(maps.abs_error.sum(dtype=np.float64)),
        "mean_abs_error_lesion": float(maps.abs_error[pred].mean()) if pred.any() else 0.0,
        "rec_ssim": volume_ssim(maps.reconstruction, image.flair, section),
        "rec_mae": float(maps.abs_error[brain].mean()) if brain.any() else 0.0,
    }


def error_by_region(error: np.ndarray, prediction: np.ndarray, brain: np.ndarray
                    ) -> dict[str, float]:
    """Mean signed error inside the predicted (zeroed) region and in the rest of the brain, and
    their voxel counts: the sign inside says whether the network fills a hole brighter or
    darker than what was there (NaN where a region is empty)."""
    brain = np.asarray(brain) > 0
    pred = (np.asarray(prediction) > 0) & brain
    rest = brain & ~pred
    err = np.asarray(error, dtype=np.float64)
    return {"mean_error_predicted": float(err[pred].mean()) if pred.any() else math.nan,
            "mean_error_rest_of_brain": float(err[rest].mean()) if rest.any() else math.nan,
            "n_predicted": int(pred.sum()), "n_rest_of_brain": int(rest.sum())}


def save_error_maps(maps: ErrorMaps, path: Path) -> None:
    """Per-case maps as float16, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, reconstruction=maps.reconstruction.astype(np.float16),
                        error=maps.error.astype(np.float16),
                        abs_error=maps.abs_error.astype(np.float16))
    tmp.replace(path)


def load_error_maps(path: str | Path) -> dict[str, np.ndarray]:
    """Maps saved by :func:`save_error_maps`, as float32."""
    with np.load(path) as z:
        return {k: z[k].astype(np.float32) for k in z.files}


def array_digest(*arrays: np.ndarray) -> str:
    """Short digest of array contents, to tell when an input changed."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def model_tag(folder: str | Path) -> str:
    """Identifies a finished training run (its key and best epoch), for cached outputs."""
    state = json.loads((Path(folder) / "state.json").read_text())
    return hashlib.sha256(f"{state['key']}|{state.get('best_epoch')}".encode()).hexdigest()[:16]


def run_error_maps(model: keras.Model, images: Sequence[QCImage],
                   predictions: Mapping[str, np.ndarray], splits: Mapping[str, str],
                   out_dir: str | Path, fold: int, section: Mapping, tag: str = "",
                   progress: bool = True) -> pd.DataFrame:
    """Error maps and scores of every case, with the case's *predicted* mask zeroed.

    Writes ``maps/<id>.npz`` and returns the per-case table (also ``rec_cases.csv``). A case
    whose maps exist for the same model ``tag`` and prediction is read back, not recomputed.
    """
    out_dir = Path(out_dir)
    batch = int(section.get("infer_batch", 4))

    def prediction(image: QCImage) -> np.ndarray:
        return np.asarray(predictions[image.subject_id]) > 0

    def stamp(image: QCImage) -> dict:
        return {"model_tag": tag, "prediction_digest": array_digest(prediction(image))}

    def compute(image: QCImage, map_path: Path) -> dict:
        start = time.perf_counter()
        pred = prediction(image)
        maps = error_maps(model, image, pred, batch)
        row = {"fold": fold, "subject_id": image.subject_id, "split": splits[image.subject_id],
               **error_scores(maps, image, pred, section),
               "rec_seconds": round(time.perf_counter() - start, 3)}
        save_error_maps(maps, map_path)
        return row

    checked = [_check_qc_image(image) for image in images]
    rows = cached_case_rows(checked, out_dir, lambda i: i.subject_id, compute, stamp=stamp,
                            desc=f"error maps fold {fold}", progress=progress)
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "rec_cases.csv", index=False)
    return table


# ---------------------------------------------------------------------------------------------
# Training


def validation_quality(model: keras.Model, images: Sequence[QCImage],
                       predictions: Mapping[str, np.ndarray], section: Mapping
                       ) -> dict[str, float]:
    """Mean SSIM and mean absolute error (inside the brain) of whole-volume reconstructions,
    each case's predicted mask zeroed (the QC path)."""
    if not images:
        return {"ssim": float("nan"), "mae": float("nan")}
    batch = int(section.get("infer_batch", 4))
    inputs = np.stack([zero_region(im.flair, predictions[im.subject_id]) for im in images])
    maps = [error_maps_from(rec, im) for rec, im in
            zip(reconstruct(model, inputs, batch), images, strict=True)]
    ssims = ssim(np.stack([m.reconstruction for m in maps])[..., None],
                 np.stack([im.flair for im in images])[..., None], **_ssim_settings(section))
    maes = [float(m.abs_error[im.brain].mean()) for m, im in zip(maps, images, strict=True)]
    return {"ssim": float(np.mean(np.asarray(ssims))), "mae": float(np.mean(maes))}


def fit_rec_unet(build, train_cases: Sequence[PreprocessedCase], val_images: Sequence[QCImage],
                 val_predictions: Mapping[str, np.ndarray], folder: str | Path,
                 section: dict, seed: int, progress: bool = True) -> TrainResult:
    """Train (or resume, or reuse) the reconstruction U-net.

    Training patches zero the ground-truth lesions of ``train_cases`` (the fold's training
    split); each epoch ends with the whole-volume SSIM of the validation cases with their
    *predicted* masks zeroed, the checkpoint with the best one is kept (``val_ssim``), and
    training stops early when it stops improving.
    """
    from ..nets.training import Augmentation

    train = [training_case(c) for c in train_cases]
    settings = _ssim_settings(section)
    key = {"section": section, "seed": seed, "train": [c.subject_id for c in train_cases],
           "val": [im.subject_id for im in val_images],
           "val_predictions": array_digest(*(np.asarray(val_predictions[im.subject_id]) > 0
                                             for im in val_images))}

    def make_dataset(start_epoch: int) -> RecPatchDataset:
        return RecPatchDataset(train, section["patch"], int(section["batch_size"]),
                               int(section["steps_per_epoch"]), seed,
                               float(section.get("lesion_patch_fraction", 0.67)),
                               Augmentation.from_section(section.get("augmentation")),
                               start_epoch=start_epoch)

    return fit_model(build, folder, section, seed, key=key, make_dataset=make_dataset,
                     loss=make_ssim_loss(**settings),
                     score=lambda model: validation_quality(model, val_images, val_predictions,
                                                            section)["ssim"],
                     score_name="val_ssim", mode="max", progress=progress)
