"""Preprocessing: resampling keeps geometry and volume, orientation and grids are handled through
the affines, normalisation is per case, the cache skips and invalidates, bad cases are reported
without losing finished ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.image import resample_to_img

from wmhqc_lib.config import PreprocessSettings
from wmhqc_lib.data import datasets, preprocess
from wmhqc_lib.data.io import DataError

SETTINGS = PreprocessSettings(voxel_mm=(4.0, 4.0, 4.0), shape=(40, 44, 40),
                              clip_percentiles=(0.5, 99.5), crop_margin_mm=4.0, workers=1)
LESION_CENTRE = np.array([12.0, -10.0, 9.0])  # world mm
LESION_RADIUS = 11.0
# the same field of view on a 2 mm in-plane native grid (four times fewer voxels), for tests of
# bookkeeping (caching, independence of cases, failures) rather than of resampling
COARSE = {"voxel": (2.0, 2.0, 3.0), "shape": (70, 85, 40)}


def _world_grid(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    idx = np.indices(shape, dtype=float).reshape(3, -1).T
    return nib.affines.apply_affine(affine, idx).T.reshape((3, *shape))


def phantom(affine: np.ndarray, shape: tuple[int, int, int], seed: int = 0) -> dict:
    """An ellipsoid 'brain' with a spherical 'lesion', defined in world mm so any grid can
    sample the same object."""
    x, y, z = _world_grid(affine, shape)
    brain = (x / 65) ** 2 + (y / 80) ** 2 + (z / 55) ** 2 <= 1
    lesion = ((x - LESION_CENTRE[0]) ** 2 + (y - LESION_CENTRE[1]) ** 2
              + (z - LESION_CENTRE[2]) ** 2) <= LESION_RADIUS**2
    rng = np.random.default_rng(seed)
    smooth = 1 + 0.2 * np.sin(x / 9) * np.cos(y / 13)
    flair = np.where(brain, 500 * smooth, 0) + np.where(lesion, 400, 0)
    t1 = np.where(brain, 800 * smooth, 0) - np.where(lesion, 300, 0)
    flair = flair + rng.normal(0, 5, shape) * brain
    t1 = t1 + rng.normal(0, 5, shape) * brain
    return {"flair": flair.astype(np.float32), "t1": t1.astype(np.float32),
            "mask": lesion.astype(np.uint8), "brain": brain.astype(np.uint8)}


def affine_for(voxel, shape, flips=(1, 1, 1), perm=(0, 1, 2)) -> np.ndarray:
    """Voxel-to-world affine centred on the origin, with axis flips and a permutation."""
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    for i, (ax, sign) in enumerate(zip(perm, flips, strict=True)):
        aff[ax, i] = sign * voxel[i]
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    return aff


def write_case(folder: Path, sid: str, voxel=(1.0, 1.0, 3.0), shape=(140, 170, 40),
               flips=(1, 1, 1), perm=(0, 1, 2), t1_grid: tuple | None = None,
               other_label: bool = False, brain_given: bool = True) -> dict:
    """Write one phantom subject and return its manifest row."""
    folder.mkdir(parents=True, exist_ok=True)
    aff = affine_for(voxel, shape, flips, perm)
    ph = phantom(aff, shape)
    mask = ph["mask"].copy()
    if other_label:
        x, y, z = _world_grid(aff, shape)
        mask[((x + 25) ** 2 + (y - 20) ** 2 + z**2) <= 8**2] = 2
    paths = {k: folder / f"{k}.nii.gz" for k in ("flair", "t1", "mask", "brain")}
    nib.save(nib.Nifti1Image(ph["flair"], aff), paths["flair"])
    nib.save(nib.Nifti1Image(mask, aff), paths["mask"])
    nib.save(nib.Nifti1Image(ph["brain"], aff), paths["brain"])
    if t1_grid is None:
        nib.save(nib.Nifti1Image(ph["t1"], aff), paths["t1"])
    else:
        t1_voxel, t1_shape, t1_perm = t1_grid
        t1_aff = affine_for(t1_voxel, t1_shape, perm=t1_perm)
        t1_aff[:3, 3] += np.array([1.3, -0.7, 2.1])  # grids not aligned
        nib.save(nib.Nifti1Image(phantom(t1_aff, t1_shape)["t1"], t1_aff), paths["t1"])
    return {"subject_id": sid, "dataset": "test", "site": "phantom",
            "t1": str(paths["t1"]), "flair": str(paths["flair"]), "mask": str(paths["mask"]),
            "mask_rule": "single", "lesion_labels": "1",
            "ignore_labels": "2" if other_label else "", "allowed_labels": "0;1;2",
            "rater_masks": "", "brain_mask": str(paths["brain"]) if brain_given else "",
            "timepoint": ""}


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centre of mass in world mm (a partial-volume mask weighs each voxel by its fraction)."""
    mask = np.asarray(mask, dtype=float)
    idx = np.argwhere(mask > 0)
    return nib.affines.apply_affine(affine, np.average(idx, axis=0, weights=mask[mask > 0]))


