"""Cross-validation folds stratified by site and lesion load.

The authors' code took validation as the last 20 % of sorted indices, and one dataset never
reached training. Here every subject is tested exactly once, and each fold's test, validation
and training sets mix sites and lesion loads in proportion. The table is saved once and every
notebook reads it, so all steps of a fold see the same split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

FOLD_COLUMNS = ["fold", "subject_id", "site", "load_bin", "split"]
SPLITS = ("train", "val", "test")


def _strata_order(frame: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """Row order grouped by site, then load bin, random within a group."""
    tiebreak = rng.permutation(len(frame))
    keys = pd.DataFrame({"site": frame["site"].to_numpy(), "bin": frame["load_bin"].to_numpy(),
                         "r": tiebreak})
    return keys.sort_values(["site", "bin", "r"], kind="stable").index.to_numpy()


def _deal_test_folds(frame: pd.DataFrame, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy balanced dealing: each subject, in site/load-bin order, goes to the fold that has
    the fewest subjects of its (site, bin) cell, then of its site, then of its load bin, then
    overall, never past ``ceil(n / n_folds)``; remaining ties are broken at random (seeded).
    Dealing site by site alone would leave every site's leftover low-load subjects in the same
    folds whenever site sizes are multiples of the fold count (the paper's 20/20/20/5/5/5/30)."""
    n = len(frame)
    cap = -(-n // n_folds)
    sites = frame["site"].to_numpy()
    bins = frame["load_bin"].to_numpy()
    total = np.zeros(n_folds, dtype=int)
    per_site: dict = {}
    per_bin: dict = {}
    per_cell: dict = {}
    fold_of = np.empty(n, dtype=int)
    for i in _strata_order(frame, rng):
        s, b = sites[i], bins[i]
        cell = per_cell.setdefault((s, b), np.zeros(n_folds, dtype=int))
        site = per_site.setdefault(s, np.zeros(n_folds, dtype=int))
        load = per_bin.setdefault(b, np.zeros(n_folds, dtype=int))
        keys = np.lexsort((rng.random(n_folds), total, load, site, cell, total >= cap))
        f = int(keys[0])
        fold_of[i] = f
        for counts in (total, cell, site, load):
            counts[f] += 1
    return fold_of + 1


def load_bins(values: pd.Series, n_bins: int) -> np.ndarray:
    """Quantile bins (0 .. n_bins-1) of lesion load; ties broken by rank, so bins stay balanced."""
    if values.isna().any():
        raise ValueError("lesion load is missing (NaN) for row(s) "
                         f"{values.index[values.isna()].tolist()[:5]}")
    if n_bins <= 1 or len(values) < n_bins:
        return np.zeros(len(values), dtype=int)
    ranks = values.rank(method="first").to_numpy() - 1
    return np.floor(ranks * n_bins / len(values)).astype(int)


def make_folds(subjects: pd.DataFrame, n_folds: int = 5, val_fraction: float = 0.1905,
               n_load_bins: int = 3, seed: int = 0, load_column: str = "lesion_ml"
               ) -> pd.DataFrame:
    """Assign every subject to one test fold and, per fold, to train or validation.

    Subjects are dealt to test folds so that each fold holds each site, each load range and
    each (site, load) cell in proportion, and fold sizes differ by at most one. Within the rest
    of each fold, validation subjects are taken at evenly spaced
    positions of the same ordering: ``round(val_fraction * n_rest)`` of them (16 of 84 for the
    paper's 105 subjects, leaving 68 for training).

    Returns a long table with one row per (fold, subject): ``FOLD_COLUMNS``; folds count from 1.
    """
    needed = {"subject_id", "site", load_column}
    missing = needed - set(subjects.columns)
    if missing:
        raise ValueError(f"subjects table lacks columns {sorted(missing)}")
    if subjects["subject_id"].duplicated().any():
        dup = subjects.loc[subjects["subject_id"].duplicated(), "subject_id"].tolist()
        raise ValueError(f"duplicate subject ids: {dup[:5]}")
    n = len(subjects)
    if n_folds < 2 or n < n_folds:
        raise ValueError(f"cannot make {n_folds} folds from {n} subjects")
    rng = np.random.default_rng([seed, 7])
    frame = subjects[["subject_id", "site"]].reset_index(drop=True).copy()
    loads = subjects[load_column].reset_index(drop=True)
    if loads.isna().any():
        missing = frame.loc[loads.isna(), "subject_id"].tolist()
        raise ValueError(f"{load_column} is missing (NaN) for subject(s) {missing[:5]}")
    frame["load_bin"] = load_bins(loads, n_load_bins)
    test_fold = _deal_test_folds(frame, n_folds, rng)
    order = _strata_order(frame, rng)

    rows = []
    for fold in range(1, n_folds + 1):
        rest = order[test_fold[order] != fold]  # keeps the site/load ordering
        n_val = int(round(val_fraction * len(rest)))
        n_val = min(max(n_val, 1 if len(rest) > 1 else 0), len(rest) - 1)
        split = np.full(n, "train", dtype=object)
        split[test_fold == fold] = "test"
        if n_val:
            offset = rng.random()
            picks = np.floor((np.arange(n_val) + offset) * len(rest) / n_val).astype(int)
            split[rest[picks]] = "val"
        part = frame.copy()
        part.insert(0, "fold", fold)
        part["split"] = split
        rows.append(part)
    return pd.concat(rows, ignore_index=True)[FOLD_COLUMNS]


def holdout(ids: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split one fold's training subjects into the ones a model fits and the ones that stop
    its training (early stopping, learning-rate plateau), so that the validation subjects,
    which choose scores and thresholds, are never also the rows that stopped a model.

    The held-out subjects sit at evenly spaced positions of ``ids`` (ordered by dataset and
    site, as the folds table lists them, so each site keeps its share): ``round(fraction * n)``
    of them, at least 1 and leaving at least 2 to fit; none when ``fraction`` is 0 or fewer
    than 3 subjects are given. Returns ``(fit, held_out)`` in the order of ``ids``."""
    ids = list(ids)
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or len(ids) < 3:
        return ids, []
    n = min(max(int(round(fraction * len(ids))), 1), len(ids) - 2)
    picks = set(np.floor((np.arange(n) + 0.5) * len(ids) / n).astype(int).tolist())
    return ([s for i, s in enumerate(ids) if i not in picks],
            [s for i, s in enumerate(ids) if i in picks])


def inner_folds(subjects: pd.DataFrame, n_folds: int, seed: int = 0, n_load_bins: int = 3,
                load_column: str = "load_pct") -> dict[str, int]:
    """Deal one fold's training subjects into ``n_folds`` inner folds (1..n), balanced by site
    and lesion load the same way as the outer folds; for out-of-fold inputs of the Dice
    regressors (each training case's maps from networks that never saw it)."""
    if n_folds < 2 or len(subjects) < n_folds:
        raise ValueError(f"cannot make {n_folds} inner folds from {len(subjects)} subjects")
    frame = subjects[["subject_id", "site"]].reset_index(drop=True).copy()
    frame["load_bin"] = load_bins(subjects[load_column].reset_index(drop=True), n_load_bins)
    dealt = _deal_test_folds(frame, n_folds, np.random.default_rng([seed, 11]))
    return dict(zip(frame["subject_id"], (int(f) for f in dealt), strict=True))


def fold_split(folds: pd.DataFrame, fold: int, split: str) -> list[str]:
    """Subject ids of one split (``train``/``val``/``test``) of one fold."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if fold not in set(folds["fold"]):
        raise ValueError(f"fold {fold} not in folds table (has {sorted(set(folds['fold']))})")
    sel = folds[(folds["fold"] == fold) & (folds["split"] == split)]
    return sel["subject_id"].tolist()


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Counts per fold and split (the table printed in the data notebook)."""
    table = folds.pivot_table(index="fold", columns="split", values="subject_id",
                              aggfunc="count", fill_value=0)
    return table.reindex(columns=list(SPLITS), fill_value=0)
