"""Figures for the notebooks: nilearn brain overlays and plotly charts that survive the book.

A plotly figure executed by papermill normally carries only the plotly JSON mimetype, which
Jupyter Book drops. :func:`use_book_renderer` makes every figure also carry an HTML div that
draws itself with the ``plotly.min.js`` the book serves from its own ``_static`` folder, so
pages work with no network (none here, none in many hospitals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
from nilearn import plotting
from plotly.io._base_renderers import PlotlyRenderer

BOOK_RENDERER = "wmhqc_book"
SYNTHETIC_NOTE = "synthetic cohort"


class _BookRenderer(PlotlyRenderer):
    """Plotly JSON for JupyterLab plus a self-drawing HTML div for the static book."""

    def to_mimebundle(self, fig_dict):  # noqa: D401 - plotly's renderer interface
        bundle = super().to_mimebundle(fig_dict)
        fig = bundle["application/vnd.plotly.v1+json"]
        bundle["text/html"] = pio.to_html(fig, include_plotlyjs=False, full_html=False,
                                          validate=False, config={"displaylogo": False})
        return bundle


def use_book_renderer() -> None:
    """Make ``fig.show()`` emit output that both JupyterLab and the built book display."""
    pio.renderers[BOOK_RENDERER] = _BookRenderer()
    pio.renderers.default = BOOK_RENDERER


def _cut_coords(mask: nib.Nifti1Image | None, fallback: nib.Nifti1Image) -> tuple[float, ...]:
    data = None if mask is None else np.asarray(mask.dataobj) > 0
    if data is None or not data.any():
        img = fallback
        data = np.asarray(fallback.dataobj) > 0
    else:
        img = mask
    centre = np.array(np.nonzero(data)).mean(axis=1)
    return tuple(nib.affines.apply_affine(img.affine, centre))


def plot_lesion_overlays(cases: Mapping[str, Mapping[str, nib.Nifti1Image]], title: str = ""
                         ) -> plt.Figure:
    """One row per case: FLAIR in three orthogonal views with the lesion outline (red) and any
    excluded region such as MICCAI label 2 (cyan), centred on the lesions. An optional
    ``brain`` mask darkens everything outside it (normalised images are 0 there, mid-grey)."""
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 3.3 * len(cases)), squeeze=False)
    for ax, (name, imgs) in zip(axes[:, 0], cases.items(), strict=True):
        background = imgs["flair"]
        if imgs.get("brain") is not None:
            data = np.asarray(background.dataobj, dtype=np.float32)
            brain = np.asarray(imgs["brain"].dataobj) > 0
            background = nib.Nifti1Image(np.where(brain, data, data[brain].min()),
                                         background.affine)
        display = plotting.plot_anat(background, axes=ax, display_mode="ortho",
                                     cut_coords=_cut_coords(imgs.get("lesion"), imgs["flair"]),
                                     title=name, annotate=True, draw_cross=False,
                                     dim=-0.3)
        if imgs.get("lesion") is not None and np.any(np.asarray(imgs["lesion"].dataobj)):
            display.add_contours(imgs["lesion"], levels=[0.5], colors="r", linewidths=0.9)
        ignore = imgs.get("ignore")
        if ignore is not None and np.any(np.asarray(ignore.dataobj)):
            display.add_contours(ignore, levels=[0.5], colors="c", linewidths=0.9)
    if title:
        fig.suptitle(title)
    return fig


def lesion_load_figure(table: pd.DataFrame, synthetic: bool) -> go.Figure:
    """Lesion load (% of brain volume) per site, one point per subject over a box."""
    label = f" ({SYNTHETIC_NOTE})" if synthetic else ""
    fig = px.box(table, x="site", y="load_pct", points="all", color="dataset",
                 hover_data=["subject_id", "lesion_ml"],
                 labels={"load_pct": "lesion load (% of brain volume)", "site": "site"},
                 title=f"Lesion load per site{label}")
    fig.update_layout(height=420, margin={"t": 60, "b": 40})
    return fig


def roundtrip_figure(table: pd.DataFrame, quality_threshold: float, synthetic: bool,
                     grid: str) -> go.Figure:
    """Round-trip Dice of every subject's reference (on the grid and back), per site, with the
    failure threshold: the points left of the line fail whatever the network does."""
    label = f" ({SYNTHETIC_NOTE})" if synthetic else ""
    fig = px.strip(table, x="roundtrip_dice", y="site", color="dataset",
                   hover_data=["subject_id", "lesion_ml"],
                   labels={"roundtrip_dice": "round-trip Dice of the reference", "site": "site"},
                   title=f"What the {grid} grid alone costs{label}")
    fig.add_vline(x=quality_threshold, line_dash="dash", line_color="firebrick",
                  annotation_text=f"failure threshold {quality_threshold:g}")
    fig.update_layout(height=420, margin={"t": 60, "b": 40})
    fig.update_xaxes(range=[0, 1.02])
    return fig


def mark_rate_changes(fig: go.Figure, history: pd.DataFrame) -> None:
    """A thin dashed line at each epoch whose learning rate is lower than the epoch before
    (the plateau schedule), so a flattening curve can be read against its schedule."""
    from ..nets.training import rate_changes

    for epoch, rate in rate_changes(history):
        fig.add_vline(x=float(epoch) - 0.5, line_dash="dash", line_width=1, line_color="grey",
                      annotation_text=f"lr {rate:.1g}", annotation_position="bottom right")


def learning_curves(history: pd.DataFrame, title: str) -> go.Figure:
    """Training loss and whole-volume validation Dice per epoch, best epoch marked."""
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=history["epoch"], y=history["loss"], name="training loss",
                             mode="lines+markers"), secondary_y=False)
    fig.add_trace(go.Scatter(x=history["epoch"], y=history["val_dice"],
                             name="validation Dice (whole volumes)", mode="lines+markers"),
                  secondary_y=True)
    if history["val_dice"].notna().any():
        best = history.loc[history["val_dice"].idxmax()]
        fig.add_vline(x=best["epoch"], line_dash="dot",
                      annotation_text=f"best epoch {int(best['epoch'])}")
    mark_rate_changes(fig, history)
    fig.update_layout(title=title, height=380, margin={"t": 60})
    fig.update_xaxes(title="epoch")
    fig.update_yaxes(title="loss", secondary_y=False)
    fig.update_yaxes(title="Dice", range=[0, 1], secondary_y=True)
    return fig


def score_scatter(table: pd.DataFrame, score: str, label: str, title: str,
                  dice_column: str = "true_dice", identity: bool = False) -> go.Figure:
    """A QC score against true Dice, one point per case, with Pearson r in the title."""
    from scipy.stats import pearsonr

    data = table[[score, dice_column, "subject_id", "site"]].dropna()
    r = pearsonr(data[score], data[dice_column])[0] if len(data) > 2 else float("nan")
    fig = px.scatter(data, x=score, y=dice_column, color="site", hover_data=["subject_id"],
                     labels={score: label, dice_column: "true lesion Dice"},
                     title=f"{title} (Pearson r = {r:.3f}, n = {len(data)})")
    if identity:
        fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot"})
    fig.update_layout(height=420, margin={"t": 60})
    return fig


def diverging_limit(data: np.ndarray) -> float:
    """Symmetric colour limit of a signed map: the 99th percentile of its non-zero magnitudes,
    so a few extreme voxels do not wash out the rest, and 0 stays the colour map's centre."""
    magnitude = np.abs(data[np.isfinite(data) & (data != 0)])
    return max(float(np.percentile(magnitude, 99)), 1e-6) if magnitude.size else 1.0


