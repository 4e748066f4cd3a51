"""A synthetic WMH cohort that stands in for the paper's 105 subjects when the real data is absent.

The public datasets cannot be downloaded everywhere (not from CI, often not from a hospital
network), so the project simulates a cohort with the properties that matter for segmentation
QC and writes it in the *native layouts* of the four public datasets. The readers in
:mod:`wmhqc_lib.data.datasets` then load synthetic and real data through one code path.

What is simulated, per subject:

* anatomy from the MNI152 2009 T1/GM/WM templates shipped inside nilearn, with a smooth random
  deformation, a per-axis size change and a head pose (rotation, shift);
* lesions in white matter: periventricular caps and rims (confluent at high load) and deep
  punctate or ovoid lesions; load drawn from a log-normal matched to the paper's cohort
  (1.48 % +- 1.41 % of brain volume); soft edges (partial volume);
* a FLAIR contrast of its own for every lesion, graded as in real WMH (see *Lesion contrast*);
* seven scanner sites mirroring paper Table 2: voxel size and field of view (scaled by the
  profile's ``voxel_scale``), orientation, contrast, noise, bias field, slice-profile blur,
  and separate T1 and FLAIR grids where the real site has them;
* what makes segmentation hard, in a minority of subjects: only tiny lesions, low lesion
  contrast, strong noise, a ghosting artefact, two raters who disagree at borders (ISBI-like),
  seven raters plus a consensus (MSSEG-like), and "other pathology" (label 2) in MICCAI-like
  subjects.

Nothing here decides which segmentations fail: that is for the network. Everything is seeded.

Lesion contrast
---------------
Real WMH are not one shade: periventricular caps and confluent lesions are bright, small deep
(punctate) lesions are often only slightly hyperintense, and every lesion fades into the
normal-appearing white matter at its border. Contrast is written here as
``r = (lesion - WM) / (GM - WM)`` on FLAIR before any site factor: ``r = 0`` is white matter,
``r = 1`` as bright as grey matter. The model, per lesion (connected component, 26-neighbour):

* its *core* contrast is log-normal: median rising log-linearly with lesion volume from
  ``LESION_CORE_SMALL`` (a punctate lesion) to ``LESION_CORE_LARGE`` (a confluent cap or band),
  spread ``LESION_CORE_SIGMA``, clipped to ``[LESION_CORE_MIN, LESION_R_MAX]``. The volume of a
  deep lesion is its seeded ellipsoid's nominal volume, not its voxel count, so a punctate lesion
  stays "small" on a coarse working grid where it fills a whole voxel;
* inside the lesion the contrast rises from the rim to the core with depth ``d`` (mm from the
  lesion border): ``r(d) = core * (1 - (1 - RIM_FRACTION) * exp(-d / RIM_DEPTH_MM))``, so a lesion
  only a voxel or two across never reaches its core value; outside, partial volume
  (``lesion_soft``) blends the rim value into the surrounding tissue;
* the site factor (``SiteSpec.lesion_contrast``) and the ``low_contrast`` hard case (x0.35)
  multiply on top; T1 hypointensity is scaled by the same fraction ``r / LESION_R_MAX`` of the
  full T1 lesion contrast;
* the contrast is counted from white matter, or from the voxel's own tissue where grey-matter
  partial volume makes it brighter on FLAIR (darker on T1), so a faint lesion never looks darker
  than the tissue it sits in.

``LESION_R_MAX`` is the single fixed contrast of generator version 2 (lesion = 2.3 x WM): lesions
are far fainter than there on average, in every hard-case condition. Measured on the clean
working-grid FLAIR of the first 30 subjects of the ``cpu`` cohort, per lesion (mean over its
voxels, partial volume included): r median 1.12 (10th-90th percentile 0.59-2.10), 41 % of
lesions fainter than grey matter, lesions over 1 ml median 2.06; weighted by volume, mean r 1.95,
a lesion/white-matter ratio of about 1.6 (1.36 for the median lesion), within what real FLAIR
shows. Version 2: median 2.88 (2.25-3.50), 2 % fainter than grey matter, volume-weighted 3.29
(ratio 2.3). A first calibration of this model (punctate core 1.3, confluent 2.8, rim 0.35;
per-lesion median 0.82, volume-weighted 1.46) left the ``cpu`` study with 55 of 63 test cases
failed in its first three folds, no longer the mostly-successful population QC is meant for.

Which voxels are lesion does not depend on the contrast: the reference masks still come from
the partial-volume map (``lesion_soft > 0.5``), and every voxel they mark is hyperintense on
FLAIR, however faintly.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn import datasets as nl_datasets
from nilearn.image import resample_img
from scipy import ndimage as ndi
from tqdm import tqdm

from ..config import Profile, SynthSettings
from .datasets import layout_paths

MARKER_FILE = "SYNTHETIC_COHORT.json"
SUBJECTS_FILE = "SYNTHETIC_COHORT.csv"
GENERATOR_VERSION = 3  # 3: per-lesion graded contrast with a rim/core profile

# Relative tissue intensities before site gain. FLAIR suppresses CSF; lesions are bright on
# FLAIR and dark on T1 relative to white matter. "lesion" is the brightest (FLAIR) or darkest
# (T1) a lesion core can be; each lesion reaches a fraction of it (see *Lesion contrast*).
FLAIR_TISSUE = {"wm": 0.50, "gm": 0.66, "csf": 0.06, "lesion": 1.15, "scalp": 0.55,
                "skull": 0.03}
T1_TISSUE = {"wm": 0.85, "gm": 0.55, "csf": 0.18, "lesion": 0.55, "scalp": 0.92, "skull": 0.05}

# Lesion contrast in units of the FLAIR grey/white contrast, r = (lesion - WM) / (GM - WM).
# Ceiling: FLAIR_TISSUE["lesion"], the fixed contrast of generator version 2 (r = 4.06).
LESION_R_MAX = (FLAIR_TISSUE["lesion"] - FLAIR_TISSUE["wm"]) / \
    (FLAIR_TISSUE["gm"] - FLAIR_TISSUE["wm"])
# (volume mm^3, median core r): a punctate deep lesion about 3 mm across is typically only
# somewhat brighter than grey matter at its core, a confluent periventricular cap (5 ml) about
# twice as much; log-linear in between, constant beyond.
LESION_CORE_SMALL = (20.0, 1.8)
LESION_CORE_LARGE = (5000.0, 3.6)
# Log-normal spread of the core r between lesions of the same size: with it, about one in eight
# punctate lesions has a core fainter than grey matter even before the rim profile, and about
# two in five 5 ml lesions reach the ceiling LESION_R_MAX.
LESION_CORE_SIGMA = 0.5
# Every lesion stays at least this hyperintense at its core: a rater marked it.
LESION_CORE_MIN = 0.15
# Rim/core profile: share of the core contrast at the lesion border, and the depth (mm) over
# which it rises towards the core (e-folding), as the FLAIR signal of WMH fades over a few mm.
RIM_FRACTION = 0.5
RIM_DEPTH_MM = 1.5
# Smooth texture inside lesions: relative SD of the lesion contrast (clipped to +-50 %, so a
# lesion voxel never drops below white matter on FLAIR or rises above it on T1).
LESION_TEXTURE = 0.10


@dataclass(frozen=True)
class Grid:
    """One acquisition grid: voxel size (mm) and matrix per array axis, and axis directions."""

    voxel_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    axcodes: tuple[str, str, str]  # nibabel codes: which world direction each array axis runs


@dataclass(frozen=True)
class SiteSpec:
    """A simulated scanner site: paper Table 2 geometry plus contrast and noise character."""

    dataset: str
    site: str
    scanner: str
    n_subjects: int
    flair: Grid
    t1: Grid | None  # None: T1 shares the FLAIR grid
    gain: float  # intensity units of the written files
    noise: float  # Rician noise sigma relative to white matter intensity
    bias: float  # amplitude of the smooth log bias field
    lesion_contrast: float  # multiplies the FLAIR lesion-minus-WM contrast
    ms_lesions: bool  # MS-like ovoid lesions rather than vascular caps and rims
    dtype: str = "int16"


# Geometry from paper Table 2 (voxel sizes and matrix sizes of T1 & FLAIR). The MSSEG Siemens
# FLAIR slice thickness is printed as 0.11 mm in the paper; 1.1 mm is assumed.
SITES: tuple[SiteSpec, ...] = (
    SiteSpec("miccai17", "Utrecht", "3T Philips Achieva", 20,
             Grid((0.96, 0.95, 3.00), (240, 240, 48), ("L", "A", "S")), None,
             1000.0, 0.030, 0.15, 1.00, False),
    SiteSpec("miccai17", "Singapore", "3T Siemens TrioTim", 20,
             Grid((1.00, 1.00, 3.00), (232, 256, 48), ("R", "A", "S")), None,
             600.0, 0.035, 0.20, 0.90, False),
    SiteSpec("miccai17", "GE3T", "3T GE Signa HDxt", 20,
             Grid((0.98, 0.98, 1.20), (132, 256, 83), ("R", "A", "S")), None,
             1500.0, 0.025, 0.10, 1.10, False),
    SiteSpec("isbi15", "ISBI", "3T Philips", 5,
             Grid((1.00, 1.00, 1.00), (181, 217, 181), ("R", "A", "S")), None,
             1.0, 0.020, 0.05, 1.00, True, dtype="float32"),
    SiteSpec("msseg16", "Center_01", "3T Philips Ingenia", 5,
             Grid((0.74, 0.74, 0.70), (336, 336, 261), ("L", "P", "S")),
             Grid((0.74, 0.74, 0.85), (336, 336, 261), ("L", "P", "S")),
             800.0, 0.030, 0.20, 0.95, True),
    SiteSpec("msseg16", "Center_07", "3T Siemens Verio", 5,
             Grid((0.50, 0.50, 1.10), (512, 512, 144), ("R", "A", "S")),
             Grid((1.00, 1.00, 1.00), (256, 256, 176), ("A", "S", "L")),
             1200.0, 0.035, 0.25, 0.85, True),
    SiteSpec("ljubljana", "Ljubljana", "3T Siemens Magnetom Trio", 30,
             Grid((0.80, 0.47, 0.47), (192, 512, 512), ("R", "A", "S")),
             Grid((0.42, 0.42, 3.30), (512, 512, 47), ("L", "A", "S")),
             700.0, 0.030, 0.15, 1.00, True),
)


def paper_site_table() -> pd.DataFrame:
    """The paper's Table 2 facts behind each simulated site (scanner, voxel sizes, matrix,
    subject count), labelled as the paper's, to set beside the synthetic cohort's own table."""
    rows = []
    for site in SITES:
        t1 = site.t1 or site.flair
        rows.append({
            "dataset": site.dataset, "site": site.site, "paper_scanner": site.scanner,
            "paper_subjects": site.n_subjects,
            "paper_flair_voxel_mm": "x".join(f"{v:.2f}" for v in site.flair.voxel_mm),
            "paper_flair_matrix": "x".join(str(v) for v in site.flair.shape),
            "paper_t1_voxel_mm": "x".join(f"{v:.2f}" for v in t1.voxel_mm),
        })
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class SubjectPlan:
    """What will be simulated for one subject; saved to ``SYNTHETIC_COHORT.csv``."""

    index: int
    dataset: str
    site: str
    local_id: str
    load_pct: float  # target lesion load, % of brain volume
    punctate_share: float
    tiny_lesions: bool
    low_contrast: bool
    high_noise: bool
    ghosting: bool
    other_pathology: bool


# ---------------------------------------------------------------------------------------------
# Template anatomy at the working resolution


@dataclass
class _Template:
    affine: np.ndarray  # working grid voxel -> template mm
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray  # CSF inside the brain mask (ventricles, sulci)
    ventricles: np.ndarray  # float 0/1, lateral ventricles
    dist_out: np.ndarray  # mm from the brain surface, 0 inside
    centre: np.ndarray  # brain centre, working voxel coordinates


@lru_cache(maxsize=4)
def _template(working_mm: float) -> _Template:
    """MNI152 tissue maps resampled to the working grid (cached per process)."""
    brain = nl_datasets.load_mni152_brain_mask(resolution=1)
    gm = nl_datasets.load_mni152_gm_template(resolution=1)
    wm = nl_datasets.load_mni152_wm_template(resolution=1)
    src_affine = brain.affine
    shape = np.ceil(np.array(brain.shape) / working_mm).astype(int)
    affine = src_affine.copy()
    affine[:3, :3] = np.diag([working_mm] * 3)

    def to_working(img: nib.Nifti1Image) -> np.ndarray:
        img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        with warnings.catch_warnings():  # the brain mask is resampled as a fraction on purpose
            warnings.filterwarnings("ignore", message="Resampling binary images")
            out = resample_img(img, target_affine=affine, target_shape=tuple(shape),
                               interpolation="continuous", force_resample=True,
                               copy_header=True)
        return np.clip(np.asarray(out.dataobj, dtype=np.float32), 0.0, 1.0)

    b, g, w = to_working(brain), to_working(gm), to_working(wm)
    csf = np.clip(b - g - w, 0.0, 1.0)
    inside = b > 0.5
    depth_mm = ndi.distance_transform_edt(inside) * working_mm
    vent = (csf > 0.6) & (depth_mm > 20.0)
    labels, n = ndi.label(vent)
    if n:
        sizes = ndi.sum(vent, labels, np.arange(1, n + 1))
        keep = np.flatnonzero(sizes * working_mm**3 > 800.0) + 1
        vent = np.isin(labels, keep)
    dist_out = ndi.distance_transform_edt(~inside).astype(np.float32) * working_mm
    centre = np.array(ndi.center_of_mass(inside))
    return _Template(affine, g, w, csf, vent.astype(np.float32), dist_out, centre)


# ---------------------------------------------------------------------------------------------
# One subject in its own (deformed template) space


@dataclass
class SubjectAnatomy:
    """Tissue maps and lesions of one subject on the working grid (mm affine ``affine``)."""

    affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    dist_out: np.ndarray
    lesion: np.ndarray  # bool, lesion voxels
    lesion_soft: np.ndarray  # float, partial-volume lesion fraction
    other: np.ndarray  # bool, "other pathology" region (label 2)
    other_core: np.ndarray  # bool, fluid-filled core of that region
    lesion_core: np.ndarray  # float, core contrast r of the lesion each voxel belongs to, else 0

    @property
    def brain(self) -> np.ndarray:
        return (self.gm + self.wm + self.csf) > 0.5


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float
                  ) -> np.ndarray:
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    sd = float(field.std())
    return field / sd if sd > 0 else field


def _deform(tpl: _Template, rng: np.random.Generator, working_mm: float) -> dict[str, np.ndarray]:
    """Warp the template maps with a per-axis scaling and a smooth random displacement."""
    shape = tpl.gm.shape
    scale = rng.uniform(0.92, 1.08, size=3)
    grid = np.indices(shape, dtype=np.float32)
    coords = np.empty_like(grid)
    for ax in range(3):
        # ~3 mm smooth displacement with a ~10 mm correlation length
        disp = _smooth_noise(rng, shape, 10.0 / working_mm) * (3.0 / working_mm)
        coords[ax] = tpl.centre[ax] + (grid[ax] - tpl.centre[ax]) / scale[ax] + disp
    out = {}
    for name in ("gm", "wm", "csf", "ventricles", "dist_out"):
        src = getattr(tpl, name)
        cval = float(src.max()) if name == "dist_out" else 0.0
        out[name] = ndi.map_coordinates(src, coords, order=1, mode="constant", cval=cval,
                                        prefilter=False).astype(np.float32)
    return out


def _ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii_vox: np.ndarray
               ) -> tuple[tuple[slice, ...], np.ndarray]:
    lo = np.maximum(np.floor(centre - radii_vox - 1).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radii_vox + 2).astype(int), shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    idx = np.indices(hi - lo, dtype=np.float32)
    r2 = sum(((idx[i] + lo[i] - centre[i]) / radii_vox[i]) ** 2 for i in range(3))
    return sl, r2 <= 1.0


def simulate_anatomy(plan: SubjectPlan, settings: SynthSettings, rng: np.random.Generator,
                     ms_lesions: bool) -> SubjectAnatomy:
    """Deform the template and grow lesions to the planned load (all on the working grid)."""
    w = settings.working_mm
    tpl = _template(w)
    maps = _deform(tpl, rng, w)
    gm, wm, csf = maps["gm"], maps["wm"], maps["csf"]
    brain = (gm + wm + csf) > 0.5
    vent = maps["ventricles"] > 0.5
    brain_vox = int(brain.sum())
    target_vox = int(round(brain_vox * plan.load_pct / 100.0))

    lesion = np.zeros(gm.shape, dtype=bool)
    # nominal lesion volume (mm^3) carried by each voxel; summed per lesion, it is the lesion's
    # size for its contrast, independent of how coarsely the working grid voxelises it
    volume = np.zeros(gm.shape, dtype=np.float32)
    candidate = (wm > 0.55) & ~vent
    dist_v = ndi.distance_transform_edt(~vent).astype(np.float32) * w if vent.any() else \
        np.full(gm.shape, 50.0, np.float32)

    # Periventricular caps and rims: closest to the ventricles, strongest at the horns,
    # broken up by a smooth random field; a larger load spreads outwards and becomes confluent.
    n_pv = int(round(target_vox * (1.0 - plan.punctate_share)))
    if n_pv > 0 and not plan.tiny_lesions:
        ys = np.flatnonzero(vent.any(axis=(0, 2)))
        y = np.arange(gm.shape[1], dtype=np.float32)[None, :, None]
        horn = np.zeros_like(y)
        if ys.size:
            horn = np.exp(-(((y - ys.min()) * w / 12.0) ** 2)) + \
                np.exp(-(((y - ys.max()) * w / 12.0) ** 2))
        length = rng.uniform(4.0, 8.0)
        score = -dist_v / length + 0.8 * horn + 0.7 * _smooth_noise(rng, gm.shape, 3.0 / w)
        score = np.where(candidate, score, -np.inf)
        n_pv = min(n_pv, int(candidate.sum()))
        if n_pv > 0:
            flat = score.ravel()
            top = np.argpartition(flat, -n_pv)[-n_pv:]
            lesion.ravel()[top] = True
            lesion &= np.isfinite(score)
            volume[lesion] = w**3

    # Deep punctate (vascular) or ovoid (MS) lesions in deep white matter.
    deep = np.argwhere((wm > 0.8) & (dist_v > 6.0) & ~lesion)
    n_deep_target = target_vox - int(lesion.sum())
    r_lo, r_hi = (1.5, 4.5) if ms_lesions else (1.0, 3.0)
    if plan.tiny_lesions:
        r_lo, r_hi = 0.8, 2.0
    grown = 0
    guard = 0
    while grown < n_deep_target and deep.size and guard < 2000:
        guard += 1
        centre = deep[rng.integers(len(deep))].astype(np.float32)
        radii_mm = rng.uniform(r_lo, r_hi) * rng.uniform(0.7, 1.4, size=3)
        sl, ball = _ellipsoid(gm.shape, centre, np.maximum(radii_mm / w, 0.6))
        new = ball & (wm[sl] > 0.45) & ~lesion[sl]
        lesion[sl] |= new
        n_new = int(new.sum())
        if n_new:
            volume[sl][new] = 4.0 / 3.0 * np.pi * float(np.prod(radii_mm)) / n_new
        grown += n_new

    # Other pathology (MICCAI label 2): an infarct-like region at the grey/white boundary with a
    # fluid core and a gliotic rim; hyperintense rim on FLAIR, so it looks lesion-like.
    other = np.zeros(gm.shape, dtype=bool)
    core = np.zeros(gm.shape, dtype=bool)
    if plan.other_pathology:
        spots = np.argwhere((gm > 0.35) & (wm > 0.3) & ~lesion)
        if spots.size:
            centre = spots[rng.integers(len(spots))].astype(np.float32)
            radius = rng.uniform(5.0, 10.0) / w
            sl, ball = _ellipsoid(gm.shape, centre, np.full(3, radius) * rng.uniform(0.8, 1.2, 3))
            other[sl] = ball & brain[sl]
            sl_core, inner = _ellipsoid(gm.shape, centre, np.full(3, radius * 0.55))
            core[sl_core] = inner
            core &= other
            lesion &= ~other

    core_r = lesion_core_contrast(lesion, volume, rng)
    return SubjectAnatomy(tpl.affine, gm, wm, csf, maps["dist_out"], lesion, _soft(lesion),
                          other, core, core_r)


def _soft(lesion: np.ndarray) -> np.ndarray:
    """Partial-volume lesion fraction: lesion edges blurred by under half a voxel."""
    soft = ndi.gaussian_filter(lesion.astype(np.float32), 0.45)
    return np.maximum(soft, lesion * 0.5)  # keep every lesion voxel at least half lesion


_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-neighbour connectivity: what touches is one lesion


def median_core_contrast(volume_mm3: np.ndarray) -> np.ndarray:
    """Median core contrast r of lesions of this volume: small lesions are fainter."""
    (v_small, r_small), (v_large, r_large) = LESION_CORE_SMALL, LESION_CORE_LARGE
    t = np.clip(np.log(np.maximum(volume_mm3, 1e-6) / v_small) / np.log(v_large / v_small),
                0.0, 1.0)
    return np.exp(np.log(r_small) + t * (np.log(r_large) - np.log(r_small)))


def draw_core_contrast(volume_mm3: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One core contrast r per lesion: log-normal around the size-dependent median."""
    volume_mm3 = np.asarray(volume_mm3, dtype=np.float64)
    r = median_core_contrast(volume_mm3) * np.exp(
        LESION_CORE_SIGMA * rng.standard_normal(volume_mm3.shape))
    return np.clip(r, LESION_CORE_MIN, LESION_R_MAX)


