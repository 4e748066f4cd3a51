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

:func:`dice` and :func:`two_class_dice` are defined in :mod:`wmhqc_lib.overlap` (below data/
and nets/, which need them) and re-exported here; :func:`pairwise_dice` (agreement of MC
samples) is QC's own.
"""

from __future__ import annotations

import numpy as np

# The overlap measures live on the library's lowest floor (wmhqc_lib/overlap.py) so that data/
# and nets/ can use them; they are re-exported here for the QC, study and deploy code.
from ..overlap import counted_voxels, dice, two_class_dice

__all__ = ["counted_voxels", "dice", "pairwise_dice", "two_class_dice"]


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
        flat = flat & counted_voxels(ignore, masks.shape[1:]).reshape(1, -1)
    m = flat.astype(np.float32)
    inter = m @ m.T
    sizes = np.diag(inter)
    denom = sizes[:, None] + sizes[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(denom > 0, 2.0 * inter / np.where(denom > 0, denom, 1.0), 1.0)
    iu = np.triu_indices(n, k=1)
    return float(d[iu].mean())
