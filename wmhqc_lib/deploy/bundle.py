"""A finished study exported as a self-contained, verified model bundle for triage.

The study answers which QC score finds failed segmentations; a bundle carries that answer to
new scans: every fold's networks, the preprocessing they were trained with, the QC score and
each fold's threshold for it (both chosen on validation rows, never test rows), and a model
card that states what the study measured on its test folds, so triage can say what its flag
promises. Layout of a bundle folder::

    bundle.json         format version, code version, profile, settings, score, thresholds,
                        the validation cases' scores (to place a new scan among them) and the
                        training cohort's image-feature ranges (out-of-distribution check)
    model_card.json     the measured operating point on the study's test folds, with intervals
    model_card.md       the same for people
    fold<k>/mc_unet.keras, rec_unet.keras, dr_<input>[_widened].keras
    manifest.json       format version and the SHA-256 of every file above

:func:`load_bundle` checks the format version and every checksum before anything is used.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import PreprocessSettings, Profile, load_profile, profile_names
from ..data import cohort, preprocess
from ..qc import evaluation as ev
from ..study import report
from ..study.steps import FoldPaths, file_digest

# ``qc.regression`` is imported where it is used: it loads Keras and TensorFlow (10 s), and
# triage's worker processes import this module only to unpickle a Bundle while they
# preprocess scans and draw report pages.

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
INFO = "bundle.json"
CARD = "model_card.json"
CARD_MD = "model_card.md"
#: Scores a bundle can compute for a new scan: the registry's, less the random baseline.
EXPORTABLE = tuple(s.name for s in ev.QC_SCORES if s.column != ev.RANDOM_COLUMN)
#: How far outside the training cohort's range a feature may go: half the range, or a tenth
#: of the feature's magnitude where the cohort is too small or too uniform to show its spread.
OOD_MARGIN, OOD_RELATIVE = 0.5, 0.1
#: Features checked against the cohort's range (shear is checked by rule, see triage).
OOD_FEATURES = tuple(f for f in preprocess.IMAGE_FEATURES if f != "axis_skew_deg")


class BundleError(ValueError):
    """A study that cannot be exported, or a bundle that cannot be trusted; says why."""


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle."""

    root: Path
    info: dict
    card: dict
    #: the networks triage loaded from this bundle, kept for its next run in this process
    #: (loading and tracing them costs seconds per run)
    networks: list = field(default_factory=list, compare=False, repr=False)

    @property
    def score(self) -> ev.QCScore:
        s = self.info["score"]
        return ev.QCScore(s["name"], s["column"], s["label"], s["higher_is_better"],
                          s["dice_scale"])

    @property
    def folds(self) -> list[int]:
        return [int(f["fold"]) for f in self.info["folds"]]

    def threshold(self, fold: int) -> float:
        return next(float(f["threshold"]) for f in self.info["folds"] if f["fold"] == fold)

    def model_path(self, fold: int, name: str) -> Path:
        return self.root / f"fold{fold}" / f"{name}.keras"

    @property
    def preprocess_settings(self) -> PreprocessSettings:
        p = self.info["preprocess"]
        return PreprocessSettings(tuple(p["voxel_mm"]), tuple(p["shape"]),
                                  tuple(p["clip_percentiles"]), float(p["crop_margin_mm"]), 1)

    @property
    def dr_models(self) -> list[str]:
        """Names of the Dice regressors in every fold (``dr_image``, ``dr_error_widened``...)."""
        return list(self.info["dice_regressors"])


def code_version() -> str:
    """The package version and, in a git checkout, the commit (``-dirty`` with local edits)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("wmhqc")
    except PackageNotFoundError:
        text = "unknown"
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True
                                ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no", "--", "wmhqc_lib"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        text += f"+g{commit}" + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def profile_of(results_dir: str | Path, profile: str | Profile | None) -> Profile:
    """The profile a study ran with: given, or the results folder's name (``results/cpu``)."""
    if isinstance(profile, Profile):
        return profile
    if profile:
        return load_profile(profile)
    name = Path(results_dir).resolve().name
    names = profile_names()
    if name not in names:
        raise BundleError(f"{results_dir}: cannot tell which profile this study ran with; "
                          f"pass --profile ({', '.join(names)})")
    return load_profile(name)


# ---------------------------------------------------------------------------------------------
# Export


def _required_files(results_dir: Path, fold: int, dr_names: list[str]) -> dict[str, Path]:
    paths = FoldPaths.under(results_dir, fold)
    files = {"mc_unet": paths.mc_unet / "best.keras", "rec_unet": paths.rec_unet / "best.keras"}
    for name in dr_names:
        kind, _, variant = name.removeprefix("dr_").partition("_")
        files[name] = paths.dr / (variant or "main") / kind / "best.keras"
    return files


