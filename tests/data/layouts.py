"""Build tiny fixture trees in each public dataset's layout, and break them on purpose.

Files are placed with :func:`wmhqc_lib.data.datasets.layout_paths`, so fixtures and readers share
one definition of each layout. Lesions are boxes, so every expected voxel count is known
exactly: the constants below give the box of each mask and its voxel count.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from wmhqc_lib.data.datasets import layout_paths

SHAPE = (10, 12, 8)
VOXEL = (1.0, 1.0, 3.0)

Box = tuple[slice, slice, slice]


def box_size(box: Box) -> int:
    return int(np.prod([s.stop - s.start for s in box]))


# MICCAI WMH: label 1 (WMH) and label 2 (other pathology), disjoint.
MICCAI_WMH: Box = (slice(2, 5), slice(3, 7), slice(2, 4))     # 24 voxels
MICCAI_OTHER: Box = (slice(6, 8), slice(6, 8), slice(4, 6))   # 8 voxels

# ISBI 2015, time point 01: two raters that overlap along x.
ISBI_R1: Box = (slice(2, 6), slice(3, 7), slice(2, 5))        # 48 voxels
ISBI_R2: Box = (slice(4, 9), slice(3, 7), slice(2, 5))        # 60 voxels
ISBI_COUNTS = {"rater1": 48, "rater2": 60, "intersection": 24, "union": 84, "majority": 24}
# Time point 02 has thinner lesions (z 2:4), so the chosen time point shows in lesion_ml.
ISBI_TP2_COUNTS = {"rater1": 32, "rater2": 40, "intersection": 16, "union": 56, "majority": 16}

# MSSEG 2016: consensus plus three manual segmentations (x 2:6, 4:8, 5:10; y 3:7; z 2:5).
MSSEG_CONSENSUS: Box = (slice(3, 8), slice(2, 8), slice(2, 5))  # 90 voxels
MSSEG_RATERS: list[Box] = [(slice(2, 6), slice(3, 7), slice(2, 5)),   # 48
                           (slice(4, 8), slice(3, 7), slice(2, 5)),   # 48
                           (slice(5, 10), slice(3, 7), slice(2, 5))]  # 60
MSSEG_COUNTS = {"consensus": 90, "rater:1": 48, "rater:2": 48, "rater:3": 60,
                "intersection": 12, "union": 96, "majority": 48}
MSSEG_T1_SHAPE = (8, 10, 20)
MSSEG_T1_VOXEL = (1.25, 1.2, 1.2)

LJUBLJANA_LESION: Box = (slice(2, 6), slice(2, 6), slice(2, 6))  # 64 voxels


def make_affine(voxel: tuple[float, float, float] = VOXEL,
                origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = origin
    return affine


def save(data: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, make_affine() if affine is None else affine)
    img.set_data_dtype(data.dtype)
    nib.save(img, str(path))
    return path


def write_image(path: Path, seed: int, shape: tuple[int, int, int] = SHAPE,
                affine: np.ndarray | None = None) -> Path:
    """A random positive float32 'scan'."""
    rng = np.random.default_rng(seed)
    return save(rng.uniform(10.0, 100.0, size=shape).astype(np.float32), path, affine)


def write_mask(path: Path, boxes: list[tuple[Box, int]], shape: tuple[int, int, int] = SHAPE,
               affine: np.ndarray | None = None) -> Path:
    data = np.zeros(shape, dtype=np.uint8)
    for box, label in boxes:
        data[box] = label
    return save(data, path, affine)


def write_miccai(root: Path, site: str, subject: str, seed: int = 0) -> dict:
    """``<site>/<id>/pre/{FLAIR,T1}.nii.gz`` and ``wmh.nii.gz`` with labels 1 and 2."""
    paths = layout_paths("miccai17", root, site, subject)
    write_image(paths["flair"], seed)
    write_image(paths["t1"], seed + 1)
    write_mask(paths["mask"], [(MICCAI_WMH, 1), (MICCAI_OTHER, 2)])
    return paths


def write_isbi(root: Path, subject: str, timepoints: tuple[str, ...] = ("01",), seed: int = 0,
               rater2_other_grid: bool = False) -> dict[str, dict]:
    """ISBI 2015 subject with uncompressed ``.nii`` files, two raters per time point.

    ``rater2_other_grid`` writes rater 2 on a larger grid shifted by one voxel (same lesion in
    world space), as happens when a rater's file was saved from another tool.
    """
    out = {}
    for tp in timepoints:
        paths = layout_paths("isbi15", root, "ISBI", subject, timepoint=tp)
        write_image(paths["flair"], seed)
        write_image(paths["t1"], seed + 1)
        for key in ("flair", "t1"):  # the other modalities sit beside them and are not read
            name = paths[key].name.replace("flair", "t2").replace("mprage", "pd")
            write_image(paths[key].with_name(name), seed + 2)
        r1, r2 = ISBI_R1, ISBI_R2
        if tp != "01":
            r1, r2 = (r1[0], r1[1], slice(2, 4)), (r2[0], r2[1], slice(2, 4))
        write_mask(paths["rater1"], [(r1, 1)])
        if rater2_other_grid:
            shifted = tuple(slice(s.start + 1, s.stop + 1) for s in r2)
            origin = tuple(-v for v in VOXEL)
            write_mask(paths["rater2"], [(shifted, 1)], shape=(12, 14, 10),
                       affine=make_affine(origin=origin))
        else:
            write_mask(paths["rater2"], [(r2, 1)])
        out[tp] = paths
    return out


def write_msseg(root: Path, center: str, patient: str, seed: int = 0, n_raters: int = 3,
                brain_mask: bool = True) -> dict:
    """MSSEG 2016 subject: consensus, ``n_raters`` manual masks, brain mask, T1 on its own grid."""
    paths = layout_paths("msseg16", root, center, patient)
    write_image(paths["flair"], seed)
    write_image(paths["t1"], seed + 1, shape=MSSEG_T1_SHAPE, affine=make_affine(MSSEG_T1_VOXEL))
    write_mask(paths["mask"], [(MSSEG_CONSENSUS, 1)])
    for box, path in zip(MSSEG_RATERS[:n_raters], paths["raters"], strict=False):
        write_mask(path, [(box, 1)])
    if brain_mask:
        write_mask(paths["brain_mask"], [((slice(1, 9), slice(1, 11), slice(1, 7)), 1)])
    return paths


def write_ljubljana(root: Path, patient: str, seed: int = 0, prefixed: bool = True) -> dict:
    paths = layout_paths("ljubljana", root, "Ljubljana", patient, prefixed=prefixed)
    write_image(paths["flair"], seed)
    write_image(paths["t1"], seed + 1)
    write_mask(paths["mask"], [(LJUBLJANA_LESION, 1)])
    write_mask(paths["brain_mask"], [((slice(1, 9), slice(1, 11), slice(1, 7)), 1)])
    return paths


def write_cohort(root: Path) -> Path:
    """One cohort root with all four dataset folders (2 + 1 + 1 + 2 subjects)."""
    write_miccai(root / "miccai17", "Utrecht", "0")
    write_miccai(root / "miccai17", "Amsterdam/GE3T", "100", seed=3)
    write_isbi(root / "isbi15", "training01")
    write_msseg(root / "msseg16", "Center_01", "Patient_01")
    write_ljubljana(root / "ljubljana", "patient01")
    write_ljubljana(root / "ljubljana", "patient02", prefixed=False)
    return root


# ------------------------------------------------------------------------------------------
# Ways to break a written file


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    img = nib.load(str(path))
    save(data, path, img.affine if affine is None else affine)


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).copy()


def drop(path: Path) -> None:
    path.unlink()


def make_4d(path: Path, frames: int = 2) -> None:
    data = _data(path)
    _rewrite(path, np.stack([data] * frames, axis=-1))


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def garble(path: Path) -> None:
    """Replace the file with bytes that are not NIfTI at all (gzipped if the name says so)."""
    junk = b"this is not a nifti file" * 20
    path.write_bytes(gzip.compress(junk) if path.name.endswith(".gz") else junk)


def put_nan(path: Path, value: float = np.nan) -> None:
    data = _data(path).astype(np.float32)
    data[1, 1, 1] = value
    _rewrite(path, data)


def zero_out(path: Path) -> None:
    _rewrite(path, np.zeros_like(_data(path)))


def put_label(path: Path, label: int = 3) -> None:
    data = _data(path)
    data[0, 0, 0] = label
    _rewrite(path, data)


def shift_affine(path: Path, mm: float = 1000.0) -> None:
    """Move the volume far away in world space (a broken header or a wrong file)."""
    img = nib.load(str(path))
    affine = img.affine.copy()
    affine[0, 3] += mm
    _rewrite(path, _data(path), affine)


BREAKERS = {"drop": drop, "4d": make_4d, "truncate": truncate, "garble": garble,
            "nan": put_nan, "inf": lambda p: put_nan(p, np.inf), "zero": zero_out,
            "label3": put_label, "shift": shift_affine}
