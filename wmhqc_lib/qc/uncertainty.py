"""Monte Carlo inference, voxel-wise uncertainty maps and per-case QC scores.

N stochastic passes per case run as batched calls (samples stacked in the batch), never as N
separate ``predict`` calls (``make bench`` prints the ratio). The layers in front of the first
dropout see the same input in every sample, so the sampling graph runs them once per case and
repeats their output (:func:`mc_sampler`).

Per case:

* mean foreground probability of the N samples, and the prediction ``mean > 0.5``;
* entropy in bits of the mean (the paper's map): ``-[p log2 p + (1-p) log2 (1-p)]``;
* mutual information (entropy of the mean minus mean entropy of the samples: the part of the
  uncertainty that comes from the model, not the data) and the variance of the samples;
* scores: entropy voxel-wise sum (the paper's VS, Eq. 1, per case, never rescaled across
  cases), mean entropy in and around the predicted lesion, and the mean pairwise Dice between
  the N binary sample masks (the best QC score in today's failure-detection benchmark);
  :func:`qc_scores` reads the MC outputs only, never an annotation;
* true quality (:func:`true_quality`): lesion Dice on the subject's native FLAIR grid, where the
  annotation lives, and on the profile grid for comparison.
"""

from __future__ import annotations

import json
import shutil
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pandas as pd
from keras import layers, ops
from scipy import ndimage as ndi

from ..data.preprocess import NativeReference, PreprocessedCase, map_to_native, native_dice
from ..nets.models import MCDropout, retrace
from .case_cache import cached_case_rows
from .metrics import dice, pairwise_dice

ENTROPY_EPS = 1e-7  # as in the authors' code
SCORES_VERSION = 3  # bumped when a column changes meaning (3: MC samples seeded per case)


class RepeatSamples(layers.Layer):
    """Repeats a one-case batch ``n`` times along the batch axis."""

    def __init__(self, n: int, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def call(self, x):
        return ops.repeat(x, self.n, axis=0)


def mc_sampler(model: keras.Model, n: int) -> keras.Model:
    """``model`` rewired to draw ``n`` Monte Carlo samples of one case in one call.

    The sampler takes a batch of one case and returns ``n`` samples. It shares the model's
    layers and weights. Everything upstream of the first :class:`MCDropout` is deterministic,
    so it runs once and its output is repeated ``n`` times, at the first dropout or wherever
    a deterministic tensor meets a stochastic one. Samples are the same as those of the model
    on ``n`` stacked copies with the same random state (a test checks this).
    """
    sampled: set[int] = set()  # ids of graph tensors that carry n samples
    repeated: dict[int, object] = {}

    def as_samples(t):
        if not isinstance(t, keras.KerasTensor) or id(t) in sampled:
            return t
        if id(t) not in repeated:
            repeated[id(t)] = RepeatSamples(n)(t)
            sampled.add(id(repeated[id(t)]))
        return repeated[id(t)]

    def call_function(layer, *args, **kwargs):
        inputs = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
        if not (isinstance(layer, MCDropout) or any(id(t) in sampled for t in inputs)):
            return layer(*args, **kwargs)
        args, kwargs = keras.tree.map_structure(as_samples, (args, kwargs))
        out = layer(*args, **kwargs)
        sampled.update(id(t) for t in keras.tree.flatten(out))
        return out

    clone = retrace(model, call_function)
    outputs = keras.tree.map_structure(as_samples, clone.outputs)  # a model without dropout
    return keras.Model(clone.inputs, outputs, name=f"{model.name}_sampler{n}")


_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sampler(model: keras.Model, n: int) -> keras.Model:
    """One sampler per model and sample count, kept while the model lives (tracing is slow)."""
    per_model = _SAMPLERS.setdefault(model, {})
    if n not in per_model:
        per_model[n] = mc_sampler(model, n)
    return per_model[n]


def sample_chunks(n_samples: int, batch: int) -> list[int]:
    """Samples per call when ``n_samples`` are drawn at most ``batch`` at a time."""
    return [min(batch, n_samples - start) for start in range(0, n_samples, batch)]


def mc_samples(model: keras.Model, image: np.ndarray, n_samples: int, batch: int
               ) -> np.ndarray:
    """N stochastic foreground-probability maps for one case, ``(N, X, Y, Z)``.

    ``image`` is ``(C, X, Y, Z)`` (the preprocessed layout). The samples are drawn ``batch``
    at a time by :func:`mc_sampler`; dropout draws an independent mask per sample.
    """
    x = np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1)[None]
    out = [np.asarray(_sampler(model, k).predict_on_batch(x))[..., 0]
           for k in sample_chunks(n_samples, batch)]
    return np.concatenate(out, axis=0)


