"""Export of a finished study and triage of new scans: the bundle's checks, BIDS discovery,
manifest and single-scan modes, bad inputs, the out-of-distribution flag, atomic outputs and
reruns, and the official BIDS validator's verdict on the derivative dataset.

Everything reads the shared smoke run (fold 1) and one triage run over a small BIDS dataset
made of the smoke cohort's scans plus broken and foreign inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from wmhqc_lib import cli
from wmhqc_lib.deploy import bundle as bundle_mod
from wmhqc_lib.deploy import triage
from wmhqc_lib.study.steps import FoldPaths, file_digest

# ---------------------------------------------------------------------------------------------
# export and load


def test_export_writes_a_verified_bundle_with_validation_chosen_thresholds(smoke_run,
                                                                           smoke_bundle):
    from wmhqc_lib.qc import evaluation as ev
    from wmhqc_lib.study import report

    _, results = smoke_run
    b = bundle_mod.load_bundle(smoke_bundle.root)
    assert b.folds == [1]
    for name in ("mc_unet", "rec_unet", *b.dr_models):
        assert b.model_path(1, name).is_file()
    # the score and the threshold are the evaluation chapter's validation-only choices
    cases = report.load_all_cases(results, [1])
    cases, scores = report.available_scores(cases, seed=b.info["seed"])
    eligible = [s for s in scores if s.name in bundle_mod.EXPORTABLE]
    assert b.score.name == report.choose_score(cases, eligible)[0].name
    expected = ev.evaluate_folds(cases, b.score, select=b.info["threshold_rule"],
                                 quality_threshold=b.info["quality_threshold"])
    assert b.threshold(1) == pytest.approx(expected.thresholds[1])
    val = cases[cases["split"] == "val"]
    assert b.info["validation_reference"]["score"] == pytest.approx(
        val[b.score.column].tolist())
    card = b.card
    assert card["cohort"]["synthetic"] is True
    op = card["test_operating_point"]
    assert op["n_cases"] == int((cases["split"] == "test").sum())
    assert 0.0 <= op["review_fraction"]["estimate"] <= 1.0
    assert "synthetic" in (b.root / bundle_mod.CARD_MD).read_text()
    assert set(b.info["feature_ranges"]) == set(bundle_mod.OOD_FEATURES)


def test_a_changed_file_or_another_format_is_refused(smoke_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(smoke_bundle.root, copy)
    target = copy / "fold1" / "rec_unet.keras"
    target.write_bytes(target.read_bytes() + b"x")
    with pytest.raises(bundle_mod.BundleError, match="checksum mismatch"):
        bundle_mod.load_bundle(copy)
    shutil.rmtree(copy)
    shutil.copytree(smoke_bundle.root, copy)
    manifest = json.loads((copy / bundle_mod.MANIFEST).read_text())
    manifest["format"] = bundle_mod.BUNDLE_FORMAT + 1
    (copy / bundle_mod.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(bundle_mod.BundleError, match="format"):
        bundle_mod.load_bundle(copy)
    with pytest.raises(bundle_mod.BundleError, match="not a wmhqc model bundle"):
        bundle_mod.load_bundle(tmp_path)


def test_an_unfinished_study_is_refused_naming_the_missing_step(smoke_run, tmp_path):
    _, results = smoke_run
    copy = tmp_path / "smoke"
    shutil.copytree(results, copy, ignore=shutil.ignore_patterns("book", "notebooks"))
    dr = FoldPaths.under(copy, 1).dr
    shutil.rmtree(dr / "main")
    with pytest.raises(bundle_mod.BundleError, match=r"fold 1: the Dice regression step"):
        bundle_mod.export_study(copy, tmp_path / "out", folds=[1])
    assert not (tmp_path / "out").exists()
    with pytest.raises(bundle_mod.BundleError, match=r"fold\(s\) \[2\]"):
        bundle_mod.export_study(copy, tmp_path / "out")  # the profile has two folds
    with pytest.raises(bundle_mod.BundleError, match="not a score"):
        bundle_mod.export_study(results, tmp_path / "out", profile="smoke", folds=[1],
                                score="random_score")


# ---------------------------------------------------------------------------------------------
# finding scans


def test_bids_discovery_with_and_without_sessions_and_filters(bids_input):
    scans = triage.discover_bids(bids_input)
    by_prefix = {s.prefix: s for s in scans}
    assert {"sub-01", "sub-02", "sub-03_ses-A", "sub-03_ses-B"} <= set(by_prefix)
    assert by_prefix["sub-03_ses-A"].session == "A"
    assert by_prefix["sub-03_ses-A"].from_bids
    assert by_prefix["sub-03_ses-A"].folder == Path("sub-03/ses-A/anat")
    assert by_prefix["sub-01"].session is None and by_prefix["sub-01"].t1.name == \
        "sub-01_T1w.nii.gz"
    assert "no matching" in by_prefix["sub-badnot1"].problem
    picked = triage.discover_bids(bids_input, participants=["sub-03"], sessions=["B"])
    assert [s.prefix for s in picked] == ["sub-03_ses-B"]
    ghost = triage.discover_bids(bids_input, participants=["99"])
    assert ghost[0].problem.startswith("participant label given")
    with pytest.raises(ValueError, match="not a BIDS dataset"):
        triage.discover_bids(bids_input / "sub-01")


def test_manifest_and_single_scan_modes(smoke_manifest, tmp_path):
    path = tmp_path / "m.csv"
    smoke_manifest.head(3).to_csv(path, index=False)
    scans = triage.scans_from_manifest(path)
    assert [s.participant for s in scans] == [triage.bids_label(s) for s in
                                               smoke_manifest["subject_id"].head(3)]
    assert all(s.flair.is_file() and s.t1.is_file() for s in scans)
    assert not any(s.from_bids for s in scans)
    # one root for all: the deepest folder holding every input, which outputs name them by
    inputs = [Path(p) for c in ("flair", "t1") for p in smoke_manifest[c].head(3)]
    assert {s.root for s in scans} == {Path(os.path.commonpath([p.parent for p in inputs]))}
    one = triage.single_scan(smoke_manifest["flair"].iloc[0], smoke_manifest["t1"].iloc[0],
                             "case_7")
    assert one.prefix == "sub-case7" and one.folder == Path("sub-case7/anat")
    assert not Path(one.source).is_absolute()
    pd.DataFrame({"subject_id": ["a"], "flair": ["x"]}).to_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['t1'\]"):
        triage.scans_from_manifest(tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------
# one triage run


def test_each_bad_input_is_reported_and_the_others_go_on(triaged):
    summary, out = triaged
    table = summary.table.set_index("participant_id")
    assert summary.n_ok == 5  # 4 good scans and the noise volume
    assert summary.exit_code == triage.EXIT_SOME_ERRORS == 3  # finished, some in error
    reasons = {
        "sub-badnan": "NaN", "sub-badempty": "all voxels are zero", "sub-bad4d": "3D volume",
        "sub-badtrunc": "truncated", "sub-badnot1": "no matching",
    }
    for pid, words in reasons.items():
        assert table.loc[pid, "status"] == "error", pid
        assert words in table.loc[pid, "reason"], (pid, table.loc[pid, "reason"])
        assert not list((out / pid / "anat").glob("*.nii.gz"))
    tsv = pd.read_csv(out / triage.GROUP_TSV, sep="\t", keep_default_na=False)
    assert list(tsv.columns[:10]) == list(triage.GROUP_COLUMNS[:10])
    assert set(tsv["status"]) == {"ok", "error"}
    assert set(tsv.loc[tsv["status"] == "ok", "flagged"]) <= {"true", "false"}
    assert (tsv.loc[tsv["session_id"] != "n/a", "participant_id"] == "sub-03").all()
    flagged_first = tsv["flagged"].tolist()
    assert flagged_first == sorted(flagged_first, key=lambda v: v != "true")


def test_a_noise_volume_is_flagged_as_unlike_the_training_cohort(triaged):
    summary, out = triaged
    row = summary.table.set_index("participant_id").loc["sub-badnoise"]
    assert row["status"] == "ok" and row["flagged"] is True
    assert "unlike the training cohort" in row["reason"]
    record = json.loads((out / row["record"]).read_text())
    assert record["out_of_distribution"] is True
    normal = json.loads((out / "sub-01/anat/sub-01_desc-wmhqc_qc.json").read_text())
    assert normal["out_of_distribution"] is False, normal["reason"]


def test_outputs_are_on_the_native_grid_with_sidecars(triaged, bids_input):
    _, out = triaged
    flair = nib.load(bids_input / "sub-03/ses-A/anat/sub-03_ses-A_FLAIR.nii.gz")
    for role in triage.OUTPUT_SUFFIXES:
        path = out / "sub-03/ses-A/anat" / f"sub-03_ses-A_{triage.OUTPUT_SUFFIXES[role]}"
        img = nib.load(path)
        assert img.shape == flair.shape and np.allclose(img.affine, flair.affine, atol=1e-4)
        sidecar = json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())
        assert sidecar["Sources"]
    mask = nib.load(out / "sub-03/ses-A/anat/sub-03_ses-A_space-orig_label-WMH_mask.nii.gz")
    prob = nib.load(out / "sub-03/ses-A/anat/sub-03_ses-A_space-orig_label-WMH_probseg.nii.gz")
    assert np.array_equal(np.asarray(mask.dataobj) > 0, np.asarray(prob.dataobj) > 0.5)
    record = json.loads((out / "sub-03/ses-A/anat/sub-03_ses-A_desc-wmhqc_qc.json").read_text())
    assert record["lesion_ml"] == pytest.approx(
        float((np.asarray(mask.dataobj) > 0).sum()) * np.prod(mask.header.get_zooms()) / 1000)
    assert 0.0 <= record["folds_flagging"] <= 1.0
    assert record["predicted_dice"] is not None


def test_records_say_what_was_scored_on_the_delivered_mask(triaged):
    """Every fold's values are in the record, with which scores read the delivered mask and
    which the fold's own samples; the predicted Dice people see lies in [0, 1]."""
    summary, out = triaged
    tsv = pd.read_csv(out / triage.GROUP_TSV, sep="\t", na_values="n/a", keep_default_na=False)
    ok = tsv[tsv["status"] == "ok"]
    assert len(ok) == summary.n_ok and ok["predicted_dice"].between(0.0, 1.0).all()
    for rel in summary.table.loc[summary.table["status"] == "ok", "record"]:
        rec = json.loads((out / rel).read_text())
        assert rec["predicted_dice"] == pytest.approx(min(1.0, max(0.0,
                                                                   rec["predicted_dice_raw"])))
        assert all(0.0 <= v <= 1.0 for v in rec["predicted_dice_range"])
        assert set(rec["scores_of_fold_samples"]) == set(triage.MASK_FREE_SCORES)
        assert rec["qc_score_name"] in rec["scores_on_delivered_mask"] + \
            rec["scores_of_fold_samples"]
        fold_scores = rec["per_fold"][0]["scores"]
        assert set(fold_scores) == set(rec["scores_on_delivered_mask"]) | set(
            rec["scores_of_fold_samples"])
        assert rec["empty_segmentation"] is (rec["lesion_ml"] == 0.0)
        assert rec["bundle"]["manifest_sha256"] and set(rec["inputs_sha256"]) == {"flair", "t1"}