@pytest.fixture(scope="module")
def base_case(tmp_path_factory):
    row = write_case(tmp_path_factory.mktemp("phantom"), "p0")
    return row, preprocess.preprocess_subject(row, SETTINGS)


def test_output_grid_shapes_and_affine(base_case):
    _, case = base_case
    assert case.image.shape == (2, *SETTINGS.shape)
    assert case.lesion.shape == case.brain.shape == case.ignore.shape == SETTINGS.shape
    assert np.allclose(np.diag(case.affine)[:3], SETTINGS.voxel_mm)
    assert np.allclose(case.affine[:3, :3], np.diag(SETTINGS.voxel_mm))  # RAS, no shear
    assert np.isfinite(case.image).all()


def test_resampling_preserves_volume_and_position(base_case):
    row, case = base_case
    native = nib.load(row["mask"])
    native_ml = float(np.asarray(native.dataobj).sum()) * 3.0 / 1000
    grid_ml = float(case.lesion.sum()) * 64.0 / 1000
    sphere_ml = 4 / 3 * np.pi * LESION_RADIUS**3 / 1000
    assert native_ml == pytest.approx(sphere_ml, rel=0.08)
    # partial volume carries the volume over (only sub-sampling rounding is lost)
    assert grid_ml == pytest.approx(native_ml, rel=0.01)
    assert case.meta["lesion_ml_grid"] == pytest.approx(grid_ml, rel=1e-5)
    assert case.lesion.dtype == np.float32 and 0 <= case.lesion.min() and case.lesion.max() <= 1
    assert case.meta["lesion_ml"] == pytest.approx(native_ml, rel=1e-6)
    # the lesion stays where it is in the world: centroid within one target voxel
    assert np.linalg.norm(centroid_mm(case.lesion, case.affine) - LESION_CENTRE) < 2.0
    # physical extent of the brain: 130 x 160 x 110 mm ellipsoid axes
    idx = np.argwhere(case.brain)
    extent = (idx.max(axis=0) - idx.min(axis=0) + 1) * 4.0
    assert np.allclose(extent, [130, 160, 110], atol=8.0)


def test_orientation_is_handled_through_the_affine(tmp_path, base_case):
    _, case = base_case
    flipped = write_case(tmp_path / "flip", "p1", voxel=(1.0, 3.0, 1.0), shape=(140, 40, 170),
                         flips=(-1, 1, -1), perm=(0, 2, 1))
    other = preprocess.preprocess_subject(flipped, SETTINGS)
    assert np.allclose(other.affine, case.affine, atol=1e-6)
    assert np.abs(other.lesion - case.lesion).sum() < 0.05 * case.lesion.sum()
    assert np.corrcoef(other.image[1].ravel(), case.image[1].ravel())[0, 1] > 0.98


