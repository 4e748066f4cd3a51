"""`wmhqc calibrate`: reviewers' verdicts against the flags per site, site thresholds with the
recall guarantee, and the site layer over a bundle.

Most tests read a hand-made triage output: synthetic scan records whose per-fold scores, flags,
sites and audit marks are written here (seeded), so every expected figure is counted from the
same table here, not typed in. The last test runs the real chain on the smoke bundle: triage
of three scans with sites, a verdict file, calibrate, and triage again with the layer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib import cli
from wmhqc_lib.deploy import calibrate as cal_mod
from wmhqc_lib.deploy import layer as layer_mod
from wmhqc_lib.deploy.bundle import BUNDLE_FORMAT, load_bundle
from wmhqc_lib.deploy.records import worst_fold_score
from wmhqc_lib.deploy.verdicts import COLUMNS, VerdictError, read_verdicts
from wmhqc_lib.qc.guarantee import failures_needed, guaranteed_threshold
from wmhqc_lib.study.steps import file_digest

THRESHOLDS = {1: 0.5, 2: 0.6}
TARGET, CONFIDENCE = 0.8, 0.8  # 8 labelled failures needed


def _fake_bundle(root: Path, seed: int = 0) -> Path:
    """A loadable bundle folder with two folds' thresholds and no network (calibration reads
    the records' scores only)."""
    (root / "fold1").mkdir(parents=True)
    info = {"format": BUNDLE_FORMAT, "seed": seed, "profile": "synthetic-test",
            "generated_by": {"version": "test"},
            "score": {"name": "stub", "column": "stub_score", "label": "stub score",
                      "higher_is_better": True, "dice_scale": False},
            "folds": [{"fold": f, "threshold": t} for f, t in THRESHOLDS.items()]}
    (root / "bundle.json").write_text(json.dumps(info))
    (root / "model_card.json").write_text("{}")
    (root / "fold1" / "mc_unet.keras").write_bytes(b"synthetic network " + bytes([seed]))
    files = sorted(p for p in root.rglob("*") if p.is_file())
    (root / "manifest.json").write_text(json.dumps({
        "format": BUNDLE_FORMAT,
        "files": {p.relative_to(root).as_posix(): file_digest(p) for p in files}}))
    return root


def _truth(seed: int = 7) -> pd.DataFrame:
    """The synthetic scans: site, failure (what reviewers will say), two fold scores, the
    flag by the bundle's rule (at least half of the folds below their thresholds), the audit
    mark, and whether a reviewer gave a verdict."""
    rng = np.random.default_rng(seed)
    rows = []

    def add(site, pid, ses, audit_p, review):
        failed = bool(rng.random() < 0.35)
        scores = [float(rng.normal(0.42 if failed else 0.8, 0.13)) for _ in THRESHOLDS]
        n_flag = sum(s < t for s, t in zip(scores, THRESHOLDS.values(), strict=True))
        flagged = n_flag / len(scores) >= 0.5
        audit = bool(rng.random() < audit_p)
        rows.append({"site": site, "participant_id": pid, "session_id": ses,
                     "failed": failed, "s1": scores[0], "s2": scores[1], "flagged": flagged,
                     "audit": audit, "reviewed": review(flagged, audit)})

    for k in range(60):  # A: an audit sample, reviewed with every flagged scan
        add("A", f"sub-a{k:02d}", "n/a", 0.6, lambda f, a: f or a)
    for k in range(6):  # B: no audit sample, only the flagged scans reviewed; two sessions
        for ses in ("ses-X", "ses-Y"):
            add("B", f"sub-b{k:02d}", ses, 0.0, lambda f, a: f)
    for k in range(10):  # C: every scan reviewed, too few failures for a guarantee
        add("C", f"sub-c{k:02d}", "n/a", 0.0, lambda f, a: True)
    for k in range(5):  # no site
        add(None, f"sub-n{k:02d}", "n/a", 0.0, lambda f, a: True)
    table = pd.DataFrame(rows)
    # C: exactly three failures, whatever the draw
    c = table.index[table["site"] == "C"]
    table.loc[c, "failed"] = [True] * 3 + [False] * (len(c) - 3)
    return table


def _record_path(pid: str, ses: str) -> Path:
    parts = [pid] + ([ses] if ses != "n/a" else [])
    prefix = "_".join(parts)
    return Path(*parts, "anat", f"{prefix}_desc-wmhqc_qc.json")


