"""Figures for the notebooks: nilearn brain overlays and plotly charts that survive the book.

A plotly figure executed by papermill normally carries only the plotly JSON mimetype, which
Jupyter Book drops. :func:`use_book_renderer` makes every figure also carry an HTML div that
draws itself with the ``plotly.min.js`` the book serves from its own ``_static`` folder, so
pages work with no network (none here, none in many hospitals).
"""

from __future__ import annotations

from collections.abc import Mapping

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
