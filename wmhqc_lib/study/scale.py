"""What a profile costs at its own sizes, measured on this machine before a long run starts.

``wmhqc check-scale --profile P`` checks that the profile's sizes can work (grid and patches
divisible by the U-nets' strides, patches inside the grid, enough room for the Dice
regressor's pools, a Monte Carlo chunk that fits in memory), then builds every network at the
profile's sizes and times one call of each kind the study makes: a training step at the
profile's patch and batch, a whole-volume validation pass, the Monte Carlo inference of one
full-size case with the profile's sample count and chunking, one reconstruction, one Dice
regressor step. Inputs are random arrays of the right shapes: speed and memory do not depend on
the content. Every timed call runs once untimed first, so tracing and compilation are reported
apart from the steady-state time that the projection uses.

The projection multiplies those times by the profile's epochs, steps and case counts (the
synthetic cohort's size unless ``cases`` is given). It is an upper bound for training (no early
stop) and leaves out the data step and the book.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..config import Profile


class ScaleError(ValueError):
    """A profile size that cannot work; the message names the setting and the fix."""


@dataclass
class Stage:
    """One timed call: its first run (tracing or compilation included) and the steady one."""

    name: str
    first_s: float
    seconds: float
    gflop: float  # forward convolutions of the call (a training step also runs ~2x backward)
    host_peak_mb: float
    device_peak_mb: float | None = None
    detail: str = ""


@dataclass
class ScaleReport:
    profile: str
    backend: str
    device: str
    cases: dict[str, int]
    stages: list[Stage] = field(default_factory=list)
    projection: dict[str, float] = field(default_factory=dict)  # seconds per fold, by step
    work: dict[str, float] = field(default_factory=dict)  # GFLOP per fold, by step
    folds: int = 5

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def fold_tflop(self) -> float:
        """Convolution work of one fold in TFLOP (training steps counted as 3x their forward
        pass), for a device-independent projection: ``fold_tflop / rate``."""
        return float(sum(self.work.values())) / 1e3

    @property
    def fold_seconds(self) -> float:
        return float(sum(self.projection.values()))

    @property
    def study_seconds(self) -> float:
        return self.fold_seconds * self.folds

    def table(self) -> str:
        """Markdown: one row per measured stage, then the projection."""
        device_mem = any(s.device_peak_mb is not None for s in self.stages)
        head = ["stage", "first call (s)", "steady (s)", "GFLOP per call", "GFLOP/s",
                "peak host memory (MB)"] + (["peak device memory (MB)"] if device_mem else [])
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.stages:
            rate = f"{s.gflop / s.seconds:.3g}" if s.gflop and s.seconds > 0 else "-"
            cells = [f"{s.name}{f' ({s.detail})' if s.detail else ''}", f"{s.first_s:.2f}",
                     f"{s.seconds:.3g}", f"{s.gflop:.3g}" if s.gflop else "-", rate,
                     f"{s.host_peak_mb:.0f}"]
            if device_mem:
                cells.append("-" if s.device_peak_mb is None else f"{s.device_peak_mb:.0f}")
            rows.append("| " + " | ".join(cells) + " |")
        lines = [f"Profile `{self.profile}`, Keras backend `{self.backend}`, device: "
                 f"{self.device}.", "", *rows, "",
                 f"Projection from the steady times above (cases: {self.cases['all']} per "
                 f"fold, {self.cases['train']} training, {self.cases['val']} validation, "
                 f"{self.cases['test']} test; training at its full epoch count, no early "
                 "stop; data step and book not included):", "",
                 "| step | projected time per fold |", "|---|---|"]
        lines += [f"| {k} | {_hms(v)} |" for k, v in self.projection.items()]
        lines += [f"| **one fold** | **{_hms(self.fold_seconds)}** |",
                  f"| **whole study ({self.folds} folds)** | **{_hms(self.study_seconds)}** |"]
        if device_mem and self.backend == "jax":
            lines += ["", "(JAX cannot reset its peak: each device figure is the peak so far.)"]
        lines += ["", f"Convolution work: {self.fold_tflop:.1f} TFLOP per fold, "
                  f"{self.fold_tflop * self.folds:.1f} TFLOP for the study (training steps "
                  "counted as three forward passes)."]
        return "\n".join(lines)

    def at_rate(self, tflops: float) -> str:
        """The study's convolution work at an *assumed* sustained rate: a projection for a
        device not measured here, never a measurement."""
        return (f"At an assumed sustained {tflops:g} TFLOP/s (a projection, not a measurement) "
                f"the convolutions of one fold would take {_hms(self.fold_tflop / tflops)} and "
                f"of the study {_hms(self.fold_tflop * self.folds / tflops)}; input pipeline, "
                "tracing and Python overheads come on top.")


def _hms(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


# ---------------------------------------------------------------------------------------------
# Sizes


def case_counts(profile: Profile, cases: int | None = None) -> dict[str, int]:
    """Cases per fold of the profile's study: the synthetic cohort's size unless ``cases``."""
    if cases is None:
        from ..data.synth import plan_cohort

        cases = len(plan_cohort(profile.synth, profile.seed))
    n_folds = profile.folds.n_folds
    test = math.ceil(cases / n_folds)
    val = max(1, round(profile.folds.val_fraction * (cases - test)))
    return {"all": cases, "train": cases - test - val, "val": val, "test": test}


def check_sizes(profile: Profile) -> list[str]:
    """Every reason the profile's sizes cannot work (empty when they can)."""
    from ..nets.models import UNetConfig

    problems = []
    shape = [int(s) for s in profile.preprocess.shape]
    for key in ("mc_unet", "rec_unet"):
        section = profile.section(key)
        divisor = UNetConfig.from_section(section).divisor
        patch = [int(p) for p in section["patch"]]
        for name, size in (("preprocess.shape", shape), (f"{key}.patch", patch)):
            if any(s % divisor for s in size):
                problems.append(f"{name} {size} is not a multiple of {divisor} in every axis "
                                f"({key} halves the grid {int(math.log2(divisor))} times)")
        if any(p > s for p, s in zip(patch, shape, strict=True)):
            problems.append(f"{key}.patch {patch} is larger than preprocess.shape {shape}")
        if int(section["batch_size"]) < 1:
            problems.append(f"{key}.batch_size must be at least 1")
    mc = profile.section("mc_unet")
    if int(mc["mc_samples"]) < 1 or int(mc["mc_batch"]) < 1:
        problems.append(f"mc_unet.mc_samples ({mc['mc_samples']}) and mc_batch "
                        f"({mc['mc_batch']}) must be at least 1")
    rec = profile.section("rec_unet")
    window = int(rec.get("ssim_window", 7))
    if window > min(int(p) for p in rec["patch"]):
        problems.append(f"rec_unet.ssim_window {window} is larger than the patch {rec['patch']}")
    dr = profile.section("dice_regression")
    pool = max(int(dr.get("input_pool", 1)), 1)
    left = min(shape) // pool // 2 ** len(dr["filters"])
    if left < 1:
        problems.append(f"dice_regression: preprocess.shape {shape} with input_pool {pool} "
                        f"leaves nothing after {len(dr['filters'])} max-pools")
    return problems