def _write_output(out: Path, truth: pd.DataFrame, bundle_sha: str) -> None:
    for r in truth.itertuples():
        per_fold = [{"fold": f, "threshold": t, "qc_score": s, "flagged": s < t}
                    for (f, t), s in zip(THRESHOLDS.items(), (r.s1, r.s2), strict=True)]
        rec = {"participant_id": r.participant_id, "session_id": r.session_id,
               "site": r.site if isinstance(r.site, str) else None, "audit": bool(r.audit),
               "status": "ok",
               "flagged": bool(r.flagged), "qc_score": (r.s1 + r.s2) / 2,
               "qc_score_name": "stub_score", "out_of_distribution": False,
               "empty_segmentation": False, "reason": "", "per_fold": per_fold,
               "rule": {"source": "bundle", "combine": "half", "layer_sha256": None},
               "bundle": {"manifest_sha256": bundle_sha}}
        path = out / _record_path(r.participant_id, r.session_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    # a scan in error, with the one verdict a scan in error can get
    path = out / _record_path("sub-aerr", "n/a")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"participant_id": "sub-aerr", "session_id": "n/a",
                                "site": "A", "audit": False, "status": "error",
                                "flagged": None, "reason": "synthetic error"}))


def _verdict_lines(truth: pd.DataFrame) -> list[str]:
    lines = ["\t".join(COLUMNS)]
    for k, r in enumerate(truth[truth["reviewed"]].itertuples()):
        verdict = ("unusable" if k % 5 == 0 else "needs_correction") if r.failed \
            else "acceptable"
        reviewer = "n/a" if k % 7 == 0 else "dr synthetic"
        lines.append("\t".join([r.participant_id, r.session_id, verdict, f"note {k}",
                                reviewer, "2024-05-01T10:00:00Z"]))
    lines.append("\t".join(["sub-aerr", "n/a", "unusable", "n/a", "dr synthetic",
                            "2024-05-02T09:30:00+02:00"]))
    return lines


@pytest.fixture()
def setup(tmp_path):
    """(bundle, triage output, verdict file, truth table)."""
    bundle = load_bundle(_fake_bundle(tmp_path / "bundle"))
    truth = _truth()
    out = tmp_path / "out"
    _write_output(out, truth, layer_mod.bundle_sha256(bundle))
    verdicts = tmp_path / "verdicts.tsv"
    verdicts.write_text("\n".join(_verdict_lines(truth)) + "\n")
    return bundle, out, verdicts, truth


def _calibrate(setup_):
    bundle, out, verdicts, _ = setup_
    return cal_mod.calibrate(out, bundle, verdicts, target_recall=TARGET,
                             confidence=CONFIDENCE)


def _by_site(cal) -> dict:
    return {s.site: s for s in cal.sites}


# ---------------------------------------------------------------------------------------------
# what the flags achieved, per site


def test_wilson_interval_known_values():
    assert cal_mod.wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert cal_mod.wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert all(math.isnan(v) for v in cal_mod.wilson(0, 0))


def test_realised_recall_precision_and_review_fraction_per_site(setup):
    cal = _calibrate(setup)
    truth = setup[3]
    sites = _by_site(cal)
    assert list(sites) == ["A", "B", "C", cal_mod.UNSPECIFIED]
    assert cal.n_verdicts == int(truth["reviewed"].sum()) + 1 and cal.n_verdicts_on_errors == 1
    for name, s in sites.items():
        part = truth[truth["site"].fillna(cal_mod.UNSPECIFIED) == name]
        rev = part[part["reviewed"]]
        assert s.counts["n_triaged"] == len(part)
        assert s.counts["n_error"] == (name == "A")
        assert s.counts["n_reviewed"] == len(rev)
        assert s.counts["n_judged_failed"] == int(rev["failed"].sum())
        assert s.review_fraction["k"] == int(part["flagged"].sum())
        assert s.review_fraction["estimate"] == pytest.approx(part["flagged"].mean())
        flagged_rev = rev[rev["flagged"]]
        assert (s.precision["k"], s.precision["n"]) == (int(flagged_rev["failed"].sum()),
                                                         len(flagged_rev))
        low, high = cal_mod.wilson(s.precision["k"], s.precision["n"])
        assert (s.precision["low"], s.precision["high"]) == (low, high)
    # recall: on A's audit sample (every audited scan has a verdict), on every scan of C; not
    # on B
    audited = truth[(truth["site"] == "A") & truth["audit"]]
    assert audited["reviewed"].all()
    a = sites["A"]
    assert a.basis == "audit sample"
    assert (a.recall["k"], a.recall["n"]) == (int((audited["failed"] & audited["flagged"])
                                                  .sum()), int(audited["failed"].sum()))
    assert 0.0 <= a.recall["lower_bound"] <= a.recall["estimate"]
    assert sites["C"].basis == "every scan" and sites["C"].recall["n"] == 3
    b = sites["B"]
    assert b.recall is None and b.basis is None
    assert "only flagged scans were reviewed" in b.recall_note
    table = cal.table().set_index("site")
    assert table.loc["A", "recall_n"] == a.recall["n"] and table.loc["B", "rule"] == \
        "bundle's rule"
    text = cal.summary_text()
    assert "B: 12 triaged" in text and "recall not measured" in text


