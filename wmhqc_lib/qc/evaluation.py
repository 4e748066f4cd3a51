"""Exact, leak-free evaluation of one QC score against true Dice, for any segmentation task.

The paper's contribution is its evaluation framework, and the authors' code got parts of it
wrong (REFERENCE.md section 2): precision and recall were swapped, the median Dice of kept cases
was reported as "Dice after filtering", and thresholds were tuned by eye on the test folds. This
module fixes all three, keeps the paper's convention available under clearly labelled names, and
adds what the field measures today (AURC, e-AURC, normalised AURC, failure AUROC, bootstrap
intervals). AURC follows fd-shifts (IML-DKFZ), which the segmentation failure-detection
benchmark of Zenk et al. 2025 builds on: risk = 1 - Dice, a risk-coverage curve from full
coverage down with tied scores leaving in one step, trapezoid area over coverage [0, 1].

Conventions, used everywhere below:

- a case *fails* when its true *lesion* Dice ``d < quality_threshold`` (0.5 by default, the
  study's ``evaluation.quality_threshold``); the positive class is the failed case;
- a QC score declares its direction: ``higher_is_better`` (predicted Dice, pairwise Dice, the
  paper's uncertainty VS) or not (mean entropy). A case is *flagged* for review when
  ``s < t`` for a higher-is-better score and ``s > t`` otherwise;
- every ratio with an empty denominator is NaN, never 0 or 1; a one-class AUROC is NaN;
- the functions taking one table judge all its rows: pass the rows you mean, e.g.
  :func:`scored_rows`. :func:`evaluate_folds` does the per-fold bookkeeping itself.

The input is a per-case table (one row per case) with a true Dice column (default
``true_dice``), the score column, and optionally ``fold`` and ``split`` (``train``/``val``/
``test``) columns.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

#: Default failure threshold on lesion Dice, the same as the study's (profiles.yml
#: ``evaluation.quality_threshold``). The paper's 0.75 was on the authors' two-class mean Dice,
#: about ``(1 + lesion Dice) / 2``, so 0.75 there is lesion Dice 0.5 here.
QUALITY_THRESHOLD = 0.5
DICE_COLUMN = "true_dice"
SPLITS = ("train", "val", "test")
RANDOM_COLUMN = "random_score"
QUALITY_SWEEP = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85)

#: The metric names of one evaluation, in the order they are reported (issue 5).
METRIC_NAMES: tuple[str, ...] = (
    "n_cases", "n_failed", "n_flagged", "n_true_positive",
    "precision", "recall", "paper_precision", "paper_recall",
    "mean_dice_before", "mean_dice_after", "median_dice_before", "median_dice_after",
    "pearson_r", "pearson_p", "spearman_r", "mae",
    "failure_auroc", "aurc", "eaurc", "norm_aurc",
    "review_fraction", "missed_failure_fraction",
)
BOOTSTRAP_METRICS = ("failure_auroc", "aurc", "eaurc", "norm_aurc", "pearson_r")
TABLE1_METRICS: tuple[str, ...] = (
    "pearson_r", "mean_dice_before", "mean_dice_after", "median_dice_after",
    "precision", "recall", "paper_precision", "paper_recall",
    "n_flagged", "n_true_positive", "mae", "failure_auroc", "aurc", "eaurc", "norm_aurc",
)


@dataclass(frozen=True)
class QCScore:
    """One QC score column and how to read it.

    ``higher_is_better``: a high score means a good segmentation. ``dice_scale``: the score
    predicts Dice itself, so MAE against true Dice means something. ``paper_table1``: one of the
    five scores of the paper's Table 1. ``baseline``: a simple score any QC method must beat.
    ``paper_threshold``: the threshold the paper's text used (tuned on test; shown, not adopted).
    ``reads_annotation``: the score is computed from the case's own annotation, so no QC method
    could have it on a new scan: a reference line that shows how far a ranking could go, never a
    candidate for the carried score and never given a threshold.
    """

    name: str
    column: str
    label: str
    higher_is_better: bool
    dice_scale: bool = False
    paper_table1: bool = False
    baseline: bool = False
    paper_threshold: float | None = None
    reads_annotation: bool = False


#: The score columns the project's per-case tables hold (``results/<profile>/fold<k>/cases.csv``).
QC_SCORES: tuple[QCScore, ...] = (
    # The paper's hypothesis: little uncertainty summed up <-> low Dice ("VS < 1100 flags").
    QCScore("uncertainty_vs", "uncertainty_vs", "VS uncertainty", True, paper_table1=True,
            paper_threshold=1100.0),
    # Signed error sum (reconstruction - original); the paper flags VS < -100,000.
    QCScore("error_vs", "error_vs", "VS error", True, paper_table1=True,
            paper_threshold=-100_000.0),
    QCScore("dr_image", "dr_image", "DR image-pred", True, dice_scale=True, paper_table1=True),
    QCScore("dr_uncertainty", "dr_uncertainty", "DR uncert-pred", True, dice_scale=True,
            paper_table1=True),
    QCScore("dr_error", "dr_error", "DR error-pred", True, dice_scale=True, paper_table1=True),
    # The field's best score (Zenk et al. 2025): agreement between MC samples.
    QCScore("pairwise_dice", "pairwise_dice", "pairwise Dice (MC samples)", True),
    QCScore("mean_entropy_lesion", "mean_entropy_lesion", "mean entropy (predicted lesion)",
            False),
    # Magnitudes of the error map: more reconstruction error, more doubt (our hypothesis).
    QCScore("error_vs_abs", "error_vs_abs", "VS |error|", False),
    QCScore("mean_abs_error_lesion", "mean_abs_error_lesion", "mean |error| (predicted lesion)",
            False),
    # Baselines. Small predicted lesion volume <-> low Dice: Dice is harsh on small lesion loads
    # and failures are mostly undersegmented (paper Figure 1c).
    QCScore("pred_lesion_ml", "pred_lesion_ml", "predicted lesion volume (baseline)", True,
            baseline=True),
    QCScore("random", RANDOM_COLUMN, "random score (baseline)", True, baseline=True),
)

#: Reference lines: scores that read the case's annotation (``reads_annotation``), shown in the
#: ranking to say how much of a score's success the lesion load alone, or the grid alone, would
#: explain. Never in :data:`QC_SCORES`, so no comparison, threshold or score choice sees them.
REFERENCE_SCORES: tuple[QCScore, ...] = (
    # Small true lesion load <-> low Dice, as for the predicted volume, but known exactly.
    QCScore("true_lesion_ml", "true_lesion_ml",
            "true lesion volume (reference, reads the annotation)", True,
            reads_annotation=True),
    # The reference mask itself through the profile grid and back: a low round-trip Dice is a
    # case the grid alone already spoils (REFERENCE.md section 6).
    QCScore("roundtrip_dice", "roundtrip_dice",
            "round-trip Dice of the reference (reference, reads the annotation)", True,
            reads_annotation=True),
)

#: The paper's Table 1 (NOT our numbers): per score, (mean over folds, median over folds).
#: Keys are our metric names for what the authors' code computed: "Precision" and "Recall" were
#: TN/(TN+FP) and TN/(TN+FN) (``paper_precision``/``paper_recall``); "Dice after filtering" was
#: the per-fold median Dice of kept cases (``median_dice_after``); "N failed segmentations
#: identified" matches the cases removed (15.5 % of 21, the text's "number of samples
#: removed"), i.e. ``n_flagged``. Dice is the paper's two-class mean Dice (``true_dice_paper``).
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "uncertainty_vs": {"pearson_r": (0.52, 0.548), "median_dice_after": (0.8504, 0.8496),
                       "paper_precision": (0.929, 0.937), "paper_recall": (0.887, 0.895),
                       "n_flagged": (3.2, 3.0), "mae": (math.nan, math.nan)},
    "error_vs": {"pearson_r": (-0.2517, -0.327), "median_dice_after": (0.837, 0.8307),
                 "paper_precision": (0.477, 0.437), "paper_recall": (0.829, 0.778),
                 "n_flagged": (9.8, 9.0), "mae": (math.nan, math.nan)},
    "dr_image": {"pearson_r": (0.572, 0.566), "median_dice_after": (0.848, 0.847),
                 "paper_precision": (0.905, 0.895), "paper_recall": (0.837, 0.809),
                 "n_flagged": (2.6, 2.0), "mae": (0.0537, 0.0535)},
    "dr_uncertainty": {"pearson_r": (0.712, 0.7108), "median_dice_after": (0.852, 0.8467),
                       "paper_precision": (0.968, 1.0), "paper_recall": (0.867, 0.809),
                       "n_flagged": (1.8, 0.0), "mae": (0.0486, 0.045)},
    "dr_error": {"pearson_r": (0.677, 0.733), "median_dice_after": (0.860, 0.8708),
                 "paper_precision": (0.826, 0.941), "paper_recall": (0.868, 0.833),
                 "n_flagged": (4.8, 3.0), "mae": (0.059, 0.057)},
}
#: The paper's row names for the keys of :data:`PAPER_TABLE1`.
PAPER_TABLE1_ROWS = {"pearson_r": "Pearson r", "median_dice_after": "Dice after filtering",
                     "paper_precision": "Precision", "paper_recall": "Recall",
                     "n_flagged": "N failed segmentations identified", "mae": "MAE"}
#: The paper's "Dice before removing failed segmentation results": 0.84 mean (0.836 median).
PAPER_DICE_BEFORE = (0.84, 0.836)


# ---------------------------------------------------------------------------------------------
# input


def read_cases(path: str | Path) -> pd.DataFrame:
    """Read a per-case CSV; errors (and later checks) name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file (no header, no cases)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV ({exc})") from None
    frame.attrs["source"] = str(path)
    return frame