def test_an_empty_delivered_mask_is_flagged_when_written(smoke_bundle, bids_input, tmp_path):
    """The mask delivered is the one on the native grid: written empty, the scan is flagged
    even where the record made on the profile grid was not."""
    from wmhqc_lib.data.preprocess import preprocess_scan

    scan = next(s for s in triage.discover_bids(bids_input) if s.prefix == "sub-01")
    case = preprocess_scan(scan.prefix, scan.flair, scan.t1, smoke_bundle.preprocess_settings)
    zeros = np.zeros(case.brain.shape, np.float32)
    record = {"status": "ok", "flagged": False, "reason": "", "empty_segmentation": False,
              "qc_score_name": "x"}
    rec = triage.write_scan(tmp_path, scan, triage.ScanResult(record, zeros, zeros, zeros, case),
                            1.0)
    assert rec["flagged"] is True and rec["empty_segmentation"] is True
    assert rec["reason"] == triage.EMPTY_REASON and rec["lesion_ml"] == 0.0
    assert json.loads((tmp_path / scan.output("record")).read_text()) == rec


# ---------------------------------------------------------------------------------------------
# where the inputs are: named relative to the raw dataset, never by their location


def _text_outputs(out: Path) -> list[Path]:
    """Records, sidecars, group_qc.tsv and the pages: every text output but the dataset
    description, which alone may say where the inputs lie."""
    return [p for p in sorted(out.rglob("*")) if p.is_file()
            and p.suffix in (".json", ".tsv", ".html") and p.name != "dataset_description.json"]


