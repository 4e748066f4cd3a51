"""QC of new scans with an exported study (the paper's Figure 1b): segment, score, flag.

Inputs: a BIDS dataset (``sub-*/[ses-*/]anat/*_FLAIR.nii[.gz]`` with the matching ``*_T1w``),
a manifest CSV (``subject_id``, ``flair``, ``t1``; as ``wmhqc data index`` writes) or one
FLAIR/T1 pair. Per scan: the study's preprocessing; every fold model's MC inference; the
*delivered* segmentation is the mean of the fold models' MC means cut at 0.5.

QC judges the segmentation it delivers. Fold model k scores the delivered mask with its own
networks and its own MC maps: its reconstruction net fills the delivered mask (error maps and
their scores), its entropy is read in and around the delivered mask, and its Dice regressors
see the pair built from the delivered mask (with fold k's entropy or error map), so each is
asked for the Dice of the delivered mask. The thresholds were chosen on scores of each fold
model's own mask (with maps that matched it), never on this pairing: how the deployed rule
fares is measured on new scans (``benchmarks/deployed_rule.py``), not assumed. Scores that read
no mask
(:data:`MASK_FREE_SCORES`: the entropy and mutual-information sums and the pairwise Dice of
fold k's MC samples) describe fold k's own samples; a record names which scores are which
(``scores_on_delivered_mask``, ``scores_of_fold_samples``). Each fold compares the bundle's QC
score with its threshold (:meth:`Bundle.threshold`), and the folds' flags combine by the
bundle's rule (:meth:`Bundle.combine`): ``half``, the scan is flagged when at least half of the
folds flag it (a tie goes to review), or ``any``, when one fold does (the rule a recall
guarantee holds for). A site layer (``deploy/layer.py``, ``--layer``) replaces both for the
scans of the sites it calibrated; a scan's site comes from the raw dataset's
``participants.tsv``, a manifest's ``site`` column or ``--site``. A scan is flagged whatever
the rule when it is unlike the training cohort (out-of-distribution check on image features),
or when nothing is segmented (an empty mask scores as a sure one: two empty samples agree
perfectly and carry no entropy). The record stores the rule it applied (``rule``). The
predicted Dice is the fold regressors' mean, clipped to [0, 1] (``predicted_dice_raw`` keeps
the mean).

An audit sample (``audit_fraction``) marks scans at random, flagged or not, for review: the
reviewers' verdicts on flagged scans alone cannot show what the flags miss, and those on a
random sample can (``wmhqc calibrate``). Which scans it marks follows from the bundle's seed and
the scan's participant and session only, so reruns and parallel tasks agree, and a larger
fraction marks a superset.

Outputs form a BIDS derivative dataset (:data:`OUTPUT_SUFFIXES`); a scan's record
(``..._desc-wmhqc_qc.json``) is written last, so a scan without one is unfinished. Records,
sidecars, ``group_qc.tsv`` and the pages name the inputs relative to the raw dataset
(``bids:raw:sub-01/anat/...``); only ``dataset_description.json`` says where it lies. A record
holds the SHA-256 of the bundle's manifest, of the site layer's (if any) and of its FLAIR and
T1, and its site; a rerun skips a scan only when its record says ``ok`` and these are
unchanged. Any failure while one scan is processed gives that scan a record with status
``error`` and its reason; the other scans go on. Several participant-level processes may write
into one output folder at once (SLURM array tasks, ``group=False``): every shared file is
replaced atomically and each process logs to its own file under ``logs/``; the group level
then builds ``group_qc.tsv`` and the pages from the records.

Exit codes (:attr:`TriageSummary.exit_code`, and of ``wmhqc triage``): :data:`EXIT_OK` (0)
every scan has a verdict; :data:`EXIT_NONE` (1) no scan could be triaged;
:data:`EXIT_SOME_ERRORS` (3) finished, but some scans are in error. ``wmhqc`` itself exits with
2 for unusable arguments, inputs or bundle (argparse's usage error).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.io import DataError
from ..study.steps import file_digest
from .bundle import MANIFEST, Bundle, deployed_operating_point
from .records import (
    RECORD_SUFFIX,
    clip_dice,
    out_of_distribution,
    raw_uri,
    relative_name,
    without_root,
)

__all__ = ["RECORD_SUFFIX", "out_of_distribution"]  # re-exported: defined in .records

GROUP_TSV = "group_qc.tsv"
GROUP_COLUMNS = ("participant_id", "session_id", "status", "flagged", "qc_score",
                 "predicted_dice", "predicted_dice_sd", "folds_flagging", "lesion_ml", "reason",
                 "seconds", "source", "site", "audit")
#: The raw dataset's participant table, whose ``site`` column gives each participant's site.
PARTICIPANTS_TSV = "participants.tsv"
#: The files of one finished scan, by role: name suffix after the scan's entity prefix.
OUTPUT_SUFFIXES = {
    "mask": "space-orig_label-WMH_mask.nii.gz",
    "probseg": "space-orig_label-WMH_probseg.nii.gz",
    "entropy": "space-orig_desc-entropy_uncertainty.nii.gz",
    "error": "space-orig_desc-signed_recerror.nii.gz",
}
BIDSIGNORE = ("*_uncertainty.nii.gz", "*_uncertainty.json", "*_recerror.nii.gz",
              "*_recerror.json", "*_qc.json", "*.html", "group_qc.tsv", "logs/")
_LABEL = re.compile(r"[^A-Za-z0-9]")
#: Exit codes of a triage run: every scan has a verdict; none could be triaged; finished with
#: some scans in error (2 is argparse's, for unusable arguments, inputs or bundle).
EXIT_OK, EXIT_NONE, EXIT_SOME_ERRORS = 0, 1, 3
#: QC scores that read no mask: fold k's values describe its own MC samples, whatever mask is
#: delivered. Every other score is computed on the delivered mask.
MASK_FREE_SCORES = ("uncertainty_vs", "mutual_information_vs", "pairwise_dice")
EMPTY_REASON = "no lesion segmented: the QC scores cannot judge an empty segmentation"


@dataclass(frozen=True)
class Scan:
    """One FLAIR (with its T1) to triage, and where its outputs go."""

    participant: str  # BIDS label, alphanumeric (no "sub-")
    session: str | None
    flair: Path | None
    t1: Path | None
    prefix: str  # entity prefix of the output names, e.g. sub-01_ses-A_run-1
    source: str  # the input as the user named it (BIDS-relative path or the manifest id)
    problem: str = ""  # why this scan cannot run (a missing T1, say), found at discovery
    from_bids: bool = False  # source is a path relative to a BIDS dataset root
    root: Path | None = None  # the raw dataset's folder: outputs name the inputs relative to it
    site: str | None = None  # where it was acquired: picks a site layer's rule

    @property
    def folder(self) -> Path:
        """The scan's folder relative to the output dataset."""
        parts = [f"sub-{self.participant}"] + ([f"ses-{self.session}"] if self.session else [])
        return Path(*parts, "anat")

    def output(self, role: str) -> Path:
        suffix = RECORD_SUFFIX if role == "record" else OUTPUT_SUFFIXES[role]
        return self.folder / f"{self.prefix}_{suffix}"


