"""MC-dropout U-net, losses, overlap metrics, uncertainty maps and scores, training behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wmhqc_lib.config import load_profile
from wmhqc_lib.data.preprocess import NativeReference, PreprocessedCase
from wmhqc_lib.nets.models import (
    ChannelPReLU,
    InstanceNormalization,
    MCDropout,
    UNetConfig,
    build_mc_unet,
    conv_flops,
)
from wmhqc_lib.qc import metrics, uncertainty

keras = pytest.importorskip("keras")

SMOKE = load_profile("smoke").section("mc_unet")
CFG = UNetConfig.from_section(SMOKE)
SHAPE = (16, 16, 16)


def phantom_case(sid: str, seed: int, shape=SHAPE) -> PreprocessedCase:
    """A preprocessed-like case: noisy background and a bright blob that is the lesion."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape)
    centre = rng.uniform(5, 11, size=3)
    lesion = (((idx - centre[:, None, None, None]) ** 2).sum(0) <= rng.uniform(4, 9)) \
        .astype(np.uint8)
    flair = rng.normal(0, 0.3, shape) + 2.5 * lesion
    t1 = rng.normal(0, 0.3, shape) - 1.5 * lesion
    image = np.stack([t1, flair]).astype(np.float32)
    # the native grid is the profile grid here, so native and grid Dice agree
    meta = {"affine": np.eye(4).tolist(), "native_affine": np.eye(4).tolist(),
            "native_shape": list(shape), "lesion_ml": float(lesion.sum()) * 0.125}
    return PreprocessedCase(sid, image, lesion, np.zeros(shape, np.uint8),
                            np.ones(shape, np.uint8), np.eye(4), meta,
                            native=NativeReference(lesion > 0, np.zeros(shape, bool), np.eye(4)))


def references(cases):
    """``reference(subject_id)`` for run_mc_inference, from the cases' own native masks."""
    by_id = {c.subject_id: c.native for c in cases}
    return by_id.__getitem__


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_mc_unet(None, CFG)


def test_model_builds_for_the_smoke_profile(model):
    out = model.predict(np.zeros((1, *SHAPE, 2), np.float32), verbose=0)
    assert out.shape == (1, *SHAPE, 1)
    assert np.all((out >= 0) & (out <= 1))
    assert sum(isinstance(layer, MCDropout) for layer in model.layers) == \
        1 + 2 * len(CFG.encoder_filters)
    assert conv_flops(model, SHAPE) > 0


@pytest.mark.parametrize("sizes, problem", [({"encoder_filters": ()}, "at least one level"),
                                             ({"encoder_filters": (8, 16), "heads": 3},
                                              "heads = 3 must be between 1 and the number of "
                                              "encoder levels (2"),
                                             ({"heads": 0}, "heads = 0")])
def test_unet_sizes_that_cannot_build_are_named(sizes, problem):
    """More heads than decoder scales built a network whose output was twice the input size,
    found only by the loss; now the configuration says what is wrong."""
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        UNetConfig(**sizes)


def test_mc_passes_differ_also_under_predict(model):
    x = phantom_case("a", 0).image
    samples = uncertainty.mc_samples(model, x, 4, 2)
    assert samples.shape == (4, *SHAPE)
    assert not np.allclose(samples[0], samples[1])
    again = model.predict(np.moveaxis(x, 0, -1)[None], verbose=0)
    assert not np.allclose(again[0, ..., 0], samples[0])


def test_normalisation_has_no_training_mode_to_leak():
    """Instance normalisation keeps no running
    statistics: the same dropout-free network gives the same output in both modes."""
    keras.utils.set_random_seed(1)
    det = build_mc_unet(None, UNetConfig(base_filters=4, encoder_filters=(8, 16, 32), dropout=0))
    x = np.moveaxis(phantom_case("a", 0).image, 0, -1)[None]
    a = np.asarray(det(x, training=False))
    b = np.asarray(det(x, training=True))
    assert np.allclose(a, b, atol=1e-5)
    assert not any(getattr(w, "trainable", True) is False for w in det.weights)