def plot_map_panels(rows: Mapping[str, Sequence[tuple[str, nib.Nifti1Image,
                                                    nib.Nifti1Image | None, str]]],
                    cut_axis: str = "z", title: str = "") -> plt.Figure:
    """A grid of single-slice panels: one row per case, one column per map.

    Each panel is ``(title, background, overlay or contour mask, kind)`` with kind ``anat``
    (background only), ``contour`` (red outline of the mask), ``heat`` (a non-negative overlay
    as a colour map over the background) or ``diverging`` (a signed overlay: red above 0, blue
    below, limits symmetric about 0 so both signs read on one scale). All panels of a row cut
    through the same slice: the centre of the row's first mask.
    """
    n_rows = len(rows)
    n_cols = max(len(v) for v in rows.values())
    # final axes positions before nilearn draws into them (a later tight_layout would move
    # the axes but not nilearn's cut); room above each row for its label, written across
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.7 * n_cols, 3.1 * n_rows),
                             squeeze=False, facecolor="black",
                             gridspec_kw={"wspace": 0.04, "hspace": 0.5, "left": 0.01,
                                          "right": 0.99, "top": 0.87, "bottom": 0.02})
    for r, (name, panels) in enumerate(rows.items()):
        first_mask = next((p[2] for p in panels if p[3] == "contour" and p[2] is not None),
                          None)
        coords = _cut_coords(first_mask, panels[0][1])
        cut = coords["xyz".index(cut_axis)]
        top = axes[r, 0].get_position().y1
        fig.text(0.01, top + 0.45 / fig.get_figheight(), " ".join(str(name).split("\n")),
                 fontsize=10, color="white", ha="left", va="bottom", fontweight="bold")
        for c, (panel_title, background, overlay, kind) in enumerate(panels):
            ax = axes[r, c]
            display = plotting.plot_anat(background, axes=ax, display_mode=cut_axis,
                                         cut_coords=[cut], annotate=False, draw_cross=False,
                                         dim=-0.3, colorbar=False)
            if kind == "contour" and overlay is not None and np.any(np.asarray(overlay.dataobj)):
                display.add_contours(overlay, levels=[0.5], colors="r", linewidths=0.8)
            elif kind == "heat" and overlay is not None:
                data = np.asarray(overlay.dataobj, dtype=np.float32)
                vmax = float(np.percentile(data[data > 0], 99)) if np.any(data > 0) else 1.0
                display.add_overlay(overlay, cmap="hot", vmin=0.0, vmax=max(vmax, 1e-6),
                                    threshold=vmax * 0.05, colorbar=True)
            elif kind == "diverging" and overlay is not None:
                vmax = diverging_limit(np.asarray(overlay.dataobj, dtype=np.float32))
                display.add_overlay(overlay, cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                                    threshold=vmax * 0.05, colorbar=True)
            ax.set_title(panel_title, fontsize=9, color="white")
    if title:
        fig.suptitle(title, color="white", y=0.995)
    return fig


