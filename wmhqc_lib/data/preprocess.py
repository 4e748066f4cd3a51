"""Per-case preprocessing into a fixed grid, cached on disk.

Every statistic is taken from the case itself (no cohort-wide normalisation), so a test case
never influences how another case is prepared. Steps: canonical orientation; T1 and masks
brought onto the FLAIR grid through the affines when grids differ; brain mask (given, or
computed from the images); crop to the brain; spacing-aware resampling (anti-aliased) of the
images to the profile's voxel size, padded or cropped to the profile's shape around the brain
centre; robust intensity normalisation inside the brain.

Masks (lesion, ignore, brain) are carried onto the profile grid as *partial volume*: each grid
voxel holds the fraction of its volume that the native mask covers (:func:`partial_volume`), so
the lesion volume on the grid equals the native one and a lesion smaller than a grid voxel is
not lost. Cutting a smoothed mask at 0.5 instead removed most WMH at 5 mm (a grid/native volume
ratio of 0.28 and one subject in ten left with no lesion). The native reference masks are kept
beside the case (``native.npz``), because true Dice is measured on the subject's own FLAIR grid
(:func:`native_dice`), with the prediction mapped back (:func:`map_to_native`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.image import resample_img, resample_to_img, smooth_img
from scipy import ndimage as ndi
from tqdm import tqdm

from ..config import PreprocessSettings
from .datasets import load_subject
from .io import DataError, same_grid, voxel_size

PREPROCESS_VERSION = 4  # 4: image_features in meta (out-of-distribution check)
CHANNELS = ("t1", "flair")


@dataclass
class NativeReference:
    """A subject's reference masks on its own FLAIR grid (canonical orientation), where true
    Dice is measured. Never read on the QC path."""

    lesion: np.ndarray  # (X, Y, Z) bool
    ignore: np.ndarray  # (X, Y, Z) bool, disjoint from lesion
    affine: np.ndarray  # voxel -> world mm of the canonical FLAIR grid

    @property
    def empty(self) -> bool:
        return not bool(self.lesion.any())


@dataclass
class PreprocessedCase:
    """One subject on the profile grid, plus what maps it back to the native FLAIR grid."""

    subject_id: str
    image: np.ndarray  # (C, X, Y, Z) float32, channels in CHANNELS order, 0 outside the brain
    lesion: np.ndarray  # (X, Y, Z) float32 in [0, 1]: partial-volume lesion fraction
    ignore: np.ndarray  # (X, Y, Z) float32 in [0, 1]: excluded from loss and metrics (label 2)
    brain: np.ndarray  # (X, Y, Z) uint8 0/1: at least half of the voxel is brain
    affine: np.ndarray  # profile grid voxel -> world mm
    meta: dict  # native grid, volumes, cache key
    # the reference on the native grid; kept in its own file and read only when scoring
    native: NativeReference | None = field(default=None, repr=False)

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
                     *, is_mask: bool = False) -> np.ndarray:
    """Anti-aliased linear resampling of an image onto a grid (``is_mask``: clipped to [0, 1]).

    Smoothing by the extra width the coarser voxel needs (FWHM^2 = target^2 - source^2 per
    axis) before interpolation keeps small structures from aliasing. Masks go through
    :func:`partial_volume` instead, which keeps their volume.
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


#: Sub-samples per native voxel and axis: enough that PV_DENSITY of them span the smallest
#: target voxel width (at least 1, at most PV_MAX_SUBSAMPLES); denser sub-sampling makes each
#: voxel's fraction closer to the exact overlap.
PV_DENSITY = 6.0
PV_MAX_SUBSAMPLES = 8
_PV_CHUNK = 1 << 21  # sub-sample points mapped per step (bounds memory)


