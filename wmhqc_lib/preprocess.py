"""Per-case preprocessing into a fixed grid, cached on disk.

Every statistic is taken from the case itself (no cohort-wide normalisation), so a test case
never influences how another case is prepared. Steps: canonical orientation; T1 and masks
brought onto the FLAIR grid through the affines when grids differ; brain mask (given, or
computed from the images); crop to the brain; spacing-aware resampling (anti-aliased) to the
profile's voxel size, padded or cropped to the profile's shape around the brain centre; robust
intensity normalisation inside the brain. What is needed to map a prediction back onto the
subject's native FLAIR grid is kept with the case.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.image import resample_img, resample_to_img, smooth_img
from scipy import ndimage as ndi
from tqdm import tqdm

from .config import PreprocessSettings
from .datasets import load_subject
from .io import DataError, same_grid, voxel_size

PREPROCESS_VERSION = 1
CHANNELS = ("t1", "flair")


@dataclass
class PreprocessedCase:
    """One subject on the profile grid, plus what maps it back to the native FLAIR grid."""

    subject_id: str
    image: np.ndarray  # (C, X, Y, Z) float32, channels in CHANNELS order, 0 outside the brain
    lesion: np.ndarray  # (X, Y, Z) uint8 0/1
    ignore: np.ndarray  # (X, Y, Z) uint8 0/1: excluded from loss and metrics (e.g. label 2)
    brain: np.ndarray  # (X, Y, Z) uint8 0/1
    affine: np.ndarray  # profile grid voxel -> world mm
    meta: dict  # native grid, volumes, cache key

    def to_nifti(self, what: str) -> nib.Nifti1Image:
        """A channel (``t1``/``flair``) or mask (``lesion``/``ignore``/``brain``) as NIfTI."""
        if what in CHANNELS:
            data = self.image[CHANNELS.index(what)]
        else:
            data = getattr(self, what)
        return nib.Nifti1Image(np.asarray(data), self.affine)


# ---------------------------------------------------------------------------------------------
# Building blocks


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def compute_brain_mask(flair: np.ndarray, t1: np.ndarray, voxel_mm: tuple[float, float, float],
                       erode_mm: float = 4.0) -> np.ndarray:
    """Brain mask from the images alone, for datasets that ship none.

    Foreground by Otsu on the smoothed, summed and scaled images; an erosion (in mm, so
    anisotropic voxels are handled) breaks the thin bridges between brain and scalp; the largest
    component is kept, dilated back, closed and hole-filled to take in ventricles and sulci.
    """
    sampling = np.asarray(voxel_mm, dtype=float)
    sigma = 1.0 / sampling
    combo = np.zeros(flair.shape, dtype=np.float32)
    for img in (flair, t1):
        img = ndi.gaussian_filter(img.astype(np.float32), sigma)
        positive = img[img > 0]
        if positive.size:
            combo += img / max(float(np.percentile(positive, 99)), 1e-6)
    positive = combo[combo > 0]
    if positive.size == 0:
        return np.zeros(flair.shape, dtype=bool)
    fg = combo > _otsu(positive)
    core = ndi.distance_transform_edt(fg, sampling=sampling) > erode_mm
    labels, n = ndi.label(core)
    if n == 0:
        return ndi.binary_fill_holes(fg)
    sizes = ndi.sum(core, labels, np.arange(1, n + 1))
    core = labels == (int(np.argmax(sizes)) + 1)
    mask = ndi.distance_transform_edt(~core, sampling=sampling) <= erode_mm + 1.0
    mask &= ndi.distance_transform_edt(~fg, sampling=sampling) <= 3.0  # not past the tissue
    dilated = ndi.distance_transform_edt(~mask, sampling=sampling) <= 4.0  # closing, 4 mm
    mask = ndi.distance_transform_edt(dilated, sampling=sampling) > 4.0
    for ax in range(3):  # fill ventricles and enclosed sulci slice by slice, then in 3D
        mask = np.stack([ndi.binary_fill_holes(s) for s in np.moveaxis(mask, ax, 0)], axis=ax)
    return ndi.binary_fill_holes(mask)


def target_grid(centre_mm: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """Affine of the profile grid (RAS, profile voxel size) centred on ``centre_mm``."""
    vox = np.asarray(settings.voxel_mm, dtype=float)
    shape = np.asarray(settings.shape, dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(vox)
    affine[:3, 3] = centre_mm - vox * (shape - 1) / 2.0
    return affine


def resample_to_grid(img: nib.Nifti1Image, affine: np.ndarray, shape: tuple[int, int, int],
                     *, is_mask: bool) -> np.ndarray:
    """Anti-aliased linear resampling onto a grid; masks come back as fractions in [0, 1].

    Smoothing by the extra width the coarser voxel needs (FWHM^2 = target^2 - source^2 per
    axis) before interpolation keeps small structures from aliasing and keeps a mask's volume
    close to the original when its fraction is thresholded at 0.5.
    """
    src = np.asarray(voxel_size(img))
    tgt = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # canonical images have array axes along world axes, so per-axis FWHM applies directly
    fwhm = np.sqrt(np.clip(tgt**2 - src**2, 0, None))
    data = np.asarray(img.dataobj, dtype=np.float32)
    work = nib.Nifti1Image(data, img.affine)
    if np.any(fwhm > 0):
        work = smooth_img(work, fwhm=fwhm)
    with warnings.catch_warnings():  # masks are resampled as fractions on purpose
        warnings.filterwarnings("ignore", message="Resampling binary images")
        out = resample_img(work, target_affine=affine, target_shape=shape,
                           interpolation="linear", force_resample=True, copy_header=True)
    arr = np.asarray(out.dataobj, dtype=np.float32)
    return np.clip(arr, 0.0, 1.0) if is_mask else arr


def normalise(channel: np.ndarray, brain: np.ndarray, clip_percentiles: tuple[float, float]
              ) -> np.ndarray:
    """Clip to within-brain percentiles, then z-score with within-brain mean and SD; 0 outside."""
    values = channel[brain]
    if values.size == 0:
        raise ValueError("empty brain mask: nothing to normalise")
    lo, hi = np.percentile(values, clip_percentiles)
    clipped = np.clip(channel, lo, hi)
    inside = clipped[brain]
    sd = float(inside.std())
    out = (clipped - float(inside.mean())) / (sd if sd > 0 else 1.0)
    return np.where(brain, out, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# One case


def _file_stamp(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def cache_key(row: Mapping, settings: PreprocessSettings) -> str:
    """Hash of the inputs (paths, sizes, mtimes, policies) and settings that shape a case."""
    files = [p for col in ("t1", "flair", "mask", "brain_mask") for p in
             str(row.get(col, "") or "").split(";") if p]
    stamp = {
        "files": [_file_stamp(p) if os.path.exists(p) else [p] for p in files],
        "policy": [str(row.get(c, "")) for c in ("mask_rule", "lesion_labels", "ignore_labels")],
        "settings": asdict(settings) | {"workers": None},
        "version": PREPROCESS_VERSION,
    }
    return hashlib.sha1(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()


def preprocess_subject(row: Mapping, settings: PreprocessSettings) -> PreprocessedCase:
    """Run every preprocessing step on one manifest row (see module docstring)."""
    subject = load_subject(row)
    native = subject.flair
    flair = nib.as_closest_canonical(native)

    def on_flair_grid(img: nib.Nifti1Image, interpolation: str) -> nib.Nifti1Image:
        img = nib.as_closest_canonical(img)
        if same_grid(img, flair):
            return img
        img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        return resample_to_img(img, flair, interpolation=interpolation, force_resample=True,
                               copy_header=True)

    t1 = on_flair_grid(subject.t1, "linear")
    lesion = on_flair_grid(subject.lesion, "nearest")
    ignore = on_flair_grid(subject.ignore, "nearest") if subject.ignore is not None else None
    flair_data = np.asarray(flair.dataobj, dtype=np.float32)
    t1_data = np.asarray(t1.dataobj, dtype=np.float32)
    vox = voxel_size(flair)
    if subject.brain_mask is not None:
        brain_native = np.asarray(on_flair_grid(subject.brain_mask, "nearest").dataobj) > 0.5
        brain_source = "given"
    else:
        brain_native = compute_brain_mask(flair_data, t1_data, vox)
        brain_source = "computed"
    if not brain_native.any():
        raise DataError(row["flair"], "brain mask is empty")
    voxel_ml = float(np.prod(vox)) / 1000.0
    lesion_native = np.asarray(lesion.dataobj) > 0
    lesion_native &= brain_native | lesion_native  # lesions outside a given mask still count

    # crop to the brain's bounding box plus margin (array slicing: no interpolation)
    idx = np.argwhere(brain_native)
    margin = np.ceil(settings.crop_margin_mm / np.asarray(vox)).astype(int)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, flair.shape[:3])
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    crop_affine = flair.affine.copy()
    crop_affine[:3, 3] = nib.affines.apply_affine(flair.affine, lo)

    def cropped(data: np.ndarray) -> nib.Nifti1Image:
        return nib.Nifti1Image(np.ascontiguousarray(data[sl], dtype=np.float32), crop_affine)

    centre_vox = (idx.min(axis=0) + idx.max(axis=0)) / 2.0
    affine = target_grid(nib.affines.apply_affine(flair.affine, centre_vox), settings)
    shape = settings.shape
    brain = resample_to_grid(cropped(brain_native), affine, shape, is_mask=True) >= 0.5
    lesion_t = resample_to_grid(cropped(lesion_native), affine, shape, is_mask=True) >= 0.5
    ignore_t = np.zeros(shape, dtype=bool)
    if ignore is not None:
        ignore_t = resample_to_grid(cropped(np.asarray(ignore.dataobj) > 0), affine, shape,
                                    is_mask=True) >= 0.5
    channels = {"t1": t1_data, "flair": flair_data}
    image = np.stack([
        normalise(resample_to_grid(cropped(channels[c]), affine, shape, is_mask=False), brain,
                  settings.clip_percentiles)
        for c in CHANNELS
    ])
    brain_ml = float(brain_native.sum()) * voxel_ml
    kept = float(brain.sum() * np.prod(settings.voxel_mm) / 1000.0)
    meta = {
        "subject_id": str(row["subject_id"]),
        "cache_key": cache_key(row, settings),
        "native_flair": str(row["flair"]),
        "native_affine": native.affine.tolist(),
        "native_shape": list(native.shape[:3]),
        "affine": affine.tolist(),
        "shape": list(shape),
        "brain_mask_source": brain_source,
        "brain_ml": brain_ml,
        "lesion_ml": float(lesion_native.sum()) * voxel_ml,
        "lesion_ml_grid": float(lesion_t.sum() * np.prod(settings.voxel_mm) / 1000.0),
        "load_pct": 100.0 * float(lesion_native.sum()) * voxel_ml / brain_ml,
        "brain_outside_grid_fraction": max(0.0, 1.0 - kept / brain_ml),
    }
    return PreprocessedCase(str(row["subject_id"]), image, lesion_t.astype(np.uint8),
                            (ignore_t & ~lesion_t).astype(np.uint8), brain.astype(np.uint8),
                            affine, meta)


def map_to_native(volume: np.ndarray, case: PreprocessedCase | Mapping, *,
                  interpolation: str = "linear") -> nib.Nifti1Image:
    """Bring a volume on the profile grid (a prediction, an uncertainty map) back onto the
    subject's native FLAIR grid, for overlay on the original scan."""
    meta = case.meta if isinstance(case, PreprocessedCase) else case
    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(meta["affine"]))
    with warnings.catch_warnings():  # a binary prediction is resampled as a fraction on purpose
        warnings.filterwarnings("ignore", message="Resampling binary images")
        return resample_img(img, target_affine=np.asarray(meta["native_affine"]),
                            target_shape=tuple(meta["native_shape"]),
                            interpolation=interpolation, force_resample=True, copy_header=True)