def activation_bytes(model, spatial, batch: int = 1) -> float:
    """float32 bytes of every layer output for one call: an upper bound of what inference keeps
    alive, and about what training keeps for the backward pass."""
    import keras

    from ..nets.models import retrace

    total = 0.0

    def count(layer, *args, **kwargs):
        nonlocal total
        out = layer(*args, **kwargs)
        for t in keras.tree.flatten(out):
            total += 4.0 * float(np.prod([d or 1 for d in t.shape]))
        return out

    probe = keras.Input(batch_shape=(batch, *spatial, model.inputs[0].shape[-1]))
    retrace(model, count, inputs=[probe])
    return total


def available_memory() -> tuple[float, str]:
    """Bytes the largest call may use, and where: the accelerator's memory when one is in
    use, else the host's available memory."""
    device = device_memory_limit()
    if device:
        return device, "device"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: float(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info["MemTotal"]), "host"
    except OSError:
        return float("inf"), "host"


# ---------------------------------------------------------------------------------------------
# Devices and memory


def device_name() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform.upper()} {getattr(d, 'device_kind', '')}".strip()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"GPU {details.get('device_name', gpus[0].name)}"
    return f"CPU ({os.cpu_count()} cores)"


def _accelerator_stats() -> dict | None:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return d.memory_stats() if d.platform != "cpu" else None
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return tf.config.experimental.get_memory_info("GPU:0")
    return None


def device_memory_limit() -> float | None:
    stats = _accelerator_stats()
    if not stats:
        return None
    return float(stats.get("bytes_limit") or 0) or None


def device_peak() -> float | None:
    """Peak accelerator memory in use so far (bytes), None on a CPU."""
    stats = _accelerator_stats()
    if not stats:
        return None
    return float(stats.get("peak_bytes_in_use", stats.get("peak", 0)))


