"""Training the segmentation networks: input pipeline, losses, fit with resume, determinism.

A plain U-net with per-sample soft Dice on whole volumes learned nothing on these CPUs (every
prediction empty after 33 minutes); lesion-centred patches with batch soft Dice plus binary
cross-entropy learned in 5 minutes (REFERENCE.md section 5). That is the default here:
training on seeded, augmented patches; validation, and every Dice reported, on whole volumes.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from keras import ops
from scipy import ndimage as ndi

from ..data.preprocess import PreprocessedCase
from ..data.synth import random_rotation
from ..overlap import dice
from .models import ChannelPReLU, InstanceNormalization, MCDropout, without_dropout

EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Determinism


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy and the backend; make TensorFlow ops deterministic when it is the
    backend (same seed, same weights)."""
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # training setup only; model code stays backend-agnostic

        try:
            tf.config.experimental.enable_op_determinism()
        except (AttributeError, RuntimeError):  # pragma: no cover - older TF or already set
            pass


# ---------------------------------------------------------------------------------------------
# Losses. y_true carries two channels: lesion (0/1) and ignore (0/1); ignored voxels count in
# neither term, so MICCAI label 2 neither helps nor hurts.


def _split_target(y_true, y_pred):
    lesion = ops.cast(y_true[..., 0:1], y_pred.dtype)
    weight = 1.0 - ops.cast(y_true[..., 1:2], y_pred.dtype)
    return lesion, weight


def soft_dice_loss(y_true, y_pred):
    """1 - soft Dice of the lesion class over the whole batch (batch Dice: stable on patches
    that hold little or no lesion)."""
    lesion, weight = _split_target(y_true, y_pred)
    p = y_pred * weight
    inter = ops.sum(p * lesion)
    denom = ops.sum(p) + ops.sum(lesion * weight)
    return 1.0 - (2.0 * inter + EPS) / (denom + EPS)


def two_class_dice_loss(y_true, y_pred):
    """1 - mean of background and lesion soft Dice (the paper's loss), for comparison."""
    lesion, weight = _split_target(y_true, y_pred)
    fg = (2.0 * ops.sum(y_pred * lesion * weight) + EPS) / \
        (ops.sum(y_pred * weight) + ops.sum(lesion * weight) + EPS)
    bg_p, bg_t = (1.0 - y_pred) * weight, (1.0 - lesion) * weight
    bg = (2.0 * ops.sum(bg_p * bg_t) + EPS) / (ops.sum(bg_p) + ops.sum(bg_t) + EPS)
    return 1.0 - (fg + bg) / 2.0


def weighted_bce(y_true, y_pred):
    """Binary cross-entropy averaged over non-ignored voxels."""
    lesion, weight = _split_target(y_true, y_pred)
    p = ops.clip(y_pred, EPS, 1.0 - EPS)
    bce = -(lesion * ops.log(p) + (1.0 - lesion) * ops.log(1.0 - p))
    return ops.sum(bce * weight) / (ops.sum(weight) + EPS)


def make_loss(name: str, bce_weight: float = 1.0) -> Callable:
    """``dice_bce`` (default), ``dice``, or ``paper_two_class_dice``."""
    if name == "dice":
        return soft_dice_loss
    if name == "paper_two_class_dice":
        return two_class_dice_loss
    if name == "dice_bce":
        def dice_bce(y_true, y_pred):
            return soft_dice_loss(y_true, y_pred) + bce_weight * weighted_bce(y_true, y_pred)
        return dice_bce
    raise ValueError(f"unknown loss {name!r}: use dice_bce, dice or paper_two_class_dice")


# ---------------------------------------------------------------------------------------------
# Input pipeline


@dataclass(frozen=True)
class Augmentation:
    """On-the-fly augmentation ranges (all seeded per batch)."""

    flip: bool = True
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise: float = 0.05

    @classmethod
    def from_section(cls, section: dict | None) -> Augmentation:
        return cls(**(section or {}))


def _rotation_matrix(rng: np.random.Generator, max_deg: float, scale: float) -> np.ndarray:
    return random_rotation(rng, max_deg) * rng.uniform(1 - scale, 1 + scale)