# ---------------------------------------------------------------------------------------------
# Cache


def case_dir(cache_dir: str | Path, subject_id: str) -> Path:
    return Path(cache_dir) / subject_id


def save_case(case: PreprocessedCase, cache_dir: str | Path) -> Path:
    """Write ``case.npz`` and ``meta.json`` atomically (a crash never leaves half a case)."""
    folder = case_dir(cache_dir, case.subject_id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "case.tmp.npz"
    np.savez_compressed(tmp, image=case.image, lesion=case.lesion, ignore=case.ignore,
                        brain=case.brain, affine=case.affine)
    tmp.replace(folder / "case.npz")
    meta_tmp = folder / "meta.tmp.json"
    meta_tmp.write_text(json.dumps(case.meta, indent=1))
    meta_tmp.replace(folder / "meta.json")
    return folder


def load_case(cache_dir: str | Path, subject_id: str) -> PreprocessedCase:
    """Read one preprocessed case from the cache."""
    folder = case_dir(cache_dir, subject_id)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "case.npz") as z:
            return PreprocessedCase(subject_id, z["image"], z["lesion"], z["ignore"], z["brain"],
                                    z["affine"], meta)
    except FileNotFoundError as exc:
        raise DataError(folder, "preprocessed case missing: run the data step first") from exc