def _check_finished(results_dir: Path, folds: list[int], dr_names: list[str]) -> None:
    """Refuse an unfinished or failed study, naming the first missing step of each fold."""
    steps = (("mc_unet", "the MC U-net (02_mc_unet)"), ("rec_unet",
             "the reconstruction U-net (04_rec_unet)"))
    problems = []
    for fold in folds:
        paths = FoldPaths.under(results_dir, fold)
        files = _required_files(results_dir, fold, dr_names)
        missing = [label for key, label in steps if not files[key].exists()]
        if not missing and not (paths.mc / "mc_cases.csv").exists():
            missing.append("the uncertainty step (03_uncertainty)")
        if not missing and (not (paths.dr / "dr_cases.csv").exists()
                            or any(not files[n].exists() for n in dr_names)):
            missing.append("the Dice regression step (05_dice_regression)")
        if missing:
            problems.append(f"fold {fold}: {missing[0]} has not finished")
    if problems:
        raise BundleError(f"{results_dir}: the study is not finished, nothing exported:\n  "
                          + "\n  ".join(problems))


def _dr_names(cases: pd.DataFrame) -> list[str]:
    """The Dice-regressor columns of the study (main, and widened when it was trained)."""
    from ..qc import regression as rg

    return [rg.column_name(k, v) for v in rg.VARIANTS for k in rg.INPUT_KINDS
            if rg.column_name(k, v) in cases.columns and cases[rg.column_name(k, v)].notna().any()]


def _operating_point(test: pd.DataFrame, flagged: np.ndarray, quality: float, n_boot: int,
                     seed: int) -> dict:
    """Precision, recall and review fraction of the flags on pooled test rows, with
    percentile bootstrap 95 % intervals over cases."""
    failed = test[ev.DICE_COLUMN].to_numpy(dtype=float) < quality
    rng = np.random.default_rng([seed, 12])
    idx = rng.integers(0, len(failed), (n_boot, len(failed)))
    f, g = failed[idx], flagged[idx]
    tp = (f & g).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = {"precision": tp / g.sum(axis=1), "recall": tp / f.sum(axis=1),
                "review_fraction": g.mean(axis=1)}
    tp0 = int((failed & flagged).sum())
    point = {"precision": tp0 / flagged.sum() if flagged.any() else math.nan,
             "recall": tp0 / failed.sum() if failed.any() else math.nan,
             "review_fraction": float(flagged.mean())}
    out = {}
    for name, values in boot.items():
        valid = values[np.isfinite(values)]
        low, high = np.quantile(valid, [0.025, 0.975]) if len(valid) else (math.nan, math.nan)
        out[name] = {"estimate": float(point[name]), "low": float(low), "high": float(high)}
    out["n_cases"], out["n_failed"], out["n_flagged"] = (len(failed), int(failed.sum()),
                                                          int(flagged.sum()))
    return out


def _feature_ranges(results_dir: Path, subjects: list[str]) -> dict[str, dict]:
    """Each image feature's range over the study cohort, widened by :data:`OOD_MARGIN`."""
    cache = cohort.CohortPaths.under(results_dir).cache
    rows = []
    for sid in subjects:
        meta = json.loads((preprocess.case_dir(cache, sid) / "meta.json").read_text())
        if "image_features" not in meta:
            raise BundleError(f"{cache / sid}: preprocessed before image features were stored; "
                              "rerun the data step (make reproduce redoes it)")
        rows.append(meta["image_features"])
    table = pd.DataFrame(rows)
    out = {}
    for name in OOD_FEATURES:
        lo, hi = float(table[name].min()), float(table[name].max())
        pad = max(OOD_MARGIN * (hi - lo), OOD_RELATIVE * max(abs(lo), abs(hi)))
        out[name] = {"min": lo, "max": hi, "low": lo - pad, "high": hi + pad}
    return out


def _score_choice(cases: pd.DataFrame, score: str | None, seed: int
                  ) -> tuple[ev.QCScore, ev.QCScore | None, pd.DataFrame]:
    """The bundle's score (validation-chosen unless named) and its predicted-Dice regressor."""
    cases, scores = report.available_scores(cases, seed=seed)
    eligible = [s for s in scores if s.name in EXPORTABLE]
    if score is None:
        chosen, table = report.choose_score(cases, eligible)
    else:
        names = {s.name: s for s in eligible} | {s.column: s for s in eligible}
        if score not in names:
            raise BundleError(f"--score {score!r}: not a score this study can export; "
                              f"choose one of {sorted(s.name for s in eligible)}")
        chosen, table = names[score], report.choose_score(cases, eligible)[1]
    regressors = [s for s in eligible if s.dice_scale]
    dice = chosen if chosen.dice_scale else (
        report.choose_score(cases, regressors)[0] if regressors else None)
    return chosen, dice, table


