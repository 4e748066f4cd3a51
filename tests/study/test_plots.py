"""Map panels: the signed (diverging) style keeps 0 at the centre of its colour map."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from wmhqc_lib.study import plots


def test_diverging_limit_is_a_robust_symmetric_magnitude():
    data = np.zeros((10, 10, 10), dtype=np.float32)
    data[:5] = np.linspace(-0.2, 0.1, 500).reshape(5, 10, 10)
    data[0, 0, 0] = 50.0  # one outlier does not set the scale
    limit = plots.diverging_limit(data)
    assert 0.19 <= limit < 1.0
    assert plots.diverging_limit(np.zeros(5)) == 1.0  # nothing to show: a harmless scale


def test_plot_map_panels_draws_a_signed_map_on_a_symmetric_scale():
    shape, affine = (12, 12, 12), np.eye(4)
    background = nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32),
                                 affine)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[4:8, 4:8, 4:8] = 1
    error = np.zeros(shape, dtype=np.float32)
    error[4:8, 4:8, 4:8] = 0.3  # brighter than the original
    error[2:4, 2:4, 4:8] = -0.1  # darker
    rows = {"case": [("prediction", background, nib.Nifti1Image(mask, affine), "contour"),
                     ("error", background, nib.Nifti1Image(error, affine), "diverging")]}
    fig = plots.plot_map_panels(rows, title="Figure 2")
    # the figure title is the one given, not the last panel's (a shadowed name once did that)
    assert fig._suptitle.get_text() == "Figure 2"
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["prediction", "error"]
    images = [im for ax in fig.axes for im in ax.images if im.get_cmap().name == "RdBu_r"]
    assert images
    low, high = images[-1].get_clim()
    assert low == pytest.approx(-high) and high == pytest.approx(plots.diverging_limit(error))
