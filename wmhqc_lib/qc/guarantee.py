"""A review threshold whose recall of failed segmentations holds with a stated confidence.

A threshold chosen to maximise F1 on 16 validation cases promises nothing beyond them. Here
the threshold is chosen so that, with probability at least ``confidence`` over the draw of the
labelled (choosing) rows, the recall of failures on new cases from the same population is at
least ``target_recall``. Only the failed rows matter for recall: the rule allows the ``m``
most reassuring-looking labelled failures to pass unflagged, with ``m`` the largest number
for which the exact binomial (Clopper–Pearson) test rejects "the miss rate exceeds
``1 - target_recall``" at level ``1 - confidence``:

    P(Binomial(n, 1 - target_recall) <= m) <= 1 - confidence.

This is Learn-then-Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021, arXiv:2110.01052)
with binomial tail p-values and fixed-sequence testing over the thresholds ordered from
"flag every case" towards "flag fewer": for one monotone family the first non-rejected
threshold sits at an order statistic of the failures' scores, and the guarantee is the
distribution-free tolerance bound of Wilks (1941): the miss rate above the ``(n - m)``-th
smallest failure score is Beta(m + 1, n - m) distributed for continuous scores, and ties only
make the flagged set larger. With ``m = 0`` impossible (``target_recall ** n > 1 -
confidence``) there is no guarantee to give: :func:`failures_needed` says how many labelled
failures it takes.

The promise assumes the labelled failures are exchangeable with the failures to come (the same
population: site, scanner, segmenter); it says nothing of a population the rows did not come
from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

METHOD = ("Learn-then-Test with exact binomial (Clopper-Pearson) p-values, fixed-sequence "
          "over thresholds (Angelopoulos et al. 2021, arXiv:2110.01052); an order statistic "
          "of the labelled failures' scores (Wilks 1941)")


def _check(target_recall: float, confidence: float) -> None:
    if not 0.0 < target_recall < 1.0:
        raise ValueError(f"target recall {target_recall}: must lie strictly between 0 and 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence}: must lie strictly between 0 and 1")


def allowed_misses(n_failures: int, target_recall: float, confidence: float) -> int | None:
    """The most labelled failures the threshold may leave unflagged while the guarantee holds;
    ``None`` when even flagging all of them is not enough (too few failures)."""
    _check(target_recall, confidence)
    if n_failures <= 0:
        return None
    m = np.arange(n_failures + 1)
    ok = stats.binom.cdf(m, n_failures, 1.0 - target_recall) <= 1.0 - confidence
    return int(m[ok].max()) if ok.any() else None


def failures_needed(target_recall: float, confidence: float) -> int:
    """The fewest labelled failures for which a guarantee exists (every one of them flagged):
    the smallest n with ``target_recall ** n <= 1 - confidence``."""
    _check(target_recall, confidence)
    n = max(1, math.ceil(math.log(1.0 - confidence) / math.log(target_recall)))
    while target_recall ** n > 1.0 - confidence:  # guard the float ceiling
        n += 1
    while n > 1 and target_recall ** (n - 1) <= 1.0 - confidence:
        n -= 1
    return n


def recall_lower_bound(caught: int, n_failures: int, confidence: float) -> float:
    """One-sided Clopper–Pearson lower bound on a recall measured as ``caught`` of
    ``n_failures`` at a threshold fixed beforehand (NaN without failures)."""
    if n_failures <= 0:
        return math.nan
    if caught <= 0:
        return 0.0
    return float(stats.beta.ppf(1.0 - confidence, caught, n_failures - caught + 1))


@dataclass(frozen=True)
class RecallGuarantee:
    """The threshold of :func:`guaranteed_threshold` and what it rests on."""

    target_recall: float
    confidence: float
    n_rows: int
    n_failures: int  # labelled failures among the choosing rows
    failures_needed: int  # the fewest failures any guarantee at this target/confidence needs
    allowed_misses: int | None  # labelled failures left unflagged (None: no guarantee)
    threshold: float | None  # compare as evaluation.flag_cases does; None: no guarantee
    higher_is_better: bool
    review_fraction: float | None  # share of the choosing rows the threshold flags
    method: str = METHOD

    @property
    def feasible(self) -> bool:
        return self.threshold is not None

    def statement(self) -> str:
        """The guarantee, or why there is none, in one sentence."""
        target, conf = f"{self.target_recall:.0%}", f"{self.confidence:.0%}"
        if not self.feasible:
            return (f"no guarantee: recall >= {target} with {conf} confidence needs at least "
                    f"{self.failures_needed} labelled failures; the choosing rows hold "
                    f"{self.n_failures}")
        return (f"recall of failures >= {target} with {conf} confidence, from "
                f"{self.n_failures} labelled failures of which the threshold leaves "
                f"{self.allowed_misses} unflagged")

    def to_dict(self) -> dict:
        return asdict(self) | {"feasible": self.feasible, "statement": self.statement()}


def guaranteed_threshold(scores: np.ndarray, failed: np.ndarray, target_recall: float,
                         confidence: float, higher_is_better: bool = True) -> RecallGuarantee:
    """The threshold that flags the fewest choosing rows while recall >= ``target_recall``
    holds with probability >= ``confidence`` (module docstring); rows with a non-finite score
    are left out. ``failed`` marks the labelled failures (lesion Dice below the quality
    threshold, or a reviewer's verdict)."""
    _check(target_recall, confidence)
    s = np.asarray(scores, dtype=float)
    failed = np.asarray(failed, dtype=bool)
    if s.shape != failed.shape:
        raise ValueError(f"scores ({s.shape}) and failure labels ({failed.shape}) differ")
    keep = np.isfinite(s)
    s, failed = s[keep], failed[keep]
    good = s if higher_is_better else -s  # lower = worse, flagged when below the threshold
    fails = np.sort(good[failed])
    n = len(fails)
    m = allowed_misses(n, target_recall, confidence)
    threshold = review = None
    if m is not None:
        last = fails[n - m - 1]  # the most reassuring failure that must still be flagged
        above = good[good > last]
        cut = (last + above.min()) / 2.0 if above.size else last + max(1.0, abs(last))
        threshold = float(cut if higher_is_better else -cut)
        review = float(np.mean(good < cut)) if len(good) else None
    return RecallGuarantee(float(target_recall), float(confidence), int(len(s)), n,
                           failures_needed(target_recall, confidence), m, threshold,
                           bool(higher_is_better), review)