def _spellings(folder: Path) -> set[str]:
    return {str(folder), os.path.abspath(folder), str(folder.resolve())}


def test_no_output_but_the_dataset_description_says_where_the_inputs_are(triaged, bids_input):
    _, out = triaged
    files = _text_outputs(out)
    assert {p.suffix for p in files} == {".json", ".tsv", ".html"}
    for path in files:
        text = path.read_text()
        for spelling in _spellings(bids_input):
            assert spelling not in text, path
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"]["raw"] == Path(os.path.abspath(bids_input)).as_uri()
    record = json.loads((out / "sub-03/ses-A/anat/sub-03_ses-A_desc-wmhqc_qc.json").read_text())
    assert record["inputs"] == {"flair": "bids:raw:sub-03/ses-A/anat/sub-03_ses-A_FLAIR.nii.gz",
                                "t1": "bids:raw:sub-03/ses-A/anat/sub-03_ses-A_T1w.nii.gz"}
    error = json.loads((out / "sub-badnan/anat/sub-badnan_desc-wmhqc_qc.json").read_text())
    assert error["reason"].startswith("sub-badnan/anat/sub-badnan_FLAIR.nii.gz: ")


def test_manifest_inputs_are_named_relative_to_the_folder_that_holds_them(smoke_bundle,
                                                                         bids_input, tmp_path):
    inputs, lists = tmp_path / "hospital", tmp_path / "lists"
    for sub, folder in (("sub-01", "a"), ("sub-badtrunc", "b")):
        (inputs / folder).mkdir(parents=True)
        for suffix in ("FLAIR", "T1w"):
            shutil.copy(bids_input / sub / "anat" / f"{sub}_{suffix}.nii.gz",
                        inputs / folder / f"{suffix.lower()}.nii.gz")
    lists.mkdir()
    pd.DataFrame({"subject_id": ["case_a", "case_b"],
                  "flair": [str(inputs / f / "flair.nii.gz") for f in "ab"],
                  "t1": [str(inputs / f / "t1w.nii.gz") for f in "ab"]}
                 ).to_csv(lists / "m.csv", index=False)
    out = tmp_path / "out"
    summary = triage.run_triage(smoke_bundle, triage.scans_from_manifest(lists / "m.csv"), out,
                                progress=False, log=lambda _: None)
    assert summary.n_ok == 1 and summary.n_error == 1
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"]["raw"] == inputs.as_uri()
    sidecar = json.loads((out / "sub-casea/anat/sub-casea_space-orig_label-WMH_mask.json")
                         .read_text())
    assert sidecar["Sources"] == ["bids:raw:a/flair.nii.gz"]
    table = summary.table.set_index("participant_id")
    assert table.loc["sub-caseb", "reason"].startswith("b/flair.nii.gz: ")
    for path in _text_outputs(out):
        text = path.read_text()
        for spelling in _spellings(inputs) | _spellings(lists):
            assert spelling not in text, path
    page = (out / "sub-casea.html").read_text()
    assert "not found" not in page and page.count("data:image/png") == 4  # FLAIR found