def bids_label(text: str) -> str:
    """A BIDS label from any identifier: its letters and digits (``miccai17_GE3T_100`` ->
    ``miccai17GE3T100``)."""
    label = _LABEL.sub("", str(text))
    if not label:
        raise ValueError(f"{text!r}: no letter or digit to make a BIDS label from")
    return label


# ---------------------------------------------------------------------------------------------
# Finding scans


def _entities(name: str) -> dict[str, str]:
    """The key-value entities of a BIDS file name (``sub-01_ses-A_FLAIR`` -> sub, ses)."""
    *pairs, _suffix = name.split(".")[0].split("_")
    return dict(p.split("-", 1) for p in pairs if "-" in p)


def _site_value(value: object) -> str | None:
    """A site as text; BIDS's ``n/a``, an empty cell or a missing value is no site."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text in ("", "n/a") else text


def participant_sites(bids_dir: str | Path) -> dict[str, str | None]:
    """Each participant's site (label without ``sub-``) from the raw dataset's
    ``participants.tsv``; empty when the file or its ``site`` column is absent (BIDS makes
    both optional). ``n/a`` is no site."""
    path = Path(bids_dir) / PARTICIPANTS_TSV
    if not path.is_file():
        return {}
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read the participant table ({exc})") from exc
    if "site" not in table.columns:
        return {}
    if "participant_id" not in table.columns:
        raise DataError(path, "no participant_id column (BIDS requires it first)")
    sites: dict[str, str | None] = {}
    for line, (pid, site) in enumerate(zip(table["participant_id"], table["site"],
                                           strict=True), start=2):
        label = pid.strip().removeprefix("sub-")
        if label in sites:
            raise DataError(path, f"line {line}: participant {pid!r} listed twice")
        sites[label] = _site_value(site)
    return sites


def discover_bids(bids_dir: str | Path, participants: Sequence[str] = (),
                  sessions: Sequence[str] = (), site: str | None = None) -> list[Scan]:
    """Every ``*_FLAIR.nii[.gz]`` under ``sub-*/[ses-*/]anat``, paired with the T1w of the
    same entities (or the only T1w of its folder). A FLAIR without a T1w is returned with a
    ``problem``, so it is reported, not dropped. Labels are given without ``sub-``/``ses-``.
    Each scan's site is its participant's in ``participants.tsv``, else ``site``."""
    root = Path(bids_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: BIDS directory not found")
    if not (root / "dataset_description.json").is_file():
        raise ValueError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    sites = participant_sites(root)
    wanted_p = {p.removeprefix("sub-") for p in participants}
    wanted_s = {s.removeprefix("ses-") for s in sessions}
    scans = []
    for sub in sorted(root.glob("sub-*")):
        label = sub.name[4:]
        if not sub.is_dir() or (wanted_p and label not in wanted_p):
            continue
        anats = [(None, sub / "anat")] + [(s.name[4:], s / "anat")
                                          for s in sorted(sub.glob("ses-*")) if s.is_dir()]
        for session, anat in anats:
            if not anat.is_dir() or (wanted_s and session not in wanted_s):
                continue
            for flair in sorted(anat.glob("*_FLAIR.nii*")):
                if not re.search(r"\.nii(\.gz)?$", flair.name):
                    continue
                ents = _entities(flair.name)
                prefix = flair.name.split(".")[0].rsplit("_", 1)[0]
                t1 = _matching_t1(anat, flair)
                problem = "" if t1 else f"no matching *_T1w.nii[.gz] in {anat.relative_to(root)}"
                scans.append(Scan(label, ents.get("ses", session), flair, t1, prefix,
                                  flair.relative_to(root).as_posix(), problem, from_bids=True,
                                  root=root, site=sites.get(label) or _site_value(site)))
    missing = wanted_p - {s.participant for s in scans}
    for label in sorted(missing):
        scans.append(Scan(label, None, None, None, f"sub-{label}", f"sub-{label}",
                          "participant label given but no FLAIR found", root=root,
                          site=sites.get(label) or _site_value(site)))
    return scans


def _matching_t1(anat: Path, flair: Path) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        candidate = anat / (flair.name.split(".")[0].rsplit("_", 1)[0] + "_T1w" + ext)
        if candidate.is_file():
            return candidate
    t1s = sorted(p for p in anat.glob("*_T1w.nii*") if re.search(r"\.nii(\.gz)?$", p.name))
    return t1s[0] if len(t1s) == 1 else None


def _common_folder(paths: Sequence[Path], default: Path) -> Path:
    """The deepest folder holding every one of ``paths`` (absolute, symbolic links not
    followed); ``default`` when there is none."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    return Path(os.path.commonpath(folders)) if folders else Path(os.path.abspath(default))


