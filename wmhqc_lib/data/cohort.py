"""The data step's artifacts: manifest, preprocessed cache, folds and the cohort table.

Every later step reads these files, never the raw data, so any notebook can rerun alone.
Layout under one results folder (``results/<profile>`` by default)::

    data/manifest.csv       one row per subject: dataset, site, file paths, policies, grids
    data/preprocess.csv     per subject: brain and lesion volume, load %, cache status
    data/cache/<subject>/   case.npz (image channels, lesion, ignore, brain) + meta.json
    data/folds.csv          one row per (fold, subject): split train / val / test
    data/cohort_table.csv   per site: subjects, voxel size, matrix, lesion load (paper Table 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Profile
from . import datasets, folds, preprocess


@dataclass(frozen=True)
class CohortPaths:
    """Where the data step writes; build with :meth:`under`."""

    root: Path

    @classmethod
    def under(cls, results_dir: str | Path) -> CohortPaths:
        return cls(Path(results_dir) / "data")

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def preprocess(self) -> Path:
        return self.root / "preprocess.csv"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def cohort_table(self) -> Path:
        return self.root / "cohort_table.csv"


def index(data_root: str | Path, paths: CohortPaths, *, skip_bad: bool = False,
          options: datasets.IndexOptions | None = None) -> datasets.IndexResult:
    """Index a cohort root (dataset folders beneath) or a single dataset's root."""
    data_root = Path(data_root)
    dataset = next((d for d in datasets.DATASETS if data_root.name == d), None)
    if dataset is not None and not any((data_root / d).is_dir() for d in datasets.DATASETS):
        result = datasets.index_dataset(dataset, data_root, options, skip_bad=skip_bad,
                                        progress=True)
    else:
        result = datasets.index_cohort(data_root, options, skip_bad=skip_bad, progress=True)
    paths.root.mkdir(parents=True, exist_ok=True)
    datasets.write_manifest(result.manifest, paths.manifest)
    return result