# ---------------------------------------------------------------------------------------------
# reruns and errors on a small dataset of its own


def _small_bids(bids_input: Path, root: Path, subjects: tuple[str, ...]) -> Path:
    root.mkdir(parents=True)
    shutil.copy(bids_input / "dataset_description.json", root)
    for sub in subjects:
        shutil.copytree(bids_input / sub, root / sub)
    return root


def test_a_rerun_redoes_a_scan_whose_bundle_or_input_changed(smoke_bundle, bids_input,
                                                            tmp_path):
    raw = _small_bids(bids_input, tmp_path / "raw", ("sub-01", "sub-02"))
    out = tmp_path / "out"

    def run() -> triage.TriageSummary:
        return triage.run_triage(smoke_bundle, triage.discover_bids(raw), out, progress=False,
                                 log=lambda _: None)

    def record(sub: str) -> Path:
        return out / sub / "anat" / f"{sub}_desc-wmhqc_qc.json"

    assert run().n_ok == 2
    rec = json.loads(record("sub-01").read_text())
    anat = raw / "sub-01" / "anat"
    assert rec["bundle"]["manifest_sha256"] == file_digest(smoke_bundle.root / "manifest.json")
    assert rec["inputs_sha256"] == {"flair": file_digest(anat / "sub-01_FLAIR.nii.gz"),
                                    "t1": file_digest(anat / "sub-01_T1w.nii.gz")}
    again = run()
    assert (again.n_ok, again.n_skipped, again.exit_code) == (0, 2, 0)
    # sub-01: another T1 (the same image with another header); sub-02: another bundle's record
    t1 = nib.load(anat / "sub-01_T1w.nii.gz")
    t1.header["descrip"] = b"edited"
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj), t1.affine, t1.header),
             anat / "sub-01_T1w.nii.gz")
    rec2 = json.loads(record("sub-02").read_text())
    rec2["bundle"]["manifest_sha256"] = "0" * 64
    record("sub-02").write_text(json.dumps(rec2))
    redone = run()
    assert (redone.n_ok, redone.n_skipped) == (2, 0)
    assert json.loads(record("sub-01").read_text())["inputs_sha256"]["t1"] == \
        file_digest(anat / "sub-01_T1w.nii.gz")
    # a record from before the digests were kept is redone
    rec = json.loads(record("sub-01").read_text())
    del rec["inputs_sha256"]
    record("sub-01").write_text(json.dumps(rec))
    last = run()
    assert (last.n_ok, last.n_skipped) == (1, 1)


