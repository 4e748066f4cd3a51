"""Overlap metrics on masks, with the conventions written down once.

* Lesion (foreground) Dice is the primary metric. The authors' code averaged a soft Dice over
  background and lesion; that two-class mean is about ``(1 + lesion Dice) / 2`` and is offered as
  :func:`two_class_dice` for comparison with the paper's numbers only.
* Both masks empty: Dice 1 (nothing to find, nothing found). One empty: Dice 0. So a case whose
  reference holds no lesion is judged by its prediction alone: 1 when nothing is predicted,
  0 otherwise (the tables mark such cases ``reference_empty``).
* Voxels marked ``ignore`` (e.g. MICCAI label 2) count for neither mask.
* The reference may carry partial volume (fractions in [0, 1], as masks on a coarse grid do):
  overlap and size are then sums of fractions, ``2 sum(p t) / (sum p + sum t)``, which equals the
  usual Dice for a binary reference.
"""

from __future__ import annotations

import numpy as np


def _valid(ignore: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Voxels that count: all but those at least half ignored (``ignore`` may be fractions)."""
    if ignore is None:
        return np.ones(shape, dtype=bool)
    ignore = np.asarray(ignore)
    return ~ignore.astype(bool) if ignore.dtype == bool else ~(ignore >= 0.5)


def dice(pred: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Lesion Dice of a binary prediction against a reference (binary, or partial-volume
    fractions), ignoring ``ignore`` voxels (at least half ignored); 1.0 when both are empty."""
    valid = _valid(ignore, np.shape(truth))
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
    valid = _valid(ignore, np.shape(truth))
    if region is not None:
        valid &= np.asarray(region, dtype=bool)
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    fg = dice(p & valid, t & valid)
    bg = dice(~p & valid, ~t & valid)
    return (fg + bg) / 2.0


def pairwise_dice(masks: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Mean Dice over all pairs of sampled binary masks (shape ``(N, ...)``).

    High when the MC samples agree. Computed from one Gram matrix of the flattened masks, so 20
    samples (190 pairs) cost one small matrix product. Pairs of two empty masks count as 1.
    """
    masks = np.asarray(masks, dtype=bool)
    n = masks.shape[0]
    if n < 2:
        raise ValueError("pairwise Dice needs at least two samples")
    flat = masks.reshape(n, -1)
    if ignore is not None:
        flat = flat & _valid(ignore, masks.shape[1:]).reshape(1, -1)
    m = flat.astype(np.float32)
    inter = m @ m.T
    sizes = np.diag(inter)
    denom = sizes[:, None] + sizes[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(denom > 0, 2.0 * inter / np.where(denom > 0, denom, 1.0), 1.0)
    iu = np.triu_indices(n, k=1)
    return float(d[iu].mean())
