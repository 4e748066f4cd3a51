"""The threshold explorer: move a QC threshold and see who gets reviewed, caught and missed.

One entry point, :func:`view_threshold_explorer`, two renderings of the same state:

- ``interactive=True`` (JupyterLab with a kernel): ipywidgets sliders for the score threshold
  and the quality threshold redraw the scatter, the confusion counts and the metrics live;
- ``interactive=False`` (the static book): a plain plotly figure whose slider steps, one per
  precomputed threshold, restyle the markers and rewrite the title. Plotly runs the slider in
  the browser, so the built page needs no kernel and no network (ipywidgets callbacks would be
  dead there).

Every number shown comes from :func:`wmhqc_lib.qc.evaluation.evaluate_score`.
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


# ---------------------------------------------------------------------------------------------
# Both thresholds live in a static page


_STATIC_SCRIPT = """
(function () {
  const root = document.getElementById("%(id)s");
  const data = JSON.parse(root.querySelector("script[type='application/json']").textContent);
  const s = root.querySelector("input[name=score]"), q = root.querySelector("input[name=quality]");
  const out = (k) => root.querySelector("[data-out=" + k + "]");
  const fmt = (v, d) => (v === null || !isFinite(v)) ? "n/a" : v.toFixed(d);
  function update() {
    const t = data.thresholds[+s.value], qt = data.qualities[+q.value];
    let n = data.dice.length, flagged = 0, failed = 0, tp = 0, keptSum = 0, kept = 0;
    for (let i = 0; i < n; i++) {
      const f = data.higher ? data.score[i] < t : data.score[i] > t;
      const bad = data.dice[i] < qt;
      flagged += f; failed += bad; tp += f && bad;
      if (!f) { kept++; keptSum += data.dice[i]; }
    }
    out("threshold").textContent = fmt(t, 4);
    out("quality").textContent = fmt(qt, 2);
    out("flagged").textContent = flagged;
    out("failed").textContent = failed;
    out("caught").textContent = tp;
    out("missed").textContent = failed - tp;
    out("needless").textContent = flagged - tp;
    out("precision").textContent = fmt(flagged ? tp / flagged : NaN, 3);
    out("recall").textContent = fmt(failed ? tp / failed : NaN, 3);
    out("review").textContent = fmt(n ? flagged / n : NaN, 3);
    out("after").textContent = fmt(kept ? keptSum / kept : NaN, 3);
  }
  s.addEventListener("input", update); q.addEventListener("input", update); update();
})();
"""


def static_explorer_html(cases: pd.DataFrame, score: str | QCScore, *, threshold: float,
                         quality_threshold: float = QUALITY_THRESHOLD,
                         dice_column: str = DICE_COLUMN, title: str = "") -> str:
    """Two sliders, the score threshold and the quality threshold (what counts as failed),
    that recompute the counts, precision, recall, review fraction and mean Dice after
    filtering in the browser from the per-case values embedded in the page: no kernel, no
    network. The numbers follow :func:`wmhqc_lib.qc.evaluation.evaluate_score` (a case is flagged
    when its score is beyond the threshold, failed when its Dice is below the quality
    threshold)."""
    import hashlib
    import json

    spec = evaluation.resolve_score(score)
    rows = cases[[spec.column, dice_column]].dropna()
    values = np.sort(rows[spec.column].unique().astype(float))
    # every distinct decision: flag none, between neighbours, flag all
    mids = (values[:-1] + values[1:]) / 2 if len(values) > 1 else np.array([])
    pad = max(float(np.ptp(values)), 1.0) * 1e-6 if len(values) else 1.0
    thresholds = np.concatenate([[values[0] - pad] if len(values) else [0.0], mids,
                                 [values[-1] + pad] if len(values) else []])
    if not spec.higher_is_better:
        thresholds = thresholds[::-1]
    qualities = np.round(np.arange(0.0, 1.001, 0.05), 2)  # 0: no case counts as failed
    start = int(np.argmin(np.abs(thresholds - threshold)))
    q_start = int(np.argmin(np.abs(qualities - quality_threshold)))
    data = {"score": rows[spec.column].astype(float).round(6).tolist(),
            "dice": rows[dice_column].astype(float).round(6).tolist(),
            "higher": bool(spec.higher_is_better),
            "thresholds": [round(float(t), 6) for t in thresholds],
            "qualities": [float(v) for v in qualities]}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    uid = "wmhqc-explorer-" + hashlib.sha256(
        (payload + spec.column + title).encode()).hexdigest()[:10]
    sign = "<" if spec.higher_is_better else ">"
    cells = "".join(f'<td data-out="{k}"></td>' for k in (
        "flagged", "failed", "caught", "missed", "needless", "precision", "recall", "review",
        "after"))
    return f"""<div id="{uid}" class="wmhqc-explorer" style="max-width:100%;overflow-x:auto">
<p><strong>{html.escape(title)}</strong></p>
<label>Flag when {html.escape(spec.label)} {sign} <span data-out="threshold"></span><br>
<input type="range" name="score" min="0" max="{len(thresholds) - 1}" step="1" value="{start}"
 style="width:min(100%,28em)"></label><br>
<label>Failed when lesion Dice &lt; <span data-out="quality"></span><br>
<input type="range" name="quality" min="0" max="{len(qualities) - 1}" step="1"
 value="{q_start}" style="width:min(100%,28em)"></label>
<table style="font-size:0.85em"><thead><tr><th>flagged</th><th>failed</th><th>caught</th>
<th>missed</th><th>needless reviews</th><th>precision</th><th>recall</th>
<th>review fraction</th><th>mean Dice after filtering</th></tr></thead>
<tbody><tr>{cells}</tr></tbody></table>
<script type="application/json">{payload}</script>
<script>{_STATIC_SCRIPT % {"id": uid}}</script>
</div>"""