def lesion_core_contrast(lesion: np.ndarray, volume: np.ndarray, rng: np.random.Generator
                         ) -> np.ndarray:
    """Per-voxel core contrast: each connected lesion gets one draw for its summed volume."""
    labels, n = ndi.label(lesion, _FULL)
    out = np.zeros(lesion.shape, dtype=np.float32)
    if n:
        sizes = ndi.sum(volume, labels, np.arange(1, n + 1))
        r = draw_core_contrast(sizes, rng).astype(np.float32)
        out[lesion] = r[labels[lesion] - 1]
    return out


def relative_contrast_map(anat: SubjectAnatomy) -> np.ndarray:
    """Contrast r at every voxel the lesion map touches: the core value scaled by the rim/core
    profile inside a lesion, the nearest lesion voxel's value in the partial-volume halo."""
    out = np.zeros(anat.lesion.shape, dtype=np.float32)
    touched = anat.lesion_soft > 0
    if not (anat.lesion & touched).any():  # no lesion, or its partial volume zeroed
        return out
    box = _bounding_box(touched, pad=1)  # distance transforms only where lesions are
    lesion, core, crop = anat.lesion[box], anat.lesion_core[box], out[box]
    w = abs(float(anat.affine[0, 0]))
    depth_mm = (ndi.distance_transform_edt(lesion) - 0.5) * w  # border voxel: half a voxel deep
    profile = 1.0 - (1.0 - RIM_FRACTION) * np.exp(-depth_mm / RIM_DEPTH_MM)
    crop[lesion] = (core * profile)[lesion]
    halo = touched[box] & ~lesion
    if halo.any():
        nearest = ndi.distance_transform_edt(~lesion, return_distances=False,
                                             return_indices=True)
        crop[halo] = crop[tuple(ax[halo] for ax in nearest)]
    return out