def test_t1_on_another_grid_is_aligned_to_flair(tmp_path, base_case):
    row = write_case(tmp_path / "grids", "p2",
                     t1_grid=((2.0, 2.0, 2.0), (90, 75, 60), (1, 0, 2)))
    case = preprocess.preprocess_subject(row, SETTINGS)
    brain = case.brain > 0
    lesion_t1 = case.image[0][case.lesion >= 0.5].mean()
    assert lesion_t1 < case.image[0][brain & (case.lesion == 0)].mean() - 1.0
    # T1 tracks the same smooth pattern as FLAIR where both are lesion-free
    region = brain & (case.lesion == 0)
    r = np.corrcoef(case.image[0][region], case.image[1][region])[0, 1]
    assert r > 0.95


def test_normalisation_is_robust_and_inside_brain_only():
    rng = np.random.default_rng(1)
    data = rng.normal(100, 10, (20, 20, 20)).astype(np.float32)
    brain = np.zeros(data.shape, dtype=bool)
    brain[4:16, 4:16, 4:16] = True
    out = preprocess.normalise(data, brain, (0.5, 99.5))
    assert abs(out[brain].mean()) < 1e-4 and out[brain].std() == pytest.approx(1.0, rel=1e-3)
    assert np.all(out[~brain] == 0)
    spiked = data.copy()
    spiked[8, 8, 8] = 1e6  # one corrupt voxel must not squash everything else
    out2 = preprocess.normalise(spiked, brain, (0.5, 99.5))
    keep = brain.copy()
    keep[8, 8, 8] = False
    assert np.corrcoef(out[keep], out2[keep])[0, 1] > 0.999
    assert abs(out2[keep].std() - 1.0) < 0.1
    with pytest.raises(ValueError):
        preprocess.normalise(data, np.zeros_like(brain), (0.5, 99.5))


def test_cases_are_processed_independently(tmp_path):
    a = write_case(tmp_path / "a", "a", **COARSE)
    b = write_case(tmp_path / "b", "b", voxel=(2.0, 2.0, 2.0), shape=(70, 85, 60))
    # make b's intensities very different: it must not change a's result
    img = nib.load(b["flair"])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 50 + 1000, img.affine), b["flair"])
    preprocess.preprocess_cohort(pd.DataFrame([a]), tmp_path / "c1", SETTINGS, progress=False)
    preprocess.preprocess_cohort(pd.DataFrame([a, b]), tmp_path / "c2", SETTINGS,
                                 progress=False)
    one = preprocess.load_case(tmp_path / "c1", "a")
    two = preprocess.load_case(tmp_path / "c2", "a")
    assert np.array_equal(one.image, two.image)
    assert np.array_equal(one.lesion, two.lesion)


def test_ignore_region_is_kept_apart_from_lesion(tmp_path):
    row = write_case(tmp_path / "o", "o", other_label=True)
    case = preprocess.preprocess_subject(row, SETTINGS)
    assert case.ignore.sum() > 0
    assert np.all(case.ignore + case.lesion <= 1.0 + 1e-6)  # fractions of one voxel
    assert not np.any((case.ignore > 0) & (case.lesion > 0))  # the regions are far apart
    assert np.linalg.norm(centroid_mm(case.ignore, case.affine) - [-25, 20, 0]) < 4.0