def _reset_device_peak() -> None:
    import keras

    if keras.backend.backend() == "tensorflow" and _accelerator_stats() is not None:
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")


class _HostPeak:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process peak so far
            return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def measure(name: str, call: Callable[[], object], gflop: float, detail: str = "",
            repeats: int = 1, log: Callable[[str], None] = print) -> Stage:
    """``call`` once untimed (tracing), then ``repeats`` times timed (median)."""
    _reset_device_peak()
    log(f"check-scale: {name} ...")
    with _HostPeak() as host:
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    device = device_peak()
    stage = Stage(name, first, float(np.median(times)), gflop, host.peak / 2**20,
                  None if device is None else device / 2**20, detail)
    log(f"check-scale: {name}: first {stage.first_s:.2f} s, steady {stage.seconds:.2f} s, "
        f"peak host {stage.host_peak_mb:.0f} MB")
    return stage


# ---------------------------------------------------------------------------------------------
# The check


def check_scale(profile: Profile, cases: int | None = None, repeats: int = 1,
                log: Callable[[str], None] = print) -> ScaleReport:
    """Check the profile's sizes, time one call of every network at them, project the study.

    Raises :class:`ScaleError` when a size cannot work, before anything is built, or when a call
    runs out of memory (naming the stage and the setting to lower).
    """
    problems = check_sizes(profile)
    if problems:
        raise ScaleError(f"profile {profile.name!r} cannot run at its sizes:\n  - "
                         + "\n  - ".join(problems))
    import keras

    from ..data.preprocess import CHANNELS
    from ..nets.models import (
        UNetConfig,
        build_dice_regressor,
        build_mc_unet,
        build_rec_unet,
        conv_flops,
    )
    from ..nets.training import (
        Augmentation,
        PatchDataset,
        compile_for_training,
        deterministic,
        make_loss,
    )
    from ..qc.reconstruction import RecPatchDataset, make_ssim_loss, reconstruct, training_case
    from ..qc.uncertainty import mc_sampler, mc_samples, sample_chunks

    keras.utils.set_random_seed(profile.seed)
    rng = np.random.default_rng(profile.seed)
    shape = tuple(int(s) for s in profile.preprocess.shape)
    counts = case_counts(profile, cases)
    report = ScaleReport(profile.name, keras.backend.backend(), device_name(), counts,
                         folds=profile.folds.n_folds)
    log(f"check-scale: profile {profile.name}, grid {list(shape)}, backend "
        f"{report.backend}, {report.device}")

    def guarded(name: str, fix: str, fn: Callable[[], Stage]) -> Stage:
        try:
            stage = fn()
        except Exception as exc:  # TensorFlow's and XLA's out-of-memory errors share no base
            text = str(exc)
            if isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in text or \
                    "ResourceExhausted" in type(exc).__name__ or "out of memory" in text.lower():
                raise ScaleError(f"{name} ran out of memory on {report.device}: {fix}") from exc
            raise
        report.stages.append(stage)
        return stage

    def batch_of(channels: int, spatial, batch: int) -> np.ndarray:
        return rng.normal(size=(batch, *spatial, channels)).astype(np.float32)

    limit, where = available_memory()

    def refuse_if_too_big(name: str, needed: float, fix: str) -> None:
        if needed > limit:
            raise ScaleError(f"{name} needs about {needed / 2**30:.1f} GiB of activations; "
                             f"{limit / 2**30:.1f} GiB of {where} memory is available: {fix}")

    # MC U-net: training step, whole-volume validation pass, Monte Carlo inference
    mc = profile.section("mc_unet")
    cfg = UNetConfig.from_section(mc, in_channels=len(CHANNELS))
    patch, batch = tuple(int(p) for p in mc["patch"]), int(mc["batch_size"])
    n, chunk = int(mc["mc_samples"]), int(mc["mc_batch"])
    model = build_mc_unet(None, cfg)
    refuse_if_too_big("the MC U-net training step", 3 * activation_bytes(model, patch, batch),
                      "lower mc_unet.batch_size or mc_unet.patch")
    refuse_if_too_big(f"MC inference with chunks of {chunk} samples",
                      activation_bytes(mc_sampler(model, min(chunk, n)), shape),
                      "lower mc_unet.mc_batch")
    compile_for_training(model, mc,
                         make_loss(mc.get("loss", "dice_bce"), float(mc.get("bce_weight", 1.0))))
    case = _random_case(shape, len(CHANNELS), rng)
    patches = PatchDataset([case], patch, batch, 1, profile.seed,
                           float(mc.get("lesion_patch_fraction", 0.67)),
                           Augmentation.from_section(mc.get("augmentation")))
    guarded("MC U-net input batch", "lower mc_unet.patch",
            lambda: measure("MC U-net input batch", lambda: patches[0], 0.0,
                            "patch sampling and augmentation", repeats, log))
    x, y = patches[0]
    guarded("MC U-net training step", "lower mc_unet.batch_size or mc_unet.patch",
            lambda: measure("MC U-net training step", lambda: model.train_on_batch(x, y),
                            conv_flops(model, patch) * batch / 1e9,
                            f"patch {list(patch)}, batch {batch}", repeats, log))
    net = deterministic(model)
    volume = batch_of(len(CHANNELS), shape, 1)
    guarded("MC U-net validation pass", "lower preprocess.shape",
            lambda: measure("MC U-net validation pass", lambda: net.predict_on_batch(volume),
                            conv_flops(net, shape) / 1e9, "dropout off, one volume",
                            repeats, log))
    image = np.moveaxis(volume[0], -1, 0)
    flops = sum(conv_flops(mc_sampler(model, k), shape) for k in sample_chunks(n, chunk))

    def mc_case():
        mc_samples(model, image, n, chunk)

    def mc_warm_then_time() -> Stage:
        # warm up on one chunk (traces the chunk-size graph), then time the whole case
        mc_samples(model, image, min(chunk, n), chunk)
        return measure("MC inference, one case", mc_case, flops / 1e9,
                       f"{n} samples in chunks of {chunk}", repeats, log)

    guarded("MC inference", "lower mc_unet.mc_batch", mc_warm_then_time)

    # Reconstruction U-net: training step (the profile's SSIM loss), one whole-volume call
    rec = profile.section("rec_unet")
    rcfg = UNetConfig.from_section(rec, in_channels=1)
    rpatch, rbatch = tuple(int(p) for p in rec["patch"]), int(rec["batch_size"])
    rec_model = build_rec_unet(None, rcfg)
    refuse_if_too_big("the reconstruction U-net training step",
                      3 * activation_bytes(rec_model, rpatch, rbatch),
                      "lower rec_unet.batch_size or rec_unet.patch")
    compile_for_training(rec_model, rec,
                         make_ssim_loss(int(rec.get("ssim_window", 7)),
                                        float(rec.get("ssim_sigma", 1.5)),
                                        rec.get("ssim_mode", "3d")))
    rec_patches = RecPatchDataset([training_case(case)], rpatch, rbatch, 1, profile.seed,
                                  float(rec.get("lesion_patch_fraction", 0.67)),
                                  Augmentation.from_section(rec.get("augmentation")))
    guarded("Rec U-net input batch", "lower rec_unet.patch",
            lambda: measure("Rec U-net input batch", lambda: rec_patches[0], 0.0,
                            "patch sampling and augmentation", repeats, log))
    rx, rtarget = rec_patches[0]
    guarded("Rec U-net training step", "lower rec_unet.batch_size or rec_unet.patch",
            lambda: measure("Rec U-net training step",
                            lambda: rec_model.train_on_batch(rx, rtarget),
                            conv_flops(rec_model, rpatch) * rbatch / 1e9,
                            f"patch {list(rpatch)}, batch {rbatch}, "
                            f"{rec.get('ssim_mode', '3d')} SSIM loss", repeats, log))
    infer_batch = int(rec.get("infer_batch", 4))
    rvol = rng.random((1, *shape)).astype(np.float32)
    guarded("reconstruction", "lower rec_unet.infer_batch",
            lambda: measure("reconstruction, one case",
                            lambda: reconstruct(rec_model, rvol, infer_batch),
                            conv_flops(rec_model, shape) / 1e9, "whole volume", repeats, log))

    # Dice regressor: training step at the profile's batch, a prediction for one case
    dr = profile.section("dice_regression")
    dbatch = int(dr["batch_size"])
    regressor = build_dice_regressor(shape, 2, dr["filters"], int(dr.get("input_pool", 1)),
                                     float(dr.get("negative_slope", 0.3)))
    compile_for_training(regressor, dr,
                         keras.losses.Huber(delta=float(dr.get("huber_delta", 1.0))))
    dx = batch_of(2, shape, dbatch)
    dy = rng.random((dbatch, 1)).astype(np.float32)
    guarded("Dice regressor training step", "lower dice_regression.batch_size",
            lambda: measure("Dice regressor training step",
                            lambda: regressor.train_on_batch(dx, dy),
                            conv_flops(regressor, shape) * dbatch / 1e9,
                            f"whole volume, batch {dbatch}", repeats, log))
    guarded("Dice regressor prediction", "lower preprocess.shape",
            lambda: measure("Dice regressor prediction, one case",
                            lambda: regressor.predict_on_batch(dx[:1]),
                            conv_flops(regressor, shape) / 1e9, "", repeats, log))

    report.projection = project_fold(profile, report, counts)
    report.work = fold_work(profile, report, counts)
    return report


