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

A study's folds hold only a handful of validation failures each, where recall 0.9 at 90 %
confidence needs 22, so the study's guarantee pools the validation rows of all folds, each
scored by a fold model that never trained on it: one common threshold (:func:`choose_pooled`).
A subject that validates several folds enters once (its first such fold's row), so that no
failure is counted twice as if it were independent evidence. The calibrated recall is that of
the mixture of fold models (each row scored by one of them); flagging a scan when any fold
model flags it can only raise it. The validation rows are not untouched, though: they also
chose the segmentation and reconstruction networks' checkpoints and the carried QC score, which
the promise assumes did not bend them away from new scans.

What it costs in review is measured on the test rows (:func:`guarantee_cost`,
:func:`tradeoff_curve`), and whether the promise holds is checked by drawing calibration sets
from a known population (:func:`simulate_guarantee`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from . import evaluation as ev

METHOD = ("Learn-then-Test with exact binomial (Clopper-Pearson) p-values, fixed-sequence "
          "over thresholds (Angelopoulos et al. 2021, arXiv:2110.01052); an order statistic "
          "of the labelled failures' scores (Wilks 1941)")


#: The confidence of a guarantee asked for by its target recall alone.
DEFAULT_CONFIDENCE = 0.9


def _check(target_recall: float, confidence: float) -> None:
    if not 0.0 < target_recall < 1.0:
        raise ValueError(f"target recall {target_recall}: must lie strictly between 0 and 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence}: must lie strictly between 0 and 1")


def check_target(target_recall: float, confidence: float) -> None:
    """A ValueError unless both lie strictly between 0 and 1 (say which does not)."""
    _check(target_recall, confidence)


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
        # any cut in (last, next row above] flags the same choosing rows; halfway leaves new
        # scans between the two an even chance. Where halfway rounds back onto ``last`` (two
        # adjacent floats), or no row lies above, the cut is the next float above ``last``.
        cut = last + (above.min() - last) / 2.0 if above.size else math.nan
        if not cut > last:
            cut = float(np.nextafter(last, np.inf))
        threshold = float(cut if higher_is_better else -cut)
        review = float(np.mean(good < cut)) if len(good) else None
    return RecallGuarantee(float(target_recall), float(confidence), int(len(s)), n,
                           failures_needed(target_recall, confidence), m, threshold,
                           bool(higher_is_better), review)


# ---------------------------------------------------------------------------------------------
# The study's guarantee: the pooled validation rows choose, the pooled test rows show the cost


@dataclass(frozen=True)
class _Rows:
    """One split's rows of all folds: score, failure label and fold, as arrays."""

    scores: np.ndarray
    failed: np.ndarray
    fold: np.ndarray

    def by_fold(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.fold == f) for f in np.unique(self.fold)]


def one_row_per_subject(part: pd.DataFrame) -> pd.DataFrame:
    """The rows with each subject once: the row of its lowest fold (a choice blind to scores
    and outcomes). A subject validates up to all-but-one folds; its rows share the image, so
    counting each as an independent failure would overstate the evidence."""
    if "subject_id" not in part or part.empty:
        return part
    order = part.sort_values("fold", kind="stable") if "fold" in part else part
    return order.drop_duplicates("subject_id", keep="first").sort_index()


def _rows(cases: pd.DataFrame, spec: ev.QCScore, split: str, quality_threshold: float,
          dice_column: str) -> _Rows:
    """One split's rows of all folds; the validation rows (the choosing rows) with each subject
    once (:func:`one_row_per_subject`)."""
    part = cases[cases["split"].astype(str) == split]
    if part.empty:
        raise ValueError(f"{cases.attrs.get('source', 'cases table')}: no {split!r} rows")
    if split == "val":
        part = one_row_per_subject(part)
    part.attrs.update(cases.attrs)
    checked = ev.check_cases(part, [dice_column, spec.column], dice_column=dice_column)
    return _Rows(checked[spec.column].to_numpy(float),
                 checked[dice_column].to_numpy(float) < quality_threshold,
                 checked["fold"].to_numpy(int) if "fold" in checked else np.zeros(len(part), int))


def _flags(scores: np.ndarray, threshold: float | None, higher_is_better: bool) -> np.ndarray:
    """The rows a guaranteed threshold flags; without a guarantee the rule abstains and every
    row goes to review (the only recall it can promise is then 1)."""
    if threshold is None:
        return np.ones(len(scores), dtype=bool)
    return ev.flag_cases(scores, threshold, higher_is_better)


def failures_per_fold(cases: pd.DataFrame, *, split: str = "val",
                      quality_threshold: float = ev.QUALITY_THRESHOLD,
                      dice_column: str = ev.DICE_COLUMN) -> dict[int, int]:
    """Labelled failures among each fold's ``split`` rows: why one fold cannot give a guarantee
    on its own."""
    part = cases[cases["split"].astype(str) == split]
    failed = part[dice_column].to_numpy(float) < quality_threshold
    return {int(f): int(failed[part["fold"].to_numpy() == f].sum())
            for f in sorted(part["fold"].unique())}


def choose_pooled(cases: pd.DataFrame, score: str | ev.QCScore, target_recall: float,
                  confidence: float = DEFAULT_CONFIDENCE, *,
                  quality_threshold: float = ev.QUALITY_THRESHOLD,
                  dice_column: str = ev.DICE_COLUMN) -> RecallGuarantee:
    """One threshold for every fold, guaranteed on the validation rows of all folds pooled,
    each subject once (each row scored by a fold model that never trained on it): the
    threshold calibrates the mixture of the fold models, which a scan flagged when any fold
    flags it can only beat."""
    spec = ev.resolve_score(score)
    val = _rows(cases, spec, "val", quality_threshold, dice_column)
    return guaranteed_threshold(val.scores, val.failed, target_recall, confidence,
                                spec.higher_is_better)


def _percentile_intervals(samples: dict[str, np.ndarray], estimate: dict[str, float],
                          level: float) -> dict[str, dict]:
    alpha = (1.0 - level) / 2
    out = {}
    for name, values in samples.items():
        valid = values[np.isfinite(values)]
        low, high = (np.quantile(valid, [alpha, 1 - alpha]) if len(valid)
                     else (math.nan, math.nan))
        out[name] = {"estimate": float(estimate[name]), "low": float(low), "high": float(high),
                     "n_valid": len(valid)}
    return out


def guarantee_cost(cases: pd.DataFrame, score: str | ev.QCScore, target_recall: float,
                   confidence: float = DEFAULT_CONFIDENCE, *, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95, quality_threshold: float = ev.QUALITY_THRESHOLD,
                   dice_column: str = ev.DICE_COLUMN) -> dict:
    """What the guarantee costs: the flags of :func:`choose_pooled`'s threshold on the test
    rows of all folds pooled (each test row scored by its own fold model), as
    :data:`evaluation.OPERATING_METRICS` with percentile bootstrap intervals, and the recall's
    one-sided Clopper–Pearson lower bound at ``confidence``.

    In each resample every fold's validation and test rows are drawn again with replacement
    and the threshold is chosen again on the pooled resampled validation rows, so the
    intervals carry the threshold's own variance; a resample with too few failures for the
    guarantee abstains (reviews every row) and is counted in ``n_infeasible_resamples``. The
    point estimate abstains likewise when the observed rows allow no guarantee
    (``guarantee["feasible"]`` is then false).
    """
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    spec = ev.resolve_score(score)
    hib = spec.higher_is_better
    val = _rows(cases, spec, "val", quality_threshold, dice_column)
    test = _rows(cases, spec, "test", quality_threshold, dice_column)
    chosen = guaranteed_threshold(val.scores, val.failed, target_recall, confidence, hib)
    flagged = _flags(test.scores, chosen.threshold, hib)
    estimate = ev.operating_counts(test.failed, flagged)
    rng = np.random.default_rng([seed, 29])
    val_groups, test_groups = val.by_fold(), test.by_fold()
    samples = {m: np.empty(n_boot) for m in ev.OPERATING_METRICS}
    infeasible = 0
    for b in range(n_boot):
        vi = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in val_groups])
        ti = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in test_groups])
        again = guaranteed_threshold(val.scores[vi], val.failed[vi], target_recall, confidence,
                                     hib)
        infeasible += not again.feasible
        flags = _flags(test.scores[ti], again.threshold, hib)
        for name, value in ev.operating_counts(test.failed[ti], flags).items():
            samples[name][b] = value
    out: dict = _percentile_intervals(samples, estimate, level)
    caught, n_failed = int((test.failed & flagged).sum()), int(test.failed.sum())
    out["recall"]["lower_bound"] = recall_lower_bound(caught, n_failed, confidence)
    out["recall"]["lower_bound_confidence"] = float(confidence)
    out.update(threshold=chosen.threshold, guarantee=chosen.to_dict(),
               validation_failures_per_fold=failures_per_fold(
                   cases, quality_threshold=quality_threshold, dice_column=dice_column),
               n_cases=len(test.failed), n_failed=n_failed, n_flagged=int(flagged.sum()),
               n_caught=caught, n_boot=int(n_boot), level=level,
               n_infeasible_resamples=int(infeasible), rechosen_in_resamples=True)
    return out