def scans_from_manifest(path: str | Path, site: str | None = None) -> list[Scan]:
    """Scans listed in a manifest CSV with ``subject_id``, ``flair`` and ``t1`` columns, and
    optionally ``site`` (a row without one takes ``site``).

    A relative path in the manifest is taken relative to the manifest's folder (not to where
    the command runs). Outputs name the inputs relative to the deepest folder that holds them
    all (the scans' ``root``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    table = pd.read_csv(path)
    missing = {"subject_id", "flair", "t1"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    scans, seen = [], set()
    for row in table.itertuples():
        label = bids_label(row.subject_id)
        if label in seen:
            raise ValueError(f"{path}: subject ids {row.subject_id!r} and another give the "
                             f"same BIDS label {label!r}")
        seen.add(label)
        flair, t1 = (path.parent / str(value) if isinstance(value, str) and value else None
                     for value in (row.flair, row.t1))
        problem = "" if flair and t1 else "manifest row lacks a FLAIR or a T1 path"
        row_site = _site_value(getattr(row, "site", None)) if "site" in table else None
        scans.append(Scan(label, None, flair, t1, f"sub-{label}", str(row.subject_id),
                          problem, site=row_site or _site_value(site)))
    root = _common_folder([p for s in scans for p in (s.flair, s.t1) if p], path.parent)
    return [replace(s, root=root) for s in scans]


def single_scan(flair: str | Path, t1: str | Path, participant: str = "01",
                site: str | None = None) -> Scan:
    """One FLAIR/T1 pair given on the command line; outputs name them relative to the deepest
    folder that holds both."""
    label = bids_label(participant)
    root = _common_folder([Path(flair), Path(t1)], Path(flair).parent)
    return Scan(label, None, Path(flair), Path(t1), f"sub-{label}",
                relative_name(flair, root), root=root, site=_site_value(site))


# ---------------------------------------------------------------------------------------------
# Models and one scan


@dataclass
class FoldModels:
    fold: int
    threshold: float
    mc: object
    rec: object
    dr: dict[str, object] = field(default_factory=dict)


def load_models(bundle: Bundle) -> list[FoldModels]:
    """Every fold's networks, loaded once per bundle object (a second triage run with the same
    loaded bundle reuses them, and their traced functions)."""
    if bundle.networks:
        return bundle.networks
    import keras

    from ..nets import models  # noqa: F401  (registers the custom layers)

    out = []
    for fold in bundle.folds:
        def load(name: str, fold=fold):
            return keras.models.load_model(bundle.model_path(fold, name), compile=False)

        out.append(FoldModels(fold, bundle.threshold(fold), load("mc_unet"), load("rec_unet"),
                              {name: load(name) for name in bundle.dr_models}))
    bundle.networks.extend(out)
    return bundle.networks


@dataclass
class ScanResult:
    """What triage found for one scan (maps on the profile grid until written)."""

    record: dict
    probability: np.ndarray | None = None
    entropy: np.ndarray | None = None
    error: np.ndarray | None = None
    case: object = None


def scan_seed(bundle: Bundle, subject_id: str, fold: int) -> int:
    """The MC-dropout seed of one scan and fold model: the same scan gets the same samples
    whatever else is triaged, and in whatever order."""
    from ..qc.uncertainty import case_seed

    return case_seed("triage", bundle.info["seed"], fold, subject_id)


def _fold_mc(bundle: Bundle, fm: FoldModels, case):
    """Fold model ``fm``'s MC samples of a case and their maps (:class:`UncertaintyMaps`),
    seeded by scan and fold."""
    from ..qc.uncertainty import mc_samples, reseed, uncertainty_maps

    reseed(fm.mc, scan_seed(bundle, case.subject_id, fm.fold))
    return uncertainty_maps(mc_samples(fm.mc, case.image, bundle.info["mc"]["samples"],
                                       bundle.info["mc"]["batch"]))


def _fold_scores(bundle: Bundle, fm: FoldModels, case, maps, delivered: np.ndarray
                 ) -> tuple[dict, np.ndarray]:
    """Fold model ``fm``'s QC scores of the *delivered* mask, and its signed error map.

    ``maps`` are the fold's own MC maps; the delivered mask stands in for the fold's own
    prediction wherever a score reads one: the fold's reconstruction net fills the delivered
    mask, and its Dice regressors read the pair built from it (with this fold's entropy or
    error map), so they predict the Dice of what is delivered. :data:`MASK_FREE_SCORES` read
    no mask and stay the fold's own."""
    from ..qc import regression as rg
    from ..qc.reconstruction import FLAIR, QCImage, error_maps, error_scores
    from ..qc.uncertainty import qc_scores

    delivered = np.asarray(delivered) > 0
    vox_ml = float(np.prod(bundle.info["preprocess"]["voxel_mm"])) / 1000.0
    image = QCImage.from_arrays(case.subject_id, case.image[FLAIR], case.brain)
    on_delivered = replace(maps, prediction=delivered.astype(np.uint8))
    emaps = error_maps(fm.rec, image, delivered, bundle.info["rec"]["infer_batch"])
    scores = qc_scores(on_delivered, vox_ml) | error_scores(emaps, image, delivered,
                                                            bundle.info["rec"]["ssim"])
    inputs = rg.CaseInputs(case.subject_id, image, delivered, maps.mean, maps.entropy,
                           emaps.error)
    for name, model in fm.dr.items():
        kind = name.removeprefix("dr_").split("_")[0]
        scores[name] = float(rg.predict_dice(model, inputs.pair(kind)[None])[0])
    return scores, emaps.error