def partial_volume(mask: np.ndarray, mask_affine: np.ndarray, affine: np.ndarray,
                   shape: tuple[int, int, int]) -> np.ndarray:
    """Fraction of each target voxel's volume covered by a mask (a box average, no blur).

    Native voxels are split into equal sub-cubes, each assigned to the target voxel that holds
    its centre. A target voxel's value is the share of the sub-cubes it received that carry
    mask (the mask may itself hold fractions). Counting the received sub-cubes, rather than
    dividing by the nominal volume ratio, makes a fully covered voxel exactly 1 whatever the
    lattice aliasing, and the mask's volume is carried over (less whatever falls outside the
    target grid). A lesion smaller than a target voxel keeps its fraction instead of
    vanishing. Works for any pair of affines (oblique, anisotropic, flipped); when each target
    axis follows one native axis (the usual case: grids that differ by spacing, flips, axis
    order and shift) the assignment factorises by axis and is computed axis by axis.
    """
    values = np.asarray(mask, dtype=np.float64)
    if not np.any(values > 0):
        return np.zeros(shape, dtype=np.float32)
    src = np.sqrt((np.asarray(mask_affine)[:3, :3] ** 2).sum(axis=0))
    tgt = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    k = np.clip(np.ceil(PV_DENSITY * src / tgt.min()), 1, PV_MAX_SUBSAMPLES).astype(int)
    # native voxel index -> target voxel coordinate, in one affine
    to_target = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ \
        np.asarray(mask_affine, dtype=np.float64)
    lin, shift = to_target[:3, :3], to_target[:3, 3]
    # a coupling between axes that moves no sub-voxel by more than 1e-6 of a target voxel
    # across the whole mask (rounding in a header's affine) counts as none
    coupled = np.abs(lin) * np.asarray(values.shape)[None, :] > 1e-6
    if (coupled.sum(axis=0) == 1).all() and (coupled.sum(axis=1) == 1).all():
        frac = _partial_volume_by_axis(values, lin, shift, k, tuple(shape))
    else:
        frac = _partial_volume_by_point(values, lin, shift, k, src, tgt, tuple(shape))
    return np.clip(frac, 0.0, 1.0).astype(np.float32)


def _sub_offsets(n: int) -> np.ndarray:
    """Centres of ``n`` equal sub-intervals of a voxel, relative to its centre."""
    return (np.arange(n) + 0.5) / n - 0.5