def sample_patch(case: PreprocessedCase, patch: Sequence[int], rng: np.random.Generator,
                 lesion_fraction: float, aug: Augmentation | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One training patch: centred on a lesion voxel with probability ``lesion_fraction``,
    else on a random brain voxel; augmented by a small affine, a left-right flip, intensity
    scale and shift, and Gaussian noise. Returns image ``(*patch, C)`` and target
    ``(*patch, 2)`` (lesion, ignore), both fractions in [0, 1] (soft Dice and BCE take
    partial-volume targets as they are)."""
    patch = np.asarray(patch)
    lesion = np.asarray(case.lesion, dtype=np.float64).ravel()
    lesion_idx = np.flatnonzero(lesion > 0)
    if len(lesion_idx) and rng.random() < lesion_fraction:
        # a lesion voxel, in proportion to how much of it is lesion (partial volume)
        weights = np.cumsum(lesion[lesion_idx])
        pick = lesion_idx[min(int(np.searchsorted(weights, rng.random() * weights[-1])),
                              len(lesion_idx) - 1)]
        centre = np.asarray(np.unravel_index(pick, case.lesion.shape), dtype=float)
    else:
        pool = np.argwhere(case.brain > 0)
        centre = pool[rng.integers(len(pool))].astype(float)
    stack = np.concatenate([case.image, case.lesion[None].astype(np.float32),
                            case.ignore[None].astype(np.float32)])
    if aug is not None and (aug.rotate_deg > 0 or aug.scale > 0):
        matrix = _rotation_matrix(rng, aug.rotate_deg, aug.scale)
    else:
        matrix = np.eye(3)
    offset = centre - matrix @ ((patch - 1) / 2.0)
    out = np.stack([ndi.affine_transform(ch, matrix, offset=offset, output_shape=tuple(patch),
                                         order=1, mode="constant", cval=0.0)
                    for ch in stack])
    image, target = out[:-2], np.clip(out[-2:], 0.0, 1.0)  # partial volume stays a fraction
    if aug is not None:
        if aug.flip and rng.random() < 0.5:
            image, target = image[:, ::-1], target[:, ::-1]
        image = image * rng.uniform(1 - aug.intensity_scale, 1 + aug.intensity_scale,
                                    size=(len(image), 1, 1, 1))
        image = image + rng.uniform(-aug.intensity_shift, aug.intensity_shift,
                                    size=(len(image), 1, 1, 1))
        if aug.noise > 0:
            image = image + rng.normal(0, rng.uniform(0, aug.noise), image.shape)
    return (np.moveaxis(image, 0, -1).astype(np.float32),
            np.moveaxis(target, 0, -1).astype(np.float32))


class PatchDataset(keras.utils.PyDataset):
    """Seeded batches of augmented patches; batch ``i`` of epoch ``e`` depends only on
    ``(seed, e, i)``, so a resumed run sees the same data as an uninterrupted one would."""

    def __init__(self, cases: Sequence[PreprocessedCase], patch: Sequence[int], batch_size: int,
                 steps: int, seed: int, lesion_fraction: float = 0.67,
                 augmentation: Augmentation | None = None, start_epoch: int = 0):
        super().__init__(workers=1, use_multiprocessing=False)
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.patch = tuple(patch)
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.lesion_fraction = lesion_fraction
        self.augmentation = augmentation
        self.epoch = start_epoch

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pairs = [sample_patch(self.cases[rng.integers(len(self.cases))], self.patch, rng,
                              self.lesion_fraction, self.augmentation)
                 for _ in range(self.batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def on_epoch_end(self) -> None:
        self.epoch += 1


# ---------------------------------------------------------------------------------------------
# Validation on whole volumes, best checkpoint, early stopping, history, resume


def predict_volume(model: keras.Model, case: PreprocessedCase) -> np.ndarray:
    """One forward pass on the whole preprocessed volume (dropout stays on in an MC model)."""
    x = np.moveaxis(case.image, 0, -1)[None].astype(np.float32)
    return np.asarray(model.predict_on_batch(x))[0, ..., 0]


_DETERMINISTIC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def deterministic(model: keras.Model) -> keras.Model:
    """The model with MC dropout skipped (shared weights), kept while the model lives; a
    model without :class:`MCDropout` is returned as it is."""
    if not any(isinstance(layer, MCDropout) for layer in model.layers):
        return model
    if model not in _DETERMINISTIC:
        _DETERMINISTIC[model] = without_dropout(model)
    return _DETERMINISTIC[model]


def predict_volumes(model: keras.Model, cases: Sequence[PreprocessedCase], batch: int = 4
                    ) -> list[np.ndarray]:
    """One forward pass per whole volume, ``batch`` volumes per call (cases of one grid share
    a shape). Measured on the ``cpu`` grid (one thread), four volumes per call took as long as
    one at a time: this saves no time there, it only keeps validation to a few calls."""
    out: list[np.ndarray] = []
    for start in range(0, len(cases), max(1, batch)):
        chunk = cases[start:start + max(1, batch)]
        x = np.stack([np.moveaxis(c.image, 0, -1) for c in chunk]).astype(np.float32)
        out.extend(np.asarray(model.predict_on_batch(x))[..., 0])
    return out


def validation_dice(model: keras.Model, cases: Sequence[PreprocessedCase], batch: int = 4
                    ) -> float:
    """Mean lesion Dice on whole validation volumes (profile grid, partial-volume reference).

    An MC model is scored with dropout off, the deterministic approximation of the MC mean
    that QC later uses, not with one stochastic pass whose noise would pick checkpoints by
    luck.
    """
    net = deterministic(model)
    cases = list(cases)
    scores = [dice(p > 0.5, c.lesion, c.ignore)
              for p, c in zip(predict_volumes(net, cases, batch), cases, strict=True)]
    return float(np.mean(scores)) if scores else float("nan")


@dataclass(frozen=True)
class LearningRateSchedule:
    """Learning rate lowered on a plateau of the validation score (``lr_patience`` epochs
    without a new best: multiply by ``lr_factor``, not below ``min_lr``).

    With early stopping at ``patience`` > ``lr_patience`` epochs, a network first gets a
    smaller step or two to settle, then stops by its own plateau rather than by the epoch
    cap. The current rate and the epoch of the last change live in the training state, so a
    resumed run continues the same schedule.
    """

    lr_patience: int
    lr_factor: float = 0.5
    min_lr: float = 1e-5

    @classmethod
    def from_section(cls, section: Mapping) -> LearningRateSchedule | None:
        """The schedule of a network section, or None when ``lr_patience`` is unset."""
        if not section.get("lr_patience"):
            return None
        return cls(int(section["lr_patience"]), float(section.get("lr_factor", 0.5)),
                   float(section.get("min_lr", 1e-5)))

    def after_epoch(self, state: dict, epoch: int, lr: float) -> float:
        """The rate for the next epoch, given the state after ``epoch`` epochs."""
        waited = epoch - max(int(state.get("best_epoch", 0)), int(state.get("lr_changed", 0)))
        if waited >= self.lr_patience and lr > self.min_lr:
            lr = max(lr * self.lr_factor, self.min_lr)
            state["lr_changed"] = epoch
        state["learning_rate"] = lr
        return lr


class WholeVolumeValidation(keras.callbacks.Callback):
    """Each epoch: validation Dice on whole volumes; keeps the best weights, stops early, saves
    the last state for resuming and the history as CSV."""

    def __init__(self, val_cases: Sequence[PreprocessedCase], folder: Path, patience: int,
                 dataset: PatchDataset, state: dict, progress: bool = True, *,
                 score: Callable[[keras.Model], float] | None = None,
                 score_name: str = "val_dice", mode: str = "max",
                 schedule: LearningRateSchedule | None = None,
                 epoch_end: Callable[[int], None] | None = None):
        super().__init__()
        self.schedule = schedule
        self.epoch_end = epoch_end
        self.val_cases = list(val_cases)
        self.folder = folder
        self.patience = patience
        self.dataset = dataset
        self.state = state
        self.progress = progress
        self.epoch_start = time.perf_counter()
        # another model's validation: ``score(model)``, kept as ``score_name``, best by ``mode``
        self.score = score or (lambda model: validation_dice(model, self.val_cases))
        self.score_name = score_name
        self.sign = 1.0 if mode == "max" else -1.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        val = float(self.score(self.model))
        seconds = time.perf_counter() - self.epoch_start
        row = {"epoch": epoch + 1, "loss": float(logs.get("loss", np.nan)),
               self.score_name: val, "seconds": round(seconds, 2)}
        self.state["history"].append(row)
        best = self.state.get(f"best_{self.score_name}", -self.sign * np.inf)
        improved = np.isfinite(val) and self.sign * val > self.sign * best
        self.state["epochs_run"] = epoch + 1
        row["learning_rate"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.model.save(self.folder / "last.keras")
        if improved:  # the same file: copied, not serialised twice
            self.state.update({f"best_{self.score_name}": val, "best_epoch": epoch + 1})
            shutil.copyfile(self.folder / "last.keras", self.folder / "best.keras")
        if self.schedule is not None:
            lr = self.schedule.after_epoch(self.state, epoch + 1, row["learning_rate"])
            self.model.optimizer.learning_rate.assign(lr)
        _write_state(self.folder, self.state)
        if self.epoch_end is not None:
            self.epoch_end(epoch + 1)
        pd.DataFrame(self.state["history"]).to_csv(self.folder / "history.csv", index=False)
        if self.progress:
            mark = " *" if improved else ""
            label = "val Dice" if self.score_name == "val_dice" else self.score_name
            log_progress(f"epoch {epoch + 1}: loss {row['loss']:.4f}  {label} {val:.3f}  "
                         f"lr {row['learning_rate']:.2g}  ({seconds:.1f} s){mark}")
        if epoch + 1 - self.state.get("best_epoch", 0) >= self.patience:
            self.model.stop_training = True
            self.state["stopped_early"] = True


def rate_changes(history: pd.DataFrame) -> list[tuple[int, float]]:
    """``(epoch, new rate)`` for each epoch that ran at a lower learning rate than the one
    before it (the plateau schedule's drops), read from a history with ``epoch`` and
    ``learning_rate`` columns; empty when the history has no rates."""
    if "learning_rate" not in history or len(history) < 2:
        return []
    lr = history["learning_rate"].to_numpy(dtype=float)
    return [(int(e), float(b)) for e, a, b in zip(history["epoch"].iloc[1:], lr[:-1], lr[1:],
                                                  strict=True) if b < a]


def stopping_summary(state: Mapping, section: Mapping) -> str:
    """How a training run ended, in words: by its own early stopping (with the epochs of its
    learning-rate changes) or at the epoch cap, the case the training chapters must flag,
    since a network stopped by the cap may not have reached its plateau."""
    history = pd.DataFrame(state.get("history", []))
    changes = [epoch for epoch, _ in rate_changes(history)]
    lr_text = (f"; learning rate lowered after epoch{'s' if len(changes) > 1 else ''} "
               + ", ".join(str(e - 1) for e in changes)) if changes else ""
    run, best = int(state.get("epochs_run", 0)), state.get("best_epoch")
    if state.get("stopped_early"):
        return (f"stopped by early stopping after epoch {run} ({int(section['patience'])} "
                f"epochs without a better validation score; best epoch {best}){lr_text}")
    if run >= int(section["epochs"]):
        return (f"reached the epoch cap ({run}) without {int(section['patience'])} epochs "
                f"of plateau (best epoch {best}): it may still have been improving{lr_text}")
    return f"interrupted after epoch {run} (best epoch {best}){lr_text}"


def log_progress(line: str) -> None:
    """A progress line for the run's log, not the page: the process's own stderr, which a
    notebook kernel started by the pipeline writes to the step log (``logs/<step>.log``),
    while the chapter shows one summary and the learning curve."""
    stream = sys.__stderr__ or sys.stderr
    print(line, file=stream, flush=True)


def _write_state(folder: Path, state: dict) -> None:
    tmp = folder / "state.tmp.json"
    tmp.write_text(json.dumps(state, indent=1, default=float))
    tmp.replace(folder / "state.json")


@dataclass
class TrainResult:
    model: keras.Model
    history: pd.DataFrame
    state: dict
    resumed: bool
    skipped: bool


def compile_for_training(model: keras.Model, section: Mapping, loss: Callable) -> None:
    """Compile with Adam at the network section's ``learning_rate`` and make its slot
    variables now.

    Made lazily, the slots are created inside the first traced training step, and TensorFlow
    traces a function that creates variables twice: 2.5 s more start-up per training run on
    this project's CPU. A section with ``run_eagerly: true`` skips tracing the training step
    altogether, which pays only for a handful of steps on tiny inputs (the smoke profile):
    there, tracing costs more than the steps it would speed up.
    """
    model.compile(optimizer=keras.optimizers.Adam(float(section["learning_rate"])), loss=loss,
                  run_eagerly=bool(section.get("run_eagerly", False)))
    model.optimizer.build(model.trainable_variables)


def fit_segmenter(build: Callable[[], keras.Model], train_cases: Sequence[PreprocessedCase],
                  val_cases: Sequence[PreprocessedCase], folder: str | Path, section: dict,
                  seed: int, progress: bool = True,
                  score: Callable[[keras.Model], float] | None = None,
                  epoch_end: Callable[[int], None] | None = None) -> TrainResult:
    """Train (or resume, or skip when finished) a segmentation model in ``folder``.

    ``section`` is the profile's model section (patch, batch_size, steps_per_epoch, epochs,
    patience, learning_rate, loss, bce_weight, lesion_patch_fraction, augmentation). The folder
    holds ``best.keras`` (best validation Dice), ``last.keras`` (for resuming), ``history.csv``
    and ``state.json``; a finished run with the same settings and seed is not redone.
    ``score(model)`` replaces the validation Dice (default :func:`validation_dice`).
    """
    key = {"section": section, "seed": seed, "train": [c.subject_id for c in train_cases],
           "val": [c.subject_id for c in val_cases]}

    def make_dataset(start_epoch: int) -> PatchDataset:
        return PatchDataset(train_cases, section["patch"], int(section["batch_size"]),
                            int(section["steps_per_epoch"]), seed,
                            float(section.get("lesion_patch_fraction", 0.67)),
                            Augmentation.from_section(section.get("augmentation")),
                            start_epoch=start_epoch)

    loss = make_loss(section.get("loss", "dice_bce"), float(section.get("bce_weight", 1.0)))
    return fit_model(build, folder, section, seed, key=key, make_dataset=make_dataset,
                     loss=loss, val_cases=val_cases, score=score, progress=progress,
                     epoch_end=epoch_end)


def fit_model(build: Callable[[], keras.Model], folder: str | Path, section: dict, seed: int,
              *, key: dict, make_dataset: Callable[[int], keras.utils.PyDataset],
              loss: Callable, val_cases: Sequence = (),
              score: Callable[[keras.Model], float] | None = None,
              score_name: str = "val_dice", mode: str = "max",
              progress: bool = True,
              epoch_end: Callable[[int], None] | None = None) -> TrainResult:
    """The training loop behind :func:`fit_segmenter`, for any model of the study.

    ``key`` (JSON-able) says what the run depends on: a finished run with the same key is
    reused, an interrupted one resumes. ``make_dataset(start_epoch)`` gives the training
    batches; ``score(model)`` the validation score each epoch (default: whole-volume Dice of
    ``val_cases``), recorded as ``score_name``; the best checkpoint is its ``mode`` (max/min).
    ``section`` supplies epochs, patience, learning_rate and run_eagerly, and optionally
    ``lr_patience``, ``lr_factor`` and ``min_lr`` (:class:`LearningRateSchedule`).
    ``epoch_end(epoch)`` is called after each epoch's checkpoints are written (the regime
    sweep keeps the best checkpoint as it stood at each epoch budget).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = json.dumps(key, sort_keys=True, default=str)
    state_path = folder / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("key") != key:
        state = {"key": key, "history": [], "epochs_run": 0, "done": False}
    custom = {"MCDropout": MCDropout, "InstanceNormalization": InstanceNormalization,
              "ChannelPReLU": ChannelPReLU}
    if state.get("done") and (folder / "best.keras").exists():
        model = keras.models.load_model(folder / "best.keras", custom_objects=custom,
                                        compile=False)
        return TrainResult(model, pd.DataFrame(state["history"]), state, False, True)

    set_determinism(seed)
    resumed = state["epochs_run"] > 0 and (folder / "last.keras").exists()
    if resumed:
        model = keras.models.load_model(folder / "last.keras", custom_objects=custom,
                                        compile=False)
        set_determinism(seed + state["epochs_run"])
    else:
        model = build()
    # on resume the weights come back; Adam's moment estimates start afresh
    compile_for_training(model, section, loss)
    if resumed and "learning_rate" in state:  # the schedule's rate when the run stopped
        model.optimizer.learning_rate.assign(float(state["learning_rate"]))
    dataset = make_dataset(state["epochs_run"])
    callback = WholeVolumeValidation(val_cases, folder, int(section["patience"]), dataset, state,
                                     progress, score=score, score_name=score_name, mode=mode,
                                     schedule=LearningRateSchedule.from_section(section),
                                     epoch_end=epoch_end)
    if not state.get("stopped_early") and state["epochs_run"] < int(section["epochs"]):
        model.fit(dataset, epochs=int(section["epochs"]), initial_epoch=state["epochs_run"],
                  callbacks=[callback], verbose=0)
    state["done"] = True
    _write_state(folder, state)
    best = keras.models.load_model(folder / "best.keras", custom_objects=custom, compile=False)
    return TrainResult(best, pd.DataFrame(state["history"]), state, resumed, False)