def qc_score(name: str) -> QCScore:
    """The registry entry (:data:`QC_SCORES`, then :data:`REFERENCE_SCORES`) with this name or
    column."""
    for spec in QC_SCORES + REFERENCE_SCORES:
        if name in (spec.name, spec.column):
            return spec
    raise ValueError(f"unknown QC score {name!r}; known: "
                     f"{[s.name for s in QC_SCORES + REFERENCE_SCORES]}")


def resolve_score(score: str | QCScore, higher_is_better: bool | None = None,
                  dice_scale: bool | None = None) -> QCScore:
    """A QCScore from a registry entry or a column name; explicit arguments win.

    An unknown column must say its direction: guessing it would silently invert every metric.
    """
    if isinstance(score, QCScore):
        spec = score
    else:
        known = [s for s in QC_SCORES + REFERENCE_SCORES if s.column == score]
        if known:
            spec = known[0]
        elif higher_is_better is None:
            raise ValueError(f"score column {score!r} is not in QC_SCORES: say whether a higher "
                             "score means better quality (higher_is_better=True/False)")
        else:
            spec = QCScore(score, score, score, bool(higher_is_better), bool(dice_scale))
    changes: dict[str, bool] = {}
    if higher_is_better is not None:
        changes["higher_is_better"] = bool(higher_is_better)
    if dice_scale is not None:
        changes["dice_scale"] = bool(dice_scale)
    return dataclasses.replace(spec, **changes) if changes else spec


def _source(cases: pd.DataFrame) -> str:
    return str(cases.attrs.get("source", "cases table"))


def _row_name(cases: pd.DataFrame, position: int) -> str:
    name = f"row {position + 1}"
    for column in ("subject_id", "case_id"):
        if column in cases.columns:
            return name + f" ({cases[column].iloc[position]})"
    return name


def check_cases(cases: pd.DataFrame, columns: Iterable[str], *,
                dice_column: str = DICE_COLUMN) -> pd.DataFrame:
    """A copy with ``columns`` as floats, or a ValueError naming the source, column and problem.

    Refuses: no rows, one row (no metric of a ranking exists), a missing column, a non-numeric,
    missing or infinite value, a Dice outside [0, 1], a split other than train/val/test, a
    missing fold.
    """
    columns = list(dict.fromkeys(columns))
    _check_structure(cases, columns)
    return _check_values(cases, columns, dice_column, np.ones(len(cases), dtype=bool))


def _check_structure(cases: pd.DataFrame, columns: list[str]) -> None:
    """Everything about the table as a whole: rows, columns, split and fold labels."""
    source = _source(cases) if isinstance(cases, pd.DataFrame) else "cases"
    if not isinstance(cases, pd.DataFrame):
        raise ValueError(f"{source}: expected a pandas DataFrame, got {type(cases).__name__}")
    if len(cases) == 0:
        raise ValueError(f"{source}: no cases (empty table)")
    if len(cases) == 1:
        raise ValueError(f"{source}: only one case; QC metrics need at least 2")
    missing = [c for c in columns if c not in cases.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing} (has {list(cases.columns)})")
    if "split" in cases.columns:
        odd = sorted(set(cases["split"].astype(str)) - set(SPLITS))
        if odd:
            raise ValueError(f"{source}: column 'split' has values {odd}; expected {SPLITS}")
    if "fold" in cases.columns and cases["fold"].isna().any():
        bad = int(np.flatnonzero(cases["fold"].isna().to_numpy())[0])
        raise ValueError(f"{source}: column 'fold' is empty at {_row_name(cases, bad)}")