def _bounding_box(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Slices of the box around ``mask`` widened by ``pad`` voxels (clipped to the array)."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def grow_follow_up(anat: SubjectAnatomy, rng: np.random.Generator) -> None:
    """Follow-up scan: lesions grow a little at their borders; new voxels take the core
    contrast of the lesion they grew from."""
    grow = ndi.binary_dilation(anat.lesion, iterations=1) & (anat.wm > 0.5)
    keep = rng.random(anat.lesion.shape) < 0.35
    new = grow & keep & ~anat.lesion
    if anat.lesion.any() and new.any():
        box = _bounding_box(anat.lesion | new, pad=0)
        nearest = ndi.distance_transform_edt(~anat.lesion[box], return_distances=False,
                                             return_indices=True)
        core, grown = anat.lesion_core[box], new[box]
        core[grown] = core[tuple(ax[grown] for ax in nearest)]
    anat.lesion = anat.lesion | new
    anat.lesion_soft = _soft(anat.lesion)


def tissue_image(anat: SubjectAnatomy, tissue: dict[str, float], contrast_scale: float,
                 rng: np.random.Generator, relative: np.ndarray | None = None) -> np.ndarray:
    """Clean intensity image on the working grid from tissue fractions (no noise, no bias).

    A lesion voxel reaches ``relative / LESION_R_MAX`` (from :func:`relative_contrast_map`,
    computed if not given) of the full lesion contrast ``tissue["lesion"] - tissue["wm"]``,
    times ``contrast_scale`` (site factor and low-contrast hard case) and a smooth texture;
    partial volume (``lesion_soft``) blends it with the tissue around.
    """
    d = anat.dist_out
    skull = (d > 2.0) & (d <= 7.0)
    scalp = np.clip((d - 7.0) / 1.5, 0, 1) * np.clip((13.0 - d) / 1.5, 0, 1)
    img = (anat.wm * tissue["wm"] + anat.gm * tissue["gm"] + anat.csf * tissue["csf"])
    outer_csf = (d > 0) & (d <= 2.0)
    img = np.where(outer_csf, tissue["csf"], img)
    img = np.where(skull, tissue["skull"], img)
    img = img + scalp * tissue["scalp"] * (d > 7.0)
    texture = np.clip(1.0 + LESION_TEXTURE * _smooth_noise(rng, img.shape, 1.5), 0.5, 1.5)
    if relative is None:
        relative = relative_contrast_map(anat)
    fraction = contrast_scale * relative / LESION_R_MAX * texture
    # The lesion replaces the voxel's tissue and sits a fraction of the full lesion contrast
    # beyond white matter, or beyond the voxel's own tissue where that is already brighter
    # (FLAIR, grey-matter partial volume) or darker (T1): a faint lesion never looks darker
    # on FLAIR than the tissue it sits in.
    sign = 1.0 if tissue["lesion"] >= tissue["wm"] else -1.0
    ref = tissue["wm"] + sign * np.maximum(sign * (img - tissue["wm"]), 0.0)
    les = ref + fraction * (tissue["lesion"] - tissue["wm"])
    img = img * (1.0 - anat.lesion_soft) + les * anat.lesion_soft
    if anat.other.any():  # the gliotic rim of other pathology keeps the full lesion contrast
        img = np.where(anat.other, tissue["lesion"], img)
        img = np.where(anat.other_core, tissue["csf"], img)
    return img.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sampling a site grid


def native_affine(grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """Voxel-to-scanner affine: axis directions from ``axcodes``, centre near the origin."""
    world_axis = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1),
                  "I": (2, -1)}
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    for i, code in enumerate(grid.axcodes):
        ax, sign = world_axis[code]
        aff[ax, i] = sign * grid.voxel_mm[i]
    centre_vox = (np.array(grid.shape) - 1) / 2.0
    aff[:3, 3] = -aff[:3, :3] @ centre_vox + rng.uniform(-10, 10, size=3)
    return aff


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation matrix with angles drawn uniformly within +-``max_deg`` about each axis."""
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Pose:
    """Where the subject's head sits in the scanner: scanner mm -> subject (working) mm."""

    matrix: np.ndarray  # 4x4

    @classmethod
    def random(cls, anat: SubjectAnatomy, rng: np.random.Generator) -> Pose:
        head = np.argwhere(anat.dist_out <= 12.0)
        centre_vox = (head.min(axis=0) + head.max(axis=0)) / 2.0
        centre_mm = anat.affine[:3, :3] @ centre_vox + anat.affine[:3, 3]
        m = np.eye(4)
        m[:3, :3] = random_rotation(rng, 8.0)
        m[:3, 3] = centre_mm + rng.uniform(-5, 5, size=3)
        return cls(m)