def tradeoff_curve(cases: pd.DataFrame, score: str | ev.QCScore, targets: Sequence[float],
                   confidence: float = DEFAULT_CONFIDENCE, *,
                   quality_threshold: float = ev.QUALITY_THRESHOLD,
                   dice_column: str = ev.DICE_COLUMN) -> pd.DataFrame:
    """Target recall against review fraction: per target, the guaranteed threshold chosen on
    the pooled validation rows and its flags on the pooled test rows. A target the validation
    failures cannot guarantee abstains (every row reviewed, ``feasible`` false) and says how
    many labelled failures it needs. One row per target, in the order given."""
    spec = ev.resolve_score(score)
    hib = spec.higher_is_better
    val = _rows(cases, spec, "val", quality_threshold, dice_column)
    test = _rows(cases, spec, "test", quality_threshold, dice_column)
    rows = []
    for target in targets:
        chosen = guaranteed_threshold(val.scores, val.failed, float(target), confidence, hib)
        flagged = _flags(test.scores, chosen.threshold, hib)
        counts = ev.operating_counts(test.failed, flagged)
        caught = int((test.failed & flagged).sum())
        rows.append({"target_recall": float(target), "confidence": float(confidence),
                     "feasible": chosen.feasible, "n_val_rows": chosen.n_rows,
                     "n_val_failures": chosen.n_failures,
                     "failures_needed": chosen.failures_needed,
                     "allowed_misses": chosen.allowed_misses, "threshold": chosen.threshold,
                     "review_fraction_val": (chosen.review_fraction if chosen.feasible
                                             else 1.0),
                     "review_fraction": counts["review_fraction"], "recall": counts["recall"],
                     "recall_lower_bound": recall_lower_bound(caught, int(test.failed.sum()),
                                                              confidence),
                     "precision": counts["precision"], "specificity": counts["specificity"],
                     "n_test": len(test.failed), "n_test_failed": int(test.failed.sum()),
                     "n_flagged": int(flagged.sum())})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Does the promise hold? Calibration sets drawn from a known population