def _check_values(cases: pd.DataFrame, columns: list[str], dice_column: str,
                  used: np.ndarray) -> pd.DataFrame:
    """Numeric, finite values (Dice in [0, 1]) in the ``used`` rows; others may be anything."""
    source = _source(cases)
    out = cases.copy()
    for column in columns:
        raw = cases[column]
        values = pd.to_numeric(raw, errors="coerce")
        bad = np.flatnonzero(used & values.isna().to_numpy() & raw.notna().to_numpy())
        if len(bad):
            raise ValueError(f"{source}: column {column!r} has non-numeric value "
                             f"{raw.iloc[bad[0]]!r} at {_row_name(cases, bad[0])}")
        values = values.to_numpy(dtype=float)
        bad = np.flatnonzero(used & ~np.isfinite(values))
        if len(bad):
            raise ValueError(f"{source}: column {column!r} has {len(bad)} missing (NaN) or "
                             f"infinite value(s), first at {_row_name(cases, bad[0])}")
        if column == dice_column:
            bad = np.flatnonzero(used & ((values < 0) | (values > 1)))
            if len(bad):
                raise ValueError(f"{source}: Dice column {column!r} has value {values[bad[0]]} "
                                 f"outside [0, 1] at {_row_name(cases, bad[0])}")
        out[column] = values
    return out


def scored_rows(cases: pd.DataFrame) -> pd.DataFrame:
    """The rows to judge a QC score on: ``split == 'test'`` when there is a split column."""
    if "split" not in cases.columns:
        return cases
    rows = cases[cases["split"].astype(str) == "test"]
    rows.attrs.update(cases.attrs)
    return rows


def add_random_score(cases: pd.DataFrame, seed: int = 0,
                     column: str = RANDOM_COLUMN) -> pd.DataFrame:
    """A copy with a seeded uniform random score: the floor a QC score must clear."""
    out = cases.copy()
    out[column] = np.random.default_rng([seed, 5]).random(len(cases))
    return out


# ---------------------------------------------------------------------------------------------
# metrics of one score


def flag_cases(scores: Sequence[float] | np.ndarray, threshold: float,
               higher_is_better: bool = True) -> np.ndarray:
    """Which cases go to review: ``s < t`` for a higher-is-better score, ``s > t`` otherwise."""
    s = np.asarray(scores, dtype=float)
    return s < threshold if higher_is_better else s > threshold


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    """scipy warns on constant input and returns NaN, which is what we report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def _curve_area(selective: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Trapezoid area under a risk-coverage curve given per kept count ``k = 1..n``.

    ``selective[..., k-1]`` is the selective risk of the ``k`` most confident cases and
    ``point[..., k-1]`` says whether the curve has a point there (``k = n`` always does). The
    curve is closed by a flat segment from the smallest point down to coverage 0, as fd-shifts
    does. Works on the last axis, so a batch of bootstrap resamples is one call.
    """
    n = selective.shape[-1]
    k = np.arange(1, n + 1)
    at = np.where(point, k, 0)
    # the kept count of the next point below k (0 = the flat end at coverage 0)
    below = np.concatenate([np.zeros(at.shape[:-1] + (1,), dtype=at.dtype),
                            np.maximum.accumulate(at, axis=-1)[..., :-1]], axis=-1)
    below_risk = np.take_along_axis(selective, np.maximum(below - 1, 0), axis=-1)
    below_risk = np.where(below > 0, below_risk, selective)
    return np.sum(np.where(point, (k - below) / n * (selective + below_risk) / 2, 0.0),
                  axis=-1)


