"""A finished study exported as a self-contained, verified model bundle for triage.

The study answers which QC score finds failed segmentations; a bundle carries that answer to
new scans: every fold's networks, the preprocessing they were trained with, the QC score and
each fold's threshold for it (both chosen on validation rows, never test rows), and a model
card that states what the study measured on its test folds, so triage can say what its flag
promises. Exported with a target recall, the bundle carries instead one threshold for every
fold with a recall guarantee (``qc/guarantee.py``), chosen on the validation rows of all folds
pooled, and the rule that a scan is flagged when any fold flags it (``combine``); the card
states the guarantee, its assumptions and what it costs. Layout of a bundle folder::

    bundle.json         format version, code version, profile, settings, score, thresholds,
                        how the folds' flags combine and the guarantee (when exported with one),
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
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import PreprocessSettings, Profile, load_profile, profile_names
from ..data import cohort, preprocess
from ..qc import evaluation as ev
from ..qc import guarantee as g
from ..study import report
from ..study.environment import code_version
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
#: The values each feature can take at all: a widened range stops there, so a report never
#: reads "voxel size beyond -0.97 mm". Fractions and correlations are bounded; sizes and
#: volumes are non-negative.
FEATURE_BOUNDS = {"brain_fill": (0.0, 1.0), "flair_bright_fraction": (0.0, 1.0),
                  "flair_t1_correlation": (-1.0, 1.0), "flair_smoothness": (-1.0, 1.0)}
NON_NEGATIVE = (0.0, math.inf)

#: The card's flag rule for each way of combining the fold models' flags.
FLAG_RULES = {
    "half": "a scan is flagged when at least half of the fold models flag the delivered "
            "segmentation (the mean of the fold models' MC means cut at 0.5), when nothing is "
            "segmented, or when it is unlike the training cohort",
    "any": "a scan is flagged when any fold model flags the delivered segmentation (the mean "
           "of the fold models' MC means cut at 0.5), when nothing is segmented, or when it is "
           "unlike the training cohort",
}


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
    #: a site calibration layer laid over the bundle (``deploy/layer.py``): its ``sites`` map
    #: a site to the threshold and rule re-chosen on that site's reviewed scans; ``None`` when
    #: triage uses the bundle as exported
    layer: dict | None = None

    @property
    def score(self) -> ev.QCScore:
        s = self.info["score"]
        return ev.QCScore(s["name"], s["column"], s["label"], s["higher_is_better"],
                          s["dice_scale"])

    @property
    def folds(self) -> list[int]:
        return [int(f["fold"]) for f in self.info["folds"]]

    def site_rule(self, site: str | None) -> dict | None:
        """The layer's rule for ``site`` (``threshold``, ``combine``...), or ``None`` when no
        layer is loaded or it has none for this site (the bundle's own rule then applies)."""
        if self.layer is None or site is None:
            return None
        return self.layer.get("sites", {}).get(str(site))

    def threshold(self, fold: int, site: str | None = None) -> float:
        """Fold ``fold``'s threshold: the site layer's for a calibrated site, else the
        bundle's (chosen on that fold's validation rows, or the guaranteed common one)."""
        rule = self.site_rule(site)
        if rule is not None:
            return float(rule["threshold"])
        return next(float(f["threshold"]) for f in self.info["folds"] if f["fold"] == fold)

    def combine(self, site: str | None = None) -> str:
        """How the fold models' flags make the scan's flag: ``"half"`` (at least half of the
        folds flag; the exported default) or ``"any"`` (one fold flagging is enough; the rule
        a recall guarantee holds for, since the recall of "any" is at least each fold's)."""
        rule = self.site_rule(site)
        if rule is not None:
            return str(rule.get("combine", "any"))
        return str(self.info.get("combine", "half"))

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


def _feature_ranges(results_dir: Path, subjects: list[str]) -> dict[str, dict]:
    """Each image feature's range over the study cohort, widened by :data:`OOD_MARGIN` but
    never past the values the feature can take (:data:`FEATURE_BOUNDS`)."""
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
        floor, ceiling = FEATURE_BOUNDS.get(name, NON_NEGATIVE)
        out[name] = {"min": lo, "max": hi, "low": max(lo - pad, floor),
                     "high": min(hi + pad, ceiling)}
    return out


def _eligible(cases: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, list[ev.QCScore]]:
    """The study's cases with the baselines added, and the scores a bundle can carry."""
    cases, scores = report.available_scores(cases, seed=seed)
    return cases, [s for s in scores if s.name in EXPORTABLE]


def _score_choice(cases: pd.DataFrame, score: str | None, seed: int
                  ) -> tuple[ev.QCScore, ev.QCScore | None, pd.DataFrame]:
    """The bundle's score (validation-chosen unless named) and its predicted-Dice regressor."""
    cases, eligible = _eligible(cases, seed)
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


def _guarantee(cases: pd.DataFrame, spec: ev.QCScore, folds: list[int], target: float,
               confidence: float, quality: float) -> tuple[g.RecallGuarantee, dict]:
    """The common guaranteed threshold of the pooled validation rows and its description for
    the bundle, or a :class:`BundleError` that says how many labelled failures are missing."""
    chosen = g.choose_pooled(cases, spec, target, confidence, quality_threshold=quality)
    per_fold = g.failures_per_fold(cases, quality_threshold=quality)
    val = cases[cases["split"] == "val"]
    counts = ", ".join(f"fold {f}: {n}" for f, n in per_fold.items())
    if not chosen.feasible:
        raise BundleError(
            f"--target-recall {target} --confidence {confidence}: no guarantee, nothing "
            f"exported: the choosing rows (the validation cases of folds {folds} pooled, "
            f"{chosen.n_rows} distinct subjects) hold {chosen.n_failures} labelled failures "
            f"(per fold, a subject counted in each fold it validates: {counts}); recall >= "
            f"{target} with {confidence} confidence needs at least {chosen.failures_needed} "
            "labelled failures. Lower the target or the confidence, label more failed cases, "
            "or export without --target-recall")
    described = {
        "statement": chosen.statement(), "target_recall": target, "confidence": confidence,
        "method": chosen.method, "threshold": chosen.threshold,
        "choosing_rows": f"the validation cases of folds {folds} pooled, each subject once "
                         "(the row of the first fold it validates), each scored by a fold "
                         "model that never trained on it",
        "n_rows": chosen.n_rows, "n_validation_rows": len(val),
        "n_subjects": int(val["subject_id"].nunique()),
        "n_failures": chosen.n_failures, "failures_per_fold": per_fold,
        "failures_needed": chosen.failures_needed, "allowed_misses": chosen.allowed_misses,
        "review_fraction_choosing_rows": chosen.review_fraction, "combine": "any",
        "assumptions": [
            "Failures to come are exchangeable with the labelled ones: the same sites, "
            "scanners, protocols and segmenter as the study's cohort. At a site the study "
            "never saw the promise does not hold until that site's own reviewed scans "
            "calibrate a threshold for it.",
            f"A labelled failure is a fold model's own segmentation with lesion Dice < "
            f"{quality}; triage delivers the ensemble's mask (the mean of the fold models), "
            "which no study row labels.",
            "The vote rule is \"any\": a scan is flagged when any fold model flags it. The "
            "recall calibrated here is averaged over the fold models (each choosing row is "
            "scored by one of them), and a scan is flagged whenever the model that scored its "
            "row would flag it, so that average is a floor for the any-fold rule; it is not a "
            "floor for each fold model on its own.",
            f"The {chosen.n_rows} choosing rows are treated as independent draws: one per "
            f"subject ({len(val)} validation rows of {int(val['subject_id'].nunique())} "
            "subjects, since a subject can validate several folds; each keeps its first "
            "fold's row).",
            "The validation cases are not untouched: they also chose the segmentation and "
            "reconstruction networks' checkpoints (early stopping) and the QC score carried "
            "here (lowest AURC). The promise assumes that choice did not make them look "
            "better than new scans; the study's validation and test cases fail at similar "
            "rates (the evaluation chapter prints both).",
            "The promise is on recall alone: how many successful segmentations go to review "
            "is the cost below, measured, not guaranteed."],
    }
    return chosen, described


def export_study(results_dir: str | Path, out_dir: str | Path, *,
                 profile: str | Profile | None = None, score: str | None = None,
                 folds: list[int] | None = None, overwrite: bool = False,
                 target_recall: float | None = None,
                 confidence: float | None = None) -> Bundle:
    """Write the bundle of a finished study (see the module docstring) and return it loaded.

    ``score``: the QC score to carry (default: the lowest AURC on the pooled validation rows,
    the evaluation chapter's rule). ``folds``: default every fold of the profile; each must
    have finished every step. Each fold's threshold is chosen on that fold's validation rows
    with the profile's ``evaluation.select`` rule, and at least half the folds must flag.

    ``target_recall`` (with ``confidence``, default :data:`qc.guarantee.DEFAULT_CONFIDENCE`):
    instead, one threshold for every fold, guaranteed on the validation rows of all exported
    folds pooled (:mod:`qc.guarantee`), and a scan is flagged when any fold flags it; the card
    states the guarantee, its assumptions and its cost. When the rows hold too few failures
    the export raises :class:`BundleError` and writes nothing.
    """
    if confidence is not None and target_recall is None:
        raise BundleError(f"--confidence {confidence} without --target-recall: a confidence "
                          "belongs to a target recall")
    if target_recall is not None:
        confidence = g.DEFAULT_CONFIDENCE if confidence is None else float(confidence)
        try:
            g.check_target(float(target_recall), confidence)
        except ValueError as exc:
            raise BundleError(f"--target-recall/--confidence: {exc}") from None
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
    guaranteed, guarantee = None, None
    if target_recall is not None:
        guaranteed, guarantee = _guarantee(cases, chosen, folds, float(target_recall),
                                           confidence, quality)
    evaluation = ev.evaluate_folds(cases, chosen, select=rule, quality_threshold=quality)
    test = cases[cases["split"] == "test"]
    test = pd.concat([test[test["fold"] == f] for f in folds])
    n_boot = int(section.get("bootstrap_samples", 1000))
    boot = ev.bootstrap_intervals(test, chosen, n_boot=n_boot, seed=prof.seed,
                                  quality_threshold=quality)
    operating = {rechoose: ev.operating_point(cases, chosen, rule, n_boot=n_boot,
                                              seed=prof.seed, rechoose=rechoose,
                                              quality_threshold=quality)
                 for rechoose in (True, False)}
    stability = report.choice_stability(*_eligible(cases, prof.seed), n_boot=n_boot,
                                        seed=prof.seed)
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
        threshold = (guaranteed.threshold if guaranteed is not None
                     else evaluation.thresholds[fold])
        fold_info.append({"fold": fold, "threshold": float(threshold)})
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
    if guarantee is not None:
        info["combine"] = "any"
        info["guarantee"] = guarantee
    card = {
        "score": chosen.label, "failure": f"lesion Dice < {quality} on the native FLAIR grid",
        "threshold_rule": f"{rule}, chosen per fold on that fold's validation cases",
        "flag_rule": FLAG_RULES["half"],
        "test_operating_point": operating[True],
        "test_operating_point_fixed_thresholds": operating[False],
        "promise": ["recall", "specificity", "review_fraction"],
        "operating_point_note": "each test case flagged by the fold model that never saw it, "
                                "with that fold's threshold; the 95 % intervals resample each "
                                "fold's validation and test cases and choose the thresholds "
                                "again in every resample; triage lets all fold models vote on "
                                "the delivered segmentation, which the study cannot test (each "
                                "case is test data for one fold model only), and it scores "
                                "the delivered mask with each fold model's own maps, while the "
                                "thresholds, the prevalence and these figures come from each "
                                "fold model's own mask: the deployed rule is measured on new "
                                "scans (deployed_check)",
        "choice_stability": ev.to_jsonable(stability.reset_index().to_dict(orient="records")),
        "choice_stability_note": report.stability_note(stability) if score is None else
        (f"named by the user ({chosen.label}); the validation rows would choose: "
         + report.stability_note(stability)),
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
    if guarantee is not None:
        cost = g.guarantee_cost(cases, chosen, guarantee["target_recall"],
                                guarantee["confidence"], n_boot=n_boot, seed=prof.seed,
                                quality_threshold=quality)
        cost.pop("guarantee")
        card.update(_guarantee_card(guarantee, cost, operating[True], rule))
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


def deployed_operating_point(card: dict) -> tuple[dict, str]:
    """The test-fold operating point of the rule the bundle deploys, with a label naming it:
    the guaranteed threshold's cost when the bundle carries a recall guarantee (each test case
    flagged by its own fold model at that threshold: the any-fold rule flags at least these),
    else the profile's rule. Every promise made from a card (pages, CLI, the deployed-rule
    check) reads it here, so none compares new scans with a rule the bundle does not use."""
    guarantee = card.get("guarantee")
    if guarantee and guarantee.get("cost"):
        return guarantee["cost"], ("guaranteed threshold, each case flagged by its own fold "
                                   "model: a floor for the any-fold rule")
    return card.get("test_operating_point") or {}, "the profile's rule"


def _guarantee_card(guarantee: dict, cost: dict, profile_op: dict, rule: str) -> dict:
    """The card's entries for a guaranteed threshold: its rules, the guarantee with its cost
    on the test folds, and which operating point is the profile's rule."""
    return {
        "threshold_rule": (f"one threshold for every fold, chosen on the validation cases of "
                           f"all exported folds pooled so that recall >= "
                           f"{guarantee['target_recall']} holds with "
                           f"{guarantee['confidence']} confidence (the guarantee)"),
        "flag_rule": FLAG_RULES["any"],
        "guarantee": guarantee | {
            "cost": cost,
            "cost_note": "the test cases of all folds pooled, each flagged by the fold model "
                         "that never saw it with the common threshold. The deployed any-fold "
                         "rule flags at least these, so its review fraction and recall on new "
                         "scans are at least these (the other fold models trained on a test "
                         "case and cannot score it fairly); 95 % intervals from "
                         "resampling each fold's validation and test cases, the threshold "
                         "chosen again on the resampled validation cases (a resample with too "
                         "few failures for the guarantee reviews every case)",
            "profile_rule": rule,
            "profile_rule_review_fraction": profile_op["review_fraction"],
            "profile_rule_recall": profile_op["recall"]},
        "test_operating_point_rule": (f"the profile's rule ({rule}, a threshold per fold, "
                                      "half the folds must flag), for comparison: this "
                                      "bundle flags with the guaranteed threshold instead"),
    }


def _interval(d: dict | None) -> str:
    if not d or d.get("estimate") is None or not math.isfinite(d["estimate"]):
        return "undefined (no case to count it on)"
    return f"{d['estimate']:.2f} (95 % CI {d['low']:.2f} to {d['high']:.2f})"


def _guarantee_markdown(guarantee: dict, cohort_text: str) -> list[str]:
    """The card's recall guarantee for people: the promise, what it rests on, what it costs."""
    cost = guarantee["cost"]
    per_fold = ", ".join(f"fold {f}: {n}" for f, n in guarantee["failures_per_fold"].items())
    recall = cost["recall"]
    bound = recall.get("lower_bound")
    bound_text = (f"; one-sided Clopper–Pearson lower bound at {guarantee['confidence']:.0%} "
                  f"confidence {bound:.2f}" if bound is not None and math.isfinite(bound)
                  else "")
    lines = [
        "## Recall guarantee", "",
        f"**{guarantee['statement'][0].upper() + guarantee['statement'][1:]}.**", "",
        f"- Target recall {guarantee['target_recall']}, confidence "
        f"{guarantee['confidence']}: one threshold, {guarantee['threshold']:.4g}, for every "
        f"fold, and a scan is flagged when any fold model flags it.",
        f"- Chosen on {guarantee['choosing_rows']}: {guarantee['n_rows']} cases from "
        f"{cohort_text}, {guarantee['n_failures']} labelled failures (per fold, a subject "
        f"counted in each fold it validates: {per_fold}). The "
        f"guarantee needs at least {guarantee['failures_needed']}; with "
        f"{guarantee['n_failures']} the threshold may leave {guarantee['allowed_misses']} of "
        "them unflagged.",
        f"- Method: {guarantee['method']}.", "",
        "It rests on these assumptions:", ""]
    lines += [f"- {a}" for a in guarantee["assumptions"]]
    lines += [
        "", f"What it costs on the study's {cost['n_cases']} test cases ({cost['n_failed']} "
        f"failed; {guarantee['cost_note']}; {cost['n_infeasible_resamples']} of "
        f"{cost['n_boot']} resamples held too few failures):", "",
        f"- review fraction: {_interval(cost['review_fraction'])} (the any-fold rule "
        "reviews at least this); the profile's rule "
        f"(`{guarantee['profile_rule']}`): "
        f"{_interval(guarantee['profile_rule_review_fraction'])}",
        f"- recall (failures flagged): {_interval(recall)}{bound_text}",
        f"- precision: {_interval(cost['precision'])} at failure prevalence "
        f"{_interval(cost['prevalence'])}", ""]
    return lines


def card_markdown(card: dict, deployed: dict | None = None) -> str:
    """The model card for people: what a flag promises, measured on the study's test folds,
    and (once :func:`add_deployed_check` stored it) what the deployed rule did on new scans."""
    op = card["test_operating_point"]
    fixed = card.get("test_operating_point_fixed_thresholds")
    rule = card["flag_rule"]
    cohort_text = ("a **synthetic** cohort" if card["cohort"]["synthetic"] else "a real cohort")
    guarantee = card.get("guarantee")
    lines = [
        "# QC model card", "",
        f"- QC score: {card['score']}; failure means {card['failure']}.",
        f"- Thresholds: {card['threshold_rule']}. {rule[0].upper() + rule[1:]}.",
        f"- Trained and tested on {cohort_text} of {card['cohort']['n_subjects']} subjects "
        f"({', '.join(card['cohort']['datasets'])}; sites {', '.join(card['cohort']['sites'])}),"
        f" profile `{card['profile']}`, folds {card['folds']}, code {card['code_version']}.",
        f"- Choice of the score: {card.get('choice_stability_note', 'not measured')}", ""]
    promise = ("What a flag promises (95 % intervals with the thresholds chosen again in every "
               "resample):")
    if guarantee:
        lines += _guarantee_markdown(guarantee, cohort_text)
        lines += ["## The profile's rule, for comparison (not this bundle's thresholds)", "",
                  f"The operating point below is {card['test_operating_point_rule']}.", ""]
        promise = ("What a flag of the profile's rule promises (95 % intervals with the "
                   "thresholds chosen again in every resample):")
    lines += [
        f"On the study's {op['n_cases']} test cases, {op['n_failed']} failed: failure "
        f"prevalence {_interval(op.get('prevalence'))}.", "", promise, "",
        f"- recall (failures flagged): {_interval(op['recall'])}",
        f"- specificity (successes passed): {_interval(op.get('specificity'))}",
        f"- review fraction: {_interval(op['review_fraction'])}", "",
        f"Precision of a flag, {_interval(op['precision'])}, holds only at this prevalence: "
        "at a site where fewer segmentations fail, fewer flags are failures.",
        f"Failure AUROC {_interval(card['failure_auroc'])}.", ""]
    if fixed:
        lines += [f"With the thresholds held fixed the intervals would be narrower (recall "
                  f"{fixed['recall']['low']:.2f} to {fixed['recall']['high']:.2f}, review "
                  f"fraction {fixed['review_fraction']['low']:.2f} to "
                  f"{fixed['review_fraction']['high']:.2f}); they would leave out that each "
                  "threshold was chosen on a few validation cases.", ""]
    lines += [f"Each test case was flagged by the fold model that never saw it: "
              f"{card['operating_point_note'].split('; ', 1)[1]}. These are the study's "
              "test-fold figures; scans unlike its cohort carry no promise.", ""]
    if deployed:
        lines += ["## The deployed rule on new scans", "",
                  f"{deployed['n_scans']} new synthetic scans from the study's sites (seeds "
                  f"{deployed.get('seeds')}), {deployed['n_failed']} failed, "
                  f"{deployed.get('n_error', 0)} in error (counted as sent to review), "
                  "triaged with this "
                  "bundle's full rule (vote of the fold models on the delivered segmentation, "
                  "empty-segmentation and out-of-distribution checks); Wilson 95 % intervals:",
                  "",
                  f"- recall: {_interval(deployed['recall'])}",
                  f"- specificity: {_interval(deployed['specificity'])}",
                  f"- review fraction: {_interval(deployed['review_fraction'])}",
                  f"- precision: {_interval(deployed['precision'])} at prevalence "
                  f"{_interval(deployed['prevalence'])}", ""]
    return "\n".join(lines)


DEPLOYED_CHECK = "deployed_check.json"


def add_deployed_check(root: str | Path, measured: dict) -> None:
    """Store what the deployed rule achieved on new scans (``benchmarks/deployed_rule.py``) in
    the bundle: ``deployed_check.json``, the card's Markdown rewritten to show it, both listed
    in the manifest. The networks, thresholds and the study's own card stay as exported."""
    root = Path(root)
    bundle = load_bundle(root)
    missing = [k for k in ("n_scans", "n_failed", "recall", "specificity", "review_fraction",
                           "precision", "prevalence") if k not in measured]
    if missing:
        raise BundleError(f"deployed check lacks {missing}")
    (root / DEPLOYED_CHECK).write_text(json.dumps(ev.to_jsonable(measured), indent=1))
    (root / CARD_MD).write_text(card_markdown(bundle.card, measured))
    manifest = json.loads((root / MANIFEST).read_text())
    for name in (DEPLOYED_CHECK, CARD_MD):
        manifest["files"][name] = file_digest(root / name)
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / MANIFEST)


# ---------------------------------------------------------------------------------------------
# Load


def verify_manifest(root: Path, *, what: str, fmt: int, error: type[ValueError],
                    changed_after: str, again: str) -> dict:
    """Read ``root``'s manifest and check its format and every listed file's checksum, raising
    ``error`` that names the file and the problem; the manifest read. Bundles and site layers
    are both checked this way before anything in them is used."""
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise error(f"{root}: not a {what} (no such folder)")
    if not manifest_path.is_file():
        raise error(f"{root}: not a {what} ({MANIFEST} missing)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{manifest_path}: unreadable ({exc})") from None
    found = manifest.get("format")
    if found != fmt:
        raise error(f"{root}: {what} format {found!r}, this wmhqc reads format {fmt}; {again}")
    for rel, digest in (manifest.get("files") or {}).items():
        file = root / rel
        if not file.is_file():
            raise error(f"{file}: listed in {MANIFEST} but missing")
        if file_digest(file) != digest:
            raise error(f"{file}: checksum mismatch (the file changed after {changed_after})")
    return manifest


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle, checking its format version and every file's checksum first."""
    root = Path(path)
    verify_manifest(root, what="wmhqc model bundle", fmt=BUNDLE_FORMAT, error=BundleError,
                    changed_after="export", again="export the study again with this version")
    info = json.loads((root / INFO).read_text())
    if info.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{root / INFO}: format {info.get('format')!r}, expected "
                          f"{BUNDLE_FORMAT}")
    card = json.loads((root / CARD).read_text())
    if (root / DEPLOYED_CHECK).is_file():
        card["deployed_check"] = json.loads((root / DEPLOYED_CHECK).read_text())
    return Bundle(root, info, card)