def test_an_error_in_one_scan_becomes_its_record_and_the_others_go_on(smoke_bundle, bids_input,
                                                                     tmp_path, monkeypatch):
    raw = _small_bids(bids_input, tmp_path / "raw", ("sub-01", "sub-02", "sub-03"))
    triage_case, write_scan = triage.triage_case, triage.write_scan

    def failing_case(bundle, models, case, site=None):
        if case.subject_id == "sub-02":
            raise RuntimeError("out of memory, say")
        return triage_case(bundle, models, case, site)

    def failing_write(out_dir, scan, result, seconds, provenance=None):
        if scan.prefix == "sub-03_ses-A":
            raise KeyError("files")
        return write_scan(out_dir, scan, result, seconds, provenance)

    monkeypatch.setattr(triage, "triage_case", failing_case)
    monkeypatch.setattr(triage, "write_scan", failing_write)
    lines: list[str] = []
    summary = triage.run_triage(smoke_bundle, triage.discover_bids(raw), tmp_path / "out",
                                progress=False, log=lines.append)
    assert (summary.n_ok, summary.n_error, summary.exit_code) == (2, 2, 3)
    table = summary.table.set_index(["participant_id", "session_id"])
    assert table.loc[("sub-02", "n/a"), "reason"] == "RuntimeError: out of memory, say"
    assert table.loc[("sub-03", "ses-A"), "reason"] == "KeyError: 'files'"
    assert table.loc[("sub-01", "n/a"), "status"] == table.loc[("sub-03", "ses-B"), "status"] \
        == "ok"
    assert not list((tmp_path / "out" / "sub-03" / "ses-A" / "anat").glob("*.nii.gz"))
    assert any("sub-02: error: RuntimeError" in line for line in lines)