def test_contradicting_verdicts_are_listed_for_the_sites_lead(setup):
    cal = _calibrate(setup)
    truth = setup[3]
    rev = truth[truth["reviewed"]]
    expected = rev[rev["flagged"] != rev["failed"]]
    got = cal.contradictions
    assert set(zip(got["participant_id"], got["session_id"], strict=True)) == set(
        zip(expected["participant_id"], expected["session_id"], strict=True))
    assert len(got) > 0 and list(got.columns) == list(cal_mod.CONTRADICTION_COLUMNS)
    for r in got.itertuples():
        assert (r.contradiction == "flagged, judged acceptable") == (r.verdict == "acceptable")
        assert r.flagged == (r.verdict == "acceptable")
        assert r.note.startswith("note ") and r.line >= 2
    md = cal.markdown()
    passed = got[~got["flagged"].astype(bool)]
    if len(passed):
        assert f"| {passed['participant_id'].iloc[0]} | " in md


# ---------------------------------------------------------------------------------------------
# site thresholds with the guarantee


def test_the_site_threshold_is_the_guarantee_on_the_worst_fold_score(setup):
    cal = _calibrate(setup)
    truth = setup[3]
    rows = truth[(truth["site"] == "A") & truth["audit"]]
    worst = np.minimum(rows["s1"], rows["s2"]).to_numpy()
    expected = guaranteed_threshold(worst, rows["failed"].to_numpy(), TARGET, CONFIDENCE, True)
    assert expected.feasible, "the synthetic site A should hold enough failures"
    a = _by_site(cal)["A"]
    assert a.rule == {"threshold": expected.threshold, "combine": "any"}
    assert a.guarantee == expected
    # "any fold flags" at the threshold leaves at most the allowed misses unflagged
    failures = rows[rows["failed"]]
    caught = ((failures["s1"] < expected.threshold) | (failures["s2"] < expected.threshold))
    assert int((~caught).sum()) <= expected.allowed_misses
    part = truth[truth["site"] == "A"]
    assert a.site_review_fraction == pytest.approx(
        float((np.minimum(part["s1"], part["s2"]) < expected.threshold).mean()))
    # the mean fold score would give another threshold: the statistic matters
    mean = guaranteed_threshold(((rows["s1"] + rows["s2"]) / 2).to_numpy(),
                                rows["failed"].to_numpy(), TARGET, CONFIDENCE, True)
    assert mean.threshold != expected.threshold


def test_an_audit_sample_with_gaps_gives_no_recall_and_no_threshold(setup, tmp_path):
    """Reviewers see flagged audit scans anyway and may skip unflagged ones: the reviewed part
    of such a sample over-represents caught failures, so nothing is taken from it."""
    bundle, out, verdicts, truth = setup
    a = truth[(truth["site"] == "A") & truth["audit"]]
    unflagged = a[~a["flagged"]]
    assert len(unflagged) >= 2
    skipped = set(unflagged["participant_id"].iloc[:2])
    lines = verdicts.read_text().splitlines()
    kept = [line for line in lines if line.split("\t")[0] not in skipped]
    assert len(kept) == len(lines) - 2
    gaps = tmp_path / "gaps.tsv"
    gaps.write_text("\n".join(kept) + "\n")
    cal = cal_mod.calibrate(out, bundle, gaps, target_recall=TARGET, confidence=CONFIDENCE)
    site = _by_site(cal)["A"]
    assert site.basis is None and site.recall is None and site.rule is None
    assert site.guarantee is None
    assert f"2 of the {len(a)} audit-sample scans have no verdict (2 of them unflagged)" in \
        site.no_rule_reason
    assert site.recall_note.startswith("Not measured: 2 of the")
    assert site.counts["n_reviewed_audit"] == len(a) - 2
    # the full sample calibrates A
    assert _by_site(_calibrate(setup))["A"].rule is not None