def test_fast_normalisation_and_prelu_match_keras_layers():
    """The one-pass instance norm and two-pass PReLU compute what Keras' own layers compute,
    also on inputs far from zero mean (where a one-pass variance could lose precision)."""
    rng = np.random.default_rng(3)
    x = (rng.normal(0, 0.5, (2, 6, 5, 4, 3)) + [[[[[4.0, -7.0, 0.1]]]]]).astype(np.float32)
    ours, ref = InstanceNormalization(), keras.layers.GroupNormalization(groups=-1, epsilon=1e-5)
    ours.build(x.shape)
    ref.build(x.shape)
    gamma, beta = rng.normal(1, 0.2, 3), rng.normal(0, 0.2, 3)
    ours.set_weights([gamma, beta])
    ref.set_weights([gamma, beta])
    assert np.allclose(np.asarray(ours(x)), np.asarray(ref(x)), atol=2e-4)
    act, ref_act = ChannelPReLU(), keras.layers.PReLU(shared_axes=[1, 2, 3])
    act.build(x.shape)
    ref_act.build(x.shape)
    alpha = rng.uniform(0, 0.5, (1, 1, 1, 3))
    act.set_weights([alpha])
    ref_act.set_weights([alpha])
    assert np.allclose(np.asarray(act(x)), np.asarray(ref_act(x)), atol=1e-6)


def test_prelu_slope_is_capped_at_one():
    """max(x, a * x) is PReLU only for slopes up to 1; larger learned slopes act as 1."""
    x = np.linspace(-2, 2, 9, dtype=np.float32).reshape(1, 1, 1, 9, 1)
    act = ChannelPReLU()
    act.build(x.shape)
    act.set_weights([np.full((1, 1, 1, 1), 1.5, np.float32)])
    assert np.allclose(np.asarray(act(x)), x)
    act.set_weights([np.full((1, 1, 1, 1), -0.5, np.float32)])  # negative slopes are exact
    assert np.allclose(np.asarray(act(x)), np.where(x > 0, x, -0.5 * x))


def test_mc_dropout_mask_rate_independence_and_scale():
    """The 16-bit mask keeps 80% of voxels, each channel alike, the two channels that share a
    32-bit random word independently, and scales kept values by 1 / (1 - p)."""
    layer = MCDropout(0.2, seed=7)
    x = np.ones((4, 16, 16, 16, 8), np.float32)
    y = np.asarray(layer(x))
    assert set(np.unique(y)) == {0.0, 1.25}
    kept = y > 0
    assert kept.mean() == pytest.approx(0.8, abs=0.005)
    assert np.abs(kept.reshape(-1, 8).mean(0) - 0.8).max() < 0.01
    pairs = kept.reshape(-1, 4, 2)  # channels 2c and 2c + 1 come from one random word
    corr = np.corrcoef(pairs[..., 0].ravel(), pairs[..., 1].ravel())[0, 1]
    assert abs(corr) < 0.01
    assert (np.asarray(layer(x)) != y).mean() > 0.2  # a new mask on every call
    odd = np.asarray(MCDropout(0.2, seed=7)(np.ones((4, 16, 16, 16, 3), np.float32)))
    assert (odd > 0).mean() == pytest.approx(0.8, abs=0.01)  # Keras' own mask


def test_sampler_runs_the_deterministic_stem_once_and_draws_the_same_samples(model):
    """The sampler repeats the stem's output instead of recomputing it, and with the same
    random state it returns the very samples of the model on stacked copies."""
    x = np.moveaxis(phantom_case("a", 0).image, 0, -1)[None]
    sampler = uncertainty.mc_sampler(model, 6)
    stem = 2 * 27 * 2 * CFG.base_filters * np.prod(SHAPE)  # the first 3^3 convolution
    assert conv_flops(sampler, SHAPE) == pytest.approx(6 * conv_flops(model, SHAPE) - 5 * stem)
    drops = [layer for layer in model.layers if isinstance(layer, MCDropout)]
    state = [np.asarray(d.seed_generator.state.value) for d in drops]
    stacked = np.asarray(model.predict_on_batch(np.repeat(x, 6, axis=0)))
    for d, st in zip(drops, state, strict=True):
        d.seed_generator.state.assign(st)
    sampled = np.asarray(sampler.predict_on_batch(x))
    assert sampled.shape == stacked.shape
    assert not np.allclose(sampled[0], sampled[1])
    assert np.allclose(sampled, stacked, atol=1e-5)


