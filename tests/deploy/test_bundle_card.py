"""The model card's promise: the evaluation's own figures, intervals that carry the thresholds'
variance, prevalence beside precision, feature ranges a feature can take, and the deployed
rule's measurement stored in a verified bundle."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wmhqc_lib.deploy import bundle as bundle_mod

ROOT = Path(__file__).resolve().parents[2]


def test_card_promise_is_the_evaluations_pooled_operating_point(smoke_run, smoke_bundle):
    from wmhqc_lib.qc import evaluation as ev
    from wmhqc_lib.study import report

    _, results = smoke_run
    b = smoke_bundle
    cases = report.load_all_cases(results, b.folds)
    q, rule = b.info["quality_threshold"], b.info["threshold_rule"]
    pooled = ev.evaluate_folds(cases, b.score, select=rule, quality_threshold=q).pooled
    op = b.card["test_operating_point"]
    for name in ("recall", "precision", "review_fraction"):
        expected = pooled[name]
        got = op[name]["estimate"]  # the card writes an undefined estimate as null (JSON)
        if np.isnan(expected):
            assert got is None or np.isnan(got), name
        else:
            assert got == pytest.approx(expected), name
    test = cases[cases["split"] == "test"]
    assert op["prevalence"]["estimate"] == pytest.approx((test["true_dice"] < q).mean())
    assert op["rechosen_in_resamples"] is True
    assert b.card["test_operating_point_fixed_thresholds"]["rechosen_in_resamples"] is False
    assert b.card["promise"] == ["recall", "specificity", "review_fraction"]
    shares = [row["share"] for row in b.card["choice_stability"]]
    assert sum(shares) == pytest.approx(1.0)
    text = (b.root / bundle_mod.CARD_MD).read_text()
    for words in ("failure prevalence", "specificity", "chosen again in every resample",
                  "holds only at this prevalence", "bootstrap resamples of the"):
        assert words in text


def test_feature_ranges_stop_where_a_feature_stops(tmp_path):
    from wmhqc_lib.data import cohort, preprocess

    cache = cohort.CohortPaths.under(tmp_path).cache
    values = {"voxel_max_mm": [1.85, 3.0, 7.5], "flair_bright_fraction": [0.0, 0.002, 0.0039],
              "flair_t1_correlation": [0.3, 0.95, 0.99], "brain_fill": [0.39, 0.42, 0.47]}
    for i in range(3):
        features = {name: 0.5 + 0.1 * i for name in preprocess.IMAGE_FEATURES}
        features.update({name: v[i] for name, v in values.items()})
        folder = preprocess.case_dir(cache, f"s{i}")
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"image_features": features}))
    ranges = bundle_mod._feature_ranges(tmp_path, ["s0", "s1", "s2"])
    # a plain widening by half the range would give -0.97 mm, -0.002 and 1.33
    assert ranges["voxel_max_mm"]["low"] == 0.0
    assert ranges["voxel_max_mm"]["high"] == pytest.approx(7.5 + 0.5 * (7.5 - 1.85))
    assert ranges["flair_bright_fraction"]["low"] == 0.0
    assert ranges["flair_t1_correlation"]["high"] == 1.0
    assert ranges["brain_fill"]["low"] == pytest.approx(0.39 - 0.1 * 0.47)  # inside: kept
    for r in ranges.values():
        assert r["low"] <= r["min"] <= r["max"] <= r["high"]


def _measured() -> dict:
    def share(k, n):
        return {"estimate": k / n, "low": k / n - 0.1, "high": min(1.0, k / n + 0.1), "k": k,
                "n": n}

    return {"n_scans": 200, "n_failed": 40, "n_flagged": 50, "recall": share(36, 40),
            "specificity": share(146, 160), "review_fraction": share(50, 200),
            "precision": share(36, 50), "prevalence": share(40, 200), "seeds": [1, 2]}


def test_deployed_check_is_stored_listed_and_shown(smoke_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(smoke_bundle.root, copy)
    card_before = (copy / bundle_mod.CARD).read_bytes()
    bundle_mod.add_deployed_check(copy, _measured())
    loaded = bundle_mod.load_bundle(copy)  # every checksum still holds
    assert loaded.card["deployed_check"]["recall"]["estimate"] == pytest.approx(0.9)
    assert (copy / bundle_mod.CARD).read_bytes() == card_before  # the study's card as exported
    text = (copy / bundle_mod.CARD_MD).read_text()
    assert "The deployed rule on new scans" in text and "0.90" in text
    manifest = json.loads((copy / bundle_mod.MANIFEST).read_text())
    assert bundle_mod.DEPLOYED_CHECK in manifest["files"]
    (copy / bundle_mod.DEPLOYED_CHECK).write_text("{}")
    with pytest.raises(bundle_mod.BundleError, match="checksum mismatch"):
        bundle_mod.load_bundle(copy)
    incomplete = {k: v for k, v in _measured().items() if k != "specificity"}
    with pytest.raises(bundle_mod.BundleError, match="specificity"):
        bundle_mod.add_deployed_check(smoke_bundle.root, incomplete)


def _benchmark():
    spec = importlib.util.spec_from_file_location("deployed_rule",
                                                  ROOT / "benchmarks" / "deployed_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deployed_rule_benchmark_counts_and_intervals():
    bench = _benchmark()
    low, high = bench.wilson(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook value
    assert bench.wilson(0, 10)[0] == 0.0 and bench.wilson(10, 10)[1] == 1.0
    scored = pd.DataFrame({"flagged": [True, True, False, False, True],
                           "failed": [True, False, True, False, False]})
    m = bench.measure(scored)
    assert m["recall"]["estimate"] == 0.5 and m["recall"]["n"] == 2
    assert m["specificity"]["estimate"] == pytest.approx(1 / 3)
    assert m["precision"]["estimate"] == pytest.approx(1 / 3)
    assert m["review_fraction"]["estimate"] == 0.6 and m["prevalence"]["estimate"] == 0.4
    for name in ("recall", "specificity", "precision"):
        assert m[name]["low"] <= m[name]["estimate"] <= m[name]["high"]
    # scans in error go to a person: counted as reviewed, in no other figure
    e = bench.measure(scored, n_error=5)
    assert e["n_scans"] == 10 and e["n_error"] == 5 and e["n_scored"] == 5
    assert e["review_fraction"]["estimate"] == 0.8 and e["recall"] == m["recall"]
