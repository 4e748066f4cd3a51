"""Per-case results on disk: computed once, read back, recomputed when what they depend on
changes or when a case was interrupted before its row was written."""

from __future__ import annotations

import numpy as np

from wmhqc_lib.qc.case_cache import cached_case_rows


def test_cases_are_computed_once_and_recomputed_when_their_stamp_changes(tmp_path):
    calls = []

    def compute(case, map_path):
        calls.append(case)
        np.savez(map_path, value=np.array([len(case)]))
        return {"subject_id": case, "value": len(case)}

    def run(stamp=None):
        return cached_case_rows(["ab", "cde"], tmp_path, str, compute, stamp=stamp,
                                desc="test", progress=False)

    first = run(lambda c: {"model": "m1"})
    assert first == [{"subject_id": "ab", "value": 2, "model": "m1"},
                     {"subject_id": "cde", "value": 3, "model": "m1"}]
    assert run(lambda c: {"model": "m1"}) == first and calls == ["ab", "cde"]
    run(lambda c: {"model": "m2" if c == "cde" else "m1"})  # only cde's result is stale
    assert calls == ["ab", "cde", "cde"]
    (tmp_path / "rows" / "ab.json").unlink()  # maps written, row not: interrupted mid-case
    run(lambda c: {"model": "m2" if c == "cde" else "m1"})
    assert calls == ["ab", "cde", "cde", "ab"]