def training_curves(history: pd.DataFrame, score: str, score_label: str, title: str,
                    higher_is_better: bool = True,
                    score_range: Sequence[float] | None = None) -> go.Figure:
    """Training loss and a validation score per epoch (any model), best epoch marked."""
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=history["epoch"], y=history["loss"], name="training loss",
                             mode="lines+markers"), secondary_y=False)
    fig.add_trace(go.Scatter(x=history["epoch"], y=history[score], name=score_label,
                             mode="lines+markers"), secondary_y=True)
    if history[score].notna().any():
        best = history.loc[history[score].idxmax() if higher_is_better
                           else history[score].idxmin()]
        fig.add_vline(x=best["epoch"], line_dash="dot",
                      annotation_text=f"best epoch {int(best['epoch'])}")
    mark_rate_changes(fig, history)
    fig.update_layout(title=title, height=380, margin={"t": 60})
    fig.update_xaxes(title="epoch")
    fig.update_yaxes(title="loss", secondary_y=False)
    fig.update_yaxes(title=score_label, secondary_y=True,
                     range=list(score_range) if score_range is not None else None)
    return fig


def regression_curves(histories: Mapping[str, pd.DataFrame], title: str,
                      score: str = "val_huber") -> go.Figure:
    """Training loss (left) and validation loss (right) per epoch of several models, each
    model's best (lowest) validation epoch marked with a star."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "validation loss"))
    colours = px.colors.qualitative.Plotly
    for i, (name, h) in enumerate(histories.items()):
        colour = colours[i % len(colours)]
        fig.add_trace(go.Scatter(x=h["epoch"], y=h["loss"], name=name, mode="lines",
                                 legendgroup=name, line={"color": colour}), row=1, col=1)
        fig.add_trace(go.Scatter(x=h["epoch"], y=h[score], name=name, mode="lines",
                                 legendgroup=name, showlegend=False, line={"color": colour}),
                      row=1, col=2)
        if h[score].notna().any():
            best = h.loc[h[score].idxmin()]
            fig.add_trace(go.Scatter(x=[best["epoch"]], y=[best[score]], mode="markers",
                                     marker={"symbol": "star", "size": 11, "color": colour},
                                     legendgroup=name, showlegend=False,
                                     hovertext=f"{name}: best epoch {int(best['epoch'])}"),
                          row=1, col=2)
    fig.update_layout(title=title, height=400, margin={"t": 70})
    fig.update_xaxes(title="epoch")
    fig.update_yaxes(type="log")
    return fig


def predicted_dice_scatter(table: pd.DataFrame, columns: Mapping[str, str], title: str,
                           dice_column: str = "true_dice") -> go.Figure:
    """Predicted against true Dice, one panel per model (``{label: column}``), each with the
    identity line and its Pearson r and mean absolute error (the paper's Figure 3c-e)."""
    from plotly.subplots import make_subplots
    from scipy.stats import pearsonr

    titles = []
    for label, column in columns.items():
        data = table[[column, dice_column]].dropna()
        ok = len(data) > 2 and np.ptp(data[column]) > 0 and np.ptp(data[dice_column]) > 0
        r = pearsonr(data[column], data[dice_column])[0] if ok else float("nan")
        mae = float(np.mean(np.abs(data[column] - data[dice_column]))) if len(data) else \
            float("nan")
        titles.append(f"{label}<br>r = {r:.3f}, MAE = {mae:.3f}, n = {len(data)}")
    fig = make_subplots(rows=1, cols=len(columns), subplot_titles=titles,
                        shared_yaxes=True, horizontal_spacing=0.05)
    sites = sorted(table["site"].dropna().unique()) if "site" in table.columns else [None]
    colours = dict(zip(sites, px.colors.qualitative.Plotly * 4, strict=False))
    for i, column in enumerate(columns.values(), start=1):
        for site in sites:
            part = table if site is None else table[table["site"] == site]
            part = part.dropna(subset=[column, dice_column])
            fig.add_trace(go.Scatter(x=part[dice_column], y=part[column], mode="markers",
                                     name=str(site), legendgroup=str(site), showlegend=i == 1,
                                     marker={"color": colours[site]},
                                     hovertext=part.get("subject_id")), row=1, col=i)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", showlegend=False,
                                 line={"dash": "dot", "color": "grey"}, hoverinfo="skip"),
                      row=1, col=i)
        fig.update_xaxes(title="true lesion Dice", range=[-0.02, 1.02], row=1, col=i)
    fig.update_yaxes(title="predicted Dice", row=1, col=1)
    fig.update_layout(title=title, height=420, margin={"t": 110})
    fig.update_annotations(font_size=11)
    return fig