def is_cached(row: Mapping, cache_dir: str | Path, settings: PreprocessSettings) -> bool:
    folder = case_dir(cache_dir, str(row["subject_id"]))
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return meta.get("cache_key") == cache_key(row, settings) and (folder / "case.npz").exists()


def _run_one(args: tuple[dict, str, PreprocessSettings]) -> dict:
    row, cache_dir, settings = args
    try:
        case = preprocess_subject(row, settings)
        save_case(case, cache_dir)
        return {**case.meta, "status": "computed", "error": ""}
    except DataError as exc:
        return {"subject_id": row["subject_id"], "status": "failed", "error": str(exc)}


def preprocess_cohort(manifest: pd.DataFrame, cache_dir: str | Path,
                      settings: PreprocessSettings, *, workers: int | None = None,
                      progress: bool = True, skip_bad: bool = False) -> pd.DataFrame:
    """Preprocess every manifest row into ``cache_dir``; cached cases are not redone.

    Returns one row per subject (volumes, load, status). A bad subject does not stop the
    others; unless ``skip_bad``, a :class:`DataError` listing every failure is raised after all
    other cases are saved, so nothing computed is lost.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for _, r in manifest.iterrows()]
    results: dict[str, dict] = {}
    todo = []
    for row in rows:
        if is_cached(row, cache_dir, settings):
            meta = json.loads((case_dir(cache_dir, row["subject_id"]) / "meta.json").read_text())
            results[row["subject_id"]] = {**meta, "status": "cached", "error": ""}
        else:
            todo.append((row, str(cache_dir), settings))
    workers = max(1, min(workers or settings.workers, len(todo) or 1))
    bar = tqdm(total=len(todo), desc="preprocessing", unit="case", disable=not progress)
    if workers > 1 and len(todo) > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            for res in pool.imap_unordered(_run_one, todo):
                results[res["subject_id"]] = res
                bar.update()
    else:
        for job in todo:
            res = _run_one(job)
            results[res["subject_id"]] = res
            bar.update()
    bar.close()
    table = pd.DataFrame([results[r["subject_id"]] for r in rows])
    failed = table[table["status"] == "failed"]
    if len(failed) and not skip_bad:
        lines = "\n".join(f"  {e}" for e in failed["error"])
        raise DataError(cache_dir, f"{len(failed)} of {len(table)} cases failed preprocessing "
                                   f"(the others are saved):\n{lines}")
    keep = ["subject_id", "status", "error", "brain_ml", "lesion_ml", "lesion_ml_grid",
            "load_pct", "brain_mask_source", "brain_outside_grid_fraction"]
    return table[[c for c in keep if c in table.columns]]
