"""Overlap of a predicted lesion mask with a reference: lesion Dice and the paper's two-class Dice.

On the lowest floor of the library (it imports nothing from wmhqc_lib's packages), so that the
data step (``data/preprocess.py``, Dice on the native grid) and training (``nets/training.py``,
validation Dice) can measure overlap without importing the QC package above them. The QC
package re-exports these from :mod:`wmhqc_lib.qc.metrics`, which documents the conventions:

* Lesion (foreground) Dice is the primary metric; :func:`two_class_dice` (mean of background
  and lesion Dice, about ``(1 + lesion Dice) / 2``) is for comparison with the paper only.
* Both masks empty: Dice 1. One empty: Dice 0.
* Voxels marked ``ignore`` (e.g. MICCAI label 2) count for neither mask.
* A partial-volume reference (fractions in [0, 1]) gives ``2 sum(p t) / (sum p + sum t)``,
  the usual Dice for a binary reference.
"""

from __future__ import annotations

import numpy as np


def counted_voxels(ignore: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Voxels that count: all but those at least half ignored (``ignore`` may be fractions)."""
    if ignore is None:
        return np.ones(shape, dtype=bool)
    ignore = np.asarray(ignore)
    return ~ignore.astype(bool) if ignore.dtype == bool else ~(ignore >= 0.5)


def dice(pred: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Lesion Dice of a binary prediction against a reference (binary, or partial-volume
    fractions), ignoring ``ignore`` voxels (at least half ignored); 1.0 when both are empty."""
    valid = counted_voxels(ignore, np.shape(truth))
    p = np.asarray(pred, dtype=bool) & valid
    truth = np.asarray(truth)
    if truth.dtype == bool or np.issubdtype(truth.dtype, np.integer):
        t = truth.astype(bool) & valid
        total = int(p.sum()) + int(t.sum())
        return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total
    t = np.where(valid, np.clip(truth.astype(np.float64), 0.0, 1.0), 0.0)
    total = float(p.sum()) + float(t.sum())
    if total == 0.0:
        return 1.0
    return 2.0 * float(t[p].sum()) / total


def two_class_dice(pred: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None,
                   region: np.ndarray | None = None) -> float:
    """Mean of background and lesion Dice, the paper code's definition (for comparison only).

    ``region`` limits the background to a volume of interest (default: the whole grid, as the
    authors computed it); a larger region inflates background Dice towards 1.
    """
    valid = counted_voxels(ignore, np.shape(truth))
    if region is not None:
        valid &= np.asarray(region, dtype=bool)
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    fg = dice(p & valid, t & valid)
    bg = dice(~p & valid, ~t & valid)
    return (fg + bg) / 2.0