def interactive_map(overlay: nib.Nifti1Image, background: nib.Nifti1Image, title: str,
                    mask: nib.Nifti1Image | None = None):
    """A nilearn ``view_img`` viewer (click to move the cut) of a voxel-wise map over the scan.

    The viewer is one self-contained HTML document (nilearn inlines its JavaScript and the
    image sprites), so it works in the offline book. Values below 5 % of the map's 99th
    percentile are transparent; the cut starts at the centre of ``mask`` when given.
    """
    data = np.asarray(overlay.dataobj, dtype=np.float32)
    positive = data[data > 0]
    vmax = float(np.percentile(positive, 99)) if positive.size else 1.0
    return plotting.view_img(overlay, bg_img=background, cmap="hot", symmetric_cmap=False,
                             vmin=0.0, vmax=max(vmax, 1e-6), threshold=max(vmax, 1e-6) * 0.05,
                             cut_coords=_cut_coords(mask, background), title=title,
                             black_bg=True, dim=-0.3, colorbar=True, width_view=600)


def triage_truth_figure(scored: pd.DataFrame, score_label: str, quality_threshold: float,
                        title: str) -> go.Figure:
    """Triaged new scans: QC score against the true lesion Dice the annotation gives, a
    marker per kind of scan, flagged scans in red; the failure line is dashed."""
    table = scored.assign(verdict=np.where(scored["flagged"].astype(bool), "flagged",
                                           "passed"))
    fig = px.scatter(table, x="qc_score", y="true_dice", color="verdict", symbol="kind",
                     hover_data=["participant_id", "site", "predicted_dice", "reason"],
                     color_discrete_map={"flagged": "#d62728", "passed": "#1f77b4"},
                     labels={"qc_score": score_label, "true_dice": "true lesion Dice"},
                     title=title)
    fig.add_hline(y=quality_threshold, line_dash="dash",
                  annotation_text=f"failure: Dice < {quality_threshold}")
    fig.update_layout(height=420)
    return fig