def test_an_infeasible_site_keeps_the_bundles_rule_and_says_what_it_needs(setup):
    cal = _calibrate(setup)
    sites = _by_site(cal)
    need = failures_needed(TARGET, CONFIDENCE)
    c = sites["C"]
    assert c.rule is None and not c.guarantee.feasible and c.guarantee.n_failures == 3
    assert f"at least {need} labelled failures" in c.no_rule_reason
    md = cal.markdown()
    assert f"needs at least {need} labelled failures among the calibration rows; 3 so far" in md
    assert "audit" in sites["B"].no_rule_reason and sites["B"].guarantee is None
    assert sites[cal_mod.UNSPECIFIED].rule is None
    assert "no site" in sites[cal_mod.UNSPECIFIED].no_rule_reason
    content = cal.layer_content("L")
    assert set(content["sites"]) == {"A"}
    assert set(content["uncalibrated"]) == {"B", "C", cal_mod.UNSPECIFIED}
    assert content["uncalibrated"]["C"]["failures_needed"] == need


# ---------------------------------------------------------------------------------------------
# bad verdict files


def _edit(setup_, change) -> Path:
    lines = setup_[2].read_text().splitlines()
    change(lines)
    setup_[2].write_text("\n".join(lines) + "\n")
    return setup_[2]


@pytest.mark.parametrize(("change", "match"), [
    (lambda ls: ls.__setitem__(2, ls[2].replace(ls[2].split("\t")[0], "sub-nobody", 1)),
     r"line 3: participant 'sub-nobody', session 'n/a' is not in the triage output"),
    (lambda ls: ls.__setitem__(3, ls[3].replace(ls[3].split("\t")[2], "fine", 1)),
     r"line 4: unknown verdict 'fine' \(allowed: acceptable, needs_correction, unusable\)"),
    (lambda ls: ls.append(ls[1]), r"line (\d+): a second verdict on .*: lines 2 and \1"),
    (lambda ls: ls.__setitem__(0, ls[0].replace("verdict", "rating")),
     r"line 1: missing column\(s\) verdict; unknown column\(s\) 'rating'"),
    (lambda ls: ls.__setitem__(5, ls[5].replace("2024-05-01T10:00:00Z", "yesterday")),
     r"line 6: time 'yesterday' is not ISO 8601"),
    (lambda ls: ls.__setitem__(2, ls[2] + "\textra"), r"line 3: 7 tab-separated field"),
    (lambda ls: ls.__setitem__(2, ls[2].replace("\tn/a\t", "\tses-Z\t", 1)),
     r"line 3: .*session 'ses-Z' is not in the triage output: no session 'ses-Z'"),
])
def test_a_bad_verdict_file_is_refused_naming_the_line(setup, change, match):
    bundle, out, _, _ = setup
    path = _edit(setup, change)
    with pytest.raises(VerdictError, match=match) as err:
        cal_mod.calibrate(out, bundle, path, target_recall=TARGET, confidence=CONFIDENCE)
    assert str(err.value).startswith(f"{path}, line ")


def test_an_unnamed_reviewer_and_blank_lines_are_allowed(setup):
    bundle, out, path, _ = setup
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    table = read_verdicts(path, cal_mod.scan_table(out, bundle))
    assert (table["reviewer"] == "").any() and table["line"].iloc[0] == 3
    assert table["failed"].tolist() == (table["verdict"] != "acceptable").tolist()


def test_the_cli_reports_a_bad_verdict_file_with_exit_2(setup, tmp_path, capsys):
    bundle, out, _, _ = setup
    path = _edit(setup, lambda ls: ls.__setitem__(2, ls[2].replace(ls[2].split("\t")[2],
                                                                      "good", 1)))
    code = cli.main(["calibrate", str(out), "--model", str(bundle.root), "--verdicts",
                     str(path), "--layer-out", str(tmp_path / "layer")])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}, line 3: unknown verdict 'good'" in err
    assert not (tmp_path / "layer").exists()


# ---------------------------------------------------------------------------------------------
# the layer