def calibration_sizes(sizes: Sequence[int | str], n_validation: int, n_all: int
                      ) -> dict[str, int]:
    """The profile's ``guarantee.calibration_sizes`` as {label: size}: ``validation`` is the
    number of the study's pooled validation rows, ``all`` the number of all its out-of-fold
    rows (validation and test), and a whole number is itself."""
    named = {"validation": int(n_validation), "all": int(n_all)}
    out = {}
    for size in sizes:
        if isinstance(size, str) and size in named:
            out[f"{size} ({named[size]})"] = named[size]
        elif isinstance(size, int | np.integer) and not isinstance(size, bool) and size > 0:
            out[str(int(size))] = int(size)
        else:
            raise ValueError(f"calibration size {size!r}: use 'validation', 'all' or a "
                             "positive whole number")
    return out


def simulate_guarantee(scores: np.ndarray, failed: np.ndarray, *, targets: Sequence[float],
                       confidences: Sequence[float],
                       sizes: Mapping[str, int] | Sequence[int], draws: int = 2000,
                       seed: int = 0, higher_is_better: bool = True) -> pd.DataFrame:
    """Check the promise where the truth is known: the population is the given rows (their
    empirical distribution, e.g. a study's pooled out-of-fold rows). Each draw takes a
    calibration set of ``size`` rows with replacement, chooses the threshold with
    :func:`guaranteed_threshold`, and measures on the whole population the realised recall
    (share of its failures flagged: what the guarantee is about) and the review fraction (share
    of its rows flagged). A draw with too few failures for a guarantee abstains (reviews all:
    recall 1, review fraction 1) and is counted in ``share_infeasible``.

    One row per target, confidence and size: the mean labelled failures per draw, the median
    and 5th-percentile realised recall, the share of draws whose recall reaches the target (all
    draws, and feasible draws only), the mean review fraction, and ``mc_se``, the Monte Carlo
    standard error of a share equal to the confidence over the ``n_feasible`` draws that gave a
    guarantee. ``passed``: the share over those draws is at least the confidence less two such
    errors (``None`` when no draw gave one): the guarantee holds given the number of labelled
    failures, and abstaining draws, which review everything, would flatter it. The same
    calibration draws serve every target and confidence of a size (seeded).
    """
    s = np.asarray(scores, dtype=float)
    failed = np.asarray(failed, dtype=bool)
    if s.shape != failed.shape or s.ndim != 1:
        raise ValueError(f"scores ({s.shape}) and failure labels ({failed.shape}) differ")
    if not np.isfinite(s).all():
        raise ValueError("the population has non-finite scores")
    if not failed.any():
        raise ValueError("the population has no failure: recall is undefined")
    if draws < 1:
        raise ValueError(f"draws {draws}: need at least 1")
    if not isinstance(sizes, Mapping):
        sizes = {str(int(n)): int(n) for n in sizes}
    pop_failures = s[failed]
    rng = np.random.default_rng([seed, 31])
    rows = []
    for label, size in sizes.items():
        picks = rng.integers(0, len(s), (draws, int(size)))
        for target in targets:
            for conf in confidences:
                recall, review = np.ones(draws), np.ones(draws)
                feasible, n_fail = np.zeros(draws, bool), np.zeros(draws)
                for d, idx in enumerate(picks):
                    res = guaranteed_threshold(s[idx], failed[idx], float(target), float(conf),
                                               higher_is_better)
                    n_fail[d], feasible[d] = res.n_failures, res.feasible
                    if res.feasible:
                        recall[d] = ev.flag_cases(pop_failures, res.threshold,
                                                  higher_is_better).mean()
                        review[d] = ev.flag_cases(s, res.threshold, higher_is_better).mean()
                met = recall >= float(target)
                n_feasible = int(feasible.sum())
                # the guarantee holds given the number of labelled failures, so it is judged on
                # the draws that gave one; abstaining draws (recall 1) would make it look better
                se = (math.sqrt(float(conf) * (1 - float(conf)) / n_feasible) if n_feasible
                      else math.nan)
                rows.append({
                    "target_recall": float(target), "confidence": float(conf),
                    "calibration": label, "calibration_size": int(size), "draws": int(draws),
                    "mean_failures": float(n_fail.mean()),
                    "share_infeasible": float(1 - feasible.mean()),
                    "median_recall": float(np.median(recall)),
                    "p05_recall": float(np.quantile(recall, 0.05)),
                    "share_met": float(met.mean()),
                    "share_met_feasible": (float(met[feasible].mean()) if feasible.any()
                                           else math.nan),
                    "n_feasible": n_feasible, "mc_se": se,
                    "mean_review_fraction": float(review.mean()),
                    "passed": (bool(met[feasible].mean() >= float(conf) - 2 * se)
                               if n_feasible else None)})
    return pd.DataFrame(rows)


def simulate_study(cases: pd.DataFrame, score: str | ev.QCScore, *,
                   targets: Sequence[float], confidences: Sequence[float],
                   sizes: Sequence[int | str] = ("validation", "all"), draws: int = 2000,
                   seed: int = 0, quality_threshold: float = ev.QUALITY_THRESHOLD,
                   dice_column: str = ev.DICE_COLUMN) -> pd.DataFrame:
    """:func:`simulate_guarantee` with a study's pooled out-of-fold rows (validation rows,
    each subject once, and test rows of every fold, each scored by a fold model that never
    trained on it) as the population; ``sizes`` as :func:`calibration_sizes` reads them
    (``validation``: as many rows as the export chooses on)."""
    spec = ev.resolve_score(score)
    val = _rows(cases, spec, "val", quality_threshold, dice_column)
    test = _rows(cases, spec, "test", quality_threshold, dice_column)
    return simulate_guarantee(
        np.r_[val.scores, test.scores], np.r_[val.failed, test.failed], targets=targets,
        confidences=confidences, draws=draws, seed=seed, higher_is_better=spec.higher_is_better,
        sizes=calibration_sizes(sizes, len(val.scores), len(val.scores) + len(test.scores)))