def test_samples_are_drawn_in_chunks_of_at_most_batch():
    assert uncertainty.sample_chunks(20, 20) == [20]
    assert uncertainty.sample_chunks(20, 4) == [4] * 5
    assert uncertainty.sample_chunks(5, 2) == [2, 2, 1]


def test_sample_mean_is_stable(model):
    x = phantom_case("a", 0).image
    a = uncertainty.mc_samples(model, x, 60, 30).mean(axis=0)
    b = uncertainty.mc_samples(model, x, 60, 30).mean(axis=0)
    single = uncertainty.mc_samples(model, x, 2, 2)
    spread_one = np.abs(single[0] - single[1]).mean()
    assert np.abs(a - b).mean() < spread_one / 3


def test_entropy_mutual_information_and_pairwise_dice():
    assert uncertainty.binary_entropy(np.array([0.5]))[0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(uncertainty.binary_entropy(np.array([0.0, 1.0])) < 1e-5)
    assert uncertainty.binary_entropy(np.array([0.1]))[0] == pytest.approx(0.4690, abs=1e-3)
    rng = np.random.default_rng(0)
    samples = rng.random((8, 6, 6, 6)).astype(np.float32)
    maps = uncertainty.uncertainty_maps(samples)
    assert np.all(maps.mutual_information >= 0)
    assert np.allclose(maps.mean, samples.mean(0))
    same = uncertainty.uncertainty_maps(np.repeat(samples[:1], 5, axis=0))
    assert np.allclose(same.mutual_information, 0, atol=1e-5)  # no disagreement, no MI
    masks = np.zeros((3, 4, 4, 4), bool)
    masks[:, :2] = True
    assert metrics.pairwise_dice(masks) == 1.0
    masks[2] = False
    masks[2, 0] = True  # half of the others' volume
    # pairs: (0,1) = 1, (0,2) = (1,2) = 2*16/(32+16)
    assert metrics.pairwise_dice(masks) == pytest.approx((1 + 2 * (32 / 48)) / 3)
    assert metrics.pairwise_dice(np.zeros((4, 3, 3, 3), bool)) == 1.0


def test_dice_conventions_and_ignore():
    t = np.zeros((4, 4, 4), bool)
    t[:2] = True
    p = np.zeros_like(t)
    p[1:3] = True
    assert metrics.dice(p, t) == pytest.approx(0.5)
    assert metrics.dice(np.zeros_like(t), np.zeros_like(t)) == 1.0
    assert metrics.dice(p, np.zeros_like(t)) == 0.0
    ignore = np.zeros_like(t)
    ignore[2] = True  # the false-positive slab is ignored
    assert metrics.dice(p, t, ignore) == pytest.approx(2 * 16 / (16 + 32))
    paper = metrics.two_class_dice(p, t)
    assert paper == pytest.approx((0.5 + 0.5) / 2)  # fg 0.5, bg 2*16/(32+32) = 0.5


def test_dice_with_a_partial_volume_reference_and_the_empty_reference_rule():
    """A fractional reference counts by its fractions (binary references unchanged); an empty
    reference scores 1 only with an empty prediction."""
    frac = np.zeros((4, 4, 4), np.float32)
    frac[0] = 1.0
    frac[1] = 0.25
    p = np.zeros(frac.shape, bool)
    p[0] = True
    # overlap 16, prediction 16, reference 16 + 4
    assert metrics.dice(p, frac) == pytest.approx(2 * 16 / (16 + 20))
    assert metrics.dice(p, frac > 0.5) == metrics.dice(p, (frac > 0.5).astype(np.uint8)) == 1.0
    ignore = np.zeros(frac.shape, np.float32)
    ignore[1] = 0.6  # mostly ignored: out of both masks
    assert metrics.dice(p, frac, ignore) == pytest.approx(1.0)
    ignore[1] = 0.4  # mostly not ignored: counts
    assert metrics.dice(p, frac, ignore) == pytest.approx(2 * 16 / (16 + 20))
    empty = np.zeros_like(frac)
    assert metrics.dice(np.zeros_like(p), empty) == 1.0
    assert metrics.dice(p, empty) == 0.0


def test_qc_scores_never_read_the_annotation(tmp_path):
    """Rewrite a case's annotation (lesion, label-2 ignore, native reference): every QC column
    of MC inference and the Dice regressor's prediction from the saved maps stay bit-identical,
    while true Dice changes."""
    from wmhqc_lib.nets.models import build_dice_regressor
    from wmhqc_lib.qc import regression
    from wmhqc_lib.qc.reconstruction import QCImage

    case = phantom_case("a", 3)
    other = np.zeros(SHAPE, np.uint8)
    other[2:6, 2:6, 2:6] = 1  # another lesion ...
    label2 = np.zeros(SHAPE, np.float32)
    label2[9:14, 9:14, 9:14] = 1.0  # ... and a label-2 region where the blob is
    altered = PreprocessedCase(
        "a", case.image, other, label2, case.brain, case.affine,
        dict(case.meta, lesion_ml=float(other.sum()) * 0.125),
        native=NativeReference(other > 0, label2 > 0, np.eye(4)))
    tables, inputs = [], []
    for k, c in enumerate((case, altered)):
        keras.utils.set_random_seed(0)  # the same weights and dropout streams for both runs
        net = build_mc_unet(None, CFG)
        out = tmp_path / f"run{k}"
        tables.append(uncertainty.run_mc_inference(net, [c], {"a": "test"}, out, n_samples=6,
                                                   batch=3, voxel_ml=0.125, fold=1,
                                                   reference=references([c]), progress=False))
        maps = uncertainty.load_maps(out / "maps" / "a.npz")
        image = QCImage.from_arrays("a", c.image[1], c.brain)
        inputs.append(regression.CaseInputs("a", image, maps["prediction"] > 0, maps["mean"],
                                            maps["entropy"], np.zeros(SHAPE, np.float32)))
    columns = list(uncertainty.QC_COLUMNS)
    assert tables[0][columns].equals(tables[1][columns])
    assert tables[0]["true_dice"].iloc[0] != tables[1]["true_dice"].iloc[0]
    keras.utils.set_random_seed(1)
    regressor = build_dice_regressor(SHAPE, 2, (4, 4, 4, 4))
    for kind in regression.INPUT_KINDS:
        x = [np.stack([i.pair(kind)]) for i in inputs]
        assert np.array_equal(regression.predict_dice(regressor, x[0]),
                              regression.predict_dice(regressor, x[1])), kind


def _target(lesion, ignore):
    return np.stack([lesion, ignore], axis=-1)[None].astype(np.float32)


def test_losses_on_hand_made_inputs():
    from wmhqc_lib.nets.training import make_loss, soft_dice_loss, weighted_bce

    lesion = np.zeros((4, 4, 4), np.float32)
    lesion[:2] = 1
    ignore = np.zeros_like(lesion)
    y = _target(lesion, ignore)
    perfect = lesion[None, ..., None]
    assert float(soft_dice_loss(y, perfect)) == pytest.approx(0.0, abs=1e-5)
    assert float(soft_dice_loss(y, 1 - perfect)) == pytest.approx(1.0, abs=1e-5)
    half = np.full_like(perfect, 0.5)
    # soft Dice = 2 * 0.5*32 / (0.5*64 + 32) = 0.5
    assert float(soft_dice_loss(y, half)) == pytest.approx(0.5, abs=1e-4)
    assert float(weighted_bce(y, half)) == pytest.approx(np.log(2), abs=1e-4)
    assert float(make_loss("dice_bce")(y, half)) == pytest.approx(0.5 + np.log(2), abs=1e-4)
    with pytest.raises(ValueError):
        make_loss("hinge")


def test_ignored_voxels_change_neither_loss_nor_dice():
    from wmhqc_lib.nets.training import make_loss

    lesion = np.zeros((6, 6, 6), np.float32)
    lesion[:2] = 1
    ignore = np.zeros_like(lesion)
    ignore[4:] = 1
    rng = np.random.default_rng(0)
    pred = rng.random(lesion.shape).astype(np.float32)
    other = pred.copy()
    other[4:] = rng.random(other[4:].shape)  # change only ignored voxels
    for name in ("dice_bce", "dice", "paper_two_class_dice"):
        loss = make_loss(name)
        a = float(loss(_target(lesion, ignore), pred[None, ..., None]))
        b = float(loss(_target(lesion, ignore), other[None, ..., None]))
        assert a == pytest.approx(b, abs=1e-6), name
    assert metrics.dice(pred > 0.5, lesion, ignore) == metrics.dice(other > 0.5, lesion, ignore)


# two levels instead of the smoke profile's three: the training tests are about the loop
# (loss, checkpoints, reuse, resuming), and the smaller graph traces a third faster
LOOP_CFG = UNetConfig(base_filters=4, encoder_filters=(8, 16), heads=2)


def _train(folder: Path, seed: int, epochs: int = 1, steps: int = 6, eager: bool = False):
    from wmhqc_lib.nets.training import fit_segmenter

    section = dict(SMOKE, epochs=epochs, steps_per_epoch=steps, patience=10,
                   learning_rate=0.01, run_eagerly=eager)
    train = [phantom_case(f"t{i}", i) for i in range(4)]
    val = [phantom_case("v0", 10)]
    return fit_segmenter(lambda: build_mc_unet(None, LOOP_CFG), train, val, folder, section,
                         seed, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Short runs shared by the training tests: two with one seed on the traced graph (as the
    cpu and paper profiles train), two with another seed run eagerly (as smoke)."""
    from wmhqc_lib.nets import training

    root = tmp_path_factory.mktemp("runs")
    compile_for_training, eager = training.compile_for_training, []

    def spy(model, *args):  # what each run's model was compiled for
        compile_for_training(model, *args)
        eager.append(model.run_eagerly)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "compile_for_training", spy)
        runs = {"a": _train(root / "a", seed=5, epochs=3),
                "b": _train(root / "b", seed=5, epochs=3),
                "c": _train(root / "c", seed=6, epochs=1, eager=True),
                "d": _train(root / "d", seed=6, epochs=1, eager=True)}
    assert eager == [False, False, True, True]  # the section's run_eagerly reached Keras
    return root, runs


def test_short_training_lowers_the_loss(runs):
    root, trained = runs
    losses = trained["a"].history["loss"].to_numpy()
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    assert (root / "a" / "best.keras").exists()
    assert (root / "a" / "history.csv").exists()


def test_same_seed_same_weights_and_finished_runs_are_reused(runs):
    root, trained = runs
    a, b, c = trained["a"], trained["b"], trained["c"]
    for first, second in ((a, b), (c, trained["d"])):  # graph, eager
        for wa, wb in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
            assert np.array_equal(wa, wb)
    assert a.history.drop(columns="seconds").equals(b.history.drop(columns="seconds"))
    assert any(not np.array_equal(wa, wc) for wa, wc in
               zip(a.model.get_weights(), c.model.get_weights(), strict=True))
    again = _train(root / "a", seed=5, epochs=3)
    assert again.skipped and again.history.equals(a.history)


def test_interrupted_training_resumes(runs):
    """A run killed after epoch 1 of 3 picks up at epoch 2 from its last checkpoint."""
    import json

    from wmhqc_lib.nets.training import fit_segmenter

    root, _ = runs
    folder = root / "c"  # one finished epoch; pretend it was meant to run three
    state = json.loads((folder / "state.json").read_text())
    key = json.loads(state["key"])
    section = dict(key["section"], epochs=3)
    # the plateau schedule had lowered the rate before the interruption: the resumed run
    # must go on at that rate, not at the section's starting one
    state.update(done=False, key=json.dumps(dict(key, section=section), sort_keys=True,
                                            default=str), learning_rate=0.0025)
    (folder / "state.json").write_text(json.dumps(state))
    train = [phantom_case(f"t{i}", i) for i in range(4)]
    result = fit_segmenter(lambda: build_mc_unet(None, LOOP_CFG), train,
                           [phantom_case("v0", 10)], folder, section, 6, progress=False)
    assert result.resumed and not result.skipped
    assert list(result.history["epoch"]) == [1, 2, 3]
    assert result.history["learning_rate"].iloc[0] == pytest.approx(0.01)
    assert result.history["learning_rate"].iloc[1] == pytest.approx(0.0025)


def test_mc_inference_writes_maps_and_resumes(tmp_path, model):
    cases = [phantom_case("a", 0), phantom_case("b", 1)]
    table = uncertainty.run_mc_inference(model, cases, {"a": "test", "b": "train"}, tmp_path,
                                         n_samples=4, batch=2, voxel_ml=0.125, fold=1,
                                         reference=references(cases), progress=False)
    assert list(table["split"]) == ["test", "train"]
    expected = {"true_dice", "true_dice_paper", "true_dice_grid", "reference_empty",
                "uncertainty_vs", "mean_entropy_lesion", "pairwise_dice", "pred_lesion_ml",
                "true_lesion_ml"}
    assert expected <= set(table.columns)
    assert table["true_lesion_ml"].iloc[0] == pytest.approx(cases[0].lesion.sum() * 0.125)
    maps = uncertainty.load_maps(tmp_path / "maps" / "a.npz")
    assert set(maps) >= {"mean", "prediction", "entropy", "mutual_information", "variance"}
    # the VS is the plain per-case sum of the saved entropy map (float16 rounding aside)
    assert table["uncertainty_vs"].iloc[0] == pytest.approx(maps["entropy"].sum(), rel=1e-2)
    mtime = (tmp_path / "maps" / "a.npz").stat().st_mtime_ns
    again = uncertainty.run_mc_inference(model, cases, {"a": "test", "b": "train"}, tmp_path,
                                         n_samples=4, batch=2, voxel_ml=0.125, fold=1,
                                         reference=references(cases), progress=False)
    assert (tmp_path / "maps" / "a.npz").stat().st_mtime_ns == mtime
    assert again.equals(table)
    retrained = uncertainty.run_mc_inference(model, cases, {"a": "test", "b": "train"},
                                             tmp_path, n_samples=4, batch=2, voxel_ml=0.125,
                                             fold=1, reference=references(cases),
                                             progress=False, model_key="another model")
    assert not retrained.equals(table)  # a new model's samples are drawn, not read back


def test_mc_samples_of_a_case_do_not_depend_on_what_ran_before(tmp_path, model):
    """Each case's dropout stream is seeded by its identity: order and company do not matter,
    so the same run twice gives the same numbers."""
    cases = [phantom_case("a", 0), phantom_case("b", 1)]
    kwargs = {"n_samples": 4, "batch": 2, "voxel_ml": 0.125, "fold": 1, "progress": False,
              "reference": references(cases)}
    first = uncertainty.run_mc_inference(model, cases, {"a": "test", "b": "train"},
                                         tmp_path / "ab", **kwargs)
    uncertainty.mc_samples(model, cases[1].image, 3, 3)  # move the random state on
    second = uncertainty.run_mc_inference(model, cases[::-1], {"a": "test", "b": "train"},
                                          tmp_path / "ba", **kwargs)
    for sid in ("a", "b"):
        one = uncertainty.load_maps(tmp_path / "ab" / "maps" / f"{sid}.npz")
        two = uncertainty.load_maps(tmp_path / "ba" / "maps" / f"{sid}.npz")
        assert np.array_equal(one["mean"], two["mean"]), sid
    assert first.set_index("subject_id")["pairwise_dice"].to_dict() == \
        second.set_index("subject_id")["pairwise_dice"].to_dict()


def test_checkpoints_are_scored_with_dropout_off(model):
    """Validation scores an MC model deterministically (dropout skipped, weights shared), so a
    checkpoint is not chosen by the luck of one stochastic pass."""
    from wmhqc_lib.nets.training import deterministic, predict_volume, validation_dice

    cases = [phantom_case("v0", 20), phantom_case("v1", 21)]
    net = deterministic(model)
    assert net is deterministic(model)  # traced once per model
    first = predict_volume(net, cases[0])
    assert np.array_equal(first, predict_volume(net, cases[0]))
    assert not np.array_equal(predict_volume(model, cases[0]), predict_volume(model, cases[0]))
    assert validation_dice(model, cases) == validation_dice(model, cases)
    # the deterministic pass is the mean over dropout masks to first order: close to MC mean
    mc = uncertainty.mc_samples(model, cases[0].image, 40, 20).mean(axis=0)
    assert np.abs(first - mc).mean() < np.abs(predict_volume(model, cases[0]) - mc).mean()
    # weights are shared: changing the model's weights changes the deterministic pass
    weights = model.get_weights()
    model.set_weights([w * 0.5 for w in weights])
    try:
        assert not np.array_equal(first, predict_volume(net, cases[0]))
    finally:
        model.set_weights(weights)


def test_a_saved_model_is_identified_by_its_weights_not_its_file(tmp_path):
    """The same weights saved twice give two different files (save time, object ids) but one
    weights digest, which seeds the MC samples: two runs that train the same weights draw the
    same samples. Other weights give another digest."""
    from wmhqc_lib.study.steps import file_digest, weights_digest

    model = build_mc_unet(None, UNetConfig(base_filters=2, encoder_filters=(4,), heads=1))
    model.save(tmp_path / "a.keras")
    again = keras.models.load_model(tmp_path / "a.keras", compile=False)
    again.save(tmp_path / "b.keras")
    assert file_digest(tmp_path / "a.keras") != file_digest(tmp_path / "b.keras")
    assert weights_digest(tmp_path / "a.keras") == weights_digest(tmp_path / "b.keras")
    kernel = again.layers[1].kernel
    kernel.assign(kernel.numpy() + 1e-3)
    again.save(tmp_path / "c.keras")
    assert weights_digest(tmp_path / "c.keras") != weights_digest(tmp_path / "a.keras")


def test_plateau_schedule_lowers_the_rate_then_waits():
    from wmhqc_lib.nets.training import LearningRateSchedule

    assert LearningRateSchedule.from_section({"lr_patience": 0}) is None
    schedule = LearningRateSchedule.from_section({"lr_patience": 2, "lr_factor": 0.5,
                                                  "min_lr": 0.001})
    state = {"best_epoch": 1}
    rates, lr = [], 0.008
    for epoch in range(1, 9):  # no new best after epoch 1
        lr = schedule.after_epoch(state, epoch, lr)
        rates.append(lr)
    # halved two epochs after the best, then two epochs after each change, floored at min_lr
    assert rates == [0.008, 0.008, 0.004, 0.004, 0.002, 0.002, 0.001, 0.001]
    state = {"best_epoch": 5, "lr_changed": 3}  # a new best resets the wait
    assert schedule.after_epoch(state, 6, 0.004) == 0.004
    assert schedule.after_epoch(state, 7, 0.004) == 0.002


def test_stopping_summary_tells_plateau_from_cap():
    from wmhqc_lib.nets.training import stopping_summary

    history = [{"epoch": e, "learning_rate": lr} for e, lr in
               enumerate([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4], start=1)]
    section = {"epochs": 5, "patience": 3}
    early = stopping_summary({"history": history, "epochs_run": 5, "best_epoch": 2,
                              "stopped_early": True}, section)
    assert "early stopping" in early and "epochs 2, 4" in early
    capped = stopping_summary({"history": history, "epochs_run": 5, "best_epoch": 5}, section)
    assert "epoch cap" in capped and "still have been improving" in capped


def test_batched_validation_matches_one_volume_at_a_time():
    from wmhqc_lib.nets.training import deterministic, predict_volume, predict_volumes

    net = deterministic(build_mc_unet(None, LOOP_CFG))
    cases = [phantom_case(f"p{i}", i) for i in range(3)]
    batched = predict_volumes(net, cases, batch=2)
    for case, volume in zip(cases, batched, strict=True):
        np.testing.assert_allclose(volume, predict_volume(net, case), atol=1e-5)
