"""Triage's scoring and verdict on stub fold models (no network is trained or loaded): the
scores are computed on the delivered mask, the vote of 2 and of 3 folds, an empty segmentation,
the predicted Dice kept in [0, 1], per-scan errors, exit codes and truth with other pathology.

The MC step of each fold (:func:`triage._fold_mc`) is replaced by fixed samples; the fold's
reconstruction net and Dice regressors are stubs that record what they were given."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from wmhqc_lib.data.preprocess import CHANNELS
from wmhqc_lib.deploy import triage
from wmhqc_lib.deploy.bundle import Bundle
from wmhqc_lib.qc.reconstruction import FLAIR, QCImage, zero_region
from wmhqc_lib.qc.uncertainty import qc_scores, uncertainty_maps

GRID = (8, 8, 8)
VOXEL_MM = (2.0, 2.0, 2.0)
VOX_ML = 8.0 / 1000.0


class StubRec:
    """A reconstruction net that gives its input back, and keeps what it was given."""

    def __init__(self):
        self.inputs: list[np.ndarray] = []

    def predict_on_batch(self, x):
        self.inputs.append(np.asarray(x)[..., 0].copy())
        return np.asarray(x)


class StubDR:
    """A Dice regressor: ``value`` if given, else the fraction of the grid its mask channel
    covers; keeps the pairs it was given."""

    def __init__(self, value: float | None = None):
        self.value = value
        self.pairs: list[np.ndarray] = []

    def __call__(self, x, training=False):
        x = np.asarray(x)
        self.pairs.append(x.copy())
        out = (x[..., 1].reshape(len(x), -1).mean(axis=1) if self.value is None
               else np.full(len(x), self.value))
        return out[:, None].astype(np.float32)


def _bundle(tmp_path: Path, thresholds: list[float], column: str = "pairwise_dice",
            predicted: str | None = "dr_uncertainty") -> Bundle:
    info = {
        "score": {"name": column, "column": column, "label": column.replace("_", " "),
                  "higher_is_better": True, "dice_scale": False},
        "folds": [{"fold": k + 1, "threshold": t} for k, t in enumerate(thresholds)],
        "preprocess": {"voxel_mm": list(VOXEL_MM)}, "rec": {"infer_batch": 2, "ssim": {}},
        "mc": {"samples": 4, "batch": 4}, "seed": 0, "feature_ranges": {},
        "predicted_dice": predicted,
    }
    return Bundle(tmp_path, info, {})


def _models(bundle: Bundle, dr: dict | None = None) -> list[triage.FoldModels]:
    return [triage.FoldModels(f, bundle.threshold(f), mc=f"mc{f}", rec=StubRec(),
                              dr=dict(dr or {"dr_uncertainty": StubDR()}))
            for f in bundle.folds]


def _case() -> SimpleNamespace:
    rng = np.random.default_rng(3)
    image = rng.normal(size=(len(CHANNELS), *GRID)).astype(np.float32)
    return SimpleNamespace(subject_id="sub-x", image=image, brain=np.ones(GRID, np.uint8),
                           meta={"image_features": {}})


def _block(*slices: slice) -> np.ndarray:
    mask = np.zeros(GRID, bool)
    mask[slices] = True
    return mask


A = _block(slice(1, 3), slice(1, 3), slice(1, 3))
B = _block(slice(5, 7), slice(5, 7), slice(5, 7))


def _samples(region: np.ndarray, seed: int, level: float = 0.9) -> np.ndarray:
    """Four MC samples near ``level`` in ``region`` and near 0 elsewhere, each a little
    different (so their pairwise Dice is the fold's own)."""
    rng = np.random.default_rng(seed)
    base = np.where(region, level, 0.02).astype(np.float32)
    samples = np.stack([base] * 4)
    flip = rng.random(samples.shape) < 0.15
    return np.where(flip & region, 0.3, samples).astype(np.float32)


def _with_mc(monkeypatch, samples_by_fold: dict[int, np.ndarray]) -> dict[int, object]:
    maps = {fold: uncertainty_maps(s) for fold, s in samples_by_fold.items()}
    monkeypatch.setattr(triage, "_fold_mc", lambda bundle, fm, case: maps[fm.fold])
    return maps


# ---------------------------------------------------------------------------------------------
# Task: QC scores the mask it delivers


def test_every_fold_scores_the_delivered_mask_with_its_own_networks(monkeypatch, tmp_path):
    bundle = _bundle(tmp_path, [0.0, 0.0])
    models = _models(bundle)
    # fold 1 segments A, fold 2 segments A and B: the mean of their MC means is above 0.5 in
    # A only, so A is delivered and fold 2's own mask (A and B) is not
    own = _with_mc(monkeypatch, {1: _samples(A, 1), 2: _samples(A | B, 2)})
    assert (own[2].prediction > 0).sum() == 2 * A.sum()
    case = _case()
    result = triage.triage_case(bundle, models, case)
    rec = result.record
    assert np.array_equal(result.probability > 0.5, A)
    image = QCImage.from_arrays(case.subject_id, case.image[FLAIR], case.brain)
    for fm, fold in zip(models, rec["per_fold"], strict=True):
        scores = fold["scores"]
        # the volume and the error maps are those of the delivered mask
        assert scores["pred_lesion_ml"] == pytest.approx(A.sum() * VOX_ML)
        (zeroed,) = fm.rec.inputs  # the reconstruction net filled the delivered mask
        assert np.array_equal(zeroed[0], zero_region(image.flair, A)), fm.fold
        # the regressor read the pair built from the delivered mask and this fold's entropy
        (pair,) = fm.dr["dr_uncertainty"].pairs
        assert np.array_equal(pair[0, ..., 1] > 0, A)
        assert np.allclose(pair[0, ..., 0], own[fm.fold].entropy)
        assert scores["dr_uncertainty"] == pytest.approx(A.mean())
        # a score that reads no mask stays the fold's own
        assert scores["pairwise_dice"] == pytest.approx(
            qc_scores(own[fm.fold], VOX_ML)["pairwise_dice"])
    assert rec["per_fold"][0]["scores"]["pairwise_dice"] != pytest.approx(
        rec["per_fold"][1]["scores"]["pairwise_dice"])
    assert rec["predicted_dice"] == pytest.approx(A.mean())  # the regressors' mean
    assert set(rec["scores_of_fold_samples"]) == set(triage.MASK_FREE_SCORES)
    assert {"pred_lesion_ml", "mean_entropy_lesion", "error_vs", "rec_ssim",
            "dr_uncertainty"} <= set(rec["scores_on_delivered_mask"])
    assert not set(rec["scores_on_delivered_mask"]) & set(rec["scores_of_fold_samples"])
    json.dumps(rec["per_fold"], allow_nan=False)  # the per-fold values go into the record


def test_the_mask_free_scores_read_no_mask():
    """What :data:`MASK_FREE_SCORES` claims, checked on the QC code itself: another prediction
    changes every other mask-reading score and none of these."""
    maps = uncertainty_maps(np.concatenate([_samples(A, 5), _samples(A | B, 6)]))
    other = replace(maps, prediction=(A | B).astype(np.uint8))
    before, after = qc_scores(maps, VOX_ML), qc_scores(other, VOX_ML)
    for name in triage.MASK_FREE_SCORES:
        assert before[name] == after[name], name
    assert before["pred_lesion_ml"] != after["pred_lesion_ml"]
    assert before["mean_entropy_lesion"] != after["mean_entropy_lesion"]


# ---------------------------------------------------------------------------------------------
# The vote


@pytest.mark.parametrize(("values", "thresholds", "flagged"), [
    ((0.2, 0.9), (0.5, 0.5), True),  # 1 of 2: a tie goes to review
    ((0.9, 0.9), (0.5, 0.5), False),  # 0 of 2
    ((0.2, 0.9, 0.9), (0.5, 0.5, 0.5), False),  # 1 of 3
    ((0.2, 0.4, 0.9), (0.5, 0.5, 0.5), True),  # 2 of 3
    ((0.6, 0.6, 0.6), (0.5, 0.7, 0.8), True),  # 2 of 3, by each fold's own threshold
])
def test_the_scan_is_flagged_when_at_least_half_of_the_folds_flag_it(monkeypatch, tmp_path,
                                                                    values, thresholds,
                                                                    flagged):
    bundle = _bundle(tmp_path, list(thresholds), column="stub_score", predicted=None)
    _with_mc(monkeypatch, {f: _samples(A, f) for f in bundle.folds})
    by_fold = dict(zip(bundle.folds, values, strict=True))
    monkeypatch.setattr(triage, "_fold_scores", lambda bundle, fm, case, maps, delivered: (
        {"stub_score": by_fold[fm.fold]}, np.zeros(GRID, np.float32)))
    rec = triage.triage_case(bundle, _models(bundle), _case()).record
    n = sum(v < t for v, t in zip(values, thresholds, strict=True))
    assert [f["flagged"] for f in rec["per_fold"]] == [v < t for v, t in
                                                       zip(values, thresholds, strict=True)]
    assert [f["qc_score"] for f in rec["per_fold"]] == list(values)
    assert rec["folds_flagging"] == pytest.approx(n / len(values))
    assert rec["flagged"] is flagged
    assert (f"in {n} of {len(values)} folds" in rec["reason"]) is flagged
    assert rec["predicted_dice"] is None and not rec["empty_segmentation"]


# ---------------------------------------------------------------------------------------------
# An empty segmentation, and the predicted Dice shown to people


def test_an_empty_segmentation_is_flagged_with_its_own_reason(monkeypatch, tmp_path):
    bundle = _bundle(tmp_path, [0.5, 0.5])
    nothing = np.zeros(GRID, bool)
    _with_mc(monkeypatch, {1: _samples(nothing, 1), 2: _samples(nothing, 2)})
    rec = triage.triage_case(bundle, _models(bundle), _case()).record
    # the score alone would pass it: empty samples agree perfectly
    assert all(f["qc_score"] == 1.0 and not f["flagged"] for f in rec["per_fold"])
    assert rec["flagged"] is True and rec["empty_segmentation"] is True
    assert rec["reason"].startswith(triage.EMPTY_REASON)
    # a mask, for comparison: not flagged
    _with_mc(monkeypatch, {1: _samples(A, 1), 2: _samples(A, 2)})
    rec = triage.triage_case(bundle, _models(bundle), _case()).record
    assert rec["flagged"] is False and rec["empty_segmentation"] is False


def test_mark_empty_keeps_the_other_reasons():
    rec = triage.mark_empty({"flagged": False, "reason": "unlike the training cohort: x",
                             "empty_segmentation": False})
    assert rec["flagged"] and rec["empty_segmentation"]
    assert rec["reason"] == f"{triage.EMPTY_REASON}; unlike the training cohort: x"
    assert triage.mark_empty(dict(rec)) == rec  # once


def test_the_predicted_dice_is_clipped_to_0_1_and_the_raw_mean_kept(monkeypatch, tmp_path):
    bundle = _bundle(tmp_path, [0.0, 0.0])
    _with_mc(monkeypatch, {1: _samples(A, 1), 2: _samples(A, 2)})
    models = [replace(fm, dr={"dr_uncertainty": StubDR(v)})
              for fm, v in zip(_models(bundle), (-0.3, -0.16), strict=True)]
    rec = triage.triage_case(bundle, models, _case()).record
    assert rec["predicted_dice"] == 0.0
    assert rec["predicted_dice_raw"] == pytest.approx(-0.23)
    assert rec["predicted_dice_range"] == [0.0, 0.0]
    models = [replace(fm, dr={"dr_uncertainty": StubDR(v)})
              for fm, v in zip(_models(bundle), (1.2, 0.9), strict=True)]
    rec = triage.triage_case(bundle, models, _case()).record
    assert rec["predicted_dice"] == 1.0 and rec["predicted_dice_range"] == pytest.approx([0.9, 1.0])


def test_the_report_shows_a_predicted_dice_in_0_1_for_an_old_record():
    from wmhqc_lib.deploy import report

    text = report._predicted_text({"predicted_dice": -0.23, "predicted_dice_sd": 0.1,
                                   "predicted_dice_range": [-0.3, -0.16]})
    assert text.startswith("0.00 ± 0.10") and "range 0.00 to 0.00" in text and "-" not in text


# ---------------------------------------------------------------------------------------------
# Errors and exit codes


@pytest.mark.parametrize(("n_ok", "n_error", "n_skipped", "code"), [
    (3, 0, 0, 0), (1, 0, 2, 0), (0, 0, 2, 0),  # every scan has a verdict
    (2, 1, 0, 3), (0, 1, 1, 3),  # finished, some in error
    (0, 2, 0, 1), (0, 0, 0, 1),  # nothing triaged
])
def test_exit_codes(n_ok, n_error, n_skipped, code):
    summary = triage.TriageSummary(pd.DataFrame(), n_ok, n_error, n_skipped, [])
    assert summary.exit_code == code
    assert {triage.EXIT_OK, triage.EXIT_NONE, triage.EXIT_SOME_ERRORS} == {0, 1, 3}


def test_any_error_in_preprocessing_becomes_the_scans_reason(monkeypatch, tmp_path):
    from wmhqc_lib.data import preprocess

    for name in ("f.nii.gz", "t.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    scan = triage.Scan("01", None, tmp_path / "f.nii.gz", tmp_path / "t.nii.gz", "sub-01",
                       "f.nii.gz", root=tmp_path)

    def broken(*args, **kwargs):
        raise KeyError("spacing")

    monkeypatch.setattr(preprocess, "preprocess_scan", broken)
    index, reason, seconds, digests = triage._prepare((4, scan, None))
    assert index == 4 and reason == "KeyError: 'spacing'" and digests is None

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess, "preprocess_scan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        triage._prepare((0, scan, None))


# ---------------------------------------------------------------------------------------------
# Paths: inputs named relative to the raw dataset


def test_inputs_are_named_relative_to_the_folder_that_holds_them(tmp_path):
    from wmhqc_lib.deploy import records

    folder = tmp_path / "in" / "a"
    folder.mkdir(parents=True)
    one = triage.single_scan(folder / "f.nii.gz", tmp_path / "in" / "t.nii.gz", "7")
    assert one.root == tmp_path / "in" and one.source == "a/f.nii.gz"
    assert triage.input_name(one, "flair") == "bids:raw:a/f.nii.gz"
    assert triage.input_name(one, "t1") == "bids:raw:t.nii.gz"
    # a manifest's relative paths are relative to its folder, not to where triage runs
    pd.DataFrame({"subject_id": ["s_1"], "flair": ["a/f.nii.gz"], "t1": ["a/t.nii.gz"]}
                 ).to_csv(tmp_path / "in" / "m.csv", index=False)
    (scan,) = triage.scans_from_manifest(tmp_path / "in" / "m.csv")
    assert scan.flair == tmp_path / "in" / "a" / "f.nii.gz" and scan.root == folder
    assert triage.input_name(scan, "flair") == "bids:raw:f.nii.gz"
    reason = f"{folder}/f.nii.gz: not a NIfTI file; {folder}x/y stays; in {folder}."
    assert records.without_root(reason, folder) == \
        f"f.nii.gz: not a NIfTI file; {folder}x/y stays; in .."
    assert records.relative_name("/elsewhere/f.nii.gz", folder) == "f.nii.gz"


# ---------------------------------------------------------------------------------------------
# Scoring against truth with other pathology (label 2)


def _fake_output(out: Path, pred: np.ndarray) -> None:
    """A triage output with one finished scan whose delivered mask is ``pred``."""
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    nib.save(nib.Nifti1Image(pred.astype(np.uint8), np.eye(4)), anat / "m.nii.gz")
    (anat / f"sub-01_{triage.RECORD_SUFFIX}").write_text(json.dumps({
        "participant_id": "sub-01", "session_id": "n/a", "status": "ok", "flagged": False,
        "files": {"mask": "sub-01/anat/m.nii.gz"}}))


def test_truth_label_2_counts_for_neither_mask(tmp_path):
    pred = A | B
    labels = np.zeros(GRID, np.uint8)
    labels[A] = 1
    labels[B] = 2  # predicted inside other pathology: no false positive
    labels[0, 7, 0] = 2  # other pathology not predicted: no missed lesion
    _fake_output(tmp_path / "out", pred)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "truth.nii.gz")
    truth = pd.DataFrame({"participant_id": ["sub-01"], "truth": [str(tmp_path / "truth.nii.gz")]})
    scored, summary = triage.score_against_truth(tmp_path / "out", truth, 0.9)
    assert scored["true_dice"].iloc[0] == pytest.approx(1.0)
    assert summary["n_failed"] == 0
    # as the study computes it: lesion Dice with label-2 voxels ignored
    from wmhqc_lib.overlap import dice

    assert dice(pred, labels == 1, labels == 2) == pytest.approx(1.0)
    assert dice(pred, labels == 1) < 0.9  # what counting B as a false positive would give
    labels[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "truth.nii.gz")
    with pytest.raises(ValueError, match=r"truth.nii.gz: label\(s\) \[3\]"):
        triage.score_against_truth(tmp_path / "out", truth, 0.9)