def fit_grid(grid: Grid, working_mm: float, scale: float) -> Grid:
    """Scale a Table 2 grid by ``scale``; widen its matrix where the largest simulated head
    (template head, +8 % size, rotated) would not fit, so every subject of a site shares one
    matrix, as on a real scanner protocol."""
    tpl = _template(working_mm)
    head = np.argwhere(tpl.dist_out <= 13.0)
    extent_mm = (head.max(axis=0) - head.min(axis=0) + 1) * working_mm * 1.08 * 1.1 + 10.0
    world_axis = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    voxel = tuple(round(v * scale, 4) for v in grid.voxel_mm)
    shape = []
    for i in range(3):
        need = extent_mm[world_axis[grid.axcodes[i]]] / voxel[i]
        shape.append(int(max(round(grid.shape[i] / scale), np.ceil(need))))
    return Grid(voxel, tuple(shape), grid.axcodes)


def sample_to_grid(volume: np.ndarray, anat: SubjectAnatomy, pose: Pose, affine: np.ndarray,
                   grid: Grid, *, blur: bool, order: int = 1) -> np.ndarray:
    """Resample a working-grid volume onto a site grid, blurring by the slice profile first."""
    w = abs(anat.affine[0, 0])
    if blur:
        world_axis = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
        sigma = np.zeros(3)
        for i, code in enumerate(grid.axcodes):
            v = grid.voxel_mm[i]
            sigma[world_axis[code]] = np.sqrt(max(v * v - w * w, 0.0)) / 2.355 / w
        volume = ndi.gaussian_filter(volume, sigma)
    full = np.linalg.inv(anat.affine) @ pose.matrix @ affine
    return ndi.affine_transform(volume, full[:3, :3], offset=full[:3, 3],
                                output_shape=grid.shape, order=order, mode="constant",
                                cval=0.0, prefilter=False).astype(np.float32)