def _partial_volume_by_axis(values: np.ndarray, lin: np.ndarray, shift: np.ndarray,
                            k: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """:func:`partial_volume` when target axis ``r`` depends on native axis ``axes[r]`` alone.

    A sub-cube lands in target voxel (t0, t1, t2) when its sub-interval along each native axis
    lands in the matching target index, so the sub-cube counts are products of per-axis counts:
    ``assign[r][t, i]`` sub-intervals of native index ``i`` fall in target index ``t``. The mask
    is carried over with one sparse product per axis, and the received counts are an outer
    product.
    """
    from scipy import sparse

    axes = np.abs(lin).argmax(axis=1)  # native axis feeding each target axis (the others' tiny
    # couplings, if any, are left out)
    moved = np.transpose(values, axes)
    assign, received = [], []
    for r, c in enumerate(axes):
        n = values.shape[c]
        offsets = _sub_offsets(int(k[c]))
        coord = (np.arange(n)[:, None] + offsets[None]) * lin[r, c] + shift[r]
        target = np.floor(coord + 0.5).astype(np.int64)
        inside = (target >= 0) & (target < shape[r])
        native = np.broadcast_to(np.arange(n)[:, None], target.shape)
        matrix = sparse.csr_matrix((np.ones(int(inside.sum())), (target[inside], native[inside])),
                                   shape=(shape[r], n))
        assign.append(matrix)
        received.append(np.asarray(matrix.sum(axis=1)).ravel())
    carried = moved
    for r, matrix in enumerate(assign):
        rolled = np.moveaxis(carried, r, 0)
        flat = matrix @ rolled.reshape(rolled.shape[0], -1)
        carried = np.moveaxis(flat.reshape(shape[r], *rolled.shape[1:]), 0, r)
    counts = received[0][:, None, None] * received[1][None, :, None] * received[2][None, None]
    return np.divide(carried, counts, out=np.zeros(shape), where=counts > 0)


def _partial_volume_by_point(values: np.ndarray, lin: np.ndarray, shift: np.ndarray,
                             k: np.ndarray, src: np.ndarray, tgt: np.ndarray,
                             shape: tuple[int, int, int]) -> np.ndarray:
    """:func:`partial_volume` for any affines (oblique grids): every sub-cube centre mapped."""
    out = np.zeros(int(np.prod(shape)), dtype=np.float64)
    # every native voxel that can share a target voxel with the mask, for the counts
    reach = 2 * (np.ceil(tgt.max() / src).astype(int) + 1) + 1
    region = ndi.maximum_filter((values > 0).astype(np.uint8), size=tuple(reach)) > 0
    idx = np.argwhere(region)
    offsets = np.stack(np.meshgrid(*[_sub_offsets(int(n)) for n in k], indexing="ij"),
                       axis=-1).reshape(-1, 3)
    base = idx @ lin.T + shift  # each native voxel's centre in target voxel coordinates
    delta = offsets @ lin.T  # sub-sample centres relative to it
    weight = values[tuple(idx.T)]
    dims = np.asarray(shape)
    strides = np.array([dims[1] * dims[2], dims[2], 1])
    counts = np.zeros_like(out)
    per_step = max(1, _PV_CHUNK // len(offsets))
    for start in range(0, len(idx), per_step):
        stop = start + per_step
        vox = np.floor(base[start:stop, None, :] + delta[None] + 0.5).astype(np.int64)
        inside = np.all((vox >= 0) & (vox < dims), axis=2)
        flat = (vox @ strides)[inside]
        w = np.broadcast_to(weight[start:stop, None], inside.shape)
        out += np.bincount(flat, weights=w[inside], minlength=out.size)
        counts += np.bincount(flat, minlength=out.size)
    frac = np.divide(out, counts, out=np.zeros_like(out), where=counts > 0)
    return frac.reshape(shape)


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


def _flair_grid_images(flair_native: nib.Nifti1Image, t1: nib.Nifti1Image,
                       brain_mask: nib.Nifti1Image | None, flair_path: str
                       ) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, np.ndarray, str]:
    """The canonical FLAIR, the T1 on its grid and the native brain mask (given or computed)."""
    flair = nib.as_closest_canonical(flair_native)
    t1_img = on_flair_grid(t1, flair, "linear")
    flair_data = np.asarray(flair.dataobj, dtype=np.float32)
    t1_data = np.asarray(t1_img.dataobj, dtype=np.float32)
    if brain_mask is not None:
        brain_native = np.asarray(on_flair_grid(brain_mask, flair, "nearest").dataobj) > 0.5
        source = "given"
    else:
        brain_native = compute_brain_mask(flair_data, t1_data, voxel_size(flair))
        source = "computed"
    if not brain_native.any():
        raise DataError(flair_path, "brain mask is empty")
    return flair, flair_data, t1_data, brain_native, source


def on_flair_grid(img: nib.Nifti1Image, flair: nib.Nifti1Image, interpolation: str
                  ) -> nib.Nifti1Image:
    """``img`` in canonical orientation, resampled onto the canonical FLAIR grid if needed."""
    img = nib.as_closest_canonical(img)
    if same_grid(img, flair):
        return img
    img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    return resample_to_img(img, flair, interpolation=interpolation, force_resample=True,
                           copy_header=True)


@dataclass
class _GridImages:
    """The image part of a preprocessed case: what QC may see, and how to get back."""

    image: np.ndarray
    brain_pv: np.ndarray
    affine: np.ndarray
    meta: dict


def _to_grid(flair: nib.Nifti1Image, native_affine: np.ndarray, native_shape: Sequence[int],
             flair_data: np.ndarray, t1_data: np.ndarray, brain_native: np.ndarray,
             brain_source: str, settings: PreprocessSettings) -> _GridImages:
    """Crop to the brain, resample both channels onto the profile grid, normalise them."""
    vox = voxel_size(flair)
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
    brain_pv = partial_volume(brain_native, flair.affine, affine, shape)
    brain = brain_pv >= 0.5
    channels = {"t1": t1_data, "flair": flair_data}
    image = np.stack([
        normalise(resample_to_grid(cropped(channels[c]), affine, shape, is_mask=False), brain,
                  settings.clip_percentiles)
        for c in CHANNELS
    ])
    voxel_ml = float(np.prod(vox)) / 1000.0
    brain_ml = float(brain_native.sum()) * voxel_ml
    grid_ml = float(np.prod(settings.voxel_mm)) / 1000.0
    kept = float(brain_pv.sum(dtype=np.float64)) * grid_ml
    meta = {
        "native_affine": np.asarray(native_affine).tolist(),
        "native_shape": [int(n) for n in native_shape[:3]],
        "affine": affine.tolist(),
        "shape": list(shape),
        "brain_mask_source": brain_source,
        "brain_ml": brain_ml,
        "brain_outside_grid_fraction": max(0.0, 1.0 - kept / brain_ml),
        "image_features": image_features(flair_data, t1_data, brain_native, flair.affine),
    }
    return _GridImages(image, brain_pv, affine, meta)


#: Image features stored per case (``meta["image_features"]``): a deployed model compares a new
#: scan's features with the ranges of the cohort it was trained on (out-of-distribution check).
IMAGE_FEATURES = ("brain_ml", "extent_x_mm", "extent_y_mm", "extent_z_mm", "brain_fill",
                  "flair_t1_correlation", "flair_smoothness", "flair_bright_fraction",
                  "voxel_max_mm", "axis_skew_deg")


def image_features(flair: np.ndarray, t1: np.ndarray, brain: np.ndarray, affine: np.ndarray
                   ) -> dict[str, float]:
    """Summary statistics of one scan that tell a brain FLAIR like the training cohort's from
    noise, another body part, a large artefact or a header whose orientation is wrong.

    ``extent_*_mm``: the brain's size along the canonical (RAS) axes, so a header that swaps
    axes moves them; ``brain_fill``: brain voxels / bounding-box voxels (shape);
    ``flair_t1_correlation`` and ``flair_smoothness`` (correlation of neighbouring voxels along
    the first axis) inside the brain are near 0 for noise; ``flair_bright_fraction``: share of
    brain voxels brighter than the median + 5 interquartile ranges (a large bright artefact);
    ``axis_skew_deg``: the largest departure of the voxel axes from right angles (shear).
    """
    brain = np.asarray(brain, dtype=bool)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    idx = np.argwhere(brain)
    extent = (idx.max(axis=0) - idx.min(axis=0) + 1) * zooms
    box = float(np.prod(idx.max(axis=0) - idx.min(axis=0) + 1))
    f, t = flair[brain].astype(np.float64), t1[brain].astype(np.float64)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        if a.size < 3 or a.std() == 0 or b.std() == 0:
            return 0.0
        return float(np.corrcoef(a, b)[0, 1])

    pair = brain[1:] & brain[:-1]
    q25, q50, q75 = np.percentile(f, [25, 50, 75])
    axes = np.asarray(affine)[:3, :3] / zooms
    cosines = np.abs(axes.T @ axes)[np.triu_indices(3, 1)]
    return {
        "brain_ml": float(brain.sum()) * float(np.prod(zooms)) / 1000.0,
        "extent_x_mm": float(extent[0]), "extent_y_mm": float(extent[1]),
        "extent_z_mm": float(extent[2]),
        "brain_fill": float(brain.sum()) / box,
        "flair_t1_correlation": corr(f, t),
        "flair_smoothness": corr(flair[1:][pair].astype(np.float64),
                                 flair[:-1][pair].astype(np.float64)),
        "flair_bright_fraction": float(np.mean(f > q50 + 5.0 * max(q75 - q25, 1e-6))),
        "voxel_max_mm": float(zooms.max()),
        "axis_skew_deg": float(np.degrees(np.arcsin(np.clip(cosines.max(), 0.0, 1.0)))),
    }


def preprocess_subject(row: Mapping, settings: PreprocessSettings) -> PreprocessedCase:
    """Run every preprocessing step on one manifest row (see module docstring)."""
    subject = load_subject(row)
    native = subject.flair
    flair, flair_data, t1_data, brain_native, brain_source = _flair_grid_images(
        native, subject.t1, subject.brain_mask, str(row["flair"]))
    lesion = on_flair_grid(subject.lesion, flair, "nearest")
    ignore = (on_flair_grid(subject.ignore, flair, "nearest") if subject.ignore is not None
              else None)
    vox = voxel_size(flair)
    voxel_ml = float(np.prod(vox)) / 1000.0
    lesion_native = np.asarray(lesion.dataobj) > 0
    lesion_native &= brain_native | lesion_native  # lesions outside a given mask still count
    grid = _to_grid(flair, native.affine, native.shape, flair_data, t1_data, brain_native,
                    brain_source, settings)
    affine, shape = grid.affine, settings.shape
    ignore_native = np.zeros_like(lesion_native)
    if ignore is not None:
        ignore_native = (np.asarray(ignore.dataobj) > 0) & ~lesion_native
    native_ref = NativeReference(lesion_native, ignore_native, flair.affine.copy())
    lesion_pv = partial_volume(lesion_native, flair.affine, affine, shape)
    ignore_pv = np.minimum(partial_volume(ignore_native, flair.affine, affine, shape),
                           1.0 - lesion_pv)
    grid_ml = float(np.prod(settings.voxel_mm)) / 1000.0
    brain_ml = grid.meta["brain_ml"]
    meta = {
        "subject_id": str(row["subject_id"]),
        "cache_key": cache_key(row, settings),
        "native_flair": str(row["flair"]),
        **grid.meta,
        "lesion_ml": float(lesion_native.sum()) * voxel_ml,
        "lesion_ml_grid": float(lesion_pv.sum(dtype=np.float64)) * grid_ml,
        "ignore_ml": float(ignore_native.sum()) * voxel_ml,
        "reference_empty": not bool(lesion_native.any()),
        "load_pct": 100.0 * float(lesion_native.sum()) * voxel_ml / brain_ml,
    }
    # what the grid costs: the partial-volume reference used as a prediction, mapped back and
    # cut at 0.5, against the native reference (an empty reference scores 1)
    meta["roundtrip_dice"] = native_dice(lesion_pv, meta, native_ref)
    return PreprocessedCase(str(row["subject_id"]), grid.image, lesion_pv, ignore_pv,
                            (grid.brain_pv >= 0.5).astype(np.uint8), affine, meta,
                            native=native_ref)


def preprocess_scan(subject_id: str, flair_path: str | Path, t1_path: str | Path,
                    settings: PreprocessSettings, brain_mask_path: str | Path | None = None
                    ) -> PreprocessedCase:
    """Preprocess a new scan (no annotation) exactly as the study's cases were: the case's
    lesion and ignore masks are empty and it has no native reference. Bad files raise
    :class:`DataError` naming the file."""
    from .io import check_overlap, load_mask, load_volume

    flair_path, t1_path = str(flair_path), str(t1_path)
    native = load_volume(flair_path)
    t1 = load_volume(t1_path)
    check_overlap(native, t1, t1_path, flair_path)
    brain_mask = None
    if brain_mask_path:
        brain_mask = load_mask(brain_mask_path, (0, 1))
        check_overlap(native, brain_mask, brain_mask_path, flair_path)
    flair, flair_data, t1_data, brain_native, source = _flair_grid_images(
        native, t1, brain_mask, flair_path)
    grid = _to_grid(flair, native.affine, native.shape, flair_data, t1_data, brain_native,
                    source, settings)
    meta = {"subject_id": subject_id, "native_flair": flair_path, **grid.meta}
    zeros = np.zeros(settings.shape, dtype=np.float32)
    return PreprocessedCase(subject_id, grid.image, zeros, zeros.copy(),
                            (grid.brain_pv >= 0.5).astype(np.uint8), grid.affine, meta)


def map_to_native(volume: np.ndarray, case: PreprocessedCase | Mapping, *,
                  interpolation: str = "linear", target_affine: np.ndarray | None = None,
                  target_shape: Sequence[int] | None = None) -> nib.Nifti1Image:
    """Bring a volume on the profile grid (a prediction, an uncertainty map) back onto the
    subject's native FLAIR grid (as stored on disk, or the given grid: e.g. the canonical
    one of :class:`NativeReference`), for overlay on the original scan and for true Dice."""
    meta = case.meta if isinstance(case, PreprocessedCase) else case
    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(meta["affine"]))
    if target_affine is None:
        target_affine, target_shape = meta["native_affine"], meta["native_shape"]
    with warnings.catch_warnings():  # a binary prediction is resampled as a fraction on purpose
        warnings.filterwarnings("ignore", message="Resampling binary images")
        return resample_img(img, target_affine=np.asarray(target_affine),
                            target_shape=tuple(int(n) for n in target_shape),
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
    if case.native is not None:
        tmp = folder / "native.tmp.npz"
        np.savez_compressed(tmp, lesion=case.native.lesion, ignore=case.native.ignore,
                            affine=case.native.affine)
        tmp.replace(folder / "native.npz")
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


def load_native_reference(cache_dir: str | Path, subject_id: str) -> NativeReference:
    """The reference masks of a cached case on its native FLAIR grid (for true Dice only)."""
    path = case_dir(cache_dir, subject_id) / "native.npz"
    try:
        with np.load(path) as z:
            return NativeReference(z["lesion"] > 0, z["ignore"] > 0, z["affine"])
    except FileNotFoundError as exc:
        raise DataError(path, "native reference missing: run the data step first") from exc


def native_dice(volume: np.ndarray, case: PreprocessedCase | Mapping,
                reference: NativeReference, *, two_class: bool = False) -> float:
    """Dice of a profile-grid prediction against the native reference, on the native grid.

    ``volume`` is a probability (or a binary mask as 0/1): it is resampled linearly onto the
    native FLAIR grid and cut at 0.5 there (:func:`map_to_native`). ``two_class``: the
    paper code's mean of background and lesion Dice, on the same grid. An empty reference
    scores 1 only when the mapped prediction is empty too (:mod:`wmhqc_lib.overlap`).
    """
    from ..overlap import dice, two_class_dice

    pred = np.asarray(map_to_native(volume, case, target_affine=reference.affine,
                                    target_shape=reference.lesion.shape).dataobj) > 0.5
    score = two_class_dice if two_class else dice
    return score(pred, reference.lesion, reference.ignore)


def is_cached(row: Mapping, cache_dir: str | Path, settings: PreprocessSettings) -> bool:
    folder = case_dir(cache_dir, str(row["subject_id"]))
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (meta.get("cache_key") == cache_key(row, settings) and (folder / "case.npz").exists()
            and (folder / "native.npz").exists())


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
            "ignore_ml", "reference_empty", "roundtrip_dice", "load_pct", "brain_mask_source",
            "brain_outside_grid_fraction"]
    return table[[c for c in keep if c in table.columns]]
