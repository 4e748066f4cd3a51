"""Reconstruction U-net: SSIM, per-case intensities, error maps, and the QC path that cannot
reach ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from wmhqc_lib.config import load_profile
from wmhqc_lib.data.preprocess import PreprocessedCase, save_case
from wmhqc_lib.nets.models import UNetConfig, build_rec_unet
from wmhqc_lib.qc import reconstruction as rc

keras = pytest.importorskip("keras")

SMOKE = load_profile("smoke").section("rec_unet")
CFG = UNetConfig.from_section(SMOKE, in_channels=1)
SHAPE = (16, 16, 16)


def phantom(sid: str, seed: int, shape=SHAPE) -> PreprocessedCase:
    """A preprocessed-like case: a ball of brain with z-scored noisy tissue and a bright
    lesion blob; 0 outside the brain, like the cache."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape)
    centre = (np.asarray(shape) - 1) / 2.0
    brain = ((idx - centre[:, None, None, None]) ** 2).sum(0) <= (min(shape) / 2 - 1) ** 2
    blob = rng.uniform(5, 10, size=3)
    lesion = (((idx - blob[:, None, None, None]) ** 2).sum(0) <= rng.uniform(3, 6)) & brain
    flair = np.where(brain, rng.normal(0, 0.3, shape) + 2.5 * lesion, 0.0)
    t1 = np.where(brain, rng.normal(0, 0.3, shape) - 1.5 * lesion, 0.0)
    return PreprocessedCase(sid, np.stack([t1, flair]).astype(np.float32),
                            lesion.astype(np.uint8), np.zeros(shape, np.uint8),
                            brain.astype(np.uint8), np.eye(4), {"subject_id": sid})


@pytest.fixture(scope="module")
def rec_model():
    keras.utils.set_random_seed(0)
    return build_rec_unet(None, CFG)


# ---------------------------------------------------------------------------------------------
# SSIM


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_ssim_of_identical_volumes_is_one_and_drops_with_noise(mode):
    rng = np.random.default_rng(0)
    x = rng.random((2, 16, 16, 16, 1)).astype(np.float32)
    same = np.asarray(rc.ssim(x, x, window=5, mode=mode))
    assert same.shape == (2,)
    assert np.allclose(same, 1.0, atol=1e-5)
    values = [float(np.asarray(rc.ssim(x, x + rng.normal(0, s, x.shape).astype(np.float32),
                                       window=5, mode=mode))[0]) for s in (0.02, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2]
    loss = rc.make_ssim_loss(5, 1.5, mode)
    assert float(np.mean(np.asarray(loss(x, x)))) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError):
        rc.ssim(x, x, window=5, mode="4d")