def _selective_points(risk: np.ndarray, confidence: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk of the ``k`` most confident cases (k = 1..n) and where the curve has a
    point: only after a whole group of tied confidences, so the order of tied rows is moot."""
    order = np.argsort(-confidence, axis=-1, kind="stable")
    r = np.take_along_axis(risk, order, axis=-1)
    c = np.take_along_axis(confidence, order, axis=-1)
    selective = np.cumsum(r, axis=-1) / np.arange(1, r.shape[-1] + 1)
    point = np.ones(r.shape, dtype=bool)
    point[..., :-1] = c[..., :-1] != c[..., 1:]
    return selective, point


def _aurc(risk: np.ndarray, confidence: np.ndarray) -> np.ndarray | float:
    """AURC as fd-shifts (``RiskCoverageStats.aurc``, IML-DKFZ) computes it.

    The curve runs from full coverage downwards; cases leave least confident first, a tied
    group of confidences leaves in one step (one curve point after the whole group), and a last
    point at coverage 0 repeats the final risk. AURC is the trapezoid area over coverage [0, 1],
    not rescaled. Last axis = cases; a 2-D input gives one AURC per row.
    """
    value = _curve_area(*_selective_points(risk, confidence))
    return float(value) if np.ndim(value) == 0 else value


def _oracle_aurc(risk: np.ndarray) -> np.ndarray | float:
    """AURC of the ideal ordering (by true risk), every case its own step as fd-shifts does
    (distinct confidences), whatever ties the risks have."""
    r = np.sort(risk, axis=-1)
    selective = np.cumsum(r, axis=-1) / np.arange(1, r.shape[-1] + 1)
    value = _curve_area(selective, np.ones(r.shape, dtype=bool))
    return float(value) if np.ndim(value) == 0 else value


def _norm_aurc(aurc: np.ndarray | float, random: np.ndarray | float,
               optimal: np.ndarray | float) -> np.ndarray | float:
    """(random - AURC) / (random - optimal): 1 = the oracle's order, 0 = a random order on
    average; NaN when all risks are equal (random == optimal, nothing to order)."""
    aurc, random, optimal = (np.asarray(v, dtype=float) for v in (aurc, random, optimal))
    span = random - optimal
    undefined = np.abs(span) <= 1e-12 * np.maximum(1.0, np.abs(random))
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(undefined, math.nan, (random - aurc) / np.where(undefined, 1.0, span))
    return float(value) if value.ndim == 0 else value


def _aurc_family(risk: np.ndarray, confidence: np.ndarray
                 ) -> tuple[np.ndarray | float, np.ndarray | float, np.ndarray | float]:
    """AURC, e-AURC (minus the oracle's) and normalised AURC (random = mean risk: the expected
    AURC of a random order) over the last axis."""
    aurc = _aurc(risk, confidence)
    optimal = _oracle_aurc(risk)
    random = np.mean(risk, axis=-1)
    return aurc, aurc - optimal, _norm_aurc(aurc, random, optimal)


def _auroc(failed: np.ndarray, badness: np.ndarray) -> float:
    if failed.all() or not failed.any():
        return math.nan
    return float(roc_auc_score(failed, badness))


def _ranking_metrics(dice: np.ndarray, score: np.ndarray, spec: QCScore,
                     quality_threshold: float) -> dict[str, float]:
    """The threshold-free metrics: correlation, MAE, failure AUROC, AURC, e-AURC."""
    good = score if spec.higher_is_better else -score
    risk = 1.0 - dice
    pearson = _quiet(stats.pearsonr, score, dice)
    spearman = _quiet(stats.spearmanr, score, dice)
    aurc, eaurc, norm_aurc = _aurc_family(risk, good)
    return {
        "pearson_r": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
        "spearman_r": float(spearman.statistic),
        "mae": float(np.mean(np.abs(score - dice))) if spec.dice_scale else math.nan,
        "failure_auroc": _auroc(dice < quality_threshold, -good),
        "aurc": float(aurc), "eaurc": float(eaurc), "norm_aurc": float(norm_aurc),
    }


def _threshold_metrics(dice: np.ndarray, flagged: np.ndarray,
                       quality_threshold: float) -> dict[str, float]:
    """Confusion counts (positive = failed case) and Dice before/after removing flagged cases."""
    failed = dice < quality_threshold
    tn, fp, fn, tp = (int(v) for v in
                      confusion_matrix(failed, flagged, labels=[False, True]).ravel())
    kept = dice[~flagged]
    n = len(dice)
    return {
        "n_cases": n, "n_failed": tp + fn, "n_flagged": tp + fp, "n_true_positive": tp,
        "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
        # the authors' code unpacked sklearn's (tn, fp, fn, tp) as (tp, fp, fn, tn):
        "paper_precision": _ratio(tn, tn + fp), "paper_recall": _ratio(tn, tn + fn),
        "mean_dice_before": float(np.mean(dice)),
        "mean_dice_after": float(np.mean(kept)) if len(kept) else math.nan,
        "median_dice_before": float(np.median(dice)),
        "median_dice_after": float(np.median(kept)) if len(kept) else math.nan,
        "review_fraction": _ratio(tp + fp, n), "missed_failure_fraction": _ratio(fn, tp + fn),
    }


def _metrics(dice: np.ndarray, score: np.ndarray, flagged: np.ndarray, spec: QCScore,
             quality_threshold: float) -> dict[str, float]:
    both = {**_threshold_metrics(dice, flagged, quality_threshold),
            **_ranking_metrics(dice, score, spec, quality_threshold)}
    return {name: both[name] for name in METRIC_NAMES}


def _check_quality(quality_threshold: float) -> None:
    if not 0.0 < quality_threshold <= 1.0:
        raise ValueError(f"quality threshold must be in (0, 1], got {quality_threshold}")


def _arrays(cases: pd.DataFrame, spec: QCScore, dice_column: str,
            quality_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    _check_quality(quality_threshold)
    checked = check_cases(cases, [dice_column, spec.column], dice_column=dice_column)
    return (checked[dice_column].to_numpy(dtype=float),
            checked[spec.column].to_numpy(dtype=float))


def failure_auroc(cases: pd.DataFrame, score: str | QCScore, *,
                  higher_is_better: bool | None = None,
                  quality_threshold: float = QUALITY_THRESHOLD,
                  dice_column: str = DICE_COLUMN) -> float:
    """Failure AUROC of one score over every row of ``cases`` (positive = failed case).

    NaN, not an error, when there are fewer than two rows or only one class: a subgroup (a third
    of lesion volume, say) may hold no success at all, and then there is nothing to separate.
    """
    spec = resolve_score(score, higher_is_better, None)
    _check_quality(quality_threshold)
    if len(cases) < 2:
        return math.nan
    dice, values = _arrays(cases, spec, dice_column, quality_threshold)
    return _auroc(dice < quality_threshold, values if not spec.higher_is_better else -values)


def evaluate_score(cases: pd.DataFrame, score: str | QCScore, threshold: float, *,
                   higher_is_better: bool | None = None, dice_scale: bool | None = None,
                   quality_threshold: float = QUALITY_THRESHOLD,
                   dice_column: str = DICE_COLUMN) -> dict[str, float]:
    """All :data:`METRIC_NAMES` of one score at one threshold, over every row of ``cases``.

    ``score`` is a :class:`QCScore` or a column name; a column in :data:`QC_SCORES` takes its
    direction from there unless ``higher_is_better`` is given. ``pearson_r``/``spearman_r`` are
    of the raw score against Dice (the paper's sign), so a lower-is-better score correlates
    negatively; every other metric is direction-free.
    """
    spec = resolve_score(score, higher_is_better, dice_scale)
    if not np.isfinite(threshold):
        raise ValueError(f"score threshold must be a finite number, got {threshold}")
    dice, values = _arrays(cases, spec, dice_column, quality_threshold)
    flagged = flag_cases(values, threshold, spec.higher_is_better)
    return _metrics(dice, values, flagged, spec, quality_threshold)


# ---------------------------------------------------------------------------------------------
# curves


def risk_coverage_curve(cases: pd.DataFrame, score: str | QCScore, *,
                        higher_is_better: bool | None = None, oracle: bool = False,
                        dice_column: str = DICE_COLUMN) -> pd.DataFrame:
    """The risk-coverage curve whose trapezoid area is the AURC (fd-shifts' curve).

    Rows run from full coverage down to 0: ``coverage`` (share of cases kept), ``n_kept``,
    ``selective_risk`` (mean 1 - Dice of the kept cases). Cases leave least confident first; a
    group of tied scores leaves in one step, so the curve has a point only where the score
    changes; the last row (coverage 0) repeats the final risk. ``-np.trapezoid(selective_risk,
    coverage)`` is :func:`evaluate_score`'s ``aurc``. ``oracle=True``: the curve of the ideal
    ordering (by true Dice, one case per step), whose area is ``aurc - eaurc``.
    """
    spec = resolve_score(score, higher_is_better, None)
    dice, values = _arrays(cases, spec, dice_column, QUALITY_THRESHOLD)
    risk = 1.0 - dice
    if oracle:
        risk = np.sort(risk)
        selective = np.cumsum(risk) / np.arange(1, len(risk) + 1)
        point = np.ones(len(risk), dtype=bool)
    else:
        selective, point = _selective_points(risk, values if spec.higher_is_better else -values)
    n_kept = np.flatnonzero(point)[::-1] + 1
    return pd.DataFrame({"coverage": np.append(n_kept / len(risk), 0.0),
                         "n_kept": np.append(n_kept, 0),
                         "selective_risk": np.append(selective[n_kept - 1],
                                                     selective[n_kept[-1] - 1])})


def failure_roc_curve(cases: pd.DataFrame, score: str | QCScore, *,
                      higher_is_better: bool | None = None,
                      quality_threshold: float = QUALITY_THRESHOLD,
                      dice_column: str = DICE_COLUMN) -> pd.DataFrame:
    """ROC of detecting failed cases (scikit-learn's points): false/true positive rate and the
    score threshold, in the score's units, at or beyond which a case counts as flagged.
    Empty when the cases hold only one class."""
    spec = resolve_score(score, higher_is_better, None)
    dice, values = _arrays(cases, spec, dice_column, quality_threshold)
    failed = dice < quality_threshold
    if failed.all() or not failed.any():
        return pd.DataFrame(columns=["fpr", "tpr", "score_threshold"], dtype=float)
    badness = -values if spec.higher_is_better else values
    fpr, tpr, thr = roc_curve(failed, badness, drop_intermediate=False)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr,
                         "score_threshold": -thr if spec.higher_is_better else thr})


def _candidate_counts(dice: np.ndarray, good: np.ndarray, quality_threshold: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct decision: thresholds (in higher-is-better units, ascending) from "flag
    none" through the midpoints between distinct scores to "flag all", with the number of
    flagged cases and of flagged failures at each."""
    u = np.unique(good)
    cand = np.concatenate([[u[0]], u[:-1] + (u[1:] - u[:-1]) / 2,
                           [np.nextafter(u[-1], np.inf)]])
    order = np.argsort(good, kind="stable")
    k = np.searchsorted(good[order], cand, side="left")  # cases with score < candidate
    cum_failed = np.concatenate([[0], np.cumsum(dice[order] < quality_threshold)])
    return cand, k, cum_failed[k]


def workload_curve(cases: pd.DataFrame, score: str | QCScore, *,
                   higher_is_better: bool | None = None,
                   quality_threshold: float = QUALITY_THRESHOLD,
                   dice_column: str = DICE_COLUMN) -> pd.DataFrame:
    """Review burden against failures missed, for every distinct threshold (flag none .. all).

    One row per decision: ``threshold`` (score units), ``review_fraction`` (cases sent to
    review), ``missed_failure_fraction`` (failures kept; NaN if there are none).
    """
    spec = resolve_score(score, higher_is_better, None)
    dice, values = _arrays(cases, spec, dice_column, quality_threshold)
    good = values if spec.higher_is_better else -values
    cand, k, tp = _candidate_counts(dice, good, quality_threshold)
    n_failed = int(np.sum(dice < quality_threshold))
    missed = (n_failed - tp) / n_failed if n_failed else np.full(len(k), math.nan)
    return pd.DataFrame({"threshold": cand if spec.higher_is_better else -cand,
                         "n_flagged": k, "review_fraction": k / len(dice),
                         "missed_failure_fraction": missed})


# ---------------------------------------------------------------------------------------------
# threshold selection


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``f1``, ``youden`` or ``recall:R`` (0 < R <= 1) -> (name, R or None)."""
    text = str(rule).strip().lower()
    if text in ("f1", "youden"):
        return text, None
    match = re.fullmatch(r"recall:([0-9]*\.?[0-9]+)", text)
    if match and 0.0 < float(match.group(1)) <= 1.0:
        return "recall", float(match.group(1))
    raise ValueError(f"bad threshold selection rule {rule!r}: use f1, youden or recall:R "
                     "with 0 < R <= 1 (e.g. recall:0.9)")


def select_threshold(cases: pd.DataFrame, score: str | QCScore, rule: str, *,
                     higher_is_better: bool | None = None,
                     quality_threshold: float = QUALITY_THRESHOLD,
                     dice_column: str = DICE_COLUMN) -> float:
    """Choose a score threshold on these rows (pass validation rows only).

    Candidates are every distinct decision: below the lowest score (flag none), midway between
    neighbouring distinct scores, just above the highest (flag all). Rules, positive = failed:

    - ``f1``: the largest F1; ``youden``: the largest TPR - FPR;
    - ``recall:R``: the smallest review burden whose recall is >= R.

    Ties go to the candidate that flags the fewest cases. With no failed case among the rows
    nothing is worth reviewing, so every rule flags none; with only failed cases it flags all.
    """
    spec = resolve_score(score, higher_is_better, None)
    if spec.reads_annotation:
        raise ValueError(f"{spec.label}: reads the annotation, so it is a reference line only; "
                         "a threshold on it would flag cases no QC method could see")
    name, target = parse_rule(rule)
    dice, values = _arrays(cases, spec, dice_column, quality_threshold)
    good = values if spec.higher_is_better else -values
    cand, k, tp = _candidate_counts(dice, good, quality_threshold)
    n = len(dice)
    n_failed = int(np.sum(dice < quality_threshold))
    if n_failed == 0:
        pick = 0
    elif n_failed == n:
        pick = len(cand) - 1
    elif name == "f1":
        fp, fn = k - tp, n_failed - tp
        pick = int(np.argmax(2 * tp / (2 * tp + fp + fn)))
    elif name == "youden":
        pick = int(np.argmax(tp / n_failed - (k - tp) / (n - n_failed)))
    else:
        pick = int(np.flatnonzero(tp >= target * n_failed - 1e-9)[0])
    return float(cand[pick] if spec.higher_is_better else -cand[pick])


# ---------------------------------------------------------------------------------------------
# folds


@dataclass
class FoldEvaluation:
    """One score evaluated per fold on its test rows (or all rows when there is no split).

    ``per_fold``: one row per fold, ``threshold`` then :data:`METRIC_NAMES`. ``pooled``: the
    metrics over all evaluated rows of all folds, each fold flagged with its own threshold.
    ``tuned_on``: ``"val"`` (chosen on validation rows), ``"test"`` (the optimistic,
    leaky variant of :func:`evaluate_folds_tuned_on_test`) or ``None`` (a fixed threshold).
    """

    score: QCScore
    quality_threshold: float
    dice_column: str
    per_fold: pd.DataFrame
    pooled: dict[str, float]
    rule: str | None = None
    tuned_on: str | None = None
    has_folds: bool = True
    evaluated_rows: str = "test"
    thresholds: dict[Any, float] = field(default_factory=dict)

    def across_folds(self) -> pd.DataFrame:
        """Mean and median over folds (the paper's Table 1 form), and how many folds each
        metric is defined in: folds where a metric is NaN are left out, not counted as 0."""
        metrics = self.per_fold[list(METRIC_NAMES)].astype(float)
        return pd.DataFrame({"mean": metrics.mean(), "median": metrics.median(),
                             "n_folds_defined": metrics.notna().sum()}).T

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready report (NaN -> None): pooled metrics at the top level."""
        out: dict[str, Any] = {
            "score": self.score.column, "higher_is_better": self.score.higher_is_better,
            "dice_scale": self.score.dice_scale, "quality_threshold": self.quality_threshold,
            "dice_column": self.dice_column, "evaluated_rows": self.evaluated_rows,
            **self.pooled,
        }
        if self.rule is None:
            out["threshold"] = next(iter(self.thresholds.values()))
        else:
            label = "val" if self.tuned_on == "val" else "test (optimistic: tuned on test)"
            out["threshold_selection"] = {
                "rule": self.rule, "tuned_on": label,
                "thresholds": [{"fold": fold, "threshold": t}
                               for fold, t in self.thresholds.items()]}
        if self.has_folds:
            out["per_fold"] = [{"fold": fold, **row} for fold, row in
                               self.per_fold.to_dict(orient="index").items()]
            out["across_folds"] = self.across_folds().to_dict(orient="index")
        return to_jsonable(out)


def _evaluate_folds(cases: pd.DataFrame, spec: QCScore, threshold: float | None,
                    rule: str | None, tune_split: str, quality_threshold: float,
                    dice_column: str) -> FoldEvaluation:
    if (threshold is None) == (rule is None):
        raise ValueError("give exactly one of a score threshold and a selection rule")
    if rule is not None:
        parse_rule(rule)
    elif not np.isfinite(threshold):
        raise ValueError(f"score threshold must be a finite number, got {threshold}")
    _check_quality(quality_threshold)
    source = _source(cases)
    _check_structure(cases, [dice_column, spec.column])
    has_split, has_folds = "split" in cases.columns, "fold" in cases.columns
    if rule is not None and not has_split:
        raise ValueError(f"{source}: choosing a threshold needs a 'split' column with val and "
                         "test rows")
    split = cases["split"].astype(str).to_numpy() if has_split else None
    if has_split:
        used = np.isin(split, ["test", tune_split] if rule is not None else ["test"])
        if not np.any(split == "test"):
            raise ValueError(f"{source}: no test rows (split has {sorted(set(split))})")
    else:
        used = np.ones(len(cases), dtype=bool)
    checked = _check_values(cases, [dice_column, spec.column], dice_column, used)
    checked = checked[used]
    checked.attrs.update(cases.attrs)
    folds = sorted(checked["fold"].unique()) if has_folds else ["all"]
    per_fold, thresholds, flagged_parts, applied_parts = {}, {}, [], []
    for fold in folds:
        part = checked[checked["fold"] == fold] if has_folds else checked
        fold = fold.item() if isinstance(fold, np.generic) else fold
        applied = part[part["split"].astype(str) == "test"] if has_split else part
        name = f"fold {fold}" if has_folds else "the table"
        if not len(applied):
            raise ValueError(f"{source}: {name} has no test rows")
        if rule is not None:
            tune = part[part["split"].astype(str) == tune_split]
            if len(tune) < 2:
                raise ValueError(f"{source}: {name} has {len(tune)} {tune_split} row(s); "
                                 "choosing a threshold needs at least 2")
            t = select_threshold(tune, spec, rule, quality_threshold=quality_threshold,
                                 dice_column=dice_column)
        else:
            t = float(threshold)
        dice = applied[dice_column].to_numpy(dtype=float)
        values = applied[spec.column].to_numpy(dtype=float)
        flagged = flag_cases(values, t, spec.higher_is_better)
        thresholds[fold] = t
        per_fold[fold] = {"threshold": t,
                          **_metrics_or_one(dice, values, flagged, spec, quality_threshold)}
        flagged_parts.append(flagged)
        applied_parts.append(applied)
    pooled_rows = pd.concat(applied_parts)
    pooled = _metrics_or_one(pooled_rows[dice_column].to_numpy(dtype=float),
                             pooled_rows[spec.column].to_numpy(dtype=float),
                             np.concatenate(flagged_parts), spec, quality_threshold)
    table = pd.DataFrame.from_dict(per_fold, orient="index")
    table.index.name = "fold"
    return FoldEvaluation(spec, quality_threshold, dice_column, table, pooled, rule,
                          tune_split if rule is not None else None, has_folds,
                          "test" if has_split else "all", thresholds)


def _metrics_or_one(dice: np.ndarray, values: np.ndarray, flagged: np.ndarray, spec: QCScore,
                    quality_threshold: float) -> dict[str, float]:
    """Per-fold metrics; a fold with a single test case has no ranking metrics (NaN)."""
    if len(dice) > 1:
        return _metrics(dice, values, flagged, spec, quality_threshold)
    out = dict.fromkeys(METRIC_NAMES, math.nan)
    out.update(_threshold_metrics(dice, flagged, quality_threshold))
    if spec.dice_scale:
        out["mae"] = float(np.mean(np.abs(values - dice)))
    return out


def evaluate_folds(cases: pd.DataFrame, score: str | QCScore, *,
                   threshold: float | None = None, select: str | None = None,
                   higher_is_better: bool | None = None, dice_scale: bool | None = None,
                   quality_threshold: float = QUALITY_THRESHOLD,
                   dice_column: str = DICE_COLUMN) -> FoldEvaluation:
    """Evaluate a score per fold with a fixed ``threshold`` or one chosen by rule ``select``.

    With a ``split`` column the metrics are computed on each fold's test rows; ``select``
    (see :func:`select_threshold`) then picks each fold's threshold on that fold's ``val`` rows
    only, so nothing about the test rows reaches the choice. Without a ``fold`` column the
    table is one fold. Only the rows used are checked: train rows may lack scores.
    """
    spec = resolve_score(score, higher_is_better, dice_scale)
    return _evaluate_folds(cases, spec, threshold, select, "val", quality_threshold,
                           dice_column)


def evaluate_folds_tuned_on_test(cases: pd.DataFrame, score: str | QCScore, select: str, *,
                                 higher_is_better: bool | None = None,
                                 dice_scale: bool | None = None,
                                 quality_threshold: float = QUALITY_THRESHOLD,
                                 dice_column: str = DICE_COLUMN) -> FoldEvaluation:
    """OPTIMISTIC, LEAKY: the threshold chosen on the very test rows it is scored on.

    This is what the authors did by eye; shown only next to :func:`evaluate_folds` to measure
    how much such tuning flatters a QC method. Never report it as a result.
    """
    spec = resolve_score(score, higher_is_better, dice_scale)
    return _evaluate_folds(cases, spec, None, select, "test", quality_threshold, dice_column)


def table1(evaluations: Sequence[FoldEvaluation], metrics: Sequence[str] = TABLE1_METRICS,
           labels: Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's Table 1 form for our results: metrics down, (score label, mean/median)
    across. Compare with :func:`paper_table1`. Columns are the scores' labels unless ``labels``
    are given; a threshold tuned on test is marked so in its label."""
    if labels is None:
        labels = [ev.score.label + (" (tuned on test: optimistic)" if ev.tuned_on == "test"
                                    else "") for ev in evaluations]
    if len(set(labels)) != len(labels) or len(labels) != len(evaluations):
        raise ValueError(f"table1 needs one distinct label per evaluation, got {list(labels)}")
    columns = {}
    for label, ev in zip(labels, evaluations, strict=True):
        summary = ev.across_folds()
        for stat in ("mean", "median"):
            columns[(label, stat)] = summary.loc[stat, list(metrics)]
    frame = pd.DataFrame(columns)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["score", "across folds"])
    return frame


def paper_table1() -> pd.DataFrame:
    """:data:`PAPER_TABLE1` (the paper's numbers, not ours) in :func:`table1`'s shape."""
    columns = {}
    for name, values in PAPER_TABLE1.items():
        label = qc_score(name).label
        for i, stat in enumerate(("mean", "median")):
            columns[(label, stat)] = pd.Series({m: v[i] for m, v in values.items()})
    frame = pd.DataFrame(columns)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["score", "across folds"])
    return frame


# ---------------------------------------------------------------------------------------------
# uncertainty of the estimates, sensitivity


def bootstrap_intervals(cases: pd.DataFrame, score: str | QCScore, *, n_boot: int = 1000,
                        seed: int = 0, level: float = 0.95,
                        higher_is_better: bool | None = None,
                        quality_threshold: float = QUALITY_THRESHOLD,
                        dice_column: str = DICE_COLUMN) -> pd.DataFrame:
    """Percentile bootstrap intervals over cases for :data:`BOOTSTRAP_METRICS`.

    Cases are resampled with replacement ``n_boot`` times (seeded). Resamples where a metric is
    undefined (one class for AUROC, constant input for r) are left out; ``n_valid`` says how
    many remained. Rows: :data:`BOOTSTRAP_METRICS`; columns: estimate, low, high, n_valid.
    """
    spec = resolve_score(score, higher_is_better, None)
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    dice, values = _arrays(cases, spec, dice_column, quality_threshold)
    point = _ranking_metrics(dice, values, spec, quality_threshold)
    rng = np.random.default_rng([seed, 11])
    idx = rng.integers(0, len(dice), (n_boot, len(dice)))
    samples = _resampled_metrics(dice, values, spec.higher_is_better, quality_threshold, idx)
    alpha = (1.0 - level) / 2
    rows = {}
    for j, name in enumerate(BOOTSTRAP_METRICS):
        valid = samples[:, j][np.isfinite(samples[:, j])]
        low, high = (np.quantile(valid, [alpha, 1 - alpha]) if len(valid)
                     else (math.nan, math.nan))
        rows[name] = {"estimate": point[name], "low": float(low), "high": float(high),
                      "n_valid": len(valid)}
    return pd.DataFrame.from_dict(rows, orient="index")


def _resampled_metrics(dice: np.ndarray, score: np.ndarray, higher_is_better: bool,
                       quality_threshold: float, idx: np.ndarray) -> np.ndarray:
    """:data:`BOOTSTRAP_METRICS` of each resample (one row of ``idx`` each), in that order.

    Vectorised equivalents of scikit-learn's AUROC (the Mann-Whitney form, ties counted
    half) and scipy's Pearson r, so a thousand resamples take well under a second; NaN where
    a metric is undefined."""
    d, s = dice[idx], score[idx]
    good = s if higher_is_better else -s
    failed = d < quality_threshold
    n_pos = failed.sum(axis=1)
    n_neg = failed.shape[1] - n_pos
    ranks = stats.rankdata(-good, axis=1)  # rank of badness, ties averaged
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = ((np.where(failed, ranks, 0.0).sum(axis=1) - n_pos * (n_pos + 1) / 2)
                 / (n_pos * n_neg))
        sc = s - s.mean(axis=1, keepdims=True)
        dc = d - d.mean(axis=1, keepdims=True)
        r = (sc * dc).sum(axis=1) / np.sqrt((sc**2).sum(axis=1) * (dc**2).sum(axis=1))
    auroc[(n_pos == 0) | (n_neg == 0)] = math.nan
    r[(np.ptp(s, axis=1) == 0) | (np.ptp(d, axis=1) == 0)] = math.nan  # scipy: constant input
    aurc, eaurc, norm_aurc = _aurc_family(1.0 - d, good)
    return np.column_stack([auroc, aurc, eaurc, norm_aurc, np.clip(r, -1.0, 1.0)])


#: The metrics :func:`paired_bootstrap_delta` compares by default, and which sign means
#: "better".
DELTA_METRICS = {"failure_auroc": "higher", "aurc": "lower"}
#: Every ranking metric a paired delta can be taken of, with the direction that is better.
METRIC_DIRECTION = {**DELTA_METRICS, "eaurc": "lower", "norm_aurc": "higher"}


def paired_bootstrap_delta(cases: pd.DataFrame, score: str | QCScore,
                           against: str | QCScore, *, n_boot: int = 1000, seed: int = 0,
                           level: float = 0.95, quality_threshold: float = QUALITY_THRESHOLD,
                           dice_column: str = DICE_COLUMN,
                           metrics: Sequence[str] = tuple(DELTA_METRICS)) -> pd.DataFrame:
    """Does ``score`` rank the cases better than ``against``? Paired, stratified bootstrap.

    Each resample draws the same cases for both scores, so what the two share (which cases are
    hard) cancels in the difference and the interval is the difference's own. Resampling is
    stratified by failure: failed and successful cases are drawn separately, each as many as
    observed, so every resample has the observed prevalence, AUROC is always defined, and the
    interval does not mix in a prevalence the cohort did not have. Seeded: the same ``seed``
    draws the same resamples for every score compared against the same reference.

    Rows: ``metrics`` (default :data:`DELTA_METRICS`; any of :data:`METRIC_DIRECTION`.
    Failure AUROC: higher is better, so a positive delta favours ``score``; AURC: lower is
    better, so a negative delta does). Columns: ``score``,
    ``against``, ``delta`` (score minus against, on all rows), percentile interval ``low`` and
    ``high``, ``n_valid`` resamples. Since the oracle's AURC is the same for both scores in a
    resample, the AURC delta is also the e-AURC delta.
    """
    spec, other = resolve_score(score), resolve_score(against)
    unknown = [m for m in metrics if m not in METRIC_DIRECTION]
    if unknown:
        raise ValueError(f"no paired delta for {unknown}: choose from {list(METRIC_DIRECTION)}")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    _check_quality(quality_threshold)
    checked = check_cases(cases, [dice_column, spec.column, other.column],
                          dice_column=dice_column)
    dice = checked[dice_column].to_numpy(dtype=float)
    failed = np.flatnonzero(dice < quality_threshold)
    passed = np.flatnonzero(dice >= quality_threshold)
    rng = np.random.default_rng([seed, 17])
    idx = np.concatenate([part[rng.integers(0, len(part), (n_boot, len(part)))]
                          for part in (failed, passed) if len(part)], axis=1)
    # row 0: all cases once (the point estimate); then the resamples, shared by both scores
    rows_drawn = np.concatenate([np.arange(len(dice))[None, :], idx])
    score_metrics, other_metrics = (
        _resampled_metrics(dice, checked[which.column].to_numpy(dtype=float),
                           which.higher_is_better, quality_threshold, rows_drawn)
        for which in (spec, other))
    diff = score_metrics - other_metrics
    alpha = (1.0 - level) / 2
    rows = {}
    for name in metrics:
        j = BOOTSTRAP_METRICS.index(name)
        point, samples = diff[0, j], diff[1:, j]
        valid = samples[np.isfinite(samples)]
        low, high = (np.quantile(valid, [alpha, 1 - alpha]) if len(valid)
                     else (math.nan, math.nan))
        rows[name] = {"score": spec.label, "against": other.label, "delta": float(point),
                      "low": float(low), "high": float(high), "n_valid": len(valid)}
    return pd.DataFrame.from_dict(rows, orient="index")


def resampled_metric(cases: pd.DataFrame, score: str | QCScore, rows: np.ndarray, *,
                     metric: str = "aurc", quality_threshold: float = QUALITY_THRESHOLD,
                     dice_column: str = DICE_COLUMN) -> np.ndarray:
    """One of :data:`BOOTSTRAP_METRICS` on each resample of ``cases``: ``rows`` is an
    ``(n_resamples, n)`` array of row positions. Callers that draw ``rows`` once and pass
    them for every score compare the scores on the same resamples (paired)."""
    spec = resolve_score(score)
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose from {BOOTSTRAP_METRICS}")
    dice = cases[dice_column].to_numpy(dtype=float)
    values = cases[spec.column].to_numpy(dtype=float)
    return _resampled_metrics(dice, values, spec.higher_is_better, quality_threshold,
                              np.asarray(rows))[:, BOOTSTRAP_METRICS.index(metric)]


#: What a flag promises, in :func:`operating_point`: positive = failed case.
OPERATING_METRICS = ("recall", "specificity", "review_fraction", "precision", "prevalence")


def operating_counts(failed: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    """:data:`OPERATING_METRICS` of one set of flags, positive = failed (NaN where a ratio
    has no cases): the study's operating point and triage's realised one use this."""
    tp = float(np.sum(failed & flagged))
    n_failed, n_flagged, n = float(failed.sum()), float(flagged.sum()), len(failed)
    return {"recall": _ratio(tp, n_failed),
            "specificity": _ratio(float(np.sum(~failed & ~flagged)), n - n_failed),
            "review_fraction": _ratio(n_flagged, n), "precision": _ratio(tp, n_flagged),
            "prevalence": _ratio(n_failed, n)}


def operating_point(cases: pd.DataFrame, score: str | QCScore, rule: str, *,
                    n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                    rechoose: bool = True, quality_threshold: float = QUALITY_THRESHOLD,
                    dice_column: str = DICE_COLUMN) -> dict[str, Any]:
    """What the flags of a validation-chosen threshold achieve on the test rows of all folds
    pooled, with percentile bootstrap intervals that carry the threshold's own uncertainty.

    Each fold's threshold is chosen by ``rule`` on that fold's validation rows and applied to
    its test rows (:func:`evaluate_folds`). In each resample, every fold's validation rows and
    test rows are drawn again with replacement (each as many as observed) and, with
    ``rechoose`` (the default), the threshold is chosen again on the resampled validation
    rows: a threshold picked on about 16 cases varies, and the interval of a promise made with
    it must show that. ``rechoose=False`` keeps the thresholds fixed (the narrower interval
    that leaves this variance out). Returns, for :data:`OPERATING_METRICS` (recall,
    specificity, review fraction, precision and the failure prevalence it depends on), the
    estimate, low, high and the resamples where it was defined; plus the case counts and each
    fold's threshold.
    """
    spec = resolve_score(score)
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    point = _evaluate_folds(cases, spec, None, rule, "val", quality_threshold, dice_column)
    split = cases["split"].astype(str)
    parts = []
    for fold in sorted(point.thresholds):
        in_fold = cases["fold"] == fold
        val, test = cases[in_fold & (split == "val")], cases[in_fold & (split == "test")]
        parts.append((val, test[dice_column].to_numpy(float) < quality_threshold,
                      test[spec.column].to_numpy(float), point.thresholds[fold]))
    failed = np.concatenate([p[1] for p in parts])
    flagged = np.concatenate([flag_cases(p[2], p[3], spec.higher_is_better) for p in parts])
    estimate = operating_counts(failed, flagged)
    rng = np.random.default_rng([seed, 23])
    samples = {m: np.empty(n_boot) for m in OPERATING_METRICS}
    for b in range(n_boot):
        fails, flags = [], []
        for val, test_failed, test_values, threshold in parts:
            if rechoose:
                drawn = val.iloc[rng.integers(0, len(val), len(val))]
                threshold = select_threshold(drawn, spec, rule,
                                             quality_threshold=quality_threshold,
                                             dice_column=dice_column)
            pick = rng.integers(0, len(test_failed), len(test_failed))
            fails.append(test_failed[pick])
            flags.append(flag_cases(test_values[pick], threshold, spec.higher_is_better))
        for name, value in operating_counts(np.concatenate(fails),
                                             np.concatenate(flags)).items():
            samples[name][b] = value
    alpha = (1.0 - level) / 2
    out: dict[str, Any] = {}
    for name in OPERATING_METRICS:
        valid = samples[name][np.isfinite(samples[name])]
        low, high = (np.quantile(valid, [alpha, 1 - alpha]) if len(valid)
                     else (math.nan, math.nan))
        out[name] = {"estimate": float(estimate[name]), "low": float(low),
                     "high": float(high), "n_valid": len(valid)}
    out.update(n_cases=len(failed), n_failed=int(failed.sum()), n_flagged=int(flagged.sum()),
               thresholds={int(k) if isinstance(k, (int, np.integer)) else k: float(v)
                           for k, v in point.thresholds.items()},
               rule=rule, rechosen_in_resamples=bool(rechoose), n_boot=int(n_boot),
               level=level)
    return out


def quality_threshold_sensitivity(cases: pd.DataFrame, score: str | QCScore, *,
                                  threshold: float | None = None, select: str | None = None,
                                  quality_thresholds: Sequence[float] = QUALITY_SWEEP,
                                  higher_is_better: bool | None = None,
                                  dice_scale: bool | None = None,
                                  dice_column: str = DICE_COLUMN) -> pd.DataFrame:
    """Pooled metrics (see :class:`FoldEvaluation`) for each quality threshold; a ``select``
    rule re-chooses the thresholds on validation rows for every failure definition. For the
    Dice definition, call again with ``dice_column='true_dice_paper'``."""
    spec = resolve_score(score, higher_is_better, dice_scale)
    rows = {}
    for q in quality_thresholds:
        ev = _evaluate_folds(cases, spec, threshold, select, "val", float(q), dice_column)
        rows[float(q)] = ev.pooled
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "quality_threshold"
    return frame


def to_jsonable(value: Any) -> Any:
    """Plain Python for ``json.dumps(allow_nan=False)``: NaN -> None, numpy -> built-ins."""
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, int | str) else k: to_jsonable(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