def _bias_field(shape: tuple[int, int, int], amplitude: float, rng: np.random.Generator
                ) -> np.ndarray:
    u = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = u[0][:, None, None], u[1][None, :, None], u[2][None, None, :]
    a = rng.normal(0, amplitude, size=7).astype(np.float32)
    log_field = a[0] * x + a[1] * y + a[2] * z + a[3] * x * x + a[4] * y * y + a[5] * z * z \
        + a[6] * x * y
    return np.exp(log_field)


def acquire(clean: np.ndarray, site: SiteSpec, grid: Grid, noise_scale: float,
            rng: np.random.Generator, ghosting: float = 0.0) -> np.ndarray:
    """Bias field, optional ghosting, Rician noise and site gain on a sampled clean image."""
    img = clean * _bias_field(grid.shape, site.bias, rng)
    if ghosting > 0:
        img = img + ghosting * np.roll(img, grid.shape[1] // 2, axis=1)
    sigma = site.noise * noise_scale * 0.5  # white matter sits near 0.5 on FLAIR
    img = np.sqrt((img + rng.normal(0, sigma, img.shape).astype(np.float32)) ** 2
                  + rng.normal(0, sigma, img.shape).astype(np.float32) ** 2)
    img = img * site.gain
    if site.dtype == "int16":
        return np.clip(np.rint(img), 0, 32767).astype(np.int16)
    return img.astype(np.float32)


def rater_masks(soft: np.ndarray, n: int, rng: np.random.Generator, sigma_vox: float = 2.0,
                amount: float = 0.15, volume_spread: float = 0.2) -> list[np.ndarray]:
    """Masks of raters who agree on lesion cores and disagree at borders and on faint lesions.

    Each rater thresholds the partial-volume lesion map at a level that wanders smoothly around
    0.5, so a border moves coherently in or out and no speckle appears far from a lesion
    (only voxels with a lesion fraction above 0.2 can be marked). The level is then offset so
    the rater's volume is the consensus volume (``soft > 0.5``) times a factor drawn within
    ``1 +- volume_spread``: raters scatter around the consensus instead of all over-segmenting,
    which a fixed threshold shift does on small, convex lesions.
    """
    candidates = soft > 0.2
    values = soft[candidates]
    consensus = int((soft > 0.5).sum())
    out = []
    for _ in range(n):
        noise = ndi.gaussian_filter(rng.standard_normal(soft.shape).astype(np.float32),
                                    sigma_vox)
        noise /= max(float(noise.std()), 1e-6)
        margin = values - (0.5 + amount * noise[candidates])
        target = int(round(consensus * rng.uniform(1 - volume_spread, 1 + volume_spread)))
        target = min(max(target, 0), margin.size)
        mask = np.zeros(soft.shape, dtype=np.uint8)
        if target > 0:
            keep = np.argpartition(-margin, target - 1)[:target]
            flat = np.flatnonzero(candidates)[keep]
            mask.ravel()[flat] = 1
        out.append(mask)
    return out


# ---------------------------------------------------------------------------------------------
# Cohort


def plan_cohort(settings: SynthSettings, seed: int) -> list[SubjectPlan]:
    """Decide every subject's site, lesion load and hard-case conditions (no image work)."""
    rng = np.random.default_rng([seed, 0])
    mean, sd = settings.lesion_load_mean_pct, settings.lesion_load_sd_pct
    s2 = np.log(1.0 + (sd / mean) ** 2)
    mu = np.log(mean) - s2 / 2.0
    hard = settings.hard_cases
    plans: list[SubjectPlan] = []
    for site in SITES:
        n = max(settings.min_subjects_per_site,
                int(round(site.n_subjects * settings.subjects_scale)))
        for k in range(n):
            tiny = bool(rng.random() < hard.get("tiny_lesions", 0.0))
            load = float(rng.uniform(0.02, 0.12)) if tiny else \
                float(np.clip(rng.lognormal(mu, np.sqrt(s2)), 0.05, 8.0))
            share = float(rng.uniform(0.4, 0.8) if site.ms_lesions else rng.uniform(0.1, 0.35))
            plans.append(SubjectPlan(
                index=len(plans), dataset=site.dataset, site=site.site,
                local_id=_local_id(site, k), load_pct=load, punctate_share=1.0 if tiny else share,
                tiny_lesions=tiny,
                low_contrast=bool(rng.random() < hard.get("low_contrast", 0.0)),
                high_noise=bool(rng.random() < hard.get("high_noise", 0.0)),
                ghosting=bool(rng.random() < hard.get("ghosting", 0.0)),
                other_pathology=bool(site.dataset == "miccai17"
                                     and rng.random() < hard.get("other_pathology", 0.0)),
            ))
    return plans


def _local_id(site: SiteSpec, k: int) -> str:
    if site.dataset == "miccai17":
        base = {"Utrecht": 0, "Singapore": 50, "GE3T": 100}[site.site]
        return str(base + k)
    if site.dataset == "isbi15":
        return f"training{k + 1:02d}"
    if site.dataset == "msseg16":
        return f"Patient_{k + 1:02d}"
    return f"patient{k + 1:02d}"


def _site(plan: SubjectPlan) -> SiteSpec:
    return next(s for s in SITES if s.dataset == plan.dataset and s.site == plan.site)


def subject_contrast_scale(plan: SubjectPlan) -> float:
    """What multiplies every lesion's contrast in this subject: the site's factor, and 0.35
    in the low-contrast hard case (it only ever makes lesions fainter)."""
    return _site(plan).lesion_contrast * (0.35 if plan.low_contrast else 1.0)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


@dataclass
class Acquisition:
    """One simulated scan of a subject: FLAIR and T1 with their affines, the soft lesion
    fraction and the label mask (1 lesion, 2 other pathology) on the FLAIR grid."""

    pose: Pose
    flair_grid: Grid
    flair: np.ndarray
    t1: np.ndarray
    flair_affine: np.ndarray
    t1_affine: np.ndarray
    soft: np.ndarray
    mask: np.ndarray


def acquire_timepoint(anat: SubjectAnatomy, site: SiteSpec, settings: SynthSettings,
                      rng: np.random.Generator, contrast: float, noise_scale: float,
                      ghost: float) -> Acquisition:
    """Place the head, choose the grids and simulate the site's FLAIR and T1 acquisitions."""
    pose = Pose.random(anat, rng)
    flair_grid = fit_grid(site.flair, settings.working_mm, settings.voxel_scale)
    t1_grid = fit_grid(site.t1, settings.working_mm, settings.voxel_scale) if site.t1 \
        else flair_grid
    flair_aff = native_affine(flair_grid, rng)
    t1_aff = native_affine(t1_grid, rng) if site.t1 else flair_aff

    relative = relative_contrast_map(anat)
    flair_clean = sample_to_grid(tissue_image(anat, FLAIR_TISSUE, contrast, rng, relative),
                                 anat, pose, flair_aff, flair_grid, blur=True)
    t1_clean = sample_to_grid(tissue_image(anat, T1_TISSUE, contrast, rng, relative), anat,
                              pose, t1_aff, t1_grid, blur=True)
    flair = acquire(flair_clean, site, flair_grid, noise_scale, rng, ghosting=ghost)
    t1 = acquire(t1_clean, site, t1_grid, noise_scale, rng)
    soft = sample_to_grid(anat.lesion_soft, anat, pose, flair_aff, flair_grid, blur=False)
    mask = (soft > 0.5).astype(np.uint8)
    if anat.other.any():
        other = sample_to_grid(anat.other.astype(np.float32), anat, pose, flair_aff,
                               flair_grid, blur=False) > 0.5
        mask[other] = 2
    return Acquisition(pose, flair_grid, flair, t1, flair_aff, t1_aff, soft, mask)


def generate_subject(plan: SubjectPlan, settings: SynthSettings, seed: int, root: Path) -> dict:
    """Simulate one subject and write its files in its dataset's native layout."""
    rng = np.random.default_rng([seed, 1, plan.index])
    site = _site(plan)
    anat = simulate_anatomy(plan, settings, rng, site.ms_lesions)
    contrast = subject_contrast_scale(plan)
    noise_scale = 3.0 if plan.high_noise else 1.0
    ghost = float(rng.uniform(0.12, 0.25)) if plan.ghosting else 0.0
    timepoints = settings.isbi_timepoints if site.dataset == "isbi15" else 1
    ds_root = root / site.dataset
    brain_voxels = int(anat.brain.sum())
    lesion_voxels = int(anat.lesion.sum())

    for tp in range(1, timepoints + 1):
        if tp > 1:  # follow-up: lesions evolve a little, new head position
            grow_follow_up(anat, rng)
        acq = acquire_timepoint(anat, site, settings, rng, contrast, noise_scale, ghost)
        flair, t1, flair_aff, t1_aff, soft, mask = (acq.flair, acq.t1, acq.flair_affine,
                                                    acq.t1_affine, acq.soft, acq.mask)
        pose, flair_grid = acq.pose, acq.flair_grid

        tp_id = f"{tp:02d}"
        paths = layout_paths(site.dataset, ds_root, site.site, plan.local_id, timepoint=tp_id)
        _save(flair, flair_aff, paths["flair"])
        _save(t1, t1_aff, paths["t1"])
        if site.dataset == "isbi15":
            r1, r2 = rater_masks(soft, 2, rng)
            _save(r1, flair_aff, paths["rater1"])
            _save(r2, flair_aff, paths["rater2"])
        else:
            _save(mask, flair_aff, paths["mask"])
        if site.dataset == "msseg16":
            for path, rater in zip(paths["raters"], rater_masks(soft, len(paths["raters"]), rng),
                                   strict=True):
                _save(rater, flair_aff, path)
        if "brain_mask" in paths:
            brain = sample_to_grid(anat.brain.astype(np.float32), anat, pose, flair_aff,
                                   flair_grid, blur=False) > 0.5
            _save(brain.astype(np.uint8), flair_aff, paths["brain_mask"])

    row = asdict(plan)
    row.update(simulated_brain_ml=brain_voxels * settings.working_mm**3 / 1000.0,
               simulated_lesion_ml=lesion_voxels * settings.working_mm**3 / 1000.0,
               simulated_load_pct=100.0 * lesion_voxels / max(brain_voxels, 1))
    return row


def _worker(args: tuple[SubjectPlan, SynthSettings, int, str]) -> dict:
    plan, settings, seed, root = args
    return generate_subject(plan, settings, seed, Path(root))


def _marker(profile: Profile) -> dict:
    settings = asdict(profile.synth)
    settings.pop("workers")  # how many processes ran does not change the cohort
    return {"synthetic": True, "generator_version": GENERATOR_VERSION,
            "profile": profile.name, "seed": profile.seed,
            "settings": settings,
            "note": "Synthetic cohort simulated by wmhqc from the MNI152 templates; "
                    "not patient data. Results computed on it are synthetic results."}


def generate_cohort(out: str | Path, profile: Profile, *, workers: int | None = None,
                    progress: bool = True, force: bool = False) -> pd.DataFrame:
    """Write the whole synthetic cohort under ``out`` (one folder per dataset layout).

    Returns the per-subject simulation table (also written to ``SYNTHETIC_COHORT.csv``). A
    finished cohort with the same settings is not regenerated unless ``force``; one made with
    other settings is refused unless ``force``, which replaces it. The marker file is written
    last, so an interrupted run starts again.
    """
    out = Path(out)
    marker_path = out / MARKER_FILE
    wanted = _marker(profile)
    if marker_path.exists() and not force:
        have = json.loads(marker_path.read_text())
        if {k: have.get(k) for k in ("generator_version", "seed", "settings")} == \
                {k: wanted[k] for k in ("generator_version", "seed", "settings")}:
            return pd.read_csv(out / SUBJECTS_FILE)
        raise FileExistsError(f"{out}: holds a synthetic cohort made with other settings "
                              f"(profile {have.get('profile')!r}); pick another folder or force")
    out.mkdir(parents=True, exist_ok=True)
    marker_path.unlink(missing_ok=True)
    for site in {s.dataset for s in SITES}:  # a forced rerun leaves no subject of the old one
        shutil.rmtree(out / site, ignore_errors=True)
    plans = plan_cohort(profile.synth, profile.seed)
    jobs = [(p, profile.synth, profile.seed, str(out)) for p in plans]
    workers = workers or profile.synth.workers
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="synthesizing subjects", disable=not progress,
               unit="subject")
    rows: list[dict] = []
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            for row in pool.imap(_worker, jobs):
                rows.append(row)
                bar.update()
    else:
        for job in jobs:
            rows.append(_worker(job))
            bar.update()
    bar.close()
    table = pd.DataFrame(rows)
    table.to_csv(out / SUBJECTS_FILE, index=False)
    wanted["seconds"] = round(time.perf_counter() - start, 1)
    marker_path.write_text(json.dumps(wanted, indent=2))
    return table