def mark_empty(record: dict) -> dict:
    """Flag a scan whose delivered mask has no voxel, with its own reason first: its QC scores
    look as sure as they can (empty MC samples agree perfectly, and where nothing is predicted
    there is no entropy to read), so they cannot judge it."""
    if not record.get("empty_segmentation"):
        record["empty_segmentation"] = True
        record["flagged"] = True
        record["reason"] = "; ".join([EMPTY_REASON] + ([record["reason"]]
                                                       if record.get("reason") else []))
    return record


#: How the folds' flags make the scan's flag, in words (:meth:`Bundle.combine`).
COMBINE_RULES = {"half": "flagged when at least half of the folds flag",
                 "any": "flagged when any fold flags"}


def applied_rule(bundle: Bundle, site: str | None) -> dict:
    """The rule triage applies to a scan of ``site``: where it comes from (the bundle, or the
    site layer's rule for this site), how the folds' flags combine and each fold's threshold.
    ``layer_sha256`` names the layer loaded (None without one), whether or not it had a rule
    for this site: a record made under another layer is redone."""
    combine = bundle.combine(site)
    if combine not in COMBINE_RULES:
        raise ValueError(f"unknown rule {combine!r} for combining the folds' flags (known: "
                         f"{', '.join(COMBINE_RULES)})")
    layer = bundle.layer or {}
    from_layer = bundle.site_rule(site) is not None
    return {"source": "layer" if from_layer else "bundle", "site": site,
            "layer": layer.get("name"), "layer_sha256": layer.get("digest"),
            "combine": combine,
            "thresholds": {str(f): bundle.threshold(f, site) for f in bundle.folds}}


def _threshold_source(bundle: Bundle, rule: dict) -> str:
    """Where a flag's thresholds came from, for the reason."""
    if rule["source"] == "layer":
        values = sorted(set(rule["thresholds"].values()))
        return (f"site {rule['site']}'s calibrated threshold "
                f"{', '.join(f'{v:.4g}' for v in values)} (site layer {rule['layer']})")
    if bundle.info.get("guarantee"):
        return "the bundle's guaranteed threshold"
    return "the bundle's validation-chosen threshold"


def triage_case(bundle: Bundle, models: Sequence[FoldModels], case,
                site: str | None = None) -> ScanResult:
    """The delivered segmentation of one preprocessed scan, every fold's QC scores of it, the
    flag by the rule for ``site`` (:func:`applied_rule`) and the maps (see the module
    docstring)."""
    from ..qc.evaluation import flag_cases

    if not models:
        raise ValueError("no fold model to triage with")
    spec = bundle.score
    rule = applied_rule(bundle, site)
    fold_maps = [_fold_mc(bundle, fm, case) for fm in models]
    probability = np.mean([m.mean for m in fold_maps], axis=0)
    delivered = probability > 0.5
    per_fold, errors = [], []
    for fm, maps in zip(models, fold_maps, strict=True):
        scores, error = _fold_scores(bundle, fm, case, maps, delivered)
        value = float(scores[spec.column])
        threshold = bundle.threshold(fm.fold, site)
        flag = bool(flag_cases(np.array([value]), threshold, spec.higher_is_better)[0])
        per_fold.append({"fold": fm.fold, "threshold": threshold, "qc_score": value,
                         "flagged": flag, "scores": scores})
        errors.append(error)
    n_flagging = sum(f["flagged"] for f in per_fold)
    fraction = n_flagging / len(per_fold)
    by_score = fraction >= 0.5 if rule["combine"] == "half" else n_flagging > 0
    reasons = []
    if by_score:
        reasons.append(f"{spec.label} beyond {_threshold_source(bundle, rule)} in "
                       f"{n_flagging} of {len(per_fold)} folds (rule: "
                       f"{COMBINE_RULES[rule['combine']]})")
    ood = out_of_distribution(case.meta["image_features"], bundle.info["feature_ranges"])
    if ood:
        reasons.append("unlike the training cohort: " + "; ".join(ood))
    dice_col = bundle.info.get("predicted_dice")
    predicted = [float(f["scores"][dice_col]) for f in per_fold] if dice_col else []
    raw = float(np.mean(predicted)) if predicted else None
    raw = raw if raw is not None and math.isfinite(raw) else None
    names = list(per_fold[0]["scores"])
    record = {
        "status": "ok", "flagged": bool(by_score or ood),
        "qc_score": float(np.mean([f["qc_score"] for f in per_fold])),
        "qc_score_name": spec.column, "folds_flagging": fraction,
        "scores_on_delivered_mask": [n for n in names if n not in MASK_FREE_SCORES],
        "scores_of_fold_samples": [n for n in names if n in MASK_FREE_SCORES],
        "out_of_distribution": bool(ood), "empty_segmentation": False,
        "predicted_dice": clip_dice(raw), "predicted_dice_raw": raw,
        "predicted_dice_sd": float(np.std(predicted)) if predicted else None,
        "predicted_dice_range": [clip_dice(min(predicted)), clip_dice(max(predicted))]
        if predicted else None,
        "reason": "; ".join(reasons), "rule": rule, "per_fold": per_fold,
        "image_features": case.meta["image_features"],
    }
    if not delivered.any():
        mark_empty(record)
    entropy = np.mean([m.entropy for m in fold_maps], axis=0)
    return ScanResult(record, probability, entropy, np.mean(errors, axis=0), case)


