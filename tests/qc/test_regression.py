"""Dice regression: the network, its input pairs, per-case inputs, widening, training and
reporting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib.nets.models import UNetConfig, build_dice_regressor, build_rec_unet
from wmhqc_lib.qc import regression as rg
from wmhqc_lib.qc.metrics import dice
from wmhqc_lib.qc.reconstruction import QCImage, rec_intensity

keras = pytest.importorskip("keras")

SHAPE = (16, 16, 16)
SECTION = {"filters": [4, 8, 8, 8], "input_pool": 1, "huber_delta": 1.0,
           "learning_rate": 0.003, "batch_size": 4, "epochs": 6, "patience": 6, "flip": True}


def case_inputs(sid: str, seed: int) -> rg.CaseInputs:
    rng = np.random.default_rng(seed)
    brain = np.zeros(SHAPE, bool)
    brain[2:14, 2:14, 2:14] = True
    flair = np.where(brain, rng.normal(0, 1, SHAPE), 0.0)
    mean = np.where(brain, rng.random(SHAPE) ** 4, 0.0).astype(np.float32)
    pred = mean > 0.5
    entropy = rng.random(SHAPE).astype(np.float32)
    error = rng.normal(0, 0.1, SHAPE).astype(np.float32)
    return rg.CaseInputs(sid, QCImage.from_arrays(sid, flair, brain), pred, mean, entropy, error)


def test_regressor_builds_with_the_papers_blocks():
    net = build_dice_regressor((40, 40, 40), 2, (16, 32, 64, 128), input_pool=2)
    convs = [la for la in net.layers if isinstance(la, keras.layers.Conv3D)]
    assert [c.filters for c in convs] == [16, 32, 64, 128]
    assert sum(isinstance(la, keras.layers.MaxPooling3D) for la in net.layers) == 4
    assert sum(isinstance(la, keras.layers.LeakyReLU) for la in net.layers) == 4
    assert net.layers[-1].units == 1
    assert net.predict(np.zeros((2, 40, 40, 40, 2), np.float32), verbose=0).shape == (2, 1)
    with pytest.raises(ValueError, match="too small"):
        build_dice_regressor((24, 24, 24), 2, (4, 8, 8, 8), input_pool=2)


def test_each_input_pair_has_the_right_channels():
    c = case_inputs("a", 0)
    expected = {"image": c.image.flair, "uncertainty": c.entropy, "error": c.error}
    for kind in rg.INPUT_KINDS:
        pair = c.pair(kind)
        assert pair.shape == (*SHAPE, 2) and pair.dtype == np.float32
        assert np.array_equal(pair[..., 0], expected[kind].astype(np.float32)), kind
        assert np.array_equal(pair[..., 1], c.prediction.astype(np.float32)), kind
        assert set(np.unique(pair[..., 1])) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        rg.input_pair("texture", c.prediction, flair=c.image.flair)
    with pytest.raises(ValueError):
        rg.input_pair("error", c.prediction, flair=c.image.flair)
    assert rg.column_name("error") == "dr_error"
    assert rg.column_name("image", "widened") == "dr_image_widened"


def test_inputs_are_normalised_per_case_only():
    """Change another case (intensities, maps): this case's inputs stay the same."""
    a, b = case_inputs("a", 0), case_inputs("b", 1)
    before = {k: a.pair(k) for k in rg.INPUT_KINDS}
    flair_b = rec_intensity(b.image.flair * 50 + 3, b.image.brain)
    b_changed = rg.CaseInputs("b", QCImage("b", flair_b, b.image.brain), ~b.prediction,
                              b.mean, b.entropy * 0.1, b.error * 10)
    pairs = {c.subject_id: {k: c.pair(k) for k in rg.INPUT_KINDS} for c in (a, b_changed)}
    for k in rg.INPUT_KINDS:
        assert np.array_equal(pairs["a"][k], before[k])
    # FLAIR is scaled inside the case's own brain
    assert a.image.flair[a.image.brain].min() == 0.0
    assert a.image.flair[a.image.brain].max() == pytest.approx(1.0)


