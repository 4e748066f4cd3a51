"""The threshold explorer: move a QC threshold and see who gets reviewed, caught and missed.

One entry point, :func:`view_threshold_explorer`, two renderings of the same state:

- ``interactive=True`` (JupyterLab with a kernel): ipywidgets sliders for the score threshold
  and the quality threshold redraw the scatter, the confusion counts and the metrics live;
- ``interactive=False`` (the static book): a plain plotly figure whose slider steps, one per
  precomputed threshold, restyle the markers and rewrite the title. Plotly runs the slider in
  the browser, so the built page needs no kernel and no network (ipywidgets callbacks would be
  dead there).

Every number shown comes from :func:`wmhqc_lib.evaluation.evaluate_score`.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from . import evaluation
from .evaluation import DICE_COLUMN, QUALITY_THRESHOLD, QCScore

#: Marker colour per outcome (Okabe-Ito, readable with colour-vision deficiency).
OUTCOME_COLORS: dict[str, str] = {
    "caught failure (flagged, failed)": "#D55E00",
    "needless review (flagged, successful)": "#E69F00",
    "missed failure (kept, failed)": "#000000",
    "kept, successful": "#0072B2",
}
_COLOR_TABLE = np.array(list(OUTCOME_COLORS.values()))  # index: 2 * (not flagged) + (not failed)
SHOWN_METRICS = ("precision", "recall", "paper_precision", "paper_recall", "review_fraction",
                 "missed_failure_fraction", "mean_dice_before", "mean_dice_after",
                 "median_dice_after", "failure_auroc", "aurc")


def outcome_colors(flagged: np.ndarray, failed: np.ndarray) -> list[str]:
    """One :data:`OUTCOME_COLORS` colour per case."""
    index = 2 * (~np.asarray(flagged, bool)) + (~np.asarray(failed, bool))
    return _COLOR_TABLE[index].tolist()


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def summary_text(metrics: dict[str, float], threshold: float, quality_threshold: float,
                 label: str, higher_is_better: bool = True) -> str:
    """The counts and key metrics of one threshold, on three lines (plotly's ``<br>``)."""
    n, flagged, tp = metrics["n_cases"], metrics["n_flagged"], metrics["n_true_positive"]
    failed = metrics["n_failed"]
    fp, fn = flagged - tp, failed - tp
    tn = n - flagged - fn
    sign = "<" if higher_is_better else ">"
    return (f"{html.escape(label)} {sign} {_fmt(threshold, 4)}: {flagged} of {n} cases flagged "
            f"for review, {tp} of {failed} failures (Dice < {quality_threshold:g}) caught<br>"
            f"TP {tp}, FP {fp}, FN {fn}, TN {tn}; precision {_fmt(metrics['precision'])}, "
            f"recall {_fmt(metrics['recall'])} (paper's convention: "
            f"{_fmt(metrics['paper_precision'])}, {_fmt(metrics['paper_recall'])})<br>"
            f"mean Dice {_fmt(metrics['mean_dice_before'])} -> "
            f"{_fmt(metrics['mean_dice_after'])} after removing flagged cases")


class _Explorer:
    """Checked data and the per-threshold state shared by both renderings."""

    def __init__(self, cases: pd.DataFrame, score: str | QCScore, higher_is_better: bool | None,
                 dice_column: str, title: str | None) -> None:
        self.spec = evaluation.resolve_score(score, higher_is_better, None)
        self.dice_column = dice_column
        self.cases = evaluation.check_cases(cases, [dice_column, self.spec.column],
                                            dice_column=dice_column)
        self.dice = self.cases[dice_column].to_numpy(dtype=float)
        self.score = self.cases[self.spec.column].to_numpy(dtype=float)
        self.title = title or f"Threshold explorer: {self.spec.label}"
        ids = (self.cases["subject_id"].astype(str).tolist() if "subject_id" in self.cases
               else [f"row {i + 1}" for i in range(len(self.cases))])
        self.hover = ids

    def thresholds(self, n_steps: int, threshold: float | None) -> np.ndarray:
        """``n_steps`` thresholds at evenly spaced score quantiles, from flag-none to flag-all
        (scores are often skewed, so value-spaced steps would waste most of the slider)."""
        if n_steps < 2:
            raise ValueError(f"the explorer needs at least 2 threshold steps, got {n_steps}")
        q = np.quantile(self.score, np.linspace(0.0, 1.0, n_steps))
        edge = np.nextafter(self.score.max(), np.inf) if self.spec.higher_is_better else \
            np.nextafter(self.score.min(), -np.inf)
        if self.spec.higher_is_better:
            q[-1] = edge
        else:
            q[0] = edge
        if threshold is not None:
            q = np.sort(np.append(q, float(threshold)))
        return q

    def state(self, threshold: float, quality_threshold: float
              ) -> tuple[list[str], dict[str, float], str]:
        metrics = evaluation.evaluate_score(self.cases, self.spec, threshold,
                                            quality_threshold=quality_threshold,
                                            dice_column=self.dice_column)
        flagged = evaluation.flag_cases(self.score, threshold, self.spec.higher_is_better)
        colors = outcome_colors(flagged, self.dice < quality_threshold)
        text = summary_text(metrics, threshold, quality_threshold, self.spec.label,
                            self.spec.higher_is_better)
        return colors, metrics, text

    def shapes(self, threshold: float, quality_threshold: float) -> list[dict[str, Any]]:
        return [
            {"type": "line", "xref": "x", "yref": "paper", "x0": threshold, "x1": threshold,
             "y0": 0, "y1": 1, "line": {"color": "#555", "dash": "dash", "width": 1.5}},
            {"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1,
             "y0": quality_threshold, "y1": quality_threshold,
             "line": {"color": "#999", "dash": "dot", "width": 1.5}},
        ]

    def figure(self, threshold: float, quality_threshold: float) -> go.Figure:
        """The scatter for one (score threshold, quality threshold)."""
        colors, _, text = self.state(threshold, quality_threshold)
        direction = "higher" if self.spec.higher_is_better else "lower"
        fig = go.Figure()
        fig.add_trace(go.Scatter(
            x=self.score, y=self.dice, mode="markers", showlegend=False, text=self.hover,
            marker={"color": colors, "size": 8, "line": {"width": 0.5, "color": "white"}},
            hovertemplate="%{text}<br>score %{x:.4g}<br>true Dice %{y:.3f}<extra></extra>"))
        for name, color in OUTCOME_COLORS.items():  # legend entries only
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                     marker={"color": color, "size": 8}))
        fig.update_layout(
            title={"text": text, "font": {"size": 13}, "y": 0.98},
            shapes=self.shapes(threshold, quality_threshold),
            xaxis_title=f"{self.spec.label} ({direction} = better quality)",
            yaxis_title=f"true Dice ({self.dice_column})", yaxis_range=[-0.03, 1.03],
            height=600, margin={"t": 130, "b": 60},
            legend={"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 0,
                    "font": {"size": 11}})
        return fig