# ---------------------------------------------------------------------------------------------
# Outputs


def _temporary(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process writes (host and process id):
    processes that write the same file at once each replace it whole, none half-writes it."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_json(path: Path, data: dict) -> None:
    _atomic_text(path, json.dumps(data, indent=1, allow_nan=False))


def _as_uri(source: str | Path) -> str:
    """A location as a URI: a URL as it is, a local path as ``file://`` (absolute, symbolic
    links not followed, like the relative names of the inputs)."""
    source = str(source)
    return source if "://" in source else Path(os.path.abspath(source)).as_uri()


def write_dataset_description(out_dir: Path, bundle: Bundle, source: str | Path,
                              raw: str | Path | None = None) -> None:
    """``dataset_description.json`` of the derivative dataset, and its ``.bidsignore``.

    ``DatasetLinks.raw`` is ``raw`` (default: ``source``), the folder that the ``bids:raw:``
    names of the inputs are relative to; this file is the only one that says where it is."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = source if raw is None else raw
    desc = {"Name": "wmhqc triage: WMH segmentation with quality control",
            "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "wmhqc", "Version": bundle.info["generated_by"]["version"],
                             "Description": f"QC bundle of profile {bundle.info['profile']}, "
                                            f"score {bundle.score.label}"}],
            "SourceDatasets": [{"URL": _as_uri(source)}],
            "DatasetLinks": {"raw": _as_uri(raw)}}
    _atomic_json(out_dir / "dataset_description.json", desc)
    _atomic_text(out_dir / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")


def read_record(out_dir: Path, scan: Scan) -> dict | None:
    path = out_dir / scan.output("record")
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def input_name(scan: Scan, role: str) -> str:
    """The scan's FLAIR or T1 (``role``) as a BIDS URI relative to the raw dataset
    (``bids:raw:sub-01/anat/sub-01_FLAIR.nii.gz``), whatever the input mode."""
    return raw_uri(relative_name(scan.flair if role == "flair" else scan.t1, scan.root))


def input_digests(scan: Scan) -> dict[str, str]:
    """SHA-256 of the scan's FLAIR and T1: a rerun redoes the scan when either changed."""
    return {"flair": file_digest(scan.flair), "t1": file_digest(scan.t1)}


def bundle_digest(bundle: Bundle) -> str:
    """SHA-256 of the bundle's manifest, which lists the digest of every file in it."""
    return file_digest(bundle.root / MANIFEST)


def _sidecar(scan: Scan, kind: str) -> dict:
    uri = input_name(scan, "flair")
    return {"Description": kind, "Sources": [uri], "SpatialReference": uri}


def write_scan(out_dir: Path, scan: Scan, result: ScanResult, seconds: float,
               provenance: dict | None = None) -> dict:
    """Write a scan's maps on its native FLAIR grid and then its record (the completion mark).

    Files go to a temporary folder first and are moved into place one by one; the record comes
    last, so a crash leaves a scan without a record, which the next run redoes. ``provenance``
    holds the digests a rerun compares (``bundle_sha256``, ``inputs_sha256``). The delivered
    mask is the one written here, on the native grid: when it is empty the scan is flagged
    (:func:`mark_empty`), even where the profile grid's mask was not."""
    import nibabel as nib

    from ..data.preprocess import map_to_native

    case = result.case
    staging = out_dir / "logs" / "staging" / scan.prefix
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    prob = np.asarray(map_to_native(result.probability, case).dataobj, dtype=np.float32)
    prob = np.clip(prob, 0.0, 1.0)
    affine = np.asarray(case.meta["native_affine"])
    mask = (prob > 0.5).astype(np.uint8)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    images = {"mask": mask, "probseg": prob,
              "entropy": np.asarray(map_to_native(result.entropy, case).dataobj, np.float32),
              "error": np.asarray(map_to_native(result.error, case).dataobj, np.float32)}
    descriptions = {"mask": "WMH segmentation: mean of the fold models' MC means > 0.5",
                    "probseg": "WMH probability: mean of the fold models' MC means",
                    "entropy": "MC entropy (bits), mean over fold models",
                    "error": "Reconstruction minus FLAIR with the delivered mask zeroed "
                             "(scaled intensity), mean over fold models"}
    for role, data in images.items():
        name = scan.output(role).name
        img = nib.Nifti1Image(data, affine)
        img.set_data_dtype(np.uint8 if role == "mask" else np.float32)
        nib.save(img, staging / name)
        sidecar = _sidecar(scan, descriptions[role])
        if role in ("mask", "probseg"):
            sidecar["Type"] = "Lesion"
        (staging / name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar, indent=1))
    provenance = provenance or {}
    record = {"participant_id": f"sub-{scan.participant}",
              "session_id": f"ses-{scan.session}" if scan.session else "n/a",
              "source": scan.source, "site": scan.site,
              "inputs": {role: input_name(scan, role) for role in ("flair", "t1")},
              "inputs_sha256": provenance.get("inputs_sha256"),
              **result.record,
              "lesion_ml": float(mask.sum()) * voxel_ml, "seconds": round(seconds, 2),
              "files": {role: scan.output(role).as_posix() for role in OUTPUT_SUFFIXES},
              "bundle": {"score": result.record["qc_score_name"],
                         "manifest_sha256": provenance.get("bundle_sha256")}}
    if not mask.any():
        mark_empty(record)
    target = out_dir / scan.folder
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, target / path.name)
    shutil.rmtree(staging, ignore_errors=True)
    _atomic_json(out_dir / scan.output("record"), record)
    return record