def guarantee_tradeoff_figure(curve: pd.DataFrame, title: str,
                              profile_rule: Mapping[str, float] | None = None) -> go.Figure:
    """What a recall guarantee costs: per target recall (at the curve's confidence), the
    review fraction of the guaranteed threshold on the pooled test rows, and the recall it
    realised there. Targets the labelled failures cannot guarantee are marked at review
    fraction 1 (the rule abstains and reviews every scan), with the failures they need.
    ``profile_rule`` (``review_fraction``, ``recall``, ``rule``): the profile's own rule,
    which promises nothing, as a horizontal line for comparison."""
    ok, short = curve[curve["feasible"]], curve[~curve["feasible"]]
    fig = go.Figure()
    fig.add_scatter(x=ok["target_recall"], y=ok["review_fraction"], mode="lines+markers",
                    name="review fraction (test rows)",
                    customdata=ok[["threshold", "allowed_misses", "n_val_failures"]],
                    hovertemplate="target %{x:.2f}: review %{y:.2f}<br>threshold "
                                  "%{customdata[0]:.4g}, %{customdata[1]} of "
                                  "%{customdata[2]} labelled failures unflagged<extra></extra>")
    fig.add_scatter(x=ok["target_recall"], y=ok["recall"], mode="markers",
                    marker={"symbol": "diamond-open", "size": 9},
                    name="recall realised on the test rows")
    if len(short):
        fig.add_scatter(x=short["target_recall"], y=np.ones(len(short)), mode="markers+text",
                        marker={"symbol": "x", "size": 11, "color": "#d62728"},
                        text=[f"needs {n}" for n in short["failures_needed"]],
                        textposition="bottom center",
                        name=f"no guarantee (has {int(short['n_val_failures'].iloc[0])} "
                             "failures): review all")
    if profile_rule is not None:
        fig.add_hline(y=float(profile_rule["review_fraction"]), line_dash="dash",
                      annotation_text=f"profile rule {profile_rule.get('rule', '')}: review "
                                      f"{profile_rule['review_fraction']:.2f}, recall "
                                      f"{profile_rule['recall']:.2f}, no guarantee")
    confidence = float(curve["confidence"].iloc[0]) if len(curve) else float("nan")
    fig.update_layout(title=title, height=440, xaxis_title=f"target recall (confidence "
                      f"{confidence:.0%})", yaxis_title="share of scans", yaxis_range=[0, 1.08])
    return fig