def test_widened_masks_and_their_own_dice(tmp_path):
    c = case_inputs("a", 0)
    masks = rg.widened_masks(c.mean, c.prediction, thresholds=(0.25, 0.5, 0.75), dilate=1,
                             erode=1)
    assert "threshold_0.5" not in masks  # equal to the prediction itself
    assert masks["threshold_0.25"].sum() > c.prediction.sum() > masks["threshold_0.75"].sum()
    assert masks["dilate_1"].sum() > c.prediction.sum()
    lesion = c.prediction.copy()
    keras.utils.set_random_seed(0)
    rec = build_rec_unet(None, UNetConfig(base_filters=4, encoder_filters=(8, 16, 32)))
    settings = {"thresholds": [0.25, 0.75], "dilate": 1, "erode": 0}
    cache = tmp_path / "a.npz"
    seen = []

    def true_dice(volume):
        seen.append(volume)
        return dice(volume > 0.5, lesion)

    extra = rg.widened_pairs(rec, c, true_dice, settings, cache, "t")
    # each target is scored from the volume its mask was cut from: the shifted MC mean for a
    # threshold mask (not the 0/1 mask), the mask itself for a dilation
    assert np.allclose(seen[0], c.mean + 0.25) and np.allclose(seen[1], c.mean - 0.25)
    assert np.array_equal(seen[2], extra["masks"][2].astype(np.float32))
    assert extra["names"] == ["threshold_0.25", "threshold_0.75", "dilate_1"]
    for name, mask, d in zip(extra["names"], extra["masks"], extra["dice"], strict=True):
        assert d == pytest.approx(dice(mask, lesion)), name
    assert extra["error"].shape == (3, *SHAPE)
    assert np.all(extra["error"][:, ~c.image.brain] == 0)
    # read back from the cache: no model needed
    again = rg.widened_pairs(None, c, lambda m: 1 / 0, settings, cache, "t")  # no rescoring
    assert np.allclose(again["error"], extra["error"], rtol=1e-2, atol=1e-3)


def test_every_target_maps_back_the_volume_its_mask_was_cut_from():
    """One rule for main and widened targets: the mask at level t is scored as the MC mean cut
    at t after mapping back, not as a 0/1 mask mapped back (which blurs differently)."""
    from wmhqc_lib.data.preprocess import map_to_native

    c = case_inputs("a", 0)
    meta = {"affine": np.diag([2.0, 2.0, 2.0, 1.0]), "native_affine": np.diag([1.3, 1.3, 1.3, 1]),
            "native_shape": [int(n * 2 / 1.3) for n in SHAPE]}
    for t in (0.2, 0.8):
        mask = c.mean > t
        volume = rg.target_volume(f"threshold_{t:g}", mask, c.mean)
        assert np.array_equal(volume > 0.5, mask)
        mapped = np.asarray(map_to_native(volume, meta).dataobj) > 0.5
        mean_cut = np.asarray(map_to_native(c.mean, meta).dataobj) > t
        assert (mapped != mean_cut).mean() < 1e-3  # the same mask on the native grid
        binary = np.asarray(map_to_native(mask.astype(np.float32), meta).dataobj) > 0.5
        assert (binary != mean_cut).sum() > (mapped != mean_cut).sum()
    dilated = rg.widened_masks(c.mean, c.prediction, dilate=1)["dilate_1"]
    assert np.array_equal(rg.target_volume("dilate_1", dilated, c.mean), dilated)


def _regression_sets(n_train=24, n_val=8):
    """Dice-like targets that a network can read off the input: the share of bright voxels."""
    rng = np.random.default_rng(0)

    def make(n, offset):
        frac = rng.uniform(0.05, 0.95, n)
        x = np.zeros((n, *SHAPE, 2), np.float32)
        for i, f in enumerate(frac):
            x[i, ..., 0] = rng.random(SHAPE) < f
            x[i, ..., 1] = rng.random(SHAPE) < 0.5
        return rg.RegressionSet(x, frac, [f"c{offset + i}" for i in range(n)])

    return make(n_train, 0), make(n_val, 100)