def test_many_small_lesions_keep_their_volume_on_a_coarse_grid():
    """Sixty lesions of one to eight native voxels (most far smaller than one 5 mm voxel) on an
    oblique, anisotropic native grid: the partial-volume grid carries their volume within 2 %,
    where cutting a smoothed mask at 0.5 loses most of it."""
    from wmhqc_lib.data.synth import random_rotation

    rng = np.random.default_rng(7)
    shape = (80, 80, 30)
    native = np.eye(4)
    native[:3, :3] = random_rotation(rng, 12.0) @ np.diag([1.2, 1.2, 4.0])
    native[:3, 3] = -native[:3, :3] @ ((np.array(shape) - 1) / 2)
    mask = np.zeros(shape, bool)
    for centre in rng.integers([20, 20, 8], [60, 60, 22], size=(60, 3)):
        size = rng.integers(1, 3, size=3)
        mask[tuple(slice(c, c + n) for c, n in zip(centre, size, strict=True))] = True
    target = np.diag([5.0, 5.0, 5.0, 1.0])
    target[:3, 3] = -5.0 * (np.array([24, 24, 24]) - 1) / 2
    native_ml = mask.sum() * abs(np.linalg.det(native[:3, :3])) / 1000
    frac = preprocess.partial_volume(mask, native, target, (24, 24, 24))
    assert frac.sum() * 0.125 == pytest.approx(native_ml, rel=0.02)
    assert frac.max() < 1.0  # every lesion is smaller than a grid voxel ...
    cut = preprocess.resample_to_grid(nib.Nifti1Image(mask.astype(np.float32), native), target,
                                      (24, 24, 24), is_mask=True) >= 0.5
    assert cut.sum() * 0.125 < 0.5 * native_ml  # ... which the old 0.5 cut mostly lost


@pytest.mark.parametrize("perm, flips", [((0, 1, 2), (1, 1, 1)), ((1, 0, 2), (-1, 1, -1)),
                                          ((2, 0, 1), (1, -1, 1))])
@pytest.mark.parametrize("grid", [(20, 20, 20), (8, 8, 8)])  # the second cuts the brain
def test_axis_aligned_grids_take_the_per_axis_path_with_the_same_fractions(perm, flips, grid,
                                                                          monkeypatch):
    """Grids that differ by spacing, flips, axis order and shift are computed axis by axis;
    the same grids turned by a small angle (about 2e-6 rad) take the general per-point path.
    Both carry the same fractions of a brain-sized and of a sub-voxel mask, also where the
    target grid cuts the mask."""
    from wmhqc_lib.data.synth import random_rotation

    by_axis = preprocess._partial_volume_by_axis
    calls = []
    monkeypatch.setattr(preprocess, "_partial_volume_by_axis",
                        lambda *a: calls.append(1) or by_axis(*a))
    shape = (50, 44, 20)
    native = affine_for((1.1, 1.3, 3.5), shape, flips, perm)
    native[:3, 3] += [0.37, -1.21, 0.66]  # no sub-cube centre exactly on a voxel border
    target = affine_for((5.0, 5.0, 5.0), grid)
    turned = native.copy()
    turned[:3, :3] = random_rotation(np.random.default_rng(3), 1e-4) @ native[:3, :3]
    world = _world_grid(native, shape)
    brain = (world[0] / 25) ** 2 + (world[1] / 22) ** 2 + (world[2] / 30) ** 2 <= 1
    small = 0.6 * ((world - np.array([4.0, -3.0, 2.0])[:, None, None, None]) ** 2).sum(0) <= 4
    for mask in (brain, small):
        fast = preprocess.partial_volume(mask, native, target, grid)
        assert len(calls) == 1
        general = preprocess.partial_volume(mask, turned, target, grid)
        assert len(calls) == 1
        calls.clear()
        assert fast.sum() > 0
        np.testing.assert_allclose(fast, general, atol=1e-6)
    if grid == (8, 8, 8):  # the brain reaches past this grid: its border voxels are full
        assert preprocess.partial_volume(brain, native, target, grid)[0].max() == 1.0