def mc_samples_naive(model: keras.Model, image: np.ndarray, n_samples: int) -> np.ndarray:
    """The slow way, one ``predict`` call per sample: kept only for the benchmark."""
    x = np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1)[None]
    return np.stack([model.predict(x, verbose=0)[0, ..., 0] for _ in range(n_samples)])


def case_seed(*parts: object) -> int:
    """A 32-bit seed from a case's identity (model, fold, subject...): the same case always
    gets the same MC samples, whatever was sampled before it and in whatever process."""
    import zlib

    return zlib.crc32("|".join(str(p) for p in parts).encode())


def reseed(model: keras.Model, seed: int) -> None:
    """Set every MC dropout layer of ``model`` to a random state given by ``seed``, so the
    samples of a case do not depend on which cases were sampled before it (triage)."""
    def walk(layer) -> list:
        return [layer] + [x for child in getattr(layer, "layers", []) for x in walk(child)]

    layers_ = [layer for layer in walk(model)[1:] if isinstance(layer, MCDropout)]
    for k, layer in enumerate(layers_):
        state = layer.seed_generator.state
        state.assign(np.array([seed % 2**32, k], dtype=state.dtype))


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli probability map (1 at p = 0.5, 0 at p in {0, 1})."""
    p = np.clip(np.asarray(p, dtype=np.float64), ENTROPY_EPS, 1.0 - ENTROPY_EPS)
    return (-(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))).astype(np.float32)


@dataclass
class UncertaintyMaps:
    """Voxel-wise outputs of MC inference for one case on the profile grid."""

    mean: np.ndarray
    prediction: np.ndarray  # uint8
    entropy: np.ndarray
    mutual_information: np.ndarray
    variance: np.ndarray
    sample_masks: np.ndarray  # (N, X, Y, Z) bool, for pairwise Dice


def uncertainty_maps(samples: np.ndarray) -> UncertaintyMaps:
    """Mean, prediction (mean > 0.5), entropy of the mean, mutual information, variance."""
    samples = np.asarray(samples, dtype=np.float32)
    mean = samples.mean(axis=0)
    entropy = binary_entropy(mean)
    expected = np.mean([binary_entropy(s) for s in samples], axis=0)
    mi = np.clip(entropy - expected, 0.0, None).astype(np.float32)
    return UncertaintyMaps(mean=mean, prediction=(mean > 0.5).astype(np.uint8),
                           entropy=entropy, mutual_information=mi,
                           variance=samples.var(axis=0).astype(np.float32),
                           sample_masks=samples > 0.5)


def mean_entropy_near_lesion(maps: UncertaintyMaps) -> float:
    """Mean entropy over the predicted lesion and a one-voxel rim around it.

    Where the mean prediction is empty, the region is every voxel any sample marked; where no
    sample marked anything, the network is certain there is no lesion and the score is 0.
    """
    region = maps.prediction > 0
    if not region.any():
        region = maps.sample_masks.any(axis=0)
    if not region.any():
        return 0.0
    region = ndi.binary_dilation(region)
    return float(maps.entropy[region].mean())


#: The columns of :func:`case_scores` that QC may use: computed from the model's outputs alone.
QC_COLUMNS = ("pred_lesion_ml", "uncertainty_vs", "mean_entropy_lesion", "pairwise_dice",
              "mutual_information_vs")


def qc_scores(maps: UncertaintyMaps, voxel_ml: float) -> dict:
    """The QC scores of one case, from the MC outputs alone: no annotation is an argument, so
    none can leak in (MICCAI label 2, say, is exactly where samples disagree)."""
    return {
        "pred_lesion_ml": float((maps.prediction > 0).sum()) * voxel_ml,
        "uncertainty_vs": float(maps.entropy.sum(dtype=np.float64)),
        "mean_entropy_lesion": mean_entropy_near_lesion(maps),
        "pairwise_dice": pairwise_dice(maps.sample_masks),
        "mutual_information_vs": float(maps.mutual_information.sum(dtype=np.float64)),
    }


def true_quality(maps: UncertaintyMaps, case: PreprocessedCase, reference: NativeReference
                 ) -> dict:
    """How good the prediction really is (needs the annotation; never an input to QC).

    ``true_dice`` and ``true_dice_paper`` are measured on the subject's native FLAIR grid (the
    MC mean mapped back and cut at 0.5); ``true_dice_grid`` on the profile grid against the
    partial-volume reference, to show what the coarse grid costs.
    """
    return {
        "true_dice": native_dice(maps.mean, case, reference),
        "true_dice_paper": native_dice(maps.mean, case, reference, two_class=True),
        "true_dice_grid": dice(maps.prediction, case.lesion, case.ignore),
        "true_lesion_ml": float(case.meta["lesion_ml"]),
        "reference_empty": reference.empty,
    }


def case_scores(maps: UncertaintyMaps, case: PreprocessedCase, reference: NativeReference,
                voxel_ml: float) -> dict:
    """True quality and QC scores of one case (true quality needs the annotation, the scores
    do not)."""
    return true_quality(maps, case, reference) | qc_scores(maps, voxel_ml)


def save_maps(maps: UncertaintyMaps, path: Path) -> None:
    """Per-case maps (float16 to keep a fold's folder small), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, mean=maps.mean.astype(np.float16), prediction=maps.prediction,
                        entropy=maps.entropy.astype(np.float16),
                        mutual_information=maps.mutual_information.astype(np.float16),
                        variance=maps.variance.astype(np.float16))
    tmp.replace(path)


