"""Readers for the four public WMH / MS lesion datasets, in the layouts they are distributed in.

Each dataset is turned into rows of one manifest (:data:`MANIFEST_COLUMNS`): one row per subject
with absolute paths, the label policy that turns its mask(s) into a binary lesion mask, and a
few facts read from the images. :func:`load_subject` is the only code path from a row to
images, so indexing validates a subject exactly the way preprocessing will later read it.

Label and rater choices that differ between the paper's code and the challenges' own rules are
explicit options (:class:`IndexOptions`) and end up recorded in every manifest row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pandas as pd

from .io import DataError, check_overlap, load_mask, load_volume, same_grid, voxel_size

DATASETS = ("miccai17", "isbi15", "msseg16", "ljubljana")

MANIFEST_COLUMNS = [
    "subject_id", "dataset", "site", "t1", "flair", "mask", "mask_rule", "lesion_labels",
    "ignore_labels", "allowed_labels", "rater_masks", "brain_mask", "timepoint",
    "flair_voxel_mm", "flair_shape", "t1_voxel_mm", "t1_shape", "lesion_ml", "synthetic",
]

SYNTHETIC_MARKER = "SYNTHETIC_COHORT.json"
MASK_RULES = ("single", "intersection", "union", "majority")
ISBI_RATER_CHOICES = ("intersection", "union", "majority", "rater1", "rater2")

# Label values each dataset's masks may hold; anything else means a wrong or corrupted file.
_ALLOWED_LABELS = {"miccai17": (0, 1, 2), "isbi15": (0, 1), "msseg16": (0, 1), "ljubljana": (0, 1)}

_EXPECTED_LAYOUT = {
    "miccai17": "<site>/<id>/pre/FLAIR.nii.gz, <site>/<id>/pre/T1.nii.gz and <site>/<id>/wmh.nii.gz"
                " (site one or two folders deep, e.g. Utrecht or Amsterdam/GE3T)",
    "isbi15": "training/trainingNN/preprocessed/trainingNN_TT_{flair,mprage}_pp.nii and "
              "training/trainingNN/masks/trainingNN_TT_mask{1,2}.nii",
    "msseg16": "<Center_XX>/<Patient_YY>/Preprocessed_Data/{FLAIR,T1}_preprocessed.nii.gz and "
               "<Center_XX>/<Patient_YY>/Masks/{Consensus,ManualSegmentation_N}.nii.gz",
    "ljubljana": "patientNN/patientNN_{T1W,FLAIR,consensus_gt}.nii.gz "
                 "(or unprefixed patientNN/{T1W,FLAIR,consensus_gt}.nii.gz)",
}

_MSSEG_MAX_RATERS = 7


@dataclass
class IndexOptions:
    """Which labels and raters make up the reference lesion mask.

    Attributes
    ----------
    miccai_label2
        MICCAI WMH 2017 label 2 ("other pathology"). ``"ignore"`` (default, the challenge's
        rule): not lesion, and excluded from loss and metrics (``ignore_labels="2"``).
        ``"lesion"``: merged into the lesion class (what the paper's code did).
        ``"background"``: treated as background.
    isbi_timepoint
        ISBI 2015 contributes one time point per subject. ``None`` (default) takes the earliest
        one available; a value such as ``"02"`` takes that one and is an error where absent.
    isbi_raters
        How the two ISBI 2015 rater masks are combined: ``"union"`` (default, the paper's code),
        ``"intersection"``, ``"majority"`` (voxels marked by more than half of the raters; with
        two raters this equals the intersection), or ``"rater1"`` / ``"rater2"`` alone.
    msseg_mask
        MSSEG 2016 reference: ``"consensus"`` (default, ``Masks/Consensus.nii.gz``),
        ``"rater:N"`` (``ManualSegmentation_N``), or ``"intersection"`` / ``"union"`` /
        ``"majority"`` over every ``ManualSegmentation_*`` file present.
    """

    miccai_label2: Literal["ignore", "lesion", "background"] = "ignore"
    isbi_timepoint: str | None = None
    isbi_raters: str = "union"
    msseg_mask: str = "consensus"

    def __post_init__(self) -> None:
        if self.miccai_label2 not in ("ignore", "lesion", "background"):
            raise ValueError(f"miccai_label2 must be 'ignore', 'lesion' or 'background', "
                             f"not {self.miccai_label2!r}")
        if self.isbi_raters not in ISBI_RATER_CHOICES:
            raise ValueError(f"isbi_raters must be one of {ISBI_RATER_CHOICES}, "
                             f"not {self.isbi_raters!r}")
        if self.isbi_timepoint is not None and not re.fullmatch(r"\d+", str(self.isbi_timepoint)):
            raise ValueError(f"isbi_timepoint must be digits like '01', "
                             f"not {self.isbi_timepoint!r}")
        if self.msseg_mask not in ("consensus", "intersection", "union", "majority"):
            match = re.fullmatch(r"rater:(\d+)", self.msseg_mask)
            if not match or not 1 <= int(match.group(1)) <= _MSSEG_MAX_RATERS:
                raise ValueError("msseg_mask must be 'consensus', 'rater:N' (N = 1..7), "
                                 f"'intersection', 'union' or 'majority', not {self.msseg_mask!r}")


@dataclass
class IndexResult:
    """A manifest of usable subjects, plus the problems of subjects left out (``skip_bad``)."""

    manifest: pd.DataFrame
    problems: list[DataError] = field(default_factory=list)


@dataclass
class SubjectImages:
    """One subject's images, each on its own grid (preprocessing resamples onto the FLAIR)."""

    subject_id: str
    flair: nib.Nifti1Image
    t1: nib.Nifti1Image
    lesion: nib.Nifti1Image
    ignore: nib.Nifti1Image | None
    brain_mask: nib.Nifti1Image | None


# ---------------------------------------------------------------------------------------------
# Layouts


def layout_paths(dataset: str, root: Path, site: str, subject: str, timepoint: str = "01",
                 prefixed: bool = True) -> dict[str, Path | list[Path]]:
    """Where each file of one subject lives in ``dataset``'s distributed layout.

    The single definition shared by the readers here and by writers of test or synthetic trees.
    Keys: ``t1``, ``flair``, and among ``mask``, ``rater1``, ``rater2``, ``raters`` (MSSEG
    ``ManualSegmentation_1..7``, a list) and ``brain_mask``. ``site`` is unused for ISBI 2015
    and Ljubljana (no site folder), ``timepoint`` only for ISBI 2015, ``prefixed`` only for
    Ljubljana (``patientNN_FLAIR.nii.gz`` vs ``FLAIR.nii.gz``).
    """
    root = Path(root)
    if dataset == "miccai17":
        base = root / site / subject
        return {"flair": base / "pre" / "FLAIR.nii.gz", "t1": base / "pre" / "T1.nii.gz",
                "mask": base / "wmh.nii.gz"}
    if dataset == "isbi15":
        base = root / "training" / subject
        stem = f"{subject}_{timepoint}"
        return {"flair": base / "preprocessed" / f"{stem}_flair_pp.nii",
                "t1": base / "preprocessed" / f"{stem}_mprage_pp.nii",
                "rater1": base / "masks" / f"{stem}_mask1.nii",
                "rater2": base / "masks" / f"{stem}_mask2.nii"}
    if dataset == "msseg16":
        base = root / site / subject
        masks = base / "Masks"
        return {"flair": base / "Preprocessed_Data" / "FLAIR_preprocessed.nii.gz",
                "t1": base / "Preprocessed_Data" / "T1_preprocessed.nii.gz",
                "mask": masks / "Consensus.nii.gz",
                "raters": [masks / f"ManualSegmentation_{i}.nii.gz"
                           for i in range(1, _MSSEG_MAX_RATERS + 1)],
                "brain_mask": masks / "Brain_Mask.nii.gz"}
    if dataset == "ljubljana":
        base = root / subject
        prefix = f"{subject}_" if prefixed else ""
        return {"t1": base / f"{prefix}T1W.nii.gz", "flair": base / f"{prefix}FLAIR.nii.gz",
                "brain_mask": base / f"{prefix}brainmask.nii.gz",
                "mask": base / f"{prefix}consensus_gt.nii.gz"}
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def _present(path: Path) -> Path | None:
    """The file at ``path``, or its gzipped / uncompressed twin (users re-compress), or None."""
    if path.is_file():
        return path
    name = path.name
    twin = path.with_name(name[:-3]) if name.endswith(".nii.gz") else path.with_name(name + ".gz")
    return twin if twin.is_file() else None


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _subject_id(*parts: str) -> str:
    """Readable, globally unique id: dataset and folder names, restricted to [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", "_".join(parts))


def _label_policy(dataset: str, options: IndexOptions) -> tuple[str, str]:
    """(lesion_labels, ignore_labels) as ;-joined strings."""
    if dataset == "miccai17":
        return {"ignore": ("1", "2"), "lesion": ("1;2", ""),
                "background": ("1", "")}[options.miccai_label2]
    return "1", ""


@dataclass
class _Candidate:
    """A subject folder found on disk: a manifest row to validate, or why it is unusable."""

    subject_id: str
    folder: Path
    row: dict[str, Any] | None = None
    error: DataError | None = None


def _resolve(folder: Path, required: dict[str, Path]) -> dict[str, Path]:
    """The existing file for each role; one error naming the folder and every missing file."""
    found: dict[str, Path] = {}
    missing = []
    for role, path in required.items():
        hit = _present(path)
        if hit is None:
            missing.append(f"{role} {path.relative_to(folder)}")
        else:
            found[role] = hit
    if missing:
        raise DataError(folder, "subject folder is missing file(s): " + ", ".join(missing))
    return found


def _make_row(dataset: str, subject_id: str, site: str, options: IndexOptions, *, t1: Path,
              flair: Path, masks: Sequence[Path], mask_rule: str, rater_masks: Sequence[Path] = (),
              brain_mask: Path | None = None, timepoint: str = "") -> dict[str, Any]:
    lesion_labels, ignore_labels = _label_policy(dataset, options)
    return {
        "subject_id": subject_id, "dataset": dataset, "site": site,
        "t1": str(t1.absolute()), "flair": str(flair.absolute()),
        "mask": ";".join(str(p.absolute()) for p in masks), "mask_rule": mask_rule,
        "lesion_labels": lesion_labels, "ignore_labels": ignore_labels,
        "allowed_labels": ";".join(str(v) for v in _ALLOWED_LABELS[dataset]),
        "rater_masks": ";".join(str(p.absolute()) for p in rater_masks),
        "brain_mask": str(brain_mask.absolute()) if brain_mask else "", "timepoint": timepoint,
    }


def _find_miccai(root: Path, options: IndexOptions) -> list[_Candidate]:
    """Subject folders one or two site levels deep (``Utrecht/0``, ``Amsterdam/GE3T/100``)."""

    def is_subject(d: Path) -> bool:
        return (d / "wmh.nii.gz").is_file() or (d / "pre" / "FLAIR.nii.gz").is_file() \
            or (d / "pre" / "T1.nii.gz").is_file()

    folders = []
    for level1 in _subdirs(root):
        for level2 in _subdirs(level1):
            if is_subject(level2):
                folders.append(level2)
                continue
            folders.extend(d for d in _subdirs(level2) if is_subject(d))
    out = []
    for folder in folders:
        site = folder.parent.relative_to(root).as_posix()
        sid = _subject_id("miccai17", site, folder.name)
        try:
            f = _resolve(folder, layout_paths("miccai17", root, site, folder.name))
        except DataError as exc:
            out.append(_Candidate(sid, folder, error=exc))
            continue
        out.append(_Candidate(sid, folder, row=_make_row(
            "miccai17", sid, site, options, t1=f["t1"], flair=f["flair"], masks=[f["mask"]],
            mask_rule="single")))
    return out


def _isbi_timepoints(folder: Path) -> list[str]:
    pattern = re.compile(rf"{re.escape(folder.name)}_(\d+)_(?:flair|mprage|pd|t2)_pp\.nii(?:\.gz)?$"
                         rf"|{re.escape(folder.name)}_(\d+)_mask\d\.nii(?:\.gz)?$")
    found = set()
    for sub in ("preprocessed", "masks"):
        if (folder / sub).is_dir():
            for path in (folder / sub).iterdir():
                match = pattern.match(path.name)
                if match:
                    found.add(match.group(1) or match.group(2))
    return sorted(found, key=int)


def _find_isbi(root: Path, options: IndexOptions) -> list[_Candidate]:
    """``training/trainingNN`` folders; one time point each (``options.isbi_timepoint``)."""
    training = root / "training"
    if not training.is_dir():
        return []
    out = []
    for folder in _subdirs(training):
        if not re.fullmatch(r"training\d+", folder.name):
            continue
        timepoints = _isbi_timepoints(folder)
        if not timepoints:
            continue
        sid = _subject_id("isbi15", folder.name)
        tp = options.isbi_timepoint if options.isbi_timepoint is not None else timepoints[0]
        if tp not in timepoints:
            out.append(_Candidate(sid, folder, error=DataError(
                folder, f"time point {tp} not found (available: {', '.join(timepoints)})")))
            continue
        paths = layout_paths("isbi15", root, "ISBI", folder.name, timepoint=tp)
        raters = {"rater1": ["rater1"], "rater2": ["rater2"]}.get(options.isbi_raters,
                                                                  ["rater1", "rater2"])
        rule = "single" if len(raters) == 1 else options.isbi_raters
        required = {k: paths[k] for k in ("flair", "t1", *raters)}
        present = [p for p in (_present(paths["rater1"]), _present(paths["rater2"])) if p]
        try:
            f = _resolve(folder, required)
        except DataError as exc:
            out.append(_Candidate(sid, folder, error=exc))
            continue
        out.append(_Candidate(sid, folder, row=_make_row(
            "isbi15", sid, "ISBI", options, t1=f["t1"], flair=f["flair"],
            masks=[f[k] for k in raters], mask_rule=rule, rater_masks=present, timepoint=tp)))
    return out


def _find_msseg(root: Path, options: IndexOptions) -> list[_Candidate]:
    """``<Center>/<Patient>`` folders holding ``Preprocessed_Data/`` or ``Masks/``."""
    out = []
    for center in _subdirs(root):
        for folder in _subdirs(center):
            if not ((folder / "Preprocessed_Data").is_dir() or (folder / "Masks").is_dir()):
                continue
            site = center.name
            sid = _subject_id("msseg16", site, folder.name)
            paths = layout_paths("msseg16", root, site, folder.name)
            raters = [p for p in (_present(q) for q in paths["raters"]) if p is not None]
            required = {"flair": paths["flair"], "t1": paths["t1"]}
            rule = "single"
            if options.msseg_mask == "consensus":
                required["mask"] = paths["mask"]
            elif options.msseg_mask.startswith("rater:"):
                n = int(options.msseg_mask.split(":")[1])
                required["mask"] = paths["raters"][n - 1]
            else:
                rule = options.msseg_mask
                if not raters:
                    out.append(_Candidate(sid, folder, error=DataError(
                        folder, "subject folder is missing file(s): no Masks/"
                        f"ManualSegmentation_N.nii.gz for msseg_mask={rule!r}")))
                    continue
            try:
                f = _resolve(folder, required)
            except DataError as exc:
                out.append(_Candidate(sid, folder, error=exc))
                continue
            out.append(_Candidate(sid, folder, row=_make_row(
                "msseg16", sid, site, options, t1=f["t1"], flair=f["flair"],
                masks=[f["mask"]] if "mask" in f else raters, mask_rule=rule,
                rater_masks=raters, brain_mask=_present(paths["brain_mask"]))))
    return out


def _find_ljubljana(root: Path, options: IndexOptions) -> list[_Candidate]:
    """``patientNN`` folders, file names prefixed with the folder name or not."""
    out = []
    for folder in _subdirs(root):
        layouts = [layout_paths("ljubljana", root, "Ljubljana", folder.name, prefixed=p)
                   for p in (True, False)]
        used = next((lay for lay in layouts if any(_present(p) for p in lay.values())), None)
        if used is None:
            continue
        sid = _subject_id("ljubljana", folder.name)
        try:
            f = _resolve(folder, {k: used[k] for k in ("t1", "flair", "mask")})
        except DataError as exc:
            out.append(_Candidate(sid, folder, error=exc))
            continue
        out.append(_Candidate(sid, folder, row=_make_row(
            "ljubljana", sid, "Ljubljana", options, t1=f["t1"], flair=f["flair"],
            masks=[f["mask"]], mask_rule="single", brain_mask=_present(used["brain_mask"]))))
    return out


_FINDERS = {"miccai17": _find_miccai, "isbi15": _find_isbi, "msseg16": _find_msseg,
            "ljubljana": _find_ljubljana}


# ---------------------------------------------------------------------------------------------
# Loading one subject


def _labels(text: Any) -> list[int]:
    text = "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text)
    return [int(v) for v in text.split(";") if v.strip() != ""]


def _paths(text: Any) -> list[str]:
    text = "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text)
    return [p for p in text.split(";") if p]


def _binary_image(data: np.ndarray, like: nib.Nifti1Image) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data.astype(np.uint8), like.affine, like.header)
    img.set_data_dtype(np.uint8)
    return img


def _combine(stack: np.ndarray, rule: str, source: str) -> np.ndarray:
    """Combine binary rater masks (first axis) by ``rule``; majority = more than half."""
    if rule == "single":
        if stack.shape[0] != 1:
            raise DataError(source, f"mask_rule 'single' but {stack.shape[0]} masks listed")
        return stack[0]
    if rule == "intersection":
        return stack.all(axis=0)
    if rule == "union":
        return stack.any(axis=0)
    if rule == "majority":
        return stack.sum(axis=0) * 2 > stack.shape[0]
    raise DataError(source, f"unknown mask_rule {rule!r}; expected one of {MASK_RULES}")


def load_subject(row: Mapping[str, Any] | pd.Series) -> SubjectImages:
    """Read and check one manifest row's images; combine its masks into lesion / ignore masks.

    The FLAIR is the reference: the T1, every mask and the brain mask must overlap it in world
    space. Each mask has the label policy applied (``lesion_labels`` → lesion,
    ``ignore_labels`` → ignore) before masks are combined by ``mask_rule``; masks on a grid other
    than the first mask's are resampled onto it (nearest neighbour). The ignore region is the
    union over masks, minus the combined lesion. Images keep their own grids.
    """
    flair_path = str(row["flair"])
    flair = load_volume(flair_path)
    t1 = load_volume(str(row["t1"]))
    check_overlap(flair, t1, row["t1"], flair_path)

    mask_paths = _paths(row["mask"])
    if not mask_paths:
        raise DataError(flair_path, f"manifest row {row['subject_id']} lists no mask")
    allowed = _labels(row["allowed_labels"])
    lesion_labels, ignore_labels = _labels(row["lesion_labels"]), _labels(row["ignore_labels"])
    reference = load_mask(mask_paths[0], allowed)
    lesions, ignores = [], []
    for path in mask_paths:
        mask = reference if path == mask_paths[0] else load_mask(path, allowed)
        check_overlap(flair, mask, path, flair_path)
        if not same_grid(mask, reference):
            from nilearn.image import resample_to_img  # slow import; needed for odd raters only

            mask = resample_to_img(mask, reference, interpolation="nearest",
                                   force_resample=True, copy_header=True)
        data = np.asarray(mask.dataobj)
        lesions.append(np.isin(data, lesion_labels))
        ignores.append(np.isin(data, ignore_labels))
    lesion = _combine(np.stack(lesions), str(row["mask_rule"]), mask_paths[0])
    ignore = None
    if ignore_labels:
        ignore = _binary_image(np.any(ignores, axis=0) & ~lesion, reference)

    brain = None
    brain_path = str(row.get("brain_mask", "") or "")
    if brain_path and brain_path != "nan":
        brain = load_mask(brain_path, (0, 1))
        if not np.any(np.asarray(brain.dataobj)):
            raise DataError(brain_path, "brain mask is empty (all voxels zero)")
        check_overlap(flair, brain, brain_path, flair_path)
    return SubjectImages(str(row["subject_id"]), flair, t1, _binary_image(lesion, reference),
                         ignore, brain)


def _grid_text(img: nib.Nifti1Image) -> tuple[str, str]:
    return ("x".join(f"{v:.2f}" for v in voxel_size(img)),
            "x".join(str(int(v)) for v in img.shape[:3]))


def _lesion_ml(img: nib.Nifti1Image) -> float:
    voxel_ml = abs(float(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    return float(np.count_nonzero(np.asarray(img.dataobj))) * voxel_ml


# ---------------------------------------------------------------------------------------------
# Indexing


def _is_synthetic(root: Path) -> bool:
    return (root / SYNTHETIC_MARKER).is_file() or (root.parent / SYNTHETIC_MARKER).is_file()


def _empty_manifest() -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype=object) for c in MANIFEST_COLUMNS})
    return df.astype({"lesion_ml": float, "synthetic": bool})


def index_dataset(dataset: str, root: str | Path, options: IndexOptions | None = None, *,
                  skip_bad: bool = False, synthetic: bool | None = None,
                  progress: bool = False) -> IndexResult:
    """Find every subject of ``dataset`` under ``root`` and validate each by loading it.

    Without ``skip_bad`` the first problem raises :class:`DataError`; with it, bad subjects are
    left out and their errors returned in ``problems``. ``synthetic=None`` detects the marker
    file ``SYNTHETIC_COHORT.json`` in ``root`` or its parent. Rows are sorted by subject id.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    options = options or IndexOptions()
    root = Path(root).absolute()
    if not root.exists():
        raise DataError(root, f"{dataset} root folder does not exist")
    if not root.is_dir():
        raise DataError(root, f"{dataset} root is not a folder")
    if synthetic is None:
        synthetic = _is_synthetic(root)

    candidates = sorted(_FINDERS[dataset](root, options), key=lambda c: (c.subject_id, c.folder))
    if not candidates:
        raise DataError(root, f"no {dataset} subjects found; expected the layout "
                        f"{_EXPECTED_LAYOUT[dataset]} under this folder")

    problems: list[DataError] = []

    def fail(error: DataError) -> None:
        if not skip_bad:
            raise error
        problems.append(error)

    by_id: dict[str, list[_Candidate]] = {}
    for cand in candidates:
        by_id.setdefault(cand.subject_id, []).append(cand)
    for sid, group in by_id.items():
        if len(group) > 1:
            fail(DataError(group[-1].folder, f"duplicate subject id {sid}: also made from "
                           + ", ".join(str(c.folder) for c in group[:-1])))
    unique = [c for c in candidates if len(by_id[c.subject_id]) == 1]

    rows = []
    if progress:
        from tqdm import tqdm

        unique = tqdm(unique, desc=f"indexing {dataset}", unit="subject")
    for cand in unique:
        if cand.error is not None:
            fail(cand.error)
            continue
        try:
            images = load_subject(cand.row)
        except DataError as exc:
            fail(exc)
            continue
        row = dict(cand.row)
        row["flair_voxel_mm"], row["flair_shape"] = _grid_text(images.flair)
        row["t1_voxel_mm"], row["t1_shape"] = _grid_text(images.t1)
        row["lesion_ml"] = _lesion_ml(images.lesion)
        row["synthetic"] = bool(synthetic)
        rows.append(row)
    if not rows:
        raise DataError(root, f"no usable {dataset} subjects: all {len(candidates)} found were "
                        f"bad (first problem: {problems[0]})")
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.sort_values("subject_id", kind="stable").reset_index(drop=True)
    return IndexResult(manifest.astype({"lesion_ml": float, "synthetic": bool}), problems)


def index_cohort(root: str | Path, options: IndexOptions | None = None, *, skip_bad: bool = False,
                 progress: bool = False) -> IndexResult:
    """Index each dataset folder in root (``miccai17/``, ``isbi15/``, ``msseg16/``, ``ljubljana/``).

    With ``skip_bad`` a dataset folder that yields no usable subject is reported in ``problems``
    and the others are still indexed; it is an error only when no dataset yields any.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DataError(root, "cohort root folder does not exist")
    present = [d for d in DATASETS if (root / d).is_dir()]
    if not present:
        raise DataError(root, "no dataset folder found; expected one or more of "
                        + ", ".join(f"{d}/" for d in DATASETS))
    frames, problems = [], []
    for dataset in present:
        try:
            result = index_dataset(dataset, root / dataset, options, skip_bad=skip_bad,
                                   progress=progress)
        except DataError as exc:
            if not skip_bad:
                raise
            problems.append(exc)
            continue
        frames.append(result.manifest)
        problems.extend(result.problems)
    if not frames:
        raise DataError(root, f"no usable subjects in any dataset folder (first problem: "
                        f"{problems[0]})")
    return IndexResult(combine_manifests(frames), problems)


def combine_manifests(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate manifests; subject ids must stay unique across them."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty_manifest()
    combined = pd.concat(frames, ignore_index=True)
    duplicated = combined["subject_id"][combined["subject_id"].duplicated()].unique().tolist()
    if duplicated:
        raise DataError("combined manifest", f"duplicate subject ids: {', '.join(duplicated)}")
    return combined


def _check_columns(df: pd.DataFrame, path: str | Path) -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(path, f"manifest is missing columns: {', '.join(missing)}")


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest as CSV (manifest columns first, any extra columns after)."""
    path = Path(path)
    _check_columns(df, path)
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    path.parent.mkdir(parents=True, exist_ok=True)
    df[MANIFEST_COLUMNS + extra].to_csv(path, index=False)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV back with its dtypes: text with "" (never NaN), float, bool."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "manifest file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read manifest CSV ({exc})") from exc
    _check_columns(df, path)
    truth = {"true": True, "1": True, "false": False, "0": False}
    flags = df["synthetic"].str.strip().str.lower()
    bad = ~flags.isin(list(truth))
    if bad.any():
        raise DataError(path, "column synthetic holds non-boolean values "
                        f"{flags[bad].unique()[:3].tolist()}")
    df["synthetic"] = flags.map(truth).astype(bool)
    try:
        df["lesion_ml"] = pd.to_numeric(df["lesion_ml"].replace("", "nan")).astype(float)
    except ValueError as exc:
        raise DataError(path, f"column lesion_ml is not numeric ({exc})") from exc
    return df
