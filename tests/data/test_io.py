"""Checks of the NIfTI readers: every broken file gives a DataError naming it and the problem."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from layouts import (
    SHAPE,
    VOXEL,
    garble,
    make_4d,
    make_affine,
    put_label,
    put_nan,
    save,
    shift_affine,
    truncate,
    write_image,
    write_mask,
    zero_out,
)

from wmhqc_lib.data.io import (
    DataError,
    check_overlap,
    load_mask,
    load_volume,
    same_grid,
    voxel_size,
    world_bounds,
)


@pytest.fixture(params=[".nii.gz", ".nii"])
def image_path(request, tmp_path: Path) -> Path:
    return write_image(tmp_path / f"scan{request.param}", seed=1)


def expect_error(path: Path, phrase: str, func, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        func(path, *args, **kwargs)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert phrase in str(info.value)
    return info.value


def test_load_volume_reads_data_and_affine(image_path: Path):
    img = load_volume(image_path)
    assert img.shape == SHAPE
    assert np.allclose(img.affine, make_affine())
    expected = np.asarray(nib.load(str(image_path)).dataobj)
    assert np.array_equal(np.asarray(img.dataobj), expected)


def test_trailing_singleton_dimension_is_dropped(image_path: Path):
    make_4d(image_path, frames=1)
    assert nib.load(str(image_path)).shape == (*SHAPE, 1)
    assert load_volume(image_path).shape == SHAPE


def test_missing_file(tmp_path: Path):
    expect_error(tmp_path / "absent.nii.gz", "file not found", load_volume)


def test_4d_volume_is_rejected(image_path: Path):
    make_4d(image_path, frames=3)
    expect_error(image_path, "expected a 3D volume", load_volume)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file(image_path: Path, keep: float):
    truncate(image_path, keep)
    expect_error(image_path, "truncated", load_volume)


def test_file_that_is_not_nifti(image_path: Path):
    garble(image_path)
    expect_error(image_path, "unreadable", load_volume)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(image_path: Path, value: float):
    put_nan(image_path, value)
    err = expect_error(image_path, "NaN or infinite", load_volume)
    assert "1 voxels" in err.problem


def test_all_zero_image(image_path: Path):
    zero_out(image_path)
    expect_error(image_path, "all voxels are zero", load_volume)
    assert not np.any(np.asarray(load_volume(image_path, allow_zero=True).dataobj))


def test_degenerate_affine_is_rejected(tmp_path: Path):
    path = write_image(tmp_path / "flat.nii.gz", 1)
    raw = nib.load(str(path))
    header = raw.header.copy()
    header["srow_y"] = [0.0, 0.0, 0.0, 0.0]  # a header whose sform collapses one axis
    header["sform_code"], header["qform_code"] = 1, 0
    nib.Nifti1Image(np.asarray(raw.dataobj), None, header).to_filename(str(path))
    assert np.linalg.det(nib.load(str(path)).affine[:3, :3]) == 0
    expect_error(path, "no valid affine", load_volume)


def test_load_mask_returns_uint8_labels(tmp_path: Path):
    box = (slice(1, 3), slice(1, 3), slice(1, 3))
    path = write_mask(tmp_path / "m.nii.gz", [(box, 2)])
    mask = load_mask(path, (0, 1, 2))
    data = np.asarray(mask.dataobj)
    assert data.dtype == np.uint8
    assert int((data == 2).sum()) == 8 and int((data != 0).sum()) == 8


def test_empty_mask_is_valid(tmp_path: Path):
    path = write_mask(tmp_path / "m.nii.gz", [])
    assert not np.any(np.asarray(load_mask(path, (0, 1)).dataobj))


def test_mask_label_outside_label_set(tmp_path: Path):
    path = write_mask(tmp_path / "m.nii.gz", [((slice(1, 3),) * 3, 1)])
    put_label(path, 3)
    err = expect_error(path, "outside the dataset's label set", load_mask, (0, 1))
    assert "[3]" in err.problem


def test_float_mask_with_integer_values_is_accepted(tmp_path: Path):
    data = np.zeros(SHAPE, np.float32)
    data[2:4, 2:4, 2:4] = 1.0
    path = save(data, tmp_path / "m.nii.gz")
    assert int(np.asarray(load_mask(path, (0, 1)).dataobj).sum()) == 8


def test_float_mask_with_fractions_is_rejected(tmp_path: Path):
    data = np.zeros(SHAPE, np.float32)
    data[2, 2, 2] = 0.5
    path = save(data, tmp_path / "m.nii.gz")
    expect_error(path, "non-integer values", load_mask, (0, 1))


def test_check_overlap(tmp_path: Path):
    ref_path = write_image(tmp_path / "flair.nii.gz", 1)
    other_path = write_image(tmp_path / "t1.nii.gz", 2)
    ref, other = load_volume(ref_path), load_volume(other_path)
    check_overlap(ref, other, other_path, ref_path)  # same grid: no error
    shift_affine(other_path, mm=1000.0)
    with pytest.raises(DataError) as info:
        check_overlap(ref, load_volume(other_path), other_path, ref_path)
    assert info.value.path == str(other_path)
    assert "does not overlap" in str(info.value) and str(ref_path) in str(info.value)


def test_partial_overlap_threshold(tmp_path: Path):
    ref = nib.Nifti1Image(np.ones(SHAPE, np.float32), make_affine())
    half = make_affine()
    half[0, 3] = SHAPE[0] * VOXEL[0] * 0.6  # 40 % of the x extent shared
    other = nib.Nifti1Image(np.ones(SHAPE, np.float32), half)
    check_overlap(ref, other, "o", "r", min_fraction=0.3)
    with pytest.raises(DataError, match="does not overlap"):
        check_overlap(ref, other, "o", "r", min_fraction=0.5)


def test_grid_helpers():
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), make_affine((0.5, 0.75, 3.0), (10, 0, 0)))
    assert voxel_size(img) == pytest.approx((0.5, 0.75, 3.0))
    lo, hi = world_bounds(img)
    assert lo == pytest.approx([9.75, -0.375, -1.5])
    assert hi == pytest.approx([14.75, 8.625, 22.5])
    assert same_grid(img, img)
    other = nib.Nifti1Image(np.ones(SHAPE, np.float32), make_affine())
    assert not same_grid(img, other)
    assert not same_grid(img, nib.Nifti1Image(np.ones((10, 12, 9), np.float32), img.affine))