def test_new_scan_truth_keeps_other_pathology(smoke_profile, tmp_path):
    from wmhqc_lib.data import synth

    settings = smoke_profile.synth
    plans = synth.plan_cohort(settings, smoke_profile.seed + 1)
    plan = replace(next(p for p in plans if p.dataset == "miccai17"), other_pathology=True)
    row = synth._new_scan((0, plan, "known_site", settings, smoke_profile.seed + 1,
                           tmp_path / "bids", tmp_path / "truth"))
    truth = nib.load(row["truth"])
    labels = np.asarray(truth.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    assert (labels == 2).any(), "the other pathology was dropped from the truth"
    voxel_ml = float(abs(np.linalg.det(truth.affine[:3, :3]))) / 1000.0
    assert row["lesion_ml"] == pytest.approx(float((labels == 1).sum()) * voxel_ml)


# ---------------------------------------------------------------------------------------------
# The rule: how the folds combine, and a site layer's rule for its own site


def _stub_scores(monkeypatch, values: dict[int, float]) -> None:
    monkeypatch.setattr(triage, "_fold_scores", lambda bundle, fm, case, maps, delivered: (
        {"stub_score": values[fm.fold]}, np.zeros(GRID, np.float32)))


@pytest.mark.parametrize(("values", "combine", "flagged"), [
    ((0.2, 0.9, 0.9), "any", True),  # one fold of three is enough
    ((0.9, 0.9, 0.9), "any", False),
    ((0.2, 0.9, 0.9), "half", False),  # the same scores under the exported default
])
def test_the_bundles_combine_rule_makes_the_flag(monkeypatch, tmp_path, values, combine,
                                                 flagged):
    bundle = _bundle(tmp_path, [0.5] * len(values), column="stub_score", predicted=None)
    bundle.info["combine"] = combine
    _with_mc(monkeypatch, {f: _samples(A, f) for f in bundle.folds})
    _stub_scores(monkeypatch, dict(zip(bundle.folds, values, strict=True)))
    rec = triage.triage_case(bundle, _models(bundle), _case()).record
    assert rec["flagged"] is flagged
    assert rec["rule"] == {"source": "bundle", "site": None, "layer": None,
                           "layer_sha256": None, "combine": combine,
                           "thresholds": {str(f): 0.5 for f in bundle.folds}}
    assert (f"(rule: {triage.COMBINE_RULES[combine]})" in rec["reason"]) is flagged
    assert ("validation-chosen threshold" in rec["reason"]) is flagged
    bundle.info["combine"] = "most"
    with pytest.raises(ValueError, match="unknown rule 'most'"):
        triage.triage_case(bundle, _models(bundle), _case())


def test_a_site_layers_rule_applies_to_the_scans_of_its_site_only(monkeypatch, tmp_path):
    base = _bundle(tmp_path, [0.5, 0.7], column="stub_score", predicted=None)
    layered = replace(base, layer={"name": "north-2024", "digest": "d" * 64,
                                   "sites": {"north": {"threshold": 0.65, "combine": "any"}}})
    _with_mc(monkeypatch, {f: _samples(A, f) for f in base.folds})
    _stub_scores(monkeypatch, {1: 0.6, 2: 0.8})  # below 0.65 in fold 1 only
    models = _models(base)
    north = triage.triage_case(layered, models, _case(), site="north").record
    assert north["flagged"] is True
    assert [f["threshold"] for f in north["per_fold"]] == [0.65, 0.65]
    assert [f["flagged"] for f in north["per_fold"]] == [True, False]
    assert north["rule"] == {"source": "layer", "site": "north", "layer": "north-2024",
                             "layer_sha256": "d" * 64, "combine": "any",
                             "thresholds": {"1": 0.65, "2": 0.65}}
    assert "site north's calibrated threshold 0.65 (site layer north-2024) in 1 of 2 folds " \
           "(rule: flagged when any fold flags)" in north["reason"]
    for site in ("south", None):  # another site, or none: the bundle's thresholds and vote
        other = triage.triage_case(layered, models, _case(), site=site).record
        assert other["flagged"] is False and other["reason"] == ""
        assert [f["threshold"] for f in other["per_fold"]] == [0.5, 0.7]
        assert other["rule"]["source"] == "bundle" and other["rule"]["combine"] == "half"
        assert other["rule"]["layer_sha256"] == "d" * 64  # made under the layer all the same
    # the bundle without the layer does not flag the north scan
    assert triage.triage_case(base, models, _case(), site="north").record["flagged"] is False


# ---------------------------------------------------------------------------------------------
# Sites of the scans, the audit sample and what a rerun redoes


def _fake_bids(root: Path, scans: dict[str, tuple[str, ...]]) -> Path:
    """Empty files in BIDS layout (discovery reads names only)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "synthetic", "BIDSVersion": "1.9.0"}')
    for sub, sessions in scans.items():
        for ses in sessions or (None,):
            anat = root / sub / (ses or "") / "anat"
            anat.mkdir(parents=True)
            prefix = "_".join([sub] + ([ses] if ses else []))
            for suffix in ("FLAIR", "T1w"):
                (anat / f"{prefix}_{suffix}.nii.gz").write_bytes(b"synthetic")
    return root


def test_sites_come_from_participants_tsv_a_manifest_column_or_the_option(tmp_path):
    from wmhqc_lib.data.io import DataError

    raw = _fake_bids(tmp_path / "raw", {"sub-01": (), "sub-02": (), "sub-03": ("ses-A",
                                                                               "ses-B")})

    def sites(**kwargs) -> dict[str, str | None]:
        return {s.prefix: s.site for s in triage.discover_bids(raw, **kwargs)}

    assert set(sites().values()) == {None}
    assert set(sites(site="fallback").values()) == {"fallback"}
    (raw / "participants.tsv").write_text("participant_id\tage\tsite\nsub-01\t70\tnorth\n"
                                          "sub-02\t71\tn/a\nsub-03\t72\tsouth\n")
    assert sites(site="fallback") == {"sub-01": "north", "sub-02": "fallback",
                                      "sub-03_ses-A": "south", "sub-03_ses-B": "south"}
    assert sites()["sub-02"] is None
    assert sites(participants=["03"], sessions=["B"]) == {"sub-03_ses-B": "south"}
    (raw / "participants.tsv").write_text("participant_id\tage\nsub-01\t70\n")
    assert set(sites().values()) == {None}  # no site column: BIDS makes it optional
    (raw / "participants.tsv").write_text("participant_id\tsite\nsub-01\tnorth\nsub-01\tsouth\n")
    with pytest.raises(DataError, match=r"participants.tsv: line 3: participant 'sub-01' "
                                        "listed twice"):
        triage.discover_bids(raw)
    # a manifest's site column; a row without one takes the option's
    pd.DataFrame({"subject_id": ["a", "b"], "flair": ["f.nii.gz"] * 2, "t1": ["t.nii.gz"] * 2,
                  "site": ["GE3T", ""]}).to_csv(tmp_path / "m.csv", index=False)
    assert [s.site for s in triage.scans_from_manifest(tmp_path / "m.csv", "x")] == ["GE3T", "x"]
    assert triage.single_scan(tmp_path / "f.nii.gz", tmp_path / "t.nii.gz", site="y").site == "y"


def test_the_audit_sample_is_seeded_by_scan_and_grows_with_its_fraction():
    ids = [(f"sub-{k:03d}", "n/a" if k % 2 else "ses-A") for k in range(2000)]

    def sample(fraction: float, seed: int = 0) -> set:
        return {i for i in ids if triage.in_audit_sample(seed, *i, fraction)}

    assert sample(0.0) == set() and sample(1.0) == set(ids)
    small, large = sample(0.1), sample(0.3)
    assert small < large  # a larger fraction marks a superset
    assert abs(len(large) / len(ids) - 0.3) < 0.04  # binomial sd 0.01
    assert sample(0.3) == large  # the same in every run
    assert sample(0.3, seed=1) != large  # another bundle seed, another sample
    # each session of a participant is drawn on its own
    assert len({triage.in_audit_sample(0, "sub-001", f"ses-{k}", 0.5) for k in range(20)}) == 2
    with pytest.raises(ValueError, match="between 0 and 1"):
        triage.in_audit_sample(0, "sub-01", "n/a", 1.5)


def test_a_record_made_under_another_layer_or_for_another_site_is_redone(tmp_path):
    for name in ("f.nii.gz", "t.nii.gz"):
        (tmp_path / name).write_bytes(b"synthetic " + name.encode())
    scan = triage.Scan("01", None, tmp_path / "f.nii.gz", tmp_path / "t.nii.gz", "sub-01",
                       "f.nii.gz", root=tmp_path, site="north")
    record = {"status": "ok", "site": "north", "bundle": {"manifest_sha256": "b"},
              "inputs_sha256": triage.input_digests(scan),
              "rule": {"source": "layer", "layer_sha256": "L1"}}
    assert triage._up_to_date(record, scan, "b", "L1")
    assert not triage._up_to_date(record, scan, "b", "L2")  # another layer
    assert not triage._up_to_date(record, scan, "b", None)  # the layer taken away
    assert not triage._up_to_date(record, replace(scan, site="south"), "b", "L1")
    assert not triage._up_to_date(record, scan, "other bundle", "L1")
    unlayered = record | {"rule": {"source": "bundle", "layer_sha256": None}}
    assert triage._up_to_date(unlayered, scan, "b") and not triage._up_to_date(unlayered,
                                                                                scan, "b", "L1")


def _write_often(job: tuple[str, int]) -> int:
    path, worker = job
    for k in range(300):
        triage._atomic_json(Path(path), {"worker": worker, "k": k, "pad": "x" * 2000})
    return worker


def test_processes_writing_one_shared_file_at_once_each_replace_it_whole(tmp_path):
    """Array tasks write the same dataset_description.json into one output folder: with one
    temporary name for all, a process would move away another's half-written file or find its
    own gone."""
    from multiprocessing import get_context

    path = tmp_path / "dataset_description.json"
    with get_context("fork").Pool(2) as pool:
        assert sorted(pool.map(_write_often, [(str(path), 0), (str(path), 1)])) == [0, 1]
    assert json.loads(path.read_text())["k"] == 299
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