def test_a_rerun_skips_finished_scans_and_redoes_an_unfinished_one(triaged, smoke_bundle,
                                                                   bids_input, monkeypatch):
    import keras

    _, out = triaged
    loaded = list(smoke_bundle.networks)
    assert loaded  # the first run kept its networks on the bundle

    def no_reload(*args, **kwargs):
        raise AssertionError("a network was loaded again")

    monkeypatch.setattr(keras.models, "load_model", no_reload)
    record = out / "sub-02/anat/sub-02_desc-wmhqc_qc.json"
    before = json.loads(record.read_text())
    record.unlink()  # as if the run had died before the record was written
    stale = out / "logs" / "staging" / "sub-02"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "half.nii.gz").write_bytes(b"partial")
    scans = [s for s in triage.discover_bids(bids_input) if s.prefix in ("sub-01", "sub-02")]
    lines: list[str] = []
    summary = triage.run_triage(smoke_bundle, scans, out, progress=False, log=lines.append)
    assert summary.n_skipped == 1 and summary.n_ok == 1
    after = json.loads(record.read_text())
    assert after["qc_score"] == pytest.approx(before["qc_score"])  # deterministic
    assert not stale.exists()
    assert any("already triaged" in line for line in lines)
    # the redone scan ran on the networks loaded for the first run (load_model never called)
    assert all(a is b for a, b in zip(smoke_bundle.networks, loaded, strict=True))


def test_the_official_bids_validator_accepts_the_output(triaged):
    _, out = triaged
    exe = shutil.which("bids-validator-deno") or str(
        Path(__import__("sys").executable).with_name("bids-validator-deno"))
    if not Path(exe).exists():
        pytest.fail("bids-validator-deno is not installed (pip install bids-validator-deno)")
    proc = subprocess.run([exe, "--format", "json", str(out)], capture_output=True, text=True,
                          timeout=600)
    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert not errors, json.dumps(errors[:5], indent=1)


def test_cli_exit_codes(smoke_bundle, bids_input, tmp_path, capsys):
    out = tmp_path / "d"
    code = cli.main(["triage", str(bids_input), str(out), "participant", "--model",
                     str(smoke_bundle.root), "--participant-label", "badnan", "--quiet"])
    assert code == 1  # nothing triaged
    assert "1 error(s)" in capsys.readouterr().out
    code = cli.main(["triage", str(bids_input), str(out), "group", "--model",
                     str(smoke_bundle.root)])
    assert code == 1
    code = cli.main(["triage", str(bids_input), str(out), "participant", "--model",
                     str(smoke_bundle.root), "--participant-label", "01", "badnan", "--quiet"])
    assert code == 3  # finished, one scan in error
    code = cli.main(["triage", str(bids_input), str(out), "group", "--model",
                     str(smoke_bundle.root)])
    assert code == 3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["triage", "-h"])
    assert "3 finished, but some scans are in error" in " ".join(capsys.readouterr().out.split())
    code = cli.main(["triage", "-", str(out), "participant", "--model",
                     str(tmp_path / "nothing")])
    assert code == 2 and "not a wmhqc model bundle" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the out-of-distribution check on scans a WMH model was never meant to see