def test_native_dice_of_a_perfect_prediction_survives_the_round_trip(tmp_path, base_case):
    """The partial-volume reference used as the prediction, mapped back to the native grid and
    cut at 0.5, scores Dice >= 0.93 against the native mask (the tolerance is what a 4 mm grid
    costs a sphere of radius 11 mm: its border moves by up to half a grid voxel); a shifted or
    empty prediction does not come close."""
    row, case = base_case
    save_case_dir = tmp_path / "cache"
    preprocess.save_case(case, save_case_dir)
    reference = preprocess.load_native_reference(save_case_dir, case.subject_id)
    truth = np.asarray(nib.as_closest_canonical(nib.load(row["mask"])).dataobj) > 0
    assert np.array_equal(reference.lesion, truth)
    assert preprocess.native_dice(case.lesion, case, reference) >= 0.93
    assert case.meta["roundtrip_dice"] == preprocess.native_dice(case.lesion, case, reference)
    shifted = np.roll(case.lesion, 3, axis=0)
    assert preprocess.native_dice(shifted, case, reference) < 0.6
    assert preprocess.native_dice(np.zeros_like(case.lesion), case, reference) == 0.0
    paper = preprocess.native_dice(case.lesion, case, reference, two_class=True)
    assert paper > preprocess.native_dice(case.lesion, case, reference)  # background Dice ~ 1


def test_empty_reference_is_scored_by_the_prediction(tmp_path):
    """A subject whose mask holds no lesion: flagged in the preprocessing table, Dice 1 with an
    empty prediction and 0 with any lesion predicted."""
    row = write_case(tmp_path / "e", "e")
    mask = nib.load(row["mask"])
    nib.save(nib.Nifti1Image(np.zeros(mask.shape, np.uint8), mask.affine), row["mask"])
    table = preprocess.preprocess_cohort(pd.DataFrame([row]), tmp_path / "c", SETTINGS,
                                         progress=False)
    assert bool(table.loc[0, "reference_empty"]) and table.loc[0, "lesion_ml"] == 0
    case = preprocess.load_case(tmp_path / "c", "e")
    reference = preprocess.load_native_reference(tmp_path / "c", "e")
    assert reference.empty and case.lesion.sum() == 0
    assert preprocess.native_dice(np.zeros(SETTINGS.shape), case, reference) == 1.0
    blob = np.zeros(SETTINGS.shape)
    blob[18:22, 20:24, 18:22] = 1.0
    assert preprocess.native_dice(blob, case, reference) == 0.0


def test_map_back_to_native_grid(base_case):
    row, case = base_case
    back = preprocess.map_to_native(case.lesion.astype(np.float32), case)
    native = nib.load(row["flair"])
    assert back.shape == native.shape
    assert np.allclose(back.affine, native.affine)
    pred = np.asarray(back.dataobj) > 0.5
    truth = np.asarray(nib.load(row["mask"]).dataobj) > 0
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.8


def test_brain_mask_computed_from_images_matches_the_given_one(smoke_manifest):
    rows = smoke_manifest[smoke_manifest["brain_mask"] != ""]
    dices = []
    for _, row in rows.iterrows():
        subject = datasets.load_subject(row)
        flair = nib.as_closest_canonical(subject.flair)
        t1 = resample_to_img(subject.t1, flair, interpolation="linear", force_resample=True,
                             copy_header=True)
        given = np.asarray(nib.as_closest_canonical(subject.brain_mask).dataobj) > 0
        computed = preprocess.compute_brain_mask(
            np.asarray(flair.dataobj, np.float32), np.asarray(t1.dataobj, np.float32),
            tuple(np.sqrt((flair.affine[:3, :3] ** 2).sum(axis=0))))
        dices.append(2 * (given & computed).sum() / (given.sum() + computed.sum()))
    assert len(dices) >= 4
    assert min(dices) > 0.85


def test_computed_brain_mask_excludes_scalp_on_synthetic_miccai(smoke_manifest):
    row = smoke_manifest[smoke_manifest["dataset"] == "miccai17"].iloc[0]
    case = preprocess.preprocess_subject(row, dataclasses.replace(SETTINGS, shape=(48, 56, 48)))
    assert case.meta["brain_mask_source"] == "computed"
    # a brain of 1.1 to 2.2 litres, not a head with its scalp
    assert 1100 < case.meta["brain_ml"] < 2300