def _random_case(shape, channels: int, rng: np.random.Generator):
    """A case of random images with a sprinkling of lesion voxels (for the input pipeline)."""
    from ..data.preprocess import PreprocessedCase

    lesion = (rng.random(shape) > 0.995).astype(np.float32)
    brain = np.ones(shape, np.uint8)
    image = rng.normal(size=(channels, *shape)).astype(np.float32)
    return PreprocessedCase("random", image, lesion, np.zeros(shape, np.float32), brain,
                            np.eye(4), {})


def _dice_regression_plan(dr: dict, counts: dict[str, int]) -> tuple[int, int, int]:
    """Widened masks per training case, regressors trained and steps per epoch."""
    from ..qc import regression as rg

    widen = rg.widen_settings(dr)
    extra_masks = rg.n_widened_masks(widen)
    regressors = len(rg.INPUT_KINDS) * (2 if widen else 1)
    steps = dr.get("steps_per_epoch") or math.ceil(counts["train"] / int(dr["batch_size"]))
    return extra_masks, regressors, int(steps)


def project_fold(profile: Profile, report: ScaleReport, counts: dict[str, int]
                 ) -> dict[str, float]:
    """Seconds per fold, step by step: the measured steady times times the profile's counts,
    plus each stage's one-off tracing (first call minus steady) once per step."""
    t = {s.name.split(",")[0]: s.seconds for s in report.stages}
    once = {s.name.split(",")[0]: max(s.first_s - s.seconds, 0.0) for s in report.stages}
    mc, rec, dr = (profile.section(k) for k in ("mc_unet", "rec_unet", "dice_regression"))
    extra_masks, regressors, dr_steps = _dice_regression_plan(dr, counts)

    def traced(*names: str) -> float:
        return sum(once[n] for n in names)

    return {
        "MC U-net training": int(mc["epochs"]) * (
            int(mc["steps_per_epoch"]) * (t["MC U-net training step"] + t["MC U-net input batch"])
            + counts["val"] * t["MC U-net validation pass"])
            + traced("MC U-net training step", "MC U-net validation pass"),
        "MC inference (every case)": counts["all"] * t["MC inference"]
            + traced("MC inference"),
        "Rec U-net training": int(rec["epochs"]) * (
            int(rec["steps_per_epoch"]) * (t["Rec U-net training step"]
                                           + t["Rec U-net input batch"])
            + counts["val"] * t["reconstruction"])
            + traced("Rec U-net training step", "reconstruction"),
        "error maps (every case, widened masks)":
            (counts["all"] + counts["train"] * extra_masks) * t["reconstruction"],
        f"Dice regressors ({regressors})": regressors * (int(dr["epochs"]) * (
            dr_steps * t["Dice regressor training step"]
            + counts["val"] * t["Dice regressor prediction"])
            + traced("Dice regressor training step", "Dice regressor prediction")),
    }