def threshold_explorer_figure(cases: pd.DataFrame, score: str | QCScore, *,
                              higher_is_better: bool | None = None,
                              quality_threshold: float = QUALITY_THRESHOLD,
                              threshold: float | None = None, n_steps: int = 60,
                              dice_column: str = DICE_COLUMN,
                              title: str | None = None) -> go.Figure:
    """The static explorer: one plotly slider step per threshold (``n_steps`` quantile-spaced
    ones plus ``threshold`` if given, where the slider starts), each restyling trace 0's marker
    colours and rewriting the title text (counts and metrics) and the threshold line. The
    quality threshold is fixed here; the interactive widget moves both."""
    explorer = _Explorer(cases, score, higher_is_better, dice_column, title)
    steps_at = explorer.thresholds(n_steps, threshold)
    if threshold is not None:
        active = int(np.flatnonzero(steps_at == float(threshold))[0])
    else:
        active = len(steps_at) // 2
    fig = explorer.figure(float(steps_at[active]), quality_threshold)
    steps = []
    for t in steps_at:
        colors, _, text = explorer.state(float(t), quality_threshold)
        steps.append({"method": "update", "label": _fmt(float(t), 4),
                      "args": [{"marker.color": [colors]},
                               {"title.text": text,
                                "shapes": explorer.shapes(float(t), quality_threshold)},
                               [0]]})
    fig.update_layout(sliders=[{
        "active": active, "steps": steps, "pad": {"t": 50},
        "currentvalue": {"prefix": f"{explorer.spec.label} threshold: "}}])
    return fig


def threshold_explorer_widget(cases: pd.DataFrame, score: str | QCScore, *,
                              higher_is_better: bool | None = None,
                              quality_threshold: float = QUALITY_THRESHOLD,
                              threshold: float | None = None, n_steps: int = 200,
                              dice_column: str = DICE_COLUMN, title: str | None = None) -> Any:
    """The live explorer (needs a kernel): sliders for both thresholds; the figure is redrawn
    into an ``ipywidgets.Output`` and the metrics table rewritten on every change."""
    import ipywidgets as widgets
    from IPython.display import display

    explorer = _Explorer(cases, score, higher_is_better, dice_column, title)
    steps_at = explorer.thresholds(n_steps, threshold)
    start = float(threshold) if threshold is not None else float(steps_at[len(steps_at) // 2])
    score_slider = widgets.SelectionSlider(
        options=[(_fmt(float(t), 4), float(t)) for t in steps_at], value=start,
        description="score t", continuous_update=False, layout={"width": "480px"})
    quality_slider = widgets.FloatSlider(
        value=quality_threshold, min=0.5, max=0.95, step=0.01, description="quality q",
        continuous_update=False, readout_format=".2f")
    table = widgets.HTML()
    out = widgets.Output()

    def redraw(_: Any = None) -> None:
        t, q = float(score_slider.value), float(quality_slider.value)
        _, metrics, _ = explorer.state(t, q)
        rows = "".join(f"<tr><td>{name}</td><td>{_fmt(metrics[name])}</td></tr>"
                       for name in ("n_cases", "n_failed", "n_flagged", "n_true_positive",
                                    *SHOWN_METRICS))
        table.value = f"<table>{rows}</table>"
        with out:
            out.clear_output(wait=True)
            display(explorer.figure(t, q))

    score_slider.observe(redraw, names="value")
    quality_slider.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([score_slider, quality_slider]),
                         widgets.HBox([out, table])])


def view_threshold_explorer(cases: pd.DataFrame, score: str | QCScore, *,
                            interactive: bool = False, **options: Any) -> Any:
    """The explorer: an ipywidgets box when ``interactive`` (JupyterLab), else the static
    plotly figure that also works in the built book. ``options`` go to either builder."""
    if interactive:
        return threshold_explorer_widget(cases, score, **options)
    return threshold_explorer_figure(cases, score, **options)
