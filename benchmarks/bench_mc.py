"""Benchmark of the MC U-net on one profile: training speed, MC inference batched against the
naive loop of N ``predict`` calls, achieved GFLOP/s next to this machine's float32 matrix-product
rate, and peak memory. Prints figures; asserts nothing (timing goals live here, not in tests).

    make bench                      # cpu profile
    .venv/bin/python benchmarks/bench_mc.py --profile paper --cases 2
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from wmhqc_lib.config import load_profile
from wmhqc_lib.data.preprocess import PreprocessedCase
from wmhqc_lib.nets.models import UNetConfig, build_mc_unet, conv_flops
from wmhqc_lib.nets.training import Augmentation, PatchDataset, compile_for_training, make_loss
from wmhqc_lib.qc.uncertainty import mc_sampler, mc_samples, mc_samples_naive, sample_chunks


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 matrix-product rate of this machine (numpy's BLAS), best of ``repeats``."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fake_case(shape, seed: int) -> PreprocessedCase:
    """Random images with a sprinkling of lesion voxels: speed does not depend on content."""
    rng = np.random.default_rng(seed)
    lesion = (rng.random(shape) > 0.995).astype(np.uint8)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    return PreprocessedCase(f"c{seed}", image, lesion, np.zeros(shape, np.uint8),
                            np.ones(shape, np.uint8), np.eye(4), {})


def main() -> None:
    import keras  # after wmhqc_lib, which sets TensorFlow's environment (oneDNN) first

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--cases", type=int, default=5, help="cases timed for MC inference")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    section = profile.section("mc_unet")
    shape = profile.preprocess.shape
    cfg = UNetConfig.from_section(section)
    n, batch = int(section["mc_samples"]), int(section["mc_batch"])
    keras.utils.set_random_seed(0)
    model = build_mc_unet(None, cfg)
    compile_for_training(model, section, make_loss(section["loss"]))

    print(f"backend {keras.backend.backend()}, profile {profile.name}, grid {shape}, "
          f"patch {section['patch']}, batch {section['batch_size']}, N = {n} samples")
    data = PatchDataset([fake_case(shape, i) for i in range(4)], section["patch"],
                        int(section["batch_size"]), args.steps, 0,
                        augmentation=Augmentation.from_section(section.get("augmentation")))
    x, y = data[0]
    model.train_on_batch(x, y)  # trace
    batches = [data[i] for i in range(args.steps)]
    t_train = _timed(lambda: [model.train_on_batch(bx, by) for bx, by in batches]) / args.steps
    t_data = _timed(lambda: [data[i] for i in range(args.steps)]) / args.steps
    per_epoch = (t_train + t_data) * int(section["steps_per_epoch"])
    print(f"training: {t_train * 1000:.0f} ms per step + {t_data * 1000:.0f} ms input pipeline; "
          f"{per_epoch:.1f} s per epoch of {section['steps_per_epoch']} steps "
          f"(whole-volume validation not included)")

    cases = [fake_case(shape, 10 + i) for i in range(args.cases)]
    mc_samples(model, cases[0].image, n, batch)  # trace
    mc_samples_naive(model, cases[0].image, 2)
    # Interleaved, so that a noisy neighbour on the machine slows both paths alike; medians.
    batched, naive = [], []
    for c in cases:
        batched.append(_timed(lambda c=c: mc_samples(model, c.image, n, batch)))
        naive.append(_timed(lambda c=c: mc_samples_naive(model, c.image, n)))
    t_batched, t_naive = float(np.median(batched)), float(np.median(naive))
    # FLOPs actually run: the sampler computes the layers before the first dropout once per call
    flops = sum(conv_flops(mc_sampler(model, k), shape) for k in sample_chunks(n, batch))
    peak = matmul_gflops()
    print(f"MC inference per case (median of {len(cases)}): batched {t_batched:.2f} s "
          f"(range {min(batched):.2f}-{max(batched):.2f}), naive loop of {n} predict calls "
          f"{t_naive:.2f} s (range {min(naive):.2f}-{max(naive):.2f}), "
          f"ratio {t_naive / t_batched:.1f}x")
    print(f"MC inference: {flops / 1e9:.1f} GFLOP per case, {flops / t_batched / 1e9:.1f} GFLOP/s "
          f"achieved; float32 matrix product on this machine: {peak:.0f} GFLOP/s")
    folds = profile.folds.n_folds
    print(f"projection: MC inference on 105 cases x {folds} folds = "
          f"{105 * folds * t_batched / 60:.1f} min")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