def export_study(results_dir: str | Path, out_dir: str | Path, *,
                 profile: str | Profile | None = None, score: str | None = None,
                 folds: list[int] | None = None, overwrite: bool = False) -> Bundle:
    """Write the bundle of a finished study (see the module docstring) and return it loaded.

    ``score``: the QC score to carry (default: the lowest AURC on the pooled validation rows,
    the evaluation chapter's rule). ``folds``: default every fold of the profile; each must
    have finished every step. Each fold's threshold is chosen on that fold's validation rows
    with the profile's ``evaluation.select`` rule.
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    prof = profile_of(results_dir, profile)
    folds = sorted(folds or range(1, prof.folds.n_folds + 1))
    missing = [f for f in folds if not FoldPaths.under(results_dir, f).cases.exists()]
    if missing:
        raise BundleError(f"{results_dir}: the study is not finished, nothing exported: "
                          f"fold(s) {missing} have no cases.csv (run make reproduce)")
    cases = report.load_all_cases(results_dir, folds)
    dr_names = _dr_names(cases)
    _check_finished(results_dir, folds, dr_names)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise BundleError(f"{out_dir}: exists and is not empty (pass --force to replace)")
    section = prof.section("evaluation")
    quality, rule = float(section["quality_threshold"]), str(section["select"])
    chosen, dice_spec, val_table = _score_choice(cases, score, prof.seed)
    evaluation = ev.evaluate_folds(cases, chosen, select=rule, quality_threshold=quality)
    test = cases[cases["split"] == "test"]
    flagged = np.concatenate([
        ev.flag_cases(test.loc[test["fold"] == f, chosen.column].to_numpy(float),
                      evaluation.thresholds[f], chosen.higher_is_better) for f in folds])
    test = pd.concat([test[test["fold"] == f] for f in folds])
    n_boot = int(section.get("bootstrap_samples", 1000))
    boot = ev.bootstrap_intervals(test, chosen, n_boot=n_boot, seed=prof.seed,
                                  quality_threshold=quality)
    manifest, prep, _ = cohort.load(results_dir)
    subjects = sorted(set(cases["subject_id"]))
    used = manifest[manifest["subject_id"].isin(subjects)]

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fold_info = []
    for fold in folds:
        folder = tmp / f"fold{fold}"
        folder.mkdir()
        for name, src in _required_files(results_dir, fold, dr_names).items():
            shutil.copy2(src, folder / f"{name}.keras")
        fold_info.append({"fold": fold, "threshold": float(evaluation.thresholds[fold])})
    val = cases[cases["split"] == "val"]
    reference = {"fold": val["fold"].astype(int).tolist(),
                 "score": val[chosen.column].astype(float).tolist(),
                 "true_dice": val[ev.DICE_COLUMN].astype(float).tolist()}
    if dice_spec is not None:
        reference["predicted_dice"] = val[dice_spec.column].astype(float).tolist()
    mc, rec = prof.section("mc_unet"), prof.section("rec_unet")
    info = {
        "format": BUNDLE_FORMAT, "generated_by": {"name": "wmhqc", "version": code_version()},
        "profile": prof.name, "seed": prof.seed,
        "preprocess": {"voxel_mm": list(prof.preprocess.voxel_mm),
                       "shape": list(prof.preprocess.shape),
                       "clip_percentiles": list(prof.preprocess.clip_percentiles),
                       "crop_margin_mm": prof.preprocess.crop_margin_mm,
                       "version": preprocess.PREPROCESS_VERSION},
        "mc": {"samples": int(mc["mc_samples"]), "batch": int(mc["mc_batch"])},
        "rec": {"infer_batch": int(rec.get("infer_batch", 4)),
                "ssim": {k: rec[k] for k in ("ssim_window", "ssim_sigma", "ssim_mode")
                         if k in rec}},
        "quality_threshold": quality, "threshold_rule": rule,
        "score": {"name": chosen.name, "column": chosen.column, "label": chosen.label,
                  "higher_is_better": chosen.higher_is_better, "dice_scale": chosen.dice_scale,
                  "chosen_by": "argument" if score else "lowest AURC on pooled validation rows"},
        "predicted_dice": dice_spec.column if dice_spec is not None else None,
        "dice_regressors": dr_names,
        "folds": fold_info,
        "validation_reference": reference,
        "feature_ranges": _feature_ranges(results_dir, subjects),
    }
    card = {
        "score": chosen.label, "failure": f"lesion Dice < {quality} on the native FLAIR grid",
        "threshold_rule": f"{rule}, chosen per fold on that fold's validation cases",
        "flag_rule": "a scan is flagged when at least half of the fold models flag it, or when "
                     "it is unlike the training cohort",
        "test_operating_point": _operating_point(test, flagged, quality, n_boot, prof.seed),
        "operating_point_note": "each test case flagged by the fold model that never saw it, "
                                "with that fold's threshold; triage lets all fold models vote, "
                                "which the study cannot test (each case is test data for one "
                                "fold model only)",
        "failure_auroc": {k: float(boot.loc["failure_auroc", k]) for k in ("estimate", "low",
                                                                            "high")},
        "aurc": {k: float(boot.loc["aurc", k]) for k in ("estimate", "low", "high")},
        "validation_choice": ev.to_jsonable(val_table.reset_index().to_dict(orient="records")),
        "cohort": {"synthetic": bool(used["synthetic"].astype(str).str.lower()
                                     .eq("true").all()),
                   "n_subjects": len(used), "datasets": sorted(used["dataset"].unique()),
                   "sites": sorted(used["site"].astype(str).unique()),
                   "n_preprocessing_failed": int((prep["status"] == "failed").sum())},
        "profile": prof.name, "folds": folds, "code_version": info["generated_by"]["version"],
    }
    (tmp / INFO).write_text(json.dumps(ev.to_jsonable(info), indent=1))
    (tmp / CARD).write_text(json.dumps(ev.to_jsonable(card), indent=1))
    (tmp / CARD_MD).write_text(card_markdown(card))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    (tmp / MANIFEST).write_text(json.dumps({
        "format": BUNDLE_FORMAT,
        "files": {p.relative_to(tmp).as_posix(): file_digest(p) for p in files}}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)  # an old bundle goes only once the new is whole
    tmp.replace(out_dir)
    return load_bundle(out_dir)


def card_markdown(card: dict) -> str:
    """The model card for people: what a flag promises, measured on the study's test folds."""
    op = card["test_operating_point"]

    def ci(d: dict) -> str:
        if d["estimate"] is None or not math.isfinite(d["estimate"]):
            return "undefined (every test case, or none, failed)"
        return f"{d['estimate']:.2f} (95 % CI {d['low']:.2f} to {d['high']:.2f})"

    cohort_text = ("a **synthetic** cohort" if card["cohort"]["synthetic"] else "a real cohort")
    return "\n".join([
        "# QC model card", "",
        f"- QC score: {card['score']}; failure means {card['failure']}.",
        f"- Thresholds: {card['threshold_rule']}. {card['flag_rule'].capitalize()}.",
        f"- Trained and tested on {cohort_text} of {card['cohort']['n_subjects']} subjects "
        f"({', '.join(card['cohort']['datasets'])}; sites {', '.join(card['cohort']['sites'])}),"
        f" profile `{card['profile']}`, folds {card['folds']}, code {card['code_version']}.",
        "", f"On the study's {op['n_cases']} test cases ({op['n_failed']} failed):", "",
        f"- precision of a flag: {ci(op['precision'])}",
        f"- recall (failures flagged): {ci(op['recall'])}",
        f"- review fraction: {ci(op['review_fraction'])}",
        f"- failure AUROC: {ci(card['failure_auroc'])}", "",
        f"Each test case was flagged by the fold model that never saw it: "
        f"{card['operating_point_note'].split('; ', 1)[1]}. These are the study's test-fold "
        "figures; scans unlike its cohort carry no promise.", ""])


# ---------------------------------------------------------------------------------------------
# Load


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle, checking its format version and every file's checksum first."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root}: not a wmhqc model bundle ({MANIFEST} missing)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path}: unreadable ({exc})") from None
    found = manifest.get("format")
    if found != BUNDLE_FORMAT:
        raise BundleError(f"{root}: bundle format {found!r}, this wmhqc reads format "
                          f"{BUNDLE_FORMAT}; export the study again with this version")
    for rel, digest in manifest["files"].items():
        file = root / rel
        if not file.is_file():
            raise BundleError(f"{file}: listed in {MANIFEST} but missing")
        if file_digest(file) != digest:
            raise BundleError(f"{file}: checksum mismatch (the file changed after export)")
    info = json.loads((root / INFO).read_text())
    if info.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{root / INFO}: format {info.get('format')!r}, expected "
                          f"{BUNDLE_FORMAT}")
    return Bundle(root, info, json.loads((root / CARD).read_text()))