def test_2d_ssim_matches_tensorflow_per_slice():
    """The paper's loss: tf.image.ssim on every axial slice (11 x 11, sigma 1.5)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow reference")
    import tensorflow as tf

    rng = np.random.default_rng(1)
    a = rng.random((1, 16, 16, 6, 1)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    slices = (np.moveaxis(a[0, ..., 0], -1, 0)[..., None], np.moveaxis(b[0, ..., 0], -1, 0)
              [..., None])
    ref = float(np.mean(tf.image.ssim(*slices, max_val=1.0, filter_size=11, filter_sigma=1.5)))
    ours = float(np.asarray(rc.ssim(a, b, window=11, sigma=1.5, mode="2d"))[0])
    assert ours == pytest.approx(ref, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Per-case intensities and hand-made error maps


def test_rec_intensity_is_per_case_in_unit_range():
    case = phantom("a", 0)
    scaled = rc.rec_intensity(case.image[rc.FLAIR], case.brain)
    inside = scaled[case.brain > 0]
    assert inside.min() == 0.0 and inside.max() == pytest.approx(1.0)
    assert np.all(scaled[case.brain == 0] == 0)
    # an affine change of intensities (another scanner) gives the same input
    again = rc.rec_intensity(3.0 * case.image[rc.FLAIR] + 7.0, case.brain)
    assert np.allclose(again, scaled, atol=1e-6)


def test_signed_and_absolute_error_maps_on_hand_made_volumes():
    brain = np.zeros((4, 4, 4), bool)
    brain[1:3, 1:3, 1:3] = True  # 8 voxels
    flair = np.where(brain, 0.5, 0.0).astype(np.float32)
    image = rc.QCImage("h", flair, brain)
    rec = np.full((4, 4, 4), 0.7, np.float32)  # also non-zero outside the brain
    rec[1, 1, 1] = 0.1  # one voxel darker than the original: error -0.4
    maps = rc.error_maps_from(rec, image)
    assert np.all(maps.error[~brain] == 0) and np.all(maps.reconstruction[~brain] == 0)
    assert maps.error[1, 1, 1] == pytest.approx(-0.4)
    assert maps.error[2, 2, 2] == pytest.approx(0.2)
    assert np.allclose(maps.abs_error, np.abs(maps.error))
    pred = np.zeros((4, 4, 4), bool)
    pred[1, 1, 1:3] = True  # errors -0.4 and +0.2
    scores = rc.error_scores(maps, image, pred, {"ssim_window": 3})
    assert scores["error_vs"] == pytest.approx(7 * 0.2 - 0.4, abs=1e-5)
    assert scores["error_vs_abs"] == pytest.approx(7 * 0.2 + 0.4, abs=1e-5)
    assert scores["mean_abs_error_lesion"] == pytest.approx(0.3, abs=1e-6)
    assert scores["rec_mae"] == pytest.approx((7 * 0.2 + 0.4) / 8, abs=1e-6)
    assert 0 < scores["rec_ssim"] < 1
    empty = rc.error_scores(maps, image, np.zeros_like(pred), {"ssim_window": 3})
    assert empty["mean_abs_error_lesion"] == 0.0  # nothing blanked, nothing inpainted
    assert rc.zero_region(flair, pred)[1, 1, 1] == 0 and rc.zero_region(flair, pred)[2, 2, 2] \
        == 0.5


# ---------------------------------------------------------------------------------------------
# The QC path cannot reach ground truth


def test_qc_path_refuses_cases_that_carry_ground_truth(rec_model):
    case = phantom("a", 0)
    pred = case.lesion.copy()
    with pytest.raises(TypeError, match="ground-truth"):
        rc.error_maps(rec_model, case, pred)
    with pytest.raises(TypeError):
        rc.error_maps_from(np.zeros(SHAPE, np.float32), case)
    image = rc.QCImage.from_arrays("a", case.image[rc.FLAIR], case.brain)
    assert not any(hasattr(image, name) for name in ("lesion", "ignore", "image"))


def test_error_maps_do_not_change_when_the_ground_truth_does(tmp_path, rec_model):
    """Rewrite a cached case with another lesion and ignore mask: its QC image, error maps and
    scores stay identical (the QC path never reads them)."""
    case = phantom("a", 0)
    save_case(case, tmp_path / "cache")
    pred = np.zeros(SHAPE, bool)
    pred[6:9, 6:9, 6:9] = True
    first = rc.load_qc_image(tmp_path / "cache", "a")
    table1 = rc.run_error_maps(rec_model, [first], {"a": pred}, {"a": "test"}, tmp_path / "r1",
                               1, SMOKE, progress=False)
    altered = PreprocessedCase("a", case.image, 1 - case.lesion, np.ones(SHAPE, np.uint8),
                               case.brain, case.affine, case.meta)
    save_case(altered, tmp_path / "cache")
    second = rc.load_qc_image(tmp_path / "cache", "a")
    assert np.array_equal(first.flair, second.flair)
    table2 = rc.run_error_maps(rec_model, [second], {"a": pred}, {"a": "test"},
                               tmp_path / "r2", 1, SMOKE, progress=False)
    m1 = rc.load_error_maps(tmp_path / "r1" / "maps" / "a.npz")
    m2 = rc.load_error_maps(tmp_path / "r2" / "maps" / "a.npz")
    for k in ("reconstruction", "error", "abs_error"):
        assert np.array_equal(m1[k], m2[k]), k
    cols = ["error_vs", "error_vs_abs", "mean_abs_error_lesion", "rec_ssim", "rec_mae"]
    assert table1[cols].equals(table2[cols])


def test_error_map_table_columns_and_resume(tmp_path, rec_model):
    cases = [phantom("a", 0), phantom("b", 1)]
    images = [rc.QCImage.from_arrays(c.subject_id, c.image[rc.FLAIR], c.brain) for c in cases]
    preds = {"a": cases[0].lesion > 0, "b": np.zeros(SHAPE, bool)}
    table = rc.run_error_maps(rec_model, images, preds, {"a": "val", "b": "test"}, tmp_path, 1,
                              SMOKE, tag="t1", progress=False)
    assert {"fold", "subject_id", "split", "error_vs", "error_vs_abs", "mean_abs_error_lesion",
            "rec_ssim", "rec_mae"} <= set(table.columns)
    assert list(table["split"]) == ["val", "test"]
    assert table.loc[1, "mean_abs_error_lesion"] == 0.0
    saved = rc.load_error_maps(tmp_path / "maps" / "a.npz")
    assert saved["error"].dtype == np.float32 and saved["error"].shape == SHAPE
    with np.load(tmp_path / "maps" / "a.npz") as z:
        assert z["error"].dtype == np.float16
    assert table.loc[0, "error_vs"] == pytest.approx(saved["error"].sum(), rel=1e-2, abs=1e-2)
    mtime = (tmp_path / "maps" / "a.npz").stat().st_mtime_ns
    rc.run_error_maps(rec_model, images, preds, {"a": "val", "b": "test"}, tmp_path, 1, SMOKE,
                      tag="t1", progress=False)
    assert (tmp_path / "maps" / "a.npz").stat().st_mtime_ns == mtime  # reused
    preds["a"] = np.zeros(SHAPE, bool)  # another prediction: recomputed
    again = rc.run_error_maps(rec_model, images, preds, {"a": "val", "b": "test"}, tmp_path, 1,
                              SMOKE, tag="t1", progress=False)
    assert again.loc[0, "mean_abs_error_lesion"] == 0.0


# ---------------------------------------------------------------------------------------------
# Training


def test_training_patches_blank_the_ground_truth_lesion():
    from wmhqc_lib.nets.training import Augmentation

    train = [rc.training_case(phantom(f"t{i}", i)) for i in range(3)]
    assert train[0].image.shape == (1, *SHAPE)
    data = rc.RecPatchDataset(train, (8, 8, 8), 4, 2, seed=0, lesion_fraction=1.0,
                              augmentation=Augmentation(rotate_deg=0, scale=0, noise=0,
                                                        intensity_shift=0))
    x, y = data[0]
    assert x.shape == y.shape == (4, 8, 8, 8, 1)
    blanked = (x == 0) & (y > 0)
    assert blanked.any()  # lesion-centred patches lose their lesion in the input
    assert np.array_equal(x[~blanked], y[~blanked])


def test_short_rec_training_improves_and_is_reused(tmp_path):
    cases = [phantom(f"t{i}", i) for i in range(3)]
    val = phantom("v", 9)
    val_images = [rc.QCImage.from_arrays("v", val.image[rc.FLAIR], val.brain)]
    preds = {"v": val.lesion > 0}
    section = dict(SMOKE, epochs=3, steps_per_epoch=4, patience=5, learning_rate=0.01)
    result = rc.fit_rec_unet(lambda: build_rec_unet(None, CFG), cases, val_images, preds,
                             tmp_path, section, seed=3, progress=False)
    history = result.history
    assert list(history.columns[:3]) == ["epoch", "loss", "val_ssim"]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert result.state["best_val_ssim"] == pytest.approx(history["val_ssim"].max())
    assert (tmp_path / "best.keras").exists()
    again = rc.fit_rec_unet(lambda: build_rec_unet(None, CFG), cases, val_images, preds,
                            tmp_path, section, seed=3, progress=False)
    assert again.skipped
    out = again.model.predict(np.zeros((1, *SHAPE, 1), np.float32), verbose=0)
    assert out.shape == (1, *SHAPE, 1) and np.all(out >= 0)  # ReLU output


def test_error_by_region_reports_the_sign_inside_the_hole():
    brain = np.zeros((4, 4, 4), bool)
    brain[1:3, 1:3, 1:3] = True
    error = np.where(brain, 0.1, 5.0)  # outside the brain must not count
    pred = np.zeros((4, 4, 4), bool)
    pred[1, 1, 1:3] = True
    pred[0, 0, 0] = True  # a predicted voxel outside the brain is ignored
    error[1, 1, 1], error[1, 1, 2] = -0.6, -0.2  # the hole filled too dark
    got = rc.error_by_region(error, pred, brain)
    assert got["mean_error_predicted"] == pytest.approx(-0.4)
    assert got["mean_error_rest_of_brain"] == pytest.approx(0.1)
    assert (got["n_predicted"], got["n_rest_of_brain"]) == (2, 6)
    empty = rc.error_by_region(error, np.zeros_like(pred), brain)
    assert np.isnan(empty["mean_error_predicted"]) and empty["n_rest_of_brain"] == 8