def test_cache_skips_finished_and_redoes_changed_cases(tmp_path):
    rows = [write_case(tmp_path / s, s, **COARSE) for s in ("s1", "s2")]
    cache = tmp_path / "cache"
    first = preprocess.preprocess_cohort(pd.DataFrame(rows), cache, SETTINGS, progress=False)
    assert list(first["status"]) == ["computed", "computed"]
    second = preprocess.preprocess_cohort(pd.DataFrame(rows), cache, SETTINGS, progress=False)
    assert list(second["status"]) == ["cached", "cached"]
    img = nib.load(rows[1]["flair"])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 2, img.affine), rows[1]["flair"])
    third = preprocess.preprocess_cohort(pd.DataFrame(rows), cache, SETTINGS, progress=False)
    assert list(third["status"]) == ["cached", "computed"]
    other = dataclasses.replace(SETTINGS, voxel_mm=(5.0, 5.0, 5.0))
    fourth = preprocess.preprocess_cohort(pd.DataFrame(rows), cache, other, progress=False)
    assert list(fourth["status"]) == ["computed", "computed"]


def test_bad_case_is_reported_and_the_others_are_kept(tmp_path):
    good = write_case(tmp_path / "good", "good", **COARSE)
    bad = write_case(tmp_path / "bad", "bad", **COARSE)
    Path(bad["t1"]).write_bytes(Path(bad["t1"]).read_bytes()[:200])  # truncated download
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        preprocess.preprocess_cohort(pd.DataFrame([good, bad]), cache, SETTINGS, progress=False)
    assert bad["t1"] in str(err.value) and "1 of 2 cases failed" in str(err.value)
    assert preprocess.load_case(cache, "good").image.shape[0] == 2
    table = preprocess.preprocess_cohort(pd.DataFrame([good, bad]), cache, SETTINGS,
                                         progress=False, skip_bad=True)
    status = dict(zip(table["subject_id"], table["status"], strict=True))
    assert status == {"good": "cached", "bad": "failed"}


def test_missing_cached_case_names_the_folder(tmp_path):
    with pytest.raises(DataError, match="preprocessed case missing"):
        preprocess.load_case(tmp_path, "nobody")


def test_a_new_scan_is_preprocessed_exactly_as_the_study_cases(tmp_path):
    """Triage reads no annotation, yet its input must be the study's input, bit for bit."""
    row = write_case(tmp_path, "p5", flips=(-1, 1, 1), brain_given=False, **COARSE)
    study = preprocess.preprocess_subject(row, SETTINGS)
    scan = preprocess.preprocess_scan("p5", row["flair"], row["t1"], SETTINGS)
    assert np.array_equal(scan.image, study.image)
    assert np.array_equal(scan.brain, study.brain)
    assert np.array_equal(scan.affine, study.affine)
    assert scan.meta["image_features"] == study.meta["image_features"]
    assert scan.meta["native_affine"] == study.meta["native_affine"]
    assert not scan.lesion.any() and scan.native is None
    with pytest.raises(DataError, match="file not found"):
        preprocess.preprocess_scan("p5", tmp_path / "nothing.nii.gz", row["t1"], SETTINGS)


def test_image_features_tell_noise_and_shear_from_anatomy(base_case):
    row, case = base_case
    feats = case.meta["image_features"]
    assert set(feats) == set(preprocess.IMAGE_FEATURES)
    assert feats["flair_smoothness"] > 0.5 and feats["axis_skew_deg"] < 1e-6
    flair = nib.load(row["flair"])
    brain = np.asarray(nib.load(row["brain_mask"]).dataobj) > 0
    noise = np.random.default_rng(0).normal(100, 30, flair.shape)
    noisy = preprocess.image_features(noise, noise[::-1], brain, flair.affine)
    assert abs(noisy["flair_smoothness"]) < 0.1 and abs(noisy["flair_t1_correlation"]) < 0.1
    sheared = flair.affine.copy()
    sheared[0, 1] = 0.2 * sheared[1, 1]
    skew = preprocess.image_features(np.asarray(flair.dataobj, float), noise, brain, sheared)
    assert skew["axis_skew_deg"] > 5
