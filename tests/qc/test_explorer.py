"""The threshold explorer: the static figure's slider steps agree with evaluate_score, and the
widget's sliders rewrite its metrics (no kernel needed for either)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from wmhqc_lib.qc import explorer
from wmhqc_lib.qc.evaluation import QUALITY_THRESHOLD, evaluate_score, flag_cases
from wmhqc_lib.qc.explorer import OUTCOME_COLORS

CAUGHT, NEEDLESS, MISSED, KEPT = OUTCOME_COLORS.values()


def cases(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    d = rng.beta(4, 1.6, n)
    return pd.DataFrame({"subject_id": [f"s{i:02d}" for i in range(n)], "true_dice": d,
                         "dr_error": d + rng.normal(0, 0.1, n),
                         "mean_entropy_lesion": 1 - d + rng.normal(0, 0.15, n)})


def step_threshold(fig: go.Figure, k: int) -> float:
    return fig.layout.sliders[0].steps[k].args[1]["shapes"][0]["x0"]


@pytest.mark.parametrize("column", ["dr_error", "mean_entropy_lesion"])
def test_static_steps_match_evaluate_score(column):
    table = cases()
    fig = explorer.threshold_explorer_figure(table, column, n_steps=55)
    steps = fig.layout.sliders[0].steps
    assert len(steps) == 55
    higher = column == "dr_error"
    n_flagged = []
    for k in (0, 7, 27, 54):
        t = step_threshold(fig, k)
        data, layout, traces = steps[k].args
        assert list(traces) == [0] and steps[k].method == "update"
        colors = np.array(data["marker.color"][0])
        m = evaluate_score(table, column, t)
        assert np.sum(colors == CAUGHT) == m["n_true_positive"]
        assert np.sum(colors == NEEDLESS) == m["n_flagged"] - m["n_true_positive"]
        assert np.sum(colors == MISSED) == m["n_failed"] - m["n_true_positive"]
        flagged = flag_cases(table[column], t, higher)
        assert np.array_equal(np.isin(colors, [CAUGHT, NEEDLESS]), flagged)
        fp, fn = m["n_flagged"] - m["n_true_positive"], m["n_failed"] - m["n_true_positive"]
        tn = m["n_cases"] - m["n_flagged"] - fn
        text = layout["title.text"]
        assert f"{m['n_flagged']} of {m['n_cases']} cases flagged" in text
        assert f"TP {m['n_true_positive']}, FP {fp}, FN {fn}, TN {tn}" in text
        assert re.search(rf"precision {m['precision']:.3g}|precision n/a", text)
        n_flagged.append(m["n_flagged"])
    if not higher:  # the slider follows the x axis: rightwards flags fewer
        n_flagged.reverse()
    assert n_flagged[0] == 0 and n_flagged[-1] == len(table)  # the slider spans none .. all
    assert n_flagged == sorted(n_flagged)


def test_static_figure_starts_at_a_given_threshold():
    table = cases()
    fig = explorer.threshold_explorer_figure(table, "dr_error", threshold=0.71, n_steps=50)
    slider = fig.layout.sliders[0]
    assert len(slider.steps) == 51
    assert step_threshold(fig, slider.active) == 0.71
    m = evaluate_score(table, "dr_error", 0.71)
    assert f"TP {m['n_true_positive']}," in fig.layout.title.text
    assert list(fig.data[0].marker.color) == list(slider.steps[slider.active].args[0]
                                                  ["marker.color"][0])
    assert fig.layout.shapes[1].y0 == QUALITY_THRESHOLD  # the quality threshold line (default)


def test_view_renders_static_by_default_and_a_widget_on_request(capsys):
    table = cases()
    assert isinstance(explorer.view_threshold_explorer(table, "dr_error"), go.Figure)
    box = explorer.view_threshold_explorer(table, "dr_error", interactive=True, n_steps=60)
    score_slider, quality_slider = box.children[0].children
    metrics_html = box.children[1].children[1]
    score_slider.value = score_slider.options[20][1]
    quality_slider.value = 0.6
    m = evaluate_score(table, "dr_error", score_slider.value, quality_threshold=0.6)
    assert f"<td>n_flagged</td><td>{m['n_flagged']}</td>" in metrics_html.value
    assert f"<td>n_failed</td><td>{m['n_failed']}</td>" in metrics_html.value
    capsys.readouterr()  # outside a kernel, the Output widget prints the figure


def test_explorer_refuses_bad_input():
    with pytest.raises(ValueError, match="missing column"):
        explorer.threshold_explorer_figure(cases(), "pairwise_dice")
    with pytest.raises(ValueError, match="at least 2"):
        explorer.threshold_explorer_figure(cases(), "dr_error", n_steps=1)