def error_record(out_dir: Path, scan: Scan, reason: str, seconds: float,
                 audit: bool = False) -> dict:
    """The record of a scan that could not be triaged; its earlier outputs are removed. Paths
    under the raw dataset in ``reason`` become relative to it."""
    shutil.rmtree(out_dir / "logs" / "staging" / scan.prefix, ignore_errors=True)
    for role in OUTPUT_SUFFIXES:
        for path in (out_dir / scan.output(role),
                     out_dir / str(scan.output(role)).replace(".nii.gz", ".json")):
            path.unlink(missing_ok=True)
    record = {"participant_id": f"sub-{scan.participant}",
              "session_id": f"ses-{scan.session}" if scan.session else "n/a",
              "source": scan.source, "site": scan.site, "audit": bool(audit),
              "status": "error", "flagged": None,
              "reason": without_root(reason, scan.root), "seconds": round(seconds, 2)}
    _atomic_json(out_dir / scan.output("record"), record)
    return record


def group_table(out_dir: str | Path) -> pd.DataFrame:
    """One row per scan record under ``out_dir`` (:data:`GROUP_COLUMNS`), flagged first."""
    out_dir = Path(out_dir)
    rows = []
    for path in sorted(out_dir.glob(f"sub-*/**/*_{RECORD_SUFFIX}")):
        rec = json.loads(path.read_text())
        row = {c: rec.get(c) for c in GROUP_COLUMNS}
        row["record"] = path.relative_to(out_dir).as_posix()
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*GROUP_COLUMNS, "record"])
    order = table["status"].map({"ok": 1, "error": 2}).fillna(3)
    flagged = table["flagged"].map({True: 0}).fillna(1)
    return (table.assign(_o=order, _f=flagged).sort_values(["_f", "_o", "participant_id",
                                                            "session_id"])
            .drop(columns=["_o", "_f"]).reset_index(drop=True))