def _features(flair: np.ndarray, t1: np.ndarray, affine: np.ndarray, tmp: Path,
              settings) -> dict:
    from wmhqc_lib.data.preprocess import preprocess_scan

    tmp.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(flair.astype(np.float32), affine), tmp / "f.nii.gz")
    nib.save(nib.Nifti1Image(t1.astype(np.float32), affine), tmp / "t.nii.gz")
    case = preprocess_scan("x", tmp / "f.nii.gz", tmp / "t.nii.gz", settings)
    assert not case.lesion.any() and case.native is None  # no annotation on the QC path
    return case.meta["image_features"]


def test_foreign_scans_are_out_of_distribution_and_a_normal_one_is_not(smoke_bundle,
                                                                      smoke_manifest,
                                                                      tmp_path):
    ranges = smoke_bundle.info["feature_ranges"]
    settings = smoke_bundle.preprocess_settings
    row = smoke_manifest.iloc[4]
    flair_img, t1_img = nib.load(row["flair"]), nib.load(row["t1"])
    flair = np.asarray(flair_img.dataobj, dtype=np.float32)
    t1 = np.asarray(nib.load(row["t1"]).dataobj, dtype=np.float32)
    if t1.shape != flair.shape:  # resample the T1 onto the FLAIR grid for these edits
        from nilearn.image import resample_to_img

        t1 = np.asarray(resample_to_img(t1_img, flair_img, force_resample=True,
                                        copy_header=True).dataobj, dtype=np.float32)
    affine = flair_img.affine
    normal = _features(flair, t1, affine, tmp_path / "normal", settings)
    assert triage.out_of_distribution(normal, ranges) == []
    # a header that claims the wrong axes: world x <- z, y <- x, z <- y
    swapped = affine[[2, 0, 1, 3]]
    reasons = triage.out_of_distribution(
        _features(flair, t1, swapped, tmp_path / "swap", settings), ranges)
    assert any("extent" in r for r in reasons), reasons
    # a large bright artefact
    from wmhqc_lib.data.synth import add_bright_artefact

    bright = add_bright_artefact(flair, affine, np.random.default_rng(1))
    reasons = triage.out_of_distribution(
        _features(bright, t1, affine, tmp_path / "bright", settings), ranges)
    assert any("flair_bright_fraction" in r for r in reasons), reasons
    # another body part: a long smooth cylinder (a limb), no brain anatomy
    grid = np.indices(flair.shape).astype(np.float32)
    centre = np.array(flair.shape, dtype=np.float32)[:, None, None, None] / 2
    radius = np.sqrt(((grid[:2] - centre[:2]) ** 2).sum(axis=0))
    limb = np.where(radius < min(flair.shape[:2]) / 5, 100.0 + grid[2], 0.0)
    reasons = triage.out_of_distribution(
        _features(limb, limb * 0.5 + 10.0 * (radius < min(flair.shape[:2]) / 5), affine,
                  tmp_path / "limb", settings), ranges)
    assert reasons, "a cylinder passed as a brain"
    # sheared voxel axes are flagged by rule
    assert any("sheared" in r for r in triage.out_of_distribution(
        {**normal, "axis_skew_deg": 5.0}, ranges))