def load_maps(path: str | Path) -> dict[str, np.ndarray]:
    """Maps saved by :func:`save_maps`, as float32 arrays (prediction as uint8)."""
    with np.load(path) as z:
        return {k: (z[k] if k == "prediction" else z[k].astype(np.float32)) for k in z.files}


def save_native(maps: UncertaintyMaps, case: PreprocessedCase, folder: Path) -> dict[str, str]:
    """Prediction and entropy on the subject's native FLAIR grid, as NIfTI."""
    folder.mkdir(parents=True, exist_ok=True)
    pred = map_to_native(maps.mean, case)
    pred_bin = nib.Nifti1Image((np.asarray(pred.dataobj) > 0.5).astype(np.uint8), pred.affine)
    ent = map_to_native(maps.entropy, case)
    paths = {"native_prediction": folder / f"{case.subject_id}_prediction.nii.gz",
             "native_entropy": folder / f"{case.subject_id}_entropy.nii.gz"}
    nib.save(pred_bin, paths["native_prediction"])
    nib.save(nib.Nifti1Image(np.asarray(ent.dataobj, dtype=np.float32), ent.affine),
             paths["native_entropy"])
    return {k: str(v) for k, v in paths.items()}


def run_mc_inference(model: keras.Model, cases: Sequence[PreprocessedCase],
                     splits: dict[str, str], out_dir: str | Path, n_samples: int, batch: int,
                     voxel_ml: float, fold: int,
                     reference: Callable[[str], NativeReference],
                     native_for: Sequence[str] = (), progress: bool = True,
                     model_key: str = "") -> pd.DataFrame:
    """MC inference on every case of a fold; writes ``maps/<id>.npz``, native NIfTI for the
    subjects in ``native_for`` and returns the per-case table (also ``mc_cases.csv``).
    ``reference(subject_id)`` gives the native reference masks for true Dice.

    Cases whose maps already exist for the same ``model_key`` (which model, how many samples)
    are read back instead of recomputed, so an interrupted run continues where it stopped; a
    different key (a retrained model) discards them all.
    """
    out_dir = Path(out_dir)
    key = json.dumps({"model": model_key, "n_samples": n_samples, "scores": SCORES_VERSION})
    key_path = out_dir / "inference.json"
    if not key_path.exists() or key_path.read_text() != key:
        for folder in ("maps", "rows", "native"):
            shutil.rmtree(out_dir / folder, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        key_path.write_text(key)

    def compute(case: PreprocessedCase, map_path: Path) -> dict:
        start = time.perf_counter()
        reseed(model, case_seed("mc", model_key, fold, case.subject_id))
        maps = uncertainty_maps(mc_samples(model, case.image, n_samples, batch))
        row = {"fold": fold, "subject_id": case.subject_id, "split": splits[case.subject_id],
               **case_scores(maps, case, reference(case.subject_id), voxel_ml)}
        if case.subject_id in native_for:
            row.update(save_native(maps, case, out_dir / "native"))
        row["mc_seconds"] = round(time.perf_counter() - start, 3)
        save_maps(maps, map_path)
        return row

    rows = cached_case_rows(cases, out_dir, lambda c: c.subject_id, compute,
                            desc=f"MC inference fold {fold}", progress=progress)
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "mc_cases.csv", index=False)
    return table