def _bundle_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_layer_is_written_beside_the_bundle_and_loads_over_it(setup, tmp_path, capsys):
    bundle, out, verdicts, _ = setup
    before = _bundle_bytes(bundle.root)
    code = cli.main(["calibrate", str(out), "--model", str(bundle.root), "--verdicts",
                     str(verdicts), "--layer-out", str(tmp_path / "site_layer"),
                     "--target-recall", str(TARGET), "--confidence", str(CONFIDENCE)])
    printed = capsys.readouterr().out
    assert code == 0 and "site layer written to" in printed and "A: 60 triaged" in printed
    assert _bundle_bytes(bundle.root) == before  # every file and the manifest unchanged
    layer = tmp_path / "site_layer"
    assert {p.name for p in layer.iterdir()} == {
        "layer.json", "calibration.md", "sites.tsv", "contradictions.tsv", "manifest.json"}
    data = json.loads((layer / "layer.json").read_text())
    assert data["base_bundle"]["manifest_sha256"] == file_digest(bundle.root / "manifest.json")
    assert data["verdicts"]["sha256"] == file_digest(verdicts)
    assert data["target_recall"] == TARGET and data["confidence"] == CONFIDENCE
    layered = layer_mod.load_layer(layer, bundle)
    rule = data["sites"]["A"]
    assert layered.threshold(1, "A") == layered.threshold(2, "A") == rule["threshold"]
    assert layered.combine("A") == "any"
    assert layered.threshold(1, "C") == THRESHOLDS[1] and layered.combine("C") == "half"
    assert layered.threshold(2, None) == THRESHOLDS[2]
    assert layered.layer["digest"] == file_digest(layer / "manifest.json")
    assert bundle.layer is None  # the bundle object itself is untouched too
    sites = pd.read_csv(layer / "sites.tsv", sep="\t", keep_default_na=False)
    assert list(sites["site"]) == ["A", "B", "C", cal_mod.UNSPECIFIED]
    # refused inside the bundle, and over a folder that is not a layer
    with pytest.raises(layer_mod.LayerError, match="inside the bundle"):
        cal_mod.write_calibration(_calibrate(setup), bundle, bundle.root / "layer")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(layer_mod.LayerError, match="not a site layer"):
        cal_mod.write_calibration(_calibrate(setup), bundle, tmp_path / "other")
    assert _bundle_bytes(bundle.root) == before
    cal_mod.write_calibration(_calibrate(setup), bundle, layer)  # an earlier layer: replaced


def test_a_layer_for_another_bundle_or_changed_after_calibration_is_refused(setup, tmp_path):
    bundle = setup[0]
    layer = cal_mod.write_calibration(_calibrate(setup), bundle, tmp_path / "layer")
    other = load_bundle(_fake_bundle(tmp_path / "other_bundle", seed=1))
    with pytest.raises(layer_mod.LayerError, match="written for another bundle"):
        layer_mod.load_layer(layer, other)
    data = json.loads((layer / "layer.json").read_text())
    data["sites"]["A"]["threshold"] += 0.1
    (layer / "layer.json").write_text(json.dumps(data))
    with pytest.raises(layer_mod.LayerError, match="layer.json: checksum mismatch"):
        layer_mod.load_layer(layer, bundle)
    with pytest.raises(layer_mod.LayerError, match="not a wmhqc site layer"):
        layer_mod.load_layer(tmp_path, bundle)


def test_records_of_another_bundle_are_refused(setup, tmp_path):
    bundle, out, verdicts, _ = setup
    other = load_bundle(_fake_bundle(tmp_path / "other_bundle", seed=2))
    with pytest.raises(ValueError, match="triaged with another bundle"):
        cal_mod.calibrate(out, other, verdicts)


# ---------------------------------------------------------------------------------------------
# the chain on the smoke bundle: triage with sites, verdicts, calibrate, triage with the layer