def test_new_synthetic_scans_are_bids_with_the_truth_kept_apart(smoke_profile, tmp_path):
    from wmhqc_lib.data import synth

    with pytest.raises(ValueError, match="study's own"):
        synth.generate_new_scans(tmp_path / "a", tmp_path / "t", smoke_profile,
                                 smoke_profile.seed, n_known=1, n_unseen=0, n_artefact=0)
    table = synth.generate_new_scans(tmp_path / "bids", tmp_path / "truth", smoke_profile,
                                     smoke_profile.seed + 1, n_known=1, n_unseen=1,
                                     n_artefact=1, workers=1)
    assert list(table["kind"]) == ["known_site", "unseen_site", "artefact"]
    assert table.loc[1, "site"] == synth.UNSEEN_SITE.site
    scans = triage.discover_bids(tmp_path / "bids")
    assert [s.prefix for s in scans] == ["sub-01", "sub-02", "sub-03"]
    assert all(not s.problem for s in scans)
    assert not list((tmp_path / "bids").rglob("*mask*"))  # no truth where triage reads
    for row in table.itertuples():
        truth = nib.load(row.truth)
        flair = nib.load(tmp_path / "bids" / row.participant_id / "anat"
                         / f"{row.participant_id}_FLAIR.nii.gz")
        assert truth.shape == flair.shape and np.allclose(truth.affine, flair.affine)
    # the same scans again, written by two worker processes
    again = synth.generate_new_scans(tmp_path / "bids2", tmp_path / "truth2", smoke_profile,
                                     smoke_profile.seed + 1, n_known=1, n_unseen=1,
                                     n_artefact=1, workers=2)
    for row in table.itertuples():
        for name in (f"{row.participant_id}_FLAIR.nii.gz", f"{row.participant_id}_T1w.nii.gz"):
            a = nib.load(tmp_path / "bids" / row.participant_id / "anat" / name)
            b = nib.load(tmp_path / "bids2" / row.participant_id / "anat" / name)
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            assert np.array_equal(a.affine, b.affine)
    for first, second in zip(table["truth"], again["truth"], strict=True):
        assert np.array_equal(np.asarray(nib.load(first).dataobj),
                              np.asarray(nib.load(second).dataobj))
    assert again.drop(columns="truth").equals(table.drop(columns="truth"))


def test_realised_operating_point_against_known_truth(triaged, bids_input, tmp_path):
    """Scoring triage against truth masks: the triage mask itself as truth gives Dice 1."""
    _, out = triaged
    record = json.loads((out / "sub-01/anat/sub-01_desc-wmhqc_qc.json").read_text())
    truth = pd.DataFrame({"participant_id": ["sub-01"], "kind": ["known_site"],
                          "truth": [str(out / record["files"]["mask"])]})
    scored, summary = triage.score_against_truth(out, truth, 0.5)
    assert scored["true_dice"].iloc[0] == pytest.approx(1.0)  # (1 for two empty masks too)
    assert summary["n_scans"] == 1 and summary["n_failed"] == 0
    empty = tmp_path / "empty.nii.gz"
    mask = nib.load(truth["truth"].iloc[0])
    nib.save(nib.Nifti1Image(np.zeros(mask.shape, np.uint8), mask.affine), empty)
    scored, summary = triage.score_against_truth(out, truth.assign(truth=str(empty)), 0.5)
    card = {"test_operating_point": {k: {"estimate": 0.5, "low": 0.4, "high": 0.6} for k in
                                     ("precision", "recall", "review_fraction")}
            | {"n_cases": 10, "n_failed": 5, "n_flagged": 5}}
    table = triage.promise_vs_realised(card, scored)
    assert table.loc["n_scans", "realised: all new scans"] == 1
    assert table.loc["precision", "promised (study test folds, 95 % CI)"] == "0.50 [0.40, 0.60]"
    # a bundle with a recall guarantee deploys its guaranteed threshold: that is what it promises
    cost = {k: {"estimate": 0.9, "low": 0.8, "high": 1.0} for k in
            ("precision", "recall", "review_fraction")} | {"n_cases": 10, "n_failed": 5,
                                                          "n_flagged": 7}
    card["guarantee"] = {"statement": "recall >= 0.9 with 90 % confidence", "cost": cost}
    table = triage.promise_vs_realised(card, scored)
    assert table.loc["recall", "promised (study test folds, 95 % CI)"] == "0.90 [0.80, 1.00]"
    assert table.loc["n_flagged", "promised (study test folds, 95 % CI)"] == 7