def test_short_regressor_training_lowers_the_loss_and_is_reused(tmp_path):
    train, val = _regression_sets()

    def build():
        return build_dice_regressor(SHAPE, 2, SECTION["filters"], 1)

    result = rg.fit_dice_regressor(build, train, val, tmp_path, dict(SECTION), seed=1,
                                   progress=False)
    h = result.history
    assert list(h.columns[:3]) == ["epoch", "loss", "val_huber"]
    assert h["loss"].iloc[-1] < h["loss"].iloc[0]
    assert result.state["best_val_huber"] == pytest.approx(h["val_huber"].min())
    assert (tmp_path / "best.keras").exists()
    pred = rg.predict_dice(result.model, val.x)
    assert pred.shape == (len(val.ids),)
    again = rg.fit_dice_regressor(build, train, val, tmp_path, dict(SECTION), seed=1,
                                  progress=False)
    assert again.skipped
    changed = rg.RegressionSet(train.x, train.y[::-1], train.ids)  # other targets: retrain key
    other = rg.fit_dice_regressor(build, changed, val, tmp_path / "o", dict(SECTION, epochs=1),
                                  seed=1, progress=False)
    assert not other.skipped


def test_pair_batches_are_seeded_and_resume_alike():
    train, _ = _regression_sets(10, 1)
    a = rg.PairDataset(train, 4, 3, seed=5)
    a.on_epoch_end()
    b = rg.PairDataset(train, 4, 3, seed=5, start_epoch=1)
    for i in range(3):
        xa, ya = a[i]
        xb, yb = b[i]
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert xa.shape == (4, *SHAPE, 2) and ya.shape == (4, 1)
    picked = np.concatenate([b[i][1][:, 0] for i in range(2)])[:8]
    assert len(set(picked.tolist())) == 8  # one epoch draws without replacement


def test_regression_metrics_and_side_by_side():
    true = np.array([0.1, 0.5, 0.9, 0.7, 0.3, 0.2])
    table = pd.DataFrame({"subject_id": list("abcdef"), "true_dice": true,
                          "split": ["test"] * 4 + ["val"] * 2})
    for k in rg.INPUT_KINDS:
        table[rg.column_name(k)] = true + 0.1
        table[rg.column_name(k, "widened")] = true[::-1]
    m = rg.regression_metrics(table, ["dr_image"], "test")
    assert m.loc[0, "mae"] == pytest.approx(0.1)
    assert m.loc[0, "pearson_r"] == pytest.approx(1.0)
    assert m.loc[0, "n"] == 4
    side = rg.metrics_side_by_side(table, "test")
    assert list(side.columns) == ["main mae", "main pearson_r", "widened mae",
                                  "widened pearson_r"]
    assert list(side.index) == [rg.INPUT_LABELS[k] for k in rg.INPUT_KINDS]


def test_input_sources_side_by_side_compares_in_sample_and_out_of_fold():
    """With compare_inputs the table holds the main source's columns and the other's suffixed
    ones; each source is scored on the same test rows, and the better ranking shows."""
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 1, 30)
    table = pd.DataFrame({"subject_id": [f"s{i}" for i in range(30)], "true_dice": true,
                          "split": ["test"] * 24 + ["val"] * 6})
    for k in rg.INPUT_KINDS:
        table[rg.column_name(k)] = 0.6 + 0.01 * rng.normal(size=30)  # nearly constant
        table[rg.column_name(k) + "_out_of_fold"] = true + 0.05 * rng.normal(size=30)
    side = rg.input_sources_side_by_side(table, quality_threshold=0.5)
    assert set(side["inputs"]) == {"in_sample", "out_of_fold"}
    assert set(side["variant"]) == {"main"} and (side["n"] == 24).all()
    best = side.loc[side.groupby("input pair")["aurc"].idxmin(), "inputs"]
    assert set(best) == {"out_of_fold"}
    assert (side.loc[side["inputs"] == "out_of_fold", "failure_auroc"] > 0.9).all()
    alone = rg.input_sources_side_by_side(table.drop(columns=[
        rg.column_name(k) + "_out_of_fold" for k in rg.INPUT_KINDS]), 0.5)
    assert set(alone["inputs"]) == {"in_sample"}
