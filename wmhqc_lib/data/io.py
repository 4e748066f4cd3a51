"""Reading NIfTI volumes with checks that name the file and the problem.

Every image or mask the project reads goes through :func:`load_volume`, so a truncated
download, a 4D file or a NaN voxel stops with a message a user can act on instead of a
traceback from deep inside resampling.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np


class DataError(ValueError):
    """A problem with one input file or subject; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        """Rebuilt from (path, problem), so that it crosses from a worker process intact."""
        return DataError, (self.path, self.problem)


def load_volume(path: str | Path, *, allow_zero: bool = False) -> nib.Nifti1Image:
    """Load a 3D NIfTI image fully into memory and check it is usable.

    A trailing singleton dimension (``X x Y x Z x 1``) is dropped. Raises :class:`DataError`
    for a missing, unreadable or truncated file, a volume that is not 3D, non-finite voxels,
    or (unless ``allow_zero``) an image whose voxels are all zero.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise DataError(path, f"cannot read NIfTI data (unreadable or truncated file: {exc})"
                        ) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {tuple(data.shape)}")
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        if bad.any():
            raise DataError(path, f"{int(bad.sum())} voxels are NaN or infinite")
    if not allow_zero and not np.any(data):
        raise DataError(path, "all voxels are zero (empty image)")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or \
            abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise DataError(path, "header has no valid affine (voxel-to-world transform)")
    out = nib.Nifti1Image(np.asarray(data), affine, img.header)
    out.set_data_dtype(data.dtype)
    return out


def load_mask(path: str | Path, allowed_labels: Iterable[int]) -> nib.Nifti1Image:
    """Load a label mask and check every value is one of ``allowed_labels``.

    An all-zero mask is valid (a subject may have no lesion).
    """
    img = load_volume(path, allow_zero=True)
    data = np.asanyarray(img.dataobj)
    allowed = sorted(int(v) for v in allowed_labels)
    labels = np.rint(data) if np.issubdtype(data.dtype, np.floating) else data
    if labels is not data:
        off = np.abs(data - labels) > 1e-3
        if off.any():
            odd = np.unique(data[off])[:3]
            raise DataError(path, f"mask holds non-integer values (e.g. {odd})")
    extra = sorted({int(v) for v in _distinct(labels)} - set(allowed))
    if extra:
        raise DataError(path, f"mask labels {extra} are outside the dataset's label set {allowed}")
    return nib.Nifti1Image(labels.astype(np.uint8), img.affine, img.header)


def _distinct(labels: np.ndarray) -> np.ndarray:
    """The distinct values of an integer-valued volume: counted when they are small
    non-negative integers (the usual labels), sorted otherwise."""
    lo, hi = labels.min(initial=0), labels.max(initial=0)
    if lo >= 0 and hi < 1 << 16:
        return np.flatnonzero(np.bincount(labels.ravel().astype(np.intp), minlength=1))
    return np.unique(labels)


def world_bounds(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper world-coordinate corners (mm) of the volume's field of view."""
    shape = np.array(img.shape[:3])
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5)
                        for j in (-0.5, shape[1] - 0.5) for k in (-0.5, shape[2] - 0.5)])
    world = nib.affines.apply_affine(img.affine, corners)
    return world.min(axis=0), world.max(axis=0)


def check_overlap(reference: nib.Nifti1Image, other: nib.Nifti1Image, other_path: str | Path,
                  reference_path: str | Path, min_fraction: float = 0.5) -> None:
    """Raise :class:`DataError` unless ``other`` covers a good part of ``reference`` in world space.

    Mask or T1 grids that do not overlap the FLAIR (a wrong file or a broken header) would
    otherwise resample to an empty volume without complaint.
    """
    lo1, hi1 = world_bounds(reference)
    lo2, hi2 = world_bounds(other)
    inter = np.clip(np.minimum(hi1, hi2) - np.maximum(lo1, lo2), 0, None)
    smaller = min(np.prod(hi1 - lo1), np.prod(hi2 - lo2))
    fraction = float(np.prod(inter) / smaller) if smaller > 0 else 0.0
    if fraction < min_fraction:
        raise DataError(
            other_path,
            f"grid does not overlap the reference image {reference_path} "
            f"(shared field of view {fraction:.0%} of the smaller volume)",
        )


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, atol: float = 1e-3) -> bool:
    """True when two images share shape and affine, so no resampling is needed."""
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=atol)


def voxel_size(img: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel size (mm) along the array axes, from the affine."""
    return tuple(float(v) for v in np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)))