def fold_work(profile: Profile, report: ScaleReport, counts: dict[str, int]) -> dict[str, float]:
    """GFLOP of convolutions per fold, step by step (a training step = 3 forward passes)."""
    g = {s.name.split(",")[0]: s.gflop for s in report.stages}
    mc, rec, dr = (profile.section(k) for k in ("mc_unet", "rec_unet", "dice_regression"))
    extra_masks, regressors, dr_steps = _dice_regression_plan(dr, counts)
    return {
        "MC U-net training": int(mc["epochs"]) * (
            int(mc["steps_per_epoch"]) * 3 * g["MC U-net training step"]
            + counts["val"] * g["MC U-net validation pass"]),
        "MC inference (every case)": counts["all"] * g["MC inference"],
        "Rec U-net training": int(rec["epochs"]) * (
            int(rec["steps_per_epoch"]) * 3 * g["Rec U-net training step"]
            + counts["val"] * g["reconstruction"]),
        "error maps (every case, widened masks)":
            (counts["all"] + counts["train"] * extra_masks) * g["reconstruction"],
        f"Dice regressors ({regressors})": regressors * int(dr["epochs"]) * (
            dr_steps * 3 * g["Dice regressor training step"]
            + counts["val"] * g["Dice regressor prediction"]),
    }