def is_synthetic_root(root: str | Path) -> bool:
    """True when ``root`` (or its parent) carries the synthetic-cohort marker."""
    root = Path(root)
    return (root / MARKER_FILE).exists() or (root.parent / MARKER_FILE).exists()


# ---------------------------------------------------------------------------------------------
# New scans for triage: another seed, a site the study never saw, an artefact


#: A simulated scanner with no counterpart in the study: thick 1.5T slices, more noise and
#: bias, fainter lesions. Triage on it shows what a deployed QC model does off its cohort.
UNSEEN_SITE = SiteSpec("unseen", "NewSite15T", "1.5T, 5 mm slices (simulated, not in the paper)",
                       0, Grid((1.00, 1.00, 5.00), (230, 256, 30), ("R", "A", "S")), None,
                       400.0, 0.045, 0.30, 0.80, False)
NEW_SCAN_KINDS = ("known_site", "unseen_site", "artefact")


def add_bright_artefact(flair: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
                        radius_mm: float = 35.0, level: float = 3.0) -> np.ndarray:
    """A large, very bright sphere over the brain (a susceptibility or spike artefact that no
    training scan had), ``level`` times the head's 99th intensity percentile. Its centre is drawn
    in the middle half of the head's bounding box, so it lies on brain tissue."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    head = flair > np.percentile(flair, 60)
    idx = np.argwhere(head)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    middle = np.all((idx >= lo + (hi - lo) / 4) & (idx <= hi - (hi - lo) / 4), axis=1)
    centre = idx[middle][rng.integers(int(middle.sum()))] * zooms
    coords = np.indices(flair.shape).reshape(3, -1).T * zooms
    inside = (np.linalg.norm(coords - centre, axis=1) <= radius_mm).reshape(flair.shape)
    out = flair.astype(np.float32)
    out[inside] = level * float(np.percentile(flair[head], 99))
    return out.astype(flair.dtype) if np.issubdtype(flair.dtype, np.integer) else out


def generate_new_scans(out: str | Path, truth_dir: str | Path, profile: Profile, seed: int, *,
                       n_known: int, n_unseen: int, n_artefact: int,
                       workers: int | None = None) -> pd.DataFrame:
    """New synthetic scans as a BIDS raw dataset under ``out`` (``sub-NN/anat/sub-NN_FLAIR``
    and ``_T1w``), for triage; their label maps go to ``truth_dir`` (never into the dataset
    triage reads): 1 lesion, 2 other pathology, kept so that scoring can ignore label-2 voxels
    as the study's lesion Dice does (``triage.score_against_truth``). ``n_known`` subjects
    come from the study's sites (planned with ``seed``, not the study's), ``n_unseen`` from
    :data:`UNSEEN_SITE`, ``n_artefact`` from the study's sites with
    :func:`add_bright_artefact` on the FLAIR. Returns one row per scan: label, kind, site,
    truth label map path, simulated lesion (label 1) ml. Each scan has its own random
    stream, so ``workers`` processes (default: the profile's ``synth.workers``) write the same
    files as one."""
    out, truth_dir = Path(out), Path(truth_dir)
    if seed == profile.seed:
        raise ValueError(f"seed {seed} is the study's own: new scans need another seed")
    settings = profile.synth
    plans = plan_cohort(settings, seed)
    rng = np.random.default_rng([seed, 7])
    picked = [plans[i] for i in rng.permutation(len(plans))[:n_known + n_unseen + n_artefact]]
    kinds = (["known_site"] * n_known + ["unseen_site"] * n_unseen
             + ["artefact"] * n_artefact)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": f"wmhqc synthetic new scans (seed {seed})", "BIDSVersion": "1.9.0",
        "DatasetType": "raw", "License": "CC0",
        "GeneratedBy": [{"Name": "wmhqc synth", "Version": str(GENERATOR_VERSION)}]}, indent=1))
    jobs = [(k, plan, kind, settings, seed, out, truth_dir)
            for k, (plan, kind) in enumerate(zip(picked, kinds, strict=True))]
    workers = workers or settings.workers
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the calling notebook may hold TensorFlow's threads by now
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            rows = pool.map(_new_scan, jobs)
    else:
        rows = [_new_scan(job) for job in jobs]
    table = pd.DataFrame(rows)
    table.to_csv(truth_dir / "new_scans.csv", index=False)
    return table


def _new_scan(job: tuple[int, SubjectPlan, str, SynthSettings, int, Path, Path]) -> dict:
    """Scan ``k`` of :func:`generate_new_scans`, written; its row."""
    k, plan, kind, settings, seed, out, truth_dir = job
    label = f"{k + 1:02d}"
    site = UNSEEN_SITE if kind == "unseen_site" else _site(plan)
    sub_rng = np.random.default_rng([seed, 2, k])
    anat = simulate_anatomy(plan, settings, sub_rng, site.ms_lesions)
    acq = acquire_timepoint(anat, site, settings, sub_rng, subject_contrast_scale(plan)
                            * (site.lesion_contrast / _site(plan).lesion_contrast),
                            3.0 if plan.high_noise else 1.0, 0.0)
    flair = acq.flair
    if kind == "artefact":
        flair = add_bright_artefact(flair, acq.flair_affine, sub_rng)
    folder = out / f"sub-{label}" / "anat"
    _save(flair, acq.flair_affine, folder / f"sub-{label}_FLAIR.nii.gz")
    _save(acq.t1, acq.t1_affine, folder / f"sub-{label}_T1w.nii.gz")
    # the label map, not the lesion mask alone: a prediction inside other pathology (label 2)
    # is no false positive in the study's Dice, so scoring must see where label 2 is
    truth = truth_dir / f"sub-{label}_desc-truth_dseg.nii.gz"
    _save(acq.mask.astype(np.uint8), acq.flair_affine, truth)
    voxel_ml = float(abs(np.linalg.det(acq.flair_affine[:3, :3]))) / 1000.0
    return {"participant_id": f"sub-{label}", "kind": kind,
            "dataset": site.dataset, "site": site.site, "truth": str(truth),
            "lesion_ml": float((acq.mask == 1).sum()) * voxel_ml, "synthetic": True}