def write_group(out_dir: str | Path, bundle: Bundle | None = None,
                pool: Pool | None = None) -> pd.DataFrame:
    """``group_qc.tsv`` (BIDS ``n/a`` for missing values, ``true``/``false`` flags), rebuilt
    from the scan records; and the reports when a bundle is given (their figures drawn in
    ``pool``'s worker processes, if one is given)."""
    out_dir = Path(out_dir)
    table = group_table(out_dir)
    text = table.drop(columns="record").copy()
    for column in ("flagged", "audit"):
        text[column] = text[column].map({True: "true", False: "false"})
    tmp = _temporary(out_dir / GROUP_TSV)
    text.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.4g")
    os.replace(tmp, out_dir / GROUP_TSV)
    if bundle is not None:
        from . import report as triage_report

        triage_report.write_reports(out_dir, table, bundle, pool)
    return table


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class TriageSummary:
    table: pd.DataFrame
    n_ok: int
    n_error: int
    n_skipped: int
    seconds_per_scan: list[float]

    @property
    def mean_seconds(self) -> float:
        """Mean seconds per triaged scan this run (preprocessing included)."""
        return float(np.mean(self.seconds_per_scan)) if self.seconds_per_scan else math.nan

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_OK` (0) when every scan has a verdict (status ok, this run or an earlier
        one), :data:`EXIT_NONE` (1) when none has, :data:`EXIT_SOME_ERRORS` (3) when some
        scans are in error and the others have a verdict."""
        if self.n_ok + self.n_skipped == 0:
            return EXIT_NONE
        return EXIT_SOME_ERRORS if self.n_error else EXIT_OK


def _describe(exc: Exception) -> str:
    """An error's reason for a record: a :class:`DataError` names its file and problem; any
    other error is named by its type too (a bare ``KeyError: 'x'`` reads as nothing)."""
    return str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"


def _prepare(job: tuple) -> tuple:
    """Digest and preprocess one scan (run in a worker process); returns (index, case or the
    reason it failed, seconds, input digests or None). Any error becomes the scan's reason;
    KeyboardInterrupt and SystemExit go through."""
    index, scan, settings = job
    start = time.perf_counter()
    try:
        if scan.problem:
            raise DataError(scan.source, scan.problem)
        from ..data.preprocess import preprocess_scan

        digests = input_digests(scan)
        case = preprocess_scan(scan.prefix, scan.flair, scan.t1, settings)
        return index, case, time.perf_counter() - start, digests
    except Exception as exc:  # noqa: BLE001 - one scan's failure never stops the others
        return index, _describe(exc), time.perf_counter() - start, None


def in_audit_sample(seed: int, participant_id: str, session_id: str, fraction: float) -> bool:
    """Whether a scan belongs to the audit sample: a uniform number in [0, 1) from a hash of
    the bundle's seed, participant and session (``sub-01``, ``ses-A`` or ``n/a``) is below
    ``fraction``. The same scan is marked in every run and every process, whatever else is
    triaged, and a larger fraction marks a superset."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"audit fraction {fraction}: must lie between 0 and 1")
    text = f"wmhqc-audit\0{seed}\0{participant_id}\0{session_id}".encode()
    uniform = int.from_bytes(hashlib.sha256(text).digest()[:8], "big") / 2.0 ** 64
    return uniform < fraction


def _scan_ids(scan: Scan) -> tuple[str, str]:
    return f"sub-{scan.participant}", f"ses-{scan.session}" if scan.session else "n/a"


def _up_to_date(record: dict | None, scan: Scan, bundle_sha: str,
                layer_sha: str | None = None) -> bool:
    """Whether a scan's earlier record stands: status ok, made with this bundle and this site
    layer (or none, as now) from these inputs for this site (a record without the digests,
    from an older wmhqc, does not)."""
    if record is None or record.get("status") != "ok":
        return False
    if (record.get("bundle") or {}).get("manifest_sha256") != bundle_sha:
        return False
    if (record.get("rule") or {}).get("layer_sha256") != layer_sha:
        return False
    if record.get("site") != scan.site:
        return False
    try:
        return record.get("inputs_sha256") == input_digests(scan)
    except (OSError, TypeError):  # an input gone, or none given
        return False


def _raw_root(scans: Sequence[Scan], source: str) -> Path | None:
    """The one raw dataset the scans come from (the folder their outputs name them relative
    to): their ``root``, else ``source``, else the deepest folder holding their inputs."""
    roots = {os.path.abspath(s.root) for s in scans if s.root is not None}
    if len(roots) > 1:
        raise ValueError(f"scans from {len(roots)} datasets ({', '.join(sorted(roots))}): "
                         "triage each into its own output folder")
    if roots:
        return Path(roots.pop())
    if source and "://" not in source:
        return Path(os.path.abspath(source))
    inputs = [p for s in scans for p in (s.flair, s.t1) if p]
    return _common_folder(inputs, Path.cwd()) if inputs else None


def _run_log(out_dir: Path, log: Callable[[str], None]) -> Callable[[str], None]:
    """``log``, and each line appended to this process's own file under ``logs/`` (named by
    time, host and process id, so that processes writing into one output never share one)."""
    path = (out_dir / "logs" / f"triage-{time.strftime('%Y%m%dT%H%M%S')}-"
            f"{socket.gethostname()}-{os.getpid()}.log")
    path.parent.mkdir(parents=True, exist_ok=True)

    def both(line: str) -> None:
        with open(path, "a", encoding="utf-8") as file:
            file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
        log(line)

    return both


def _mark_audit(out_dir: Path, scan: Scan, record: dict, audit: bool) -> None:
    """Set the audit mark of a record that otherwise stands (the fraction changed since)."""
    if bool(record.get("audit", False)) != audit:
        _atomic_json(out_dir / scan.output("record"), record | {"audit": audit})


def run_triage(bundle: Bundle, scans: Sequence[Scan], out_dir: str | Path, *,
               source: str = "", nprocs: int = 1, progress: bool = True,
               log: Callable[[str], None] = print, group: bool = True,
               audit_fraction: float = 0.0) -> TriageSummary:
    """Triage ``scans`` into the derivative dataset ``out_dir`` (see the module docstring).

    Scans whose record says ``ok`` and whose bundle, site layer, site and input digests are
    unchanged are skipped (their audit mark is updated if ``audit_fraction`` changed).
    Preprocessing runs in ``nprocs`` worker processes while the networks run here, one scan at
    a time; the same workers then draw the report pages (when there was more than one scan to
    triage). An error in one scan (in a worker or here) becomes its ``error`` record and the
    others go on. ``source`` names the input dataset for ``SourceDatasets`` (default: the
    scans' raw dataset folder). ``audit_fraction``: the share of scans marked ``audit`` for
    review whatever their flag (:func:`in_audit_sample`). ``group=False`` writes the scans'
    files only, not ``group_qc.tsv`` nor the pages, for participant-level processes that share
    the output folder; the summary's table then holds this run's scans only.
    """
    from multiprocessing import get_context

    from tqdm import tqdm

    out_dir = Path(out_dir)
    seed = bundle.info["seed"]
    if not 0.0 <= audit_fraction <= 1.0:
        raise ValueError(f"audit fraction {audit_fraction}: must lie between 0 and 1")
    raw = _raw_root(scans, source)
    scans = [replace(s, root=raw) for s in scans]
    write_dataset_description(out_dir, bundle, source or raw or "unknown", raw)
    log = _run_log(out_dir, log)
    bundle_sha = bundle_digest(bundle)
    layer_sha = (bundle.layer or {}).get("digest")
    audit = {scan.prefix: in_audit_sample(seed, *_scan_ids(scan), audit_fraction)
             for scan in scans}
    todo, skipped, changed = [], 0, 0
    for scan in scans:
        rec = read_record(out_dir, scan)
        if _up_to_date(rec, scan, bundle_sha, layer_sha):
            skipped += 1
            _mark_audit(out_dir, scan, rec, audit[scan.prefix])
        else:
            changed += rec is not None and rec.get("status") == "ok"
            todo.append(scan)
    if skipped:
        log(f"{skipped} scan(s) already triaged in {out_dir} with this bundle and site layer "
            "from these inputs: skipped")
    if changed:
        log(f"{changed} scan(s) triaged before with another bundle or site layer, for another "
            "site or from other inputs: redone")
    if bundle.layer is not None:
        log(f"site layer {bundle.layer.get('name')}: calibrated rule for site(s) "
            f"{', '.join(sorted(bundle.layer.get('sites', {}))) or 'none'}")
    settings = bundle.preprocess_settings
    jobs = [(i, scan, settings) for i, scan in enumerate(todo)]
    # the workers start and preprocess while the networks load here
    pool = get_context("spawn").Pool(min(nprocs, len(jobs))) \
        if nprocs > 1 and len(jobs) > 1 else None
    n_ok = n_error = 0
    seconds = []
    try:
        prepared = pool.imap(_prepare, jobs) if pool else map(_prepare, jobs)
        models = load_models(bundle) if todo else []
        with tqdm(total=len(todo), desc="triage", unit="scan", disable=not progress) as bar:
            for index, case, prep_s, digests in prepared:
                scan = todo[index]
                start = time.perf_counter()
                reason = case if isinstance(case, str) else None
                if reason is None:
                    try:
                        result = triage_case(bundle, models, case, scan.site)
                        result.record["audit"] = audit[scan.prefix]
                        total = prep_s + time.perf_counter() - start
                        rec = write_scan(out_dir, scan, result, total,
                                         {"bundle_sha256": bundle_sha,
                                          "inputs_sha256": digests})
                    except Exception as exc:  # noqa: BLE001 - the other scans go on
                        reason = _describe(exc)
                if reason is not None:
                    rec = error_record(out_dir, scan, reason,
                                       prep_s + time.perf_counter() - start,
                                       audit[scan.prefix])
                    n_error += 1
                    log(f"{scan.prefix}: error: {rec['reason']}")
                else:
                    n_ok += 1
                    seconds.append(total)
                    verdict = "FLAGGED" if rec["flagged"] else "passed"
                    log(f"{scan.prefix}: {verdict} ({total:.1f} s)"
                        + (" [audit sample]" if rec["audit"] else "")
                        + (f": {rec['reason']}" if rec["flagged"] else ""))
                bar.update()
        if group:
            table = write_group(out_dir, bundle, pool)
        else:
            mine = {scan.output("record").as_posix() for scan in scans}
            table = group_table(out_dir)
            table = table[table["record"].isin(mine)].reset_index(drop=True)
    except BaseException:
        if pool:  # an error or Ctrl-C here: do not wait for the queued scans
            pool.terminate()
        raise
    finally:
        if pool:
            pool.close()
            pool.join()
    return TriageSummary(table, n_ok, n_error, skipped, seconds)


# ---------------------------------------------------------------------------------------------
# Where the truth is known (synthetic new scans): what the flags achieved


def score_against_truth(out_dir: str | Path, truth: pd.DataFrame, quality_threshold: float
                        ) -> tuple[pd.DataFrame, dict]:
    """Each triaged scan's true lesion Dice (its mask against ``truth['truth']``, both on the
    input FLAIR's grid) and the realised precision, recall and review fraction of the flags.

    ``truth`` has ``participant_id`` and ``truth`` (a label map path: 1 lesion, 2 other
    pathology) per scan; only triage that ran (status ok) is scored. Label-2 voxels count for
    neither mask, as in the study's lesion Dice (MICCAI's rule, :func:`preprocess.native_dice`);
    any other label is refused. Failure is Dice below ``quality_threshold``, as in the study.
    """
    import nibabel as nib

    from ..qc.metrics import dice

    out_dir = Path(out_dir)
    table = group_table(out_dir)
    # the truth's own columns (its site, say) stand for the scan where both tables have one
    shared = [c for c in truth.columns if c in table.columns and c != "participant_id"]
    table = table[table["status"] == "ok"].drop(columns=shared).merge(
        truth, on="participant_id", how="inner")
    rows = []
    for row in table.itertuples():
        record = json.loads((out_dir / row.record).read_text())
        pred = np.asarray(nib.load(out_dir / record["files"]["mask"]).dataobj) > 0
        labels = np.asarray(nib.load(row.truth).dataobj)
        if pred.shape != labels.shape:
            raise ValueError(f"{row.truth}: grid {labels.shape} differs from the triage mask "
                             f"{pred.shape}")
        unknown = sorted(set(np.unique(labels).tolist()) - {0, 1, 2})
        if unknown:
            raise ValueError(f"{row.truth}: label(s) {unknown} in a truth map of 0 (background),"
                             " 1 (lesion) and 2 (other pathology, ignored)")
        ref, ignore = labels == 1, labels == 2
        rows.append({"participant_id": row.participant_id,
                     "true_dice": dice(pred, ref, ignore)})
    scored = table.merge(pd.DataFrame(rows, columns=["participant_id", "true_dice"]),
                         on="participant_id")
    scored["failed"] = scored["true_dice"] < quality_threshold
    return scored, realised(scored)


def realised(scored: pd.DataFrame) -> dict:
    """Counts, precision, recall, specificity, review fraction and prevalence of the flags on
    scans with known failure."""
    from ..qc.evaluation import operating_counts

    flagged = scored["flagged"].astype(bool).to_numpy()
    failed = scored["failed"].astype(bool).to_numpy()
    return {"n_scans": len(scored), "n_failed": int(failed.sum()),
            "n_flagged": int(flagged.sum()), **operating_counts(failed, flagged)}


def promise_vs_realised(card: dict, scored: pd.DataFrame, group: str = "kind") -> pd.DataFrame:
    """The model card's test-fold operating point of the deployed rule (the guaranteed
    threshold where the bundle carries a guarantee), with its interval, beside what the flags
    achieved on the triaged scans, overall and per ``group`` (e.g. the kind of new scan)."""
    op, _ = deployed_operating_point(card)

    def promised(name: str) -> str:
        d = op[name]
        if d["estimate"] is None or not math.isfinite(d["estimate"]):
            return "undefined"
        return f"{d['estimate']:.2f} [{d['low']:.2f}, {d['high']:.2f}]"

    columns = {"promised (study test folds, 95 % CI)": {
        "precision": promised("precision"), "recall": promised("recall"),
        "review_fraction": promised("review_fraction"), "n_scans": op["n_cases"],
        "n_failed": op["n_failed"], "n_flagged": op["n_flagged"]}}
    parts = [("realised: all new scans", scored)] + [
        (f"realised: {name}", part) for name, part in scored.groupby(group, sort=False)]
    for label, part in parts:
        r = realised(part)
        columns[label] = {k: (f"{v:.2f}" if isinstance(v, float) and math.isfinite(v)
                              else ("undefined" if isinstance(v, float) else v))
                          for k, v in r.items()}
    order = ["precision", "recall", "review_fraction", "n_scans", "n_failed", "n_flagged"]
    return pd.DataFrame(columns).loc[order]