def test_triage_calibrate_and_triage_again_with_the_site_layer(smoke_bundle, bids_input,
                                                              tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(bids_input / "dataset_description.json", raw)
    for sub in ("sub-01", "sub-02"):
        shutil.copytree(bids_input / sub, raw / sub)
    shutil.copytree(bids_input / "sub-03" / "ses-A", raw / "sub-03" / "ses-A")
    (raw / "participants.tsv").write_text("participant_id\tsite\nsub-01\tnorth\n"
                                          "sub-02\tnorth\nsub-03\tnorth\n")
    out, model = tmp_path / "out", str(smoke_bundle.root)
    # participant level without the group files (as array tasks do), then the group level
    assert cli.main(["triage", str(raw), str(out), "participant", "--model", model,
                     "--skip-group", "--quiet", "--audit-fraction", "1"]) == 0
    assert not (out / "group_qc.tsv").exists() and not (out / "group_qc.html").exists()
    assert list((out / "logs").glob("triage-*.log"))
    assert cli.main(["triage", str(raw), str(out), "group", "--model", model]) == 0
    tsv = pd.read_csv(out / "group_qc.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert set(tsv["site"]) == {"north"} and set(tsv["audit"]) == {"true"}
    records = {(r.participant_id, r.session_id): json.loads((out / r.record).read_text())
               for r in cal_mod.scan_table(out, smoke_bundle).itertuples()}
    hib = smoke_bundle.score.higher_is_better
    worst = {p: worst_fold_score(r, hib) for p, r in records.items()}
    for rec in records.values():
        assert rec["rule"]["source"] == "bundle" and rec["rule"]["layer_sha256"] is None
    # verdicts: one failure, chosen so that the site threshold the guarantee gives (at target
    # and confidence 0.5 a single labelled failure suffices) changes at least one flag
    before = {p: bool(r["flagged"]) for p, r in records.items()}
    forced = {p: bool(r["out_of_distribution"] or r["empty_segmentation"])
              for p, r in records.items()}

    def flags_with(threshold: float) -> dict:
        return {p: bool(forced[p] or (worst[p] < threshold if hib else worst[p] > threshold))
                for p in worst}

    best = None
    for failure in worst:
        failed = np.array([p == failure for p in worst])
        g = guaranteed_threshold(np.array(list(worst.values())), failed, 0.5, 0.5, hib)
        changed = sum(flags_with(g.threshold)[p] != before[p] for p in worst)
        if best is None or changed > best[2]:
            best = (failure, g.threshold, changed)
    failure, expected_threshold, changed = best
    assert changed, "no choice of verdicts changes a flag (all scans forced?)"
    verdicts = tmp_path / "verdicts.tsv"
    verdicts.write_text("\n".join(["\t".join(COLUMNS)] + [
        "\t".join([*p, "needs_correction" if p == failure else "acceptable", "n/a",
                   "site lead", "2024-05-01T10:00:00Z"]) for p in records]) + "\n")
    layer = tmp_path / "north_layer"
    capsys.readouterr()
    assert cli.main(["calibrate", str(out), "--model", model, "--verdicts", str(verdicts),
                     "--layer-out", str(layer), "--target-recall", "0.5",
                     "--confidence", "0.5"]) == 0
    assert "north: 3 triaged" in capsys.readouterr().out
    data = json.loads((layer / "layer.json").read_text())
    assert data["sites"]["north"]["threshold"] == pytest.approx(expected_threshold)
    # triage again with the layer: every record is redone under it and flags by the site rule
    assert cli.main(["triage", str(raw), str(out), "participant", "--model", model,
                     "--layer", str(layer), "--quiet", "--audit-fraction", "1"]) == 0
    expected = flags_with(expected_threshold)
    layer_sha = file_digest(layer / "manifest.json")
    for pid in records:
        rec = json.loads((out / _record_path(*pid)).read_text())
        assert rec["rule"]["source"] == "layer" and rec["rule"]["layer_sha256"] == layer_sha
        assert rec["rule"]["combine"] == "any" and rec["site"] == "north"
        assert all(f["threshold"] == pytest.approx(expected_threshold) for f in rec["per_fold"])
        assert rec["flagged"] is expected[pid], pid
        if expected[pid] and not forced[pid]:
            assert "site north's calibrated threshold" in rec["reason"]
            assert "any fold flags" in rec["reason"]
        assert worst_fold_score(rec, hib) == pytest.approx(worst[pid])  # same scores
    # a rerun with another audit fraction redoes nothing and only moves the audit marks
    capsys.readouterr()
    assert cli.main(["triage", str(raw), str(out), "participant", "--model", model,
                     "--layer", str(layer), "--quiet", "--skip-group"]) == 0
    printed = capsys.readouterr().out
    assert "triaged 0 scan(s)" in printed and "3 already done" in printed
    for pid in records:
        rec = json.loads((out / _record_path(*pid)).read_text())
        assert rec["audit"] is False and rec["rule"]["layer_sha256"] == layer_sha
    # a layer of another bundle (its checksums consistent) is refused by triage, with exit 2
    foreign = tmp_path / "foreign"
    shutil.copytree(layer, foreign)
    data["base_bundle"]["manifest_sha256"] = "0" * 64
    (foreign / "layer.json").write_text(json.dumps(data))
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["files"]["layer.json"] = file_digest(foreign / "layer.json")
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(["triage", str(raw), str(out), "participant", "--model", model,
                     "--layer", str(foreign), "--quiet"]) == 2
    assert "written for another bundle" in capsys.readouterr().err
