"""The recall guarantee: its counts, its threshold's direction, and its coverage by
simulation from a known population."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wmhqc_lib.qc import guarantee as g
from wmhqc_lib.qc.evaluation import flag_cases


def test_failures_needed_is_the_smallest_n_with_a_guarantee():
    for target, conf in [(0.9, 0.9), (0.8, 0.95), (0.95, 0.9), (0.5, 0.5)]:
        n = g.failures_needed(target, conf)
        assert target ** n <= 1 - conf < target ** (n - 1)
        assert g.allowed_misses(n, target, conf) == 0
        assert g.allowed_misses(n - 1, target, conf) is None
    assert g.failures_needed(0.9, 0.9) == 22  # 0.9**22 = 0.098, 0.9**21 = 0.109


def test_allowed_misses_grows_with_failures_and_shrinks_with_confidence():
    assert g.allowed_misses(100, 0.9, 0.9) > g.allowed_misses(50, 0.9, 0.9)
    assert g.allowed_misses(100, 0.9, 0.99) < g.allowed_misses(100, 0.9, 0.9)
    assert g.allowed_misses(0, 0.9, 0.9) is None


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_threshold_flags_all_but_the_allowed_misses(higher_is_better):
    rng = np.random.default_rng(0)
    failed = np.r_[np.ones(60, bool), np.zeros(140, bool)]
    good = np.r_[rng.normal(0.3, 0.1, 60), rng.normal(0.7, 0.1, 140)]
    scores = good if higher_is_better else -good
    res = g.guaranteed_threshold(scores, failed, 0.9, 0.9, higher_is_better)
    flags = flag_cases(scores, res.threshold, higher_is_better)
    assert res.feasible and res.allowed_misses == g.allowed_misses(60, 0.9, 0.9)
    assert int((failed & ~flags).sum()) == res.allowed_misses
    assert res.review_fraction == pytest.approx(flags.mean())


def test_too_few_failures_gives_no_threshold_and_says_how_many_are_needed():
    res = g.guaranteed_threshold(np.linspace(0, 1, 30), np.arange(30) < 5, 0.9, 0.9)
    assert not res.feasible and res.threshold is None and res.n_failures == 5
    assert "22" in res.statement() and "5" in res.statement()


def test_ties_are_flagged_together():
    scores = np.array([0.2, 0.2, 0.2, 0.5, 0.5, 0.9])
    failed = np.array([True, True, True, False, False, False])
    res = g.guaranteed_threshold(scores, failed, 0.5, 0.8)
    assert flag_cases(scores, res.threshold)[:3].all()


def test_coverage_holds_in_simulation():
    """Draw calibration sets from a known population: the population recall of the chosen
    threshold reaches the target in at least the promised share of draws (within Monte Carlo
    error), and not trivially (the share stays below 1)."""
    rng = np.random.default_rng(1)
    target, conf, n_fail, draws = 0.85, 0.8, 40, 2000
    met = 0
    for _ in range(draws):
        fails = rng.normal(0.0, 1.0, n_fail)  # failures' scores, higher = better
        res = g.guaranteed_threshold(fails, np.ones(n_fail, bool), target, conf)
        recall = 0.5 * (1 + math.erf(res.threshold / math.sqrt(2)))  # P(N(0,1) < t)
        met += recall >= target
    share = met / draws
    assert conf - 3 * math.sqrt(conf * (1 - conf) / draws) <= share < 0.99


def test_lower_bound_is_clopper_pearson():
    assert g.recall_lower_bound(10, 10, 0.9) == pytest.approx(0.1 ** 0.1)
    assert g.recall_lower_bound(0, 10, 0.9) == 0.0
    assert math.isnan(g.recall_lower_bound(0, 0, 0.9))