def prepare(manifest: pd.DataFrame, profile: Profile, paths: CohortPaths, *,
            seed: int | None = None, skip_bad: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Preprocess every subject (cached) and make the folds; write both tables."""
    prep = preprocess.preprocess_cohort(manifest, paths.cache, profile.preprocess,
                                        skip_bad=skip_bad)
    prep.to_csv(paths.preprocess, index=False)
    ok = prep[prep["status"] != "failed"][["subject_id", "load_pct"]]
    subjects = manifest.merge(ok, on="subject_id")
    cv = folds.make_folds(subjects, n_folds=profile.folds.n_folds,
                          val_fraction=profile.folds.val_fraction,
                          n_load_bins=profile.folds.load_bins,
                          seed=profile.seed if seed is None else seed, load_column="load_pct")
    cv.to_csv(paths.folds, index=False)
    return prep, cv


def cohort_table(manifest: pd.DataFrame, prep: pd.DataFrame) -> pd.DataFrame:
    """Per site: subjects, FLAIR and T1 voxel size and matrix, lesion load (mean +- SD %).

    The same columns as the paper's Table 2, computed from the files, so real and synthetic
    cohorts are described the same way.
    """
    merged = manifest.merge(prep[["subject_id", "brain_ml", "load_pct"]], on="subject_id")

    def common(values: pd.Series) -> str:
        counts = values.value_counts()
        return counts.index[0] if len(counts) == 1 else f"{counts.index[0]} (+{len(counts) - 1})"

    rows = []
    for (dataset, site), group in merged.groupby(["dataset", "site"], sort=False):
        rows.append({
            "dataset": dataset, "site": site, "subjects": len(group),
            "flair_voxel_mm": common(group["flair_voxel_mm"]),
            "flair_shape": common(group["flair_shape"]),
            "t1_voxel_mm": common(group["t1_voxel_mm"]),
            "t1_shape": common(group["t1_shape"]),
            "brain_ml_mean": group["brain_ml"].mean(),
            "lesion_ml_mean": group["lesion_ml"].mean(),
            "load_pct_mean": group["load_pct"].mean(),
            "load_pct_sd": group["load_pct"].std(ddof=1) if len(group) > 1 else np.nan,
        })
    total = {"dataset": "all", "site": "all", "subjects": len(merged),
             "flair_voxel_mm": "", "flair_shape": "", "t1_voxel_mm": "", "t1_shape": "",
             "brain_ml_mean": merged["brain_ml"].mean(),
             "lesion_ml_mean": merged["lesion_ml"].mean(),
             "load_pct_mean": merged["load_pct"].mean(),
             "load_pct_sd": merged["load_pct"].std(ddof=1) if len(merged) > 1 else np.nan}
    return pd.DataFrame(rows + [total])


def grid_volume_check(prep: pd.DataFrame) -> pd.DataFrame:
    """How much of each subject's lesion volume the profile grid carries (partial volume), and
    how many references hold no lesion at all (scored by the empty-reference rule).

    One row per site and one for all: the native lesion volume, the grid/native ratio (median,
    minimum, maximum), the count of empty references and, where preprocessing recorded it, the
    median round-trip Dice: the partial-volume reference itself used as the prediction (mapped
    back and cut at 0.5) against the native reference. Lesions whose fractions stay below one
    half on the grid are lost on the way back, so it shows how much of the lesion load the grid
    cannot carry as "mostly lesion" voxels.
    """
    ok = prep[prep["status"] != "failed"].copy()
    empty = ok["reference_empty"].astype(bool) if "reference_empty" in ok else \
        ok["lesion_ml"] <= 0
    ok["ratio"] = np.where(empty, np.nan, ok["lesion_ml_grid"] / ok["lesion_ml"].where(~empty))
    ok["empty"] = empty

    def summary(group: pd.DataFrame) -> dict:
        return {"subjects": len(group), "lesion_ml_median": group["lesion_ml"].median(),
                "grid_ratio_median": group["ratio"].median(),
                "grid_ratio_min": group["ratio"].min(), "grid_ratio_max": group["ratio"].max(),
                "empty_references": int(group["empty"].sum()),
                "roundtrip_dice_median": group["roundtrip_dice"].median()
                if "roundtrip_dice" in group else np.nan}

    rows = []
    if "site" in ok:
        rows = [{"site": site, **summary(group)} for site, group in ok.groupby("site", sort=False)]
    return pd.DataFrame(rows + [{"site": "all", **summary(ok)}])


def grid_cost(prep: pd.DataFrame, quality_threshold: float) -> pd.DataFrame:
    """What the profile grid alone costs, per site and for all: the round-trip Dice of the
    reference (median, 10th percentile, minimum) and how many subjects it already puts below
    the failure threshold before any network runs.

    Those subjects would count as failed even for a perfect segmenter on this grid, so a study
    whose grid fails many of them measures the grid, not the segmenter or its QC. Subjects
    with an empty reference are left out (their round trip is 1 by the empty-mask rule).
    """
    ok = prep[(prep["status"] != "failed") & prep["roundtrip_dice"].notna()].copy()
    if "reference_empty" in ok:
        ok = ok[~ok["reference_empty"].astype(bool)]

    def summary(group: pd.DataFrame) -> dict:
        rt = group["roundtrip_dice"].astype(float)
        below = int((rt < quality_threshold).sum())
        return {"subjects": len(rt), "roundtrip_median": rt.median(),
                "roundtrip_p10": rt.quantile(0.1) if len(rt) else np.nan,
                "roundtrip_min": rt.min(), "failed_by_grid": below,
                "failed_by_grid_share": below / len(rt) if len(rt) else np.nan}

    rows = []
    if "site" in ok:
        rows = [{"site": site, **summary(group)} for site, group in ok.groupby("site", sort=False)]
    return pd.DataFrame(rows + [{"site": "all", **summary(ok)}])


def example_cases(table: pd.DataFrame, column: str = "load_pct") -> dict[str, str]:
    """A small, a medium and a large lesion-load subject: the one nearest the median of each
    third of the load distribution (ties by subject id), for figures that show the range."""
    ordered = table.sort_values([column, "subject_id"]).reset_index(drop=True)
    n = len(ordered)
    if n < 3:
        raise ValueError(f"need at least 3 subjects to pick examples, have {n}")
    picks = {}
    for name, (a, b) in zip(("small", "medium", "large"),
                            ((0, n // 3), (n // 3, 2 * n // 3), (2 * n // 3, n)), strict=True):
        part = ordered.iloc[a:b]
        median = part[column].median()
        picks[name] = part.iloc[int(np.argmin(np.abs(part[column] - median).to_numpy()))][
            "subject_id"]
    return picks


def load(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Manifest, preprocessing table and folds written by the data step."""
    paths = CohortPaths.under(results_dir)
    for path in (paths.manifest, paths.preprocess, paths.folds):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run the data step (notebook 01) first")
    return (datasets.read_manifest(paths.manifest), pd.read_csv(paths.preprocess),
            pd.read_csv(paths.folds))


def synthetic_note(results_dir: str | Path) -> str:
    """`` (synthetic cohort)`` when the run's cohort is synthetic, for figure and table titles,
    so no result from simulated data is shown without saying so."""
    manifest = datasets.read_manifest(CohortPaths.under(results_dir).manifest)
    return " (synthetic cohort)" if bool(manifest["synthetic"].all()) else ""
