"""Dataset readers on fixture trees in each distributed layout, label/rater policies, bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from layouts import (
    BREAKERS,
    ISBI_COUNTS,
    ISBI_TP2_COUNTS,
    LJUBLJANA_LESION,
    MICCAI_OTHER,
    MICCAI_WMH,
    MSSEG_COUNTS,
    box_size,
    make_4d,
    put_label,
    write_cohort,
    write_isbi,
    write_ljubljana,
    write_mask,
    write_miccai,
    write_msseg,
    zero_out,
)

from wmhqc_lib.data.datasets import (
    DATASETS,
    MANIFEST_COLUMNS,
    IndexOptions,
    combine_manifests,
    index_cohort,
    index_dataset,
    layout_paths,
    load_subject,
    read_manifest,
    write_manifest,
)
from wmhqc_lib.data.io import DataError

MICCAI_VOXEL_ML = 3.0 / 1000  # 1 x 1 x 3 mm voxels


def count(img: nib.Nifti1Image | None) -> int:
    assert img is not None
    return int(np.count_nonzero(np.asarray(img.dataobj)))


def row_of(result, subject_id: str) -> pd.Series:
    rows = result.manifest[result.manifest["subject_id"] == subject_id]
    assert len(rows) == 1, result.manifest["subject_id"].tolist()
    return rows.iloc[0]


# ------------------------------------------------------------------------------------------
# Layout definition


def test_layout_paths_match_the_distributed_layouts(tmp_path: Path):
    r = tmp_path
    m = layout_paths("miccai17", r, "Amsterdam/GE3T", "100")
    assert m["flair"] == r / "Amsterdam" / "GE3T" / "100" / "pre" / "FLAIR.nii.gz"
    assert m["t1"] == r / "Amsterdam" / "GE3T" / "100" / "pre" / "T1.nii.gz"
    assert m["mask"] == r / "Amsterdam" / "GE3T" / "100" / "wmh.nii.gz"
    i = layout_paths("isbi15", r, "ISBI", "training03", timepoint="02")
    pp = r / "training" / "training03" / "preprocessed"
    assert i["flair"] == pp / "training03_02_flair_pp.nii"
    assert i["t1"] == pp / "training03_02_mprage_pp.nii"
    assert i["rater2"] == r / "training" / "training03" / "masks" / "training03_02_mask2.nii"
    s = layout_paths("msseg16", r, "Center_07", "Patient_02")
    base = r / "Center_07" / "Patient_02"
    assert s["flair"] == base / "Preprocessed_Data" / "FLAIR_preprocessed.nii.gz"
    assert s["mask"] == base / "Masks" / "Consensus.nii.gz"
    assert s["raters"][0] == base / "Masks" / "ManualSegmentation_1.nii.gz"
    assert len(s["raters"]) == 7
    assert s["brain_mask"] == base / "Masks" / "Brain_Mask.nii.gz"
    lp = layout_paths("ljubljana", r, "Ljubljana", "patient04")
    lu = layout_paths("ljubljana", r, "Ljubljana", "patient04", prefixed=False)
    assert lp["mask"] == r / "patient04" / "patient04_consensus_gt.nii.gz"
    assert lp["t1"] == r / "patient04" / "patient04_T1W.nii.gz"
    assert lu["flair"] == r / "patient04" / "FLAIR.nii.gz"
    assert lu["brain_mask"] == r / "patient04" / "brainmask.nii.gz"
    with pytest.raises(ValueError, match="unknown dataset"):
        layout_paths("brats", r, "x", "y")


@pytest.mark.parametrize("kwargs", [{"miccai_label2": "drop"}, {"isbi_raters": "rater3"},
                                    {"msseg_mask": "rater:9"}, {"msseg_mask": "staple"},
                                    {"isbi_timepoint": "first"}])
def test_invalid_options(kwargs):
    with pytest.raises(ValueError):
        IndexOptions(**kwargs)


def test_unknown_dataset(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown dataset"):
        index_dataset("brats", tmp_path)


# ------------------------------------------------------------------------------------------
# MICCAI WMH 2017


def test_miccai_sites_nested_one_and_two_levels(tmp_path: Path):
    for site, subject in [("Utrecht", "0"), ("Singapore", "50"), ("Amsterdam/GE3T", "100"),
                          ("Amsterdam/Philips", "200")]:
        write_miccai(tmp_path, site, subject)
    (tmp_path / "Utrecht" / "0" / "orig").mkdir()  # raw images folder: not a subject
    result = index_dataset("miccai17", tmp_path)
    df = result.manifest
    assert list(df.columns) == MANIFEST_COLUMNS
    assert df["subject_id"].tolist() == ["miccai17_Amsterdam-GE3T_100",
                                         "miccai17_Amsterdam-Philips_200",
                                         "miccai17_Singapore_50", "miccai17_Utrecht_0"]
    assert df["site"].tolist() == ["Amsterdam/GE3T", "Amsterdam/Philips", "Singapore", "Utrecht"]
    assert result.problems == []
    row = row_of(result, "miccai17_Amsterdam-GE3T_100")
    assert row["flair"] == str(tmp_path / "Amsterdam" / "GE3T" / "100" / "pre" / "FLAIR.nii.gz")
    assert row["mask"] == str(tmp_path / "Amsterdam" / "GE3T" / "100" / "wmh.nii.gz")
    assert Path(row["t1"]).is_absolute()
    assert row["dataset"] == "miccai17" and row["mask_rule"] == "single"
    assert row["allowed_labels"] == "0;1;2"
    assert row["rater_masks"] == "" and row["brain_mask"] == "" and row["timepoint"] == ""
    assert row["flair_voxel_mm"] == "1.00x1.00x3.00" and row["flair_shape"] == "10x12x8"
    assert row["t1_voxel_mm"] == "1.00x1.00x3.00" and row["t1_shape"] == "10x12x8"
    assert not row["synthetic"]
    assert df["synthetic"].dtype == bool and df["lesion_ml"].dtype == float


LABEL2_CASES = {  # option -> (lesion voxels, ignore voxels or None, lesion_labels, ignore_labels)
    "ignore": (box_size(MICCAI_WMH), box_size(MICCAI_OTHER), "1", "2"),
    "lesion": (box_size(MICCAI_WMH) + box_size(MICCAI_OTHER), None, "1;2", ""),
    "background": (box_size(MICCAI_WMH), None, "1", ""),
}


@pytest.mark.parametrize("policy", list(LABEL2_CASES))
def test_miccai_label2_policy(tmp_path: Path, policy: str):
    write_miccai(tmp_path, "Utrecht", "0")
    n_lesion, n_ignore, lesion_labels, ignore_labels = LABEL2_CASES[policy]
    result = index_dataset("miccai17", tmp_path, IndexOptions(miccai_label2=policy))
    row = row_of(result, "miccai17_Utrecht_0")
    assert row["lesion_labels"] == lesion_labels and row["ignore_labels"] == ignore_labels
    assert row["lesion_ml"] == pytest.approx(n_lesion * MICCAI_VOXEL_ML)
    images = load_subject(row)
    assert images.subject_id == "miccai17_Utrecht_0"
    lesion = np.asarray(images.lesion.dataobj)
    assert lesion.dtype == np.uint8 and set(np.unique(lesion)) <= {0, 1}
    assert count(images.lesion) == n_lesion
    assert lesion[MICCAI_WMH].all()
    if n_ignore is None:
        assert images.ignore is None
    else:
        assert count(images.ignore) == n_ignore
        assert np.asarray(images.ignore.dataobj)[MICCAI_OTHER].all()
        assert not np.any(np.asarray(images.ignore.dataobj) & lesion)
    assert images.brain_mask is None


def test_subject_with_empty_mask_is_valid(tmp_path: Path):
    paths = write_miccai(tmp_path, "Utrecht", "0")
    zero_out(paths["mask"])
    row = row_of(index_dataset("miccai17", tmp_path), "miccai17_Utrecht_0")
    assert row["lesion_ml"] == 0.0


# ------------------------------------------------------------------------------------------
# ISBI 2015


@pytest.mark.parametrize("rule", list(ISBI_COUNTS))
def test_isbi_rater_policies(tmp_path: Path, rule: str):
    paths = write_isbi(tmp_path, "training01")["01"]
    result = index_dataset("isbi15", tmp_path, IndexOptions(isbi_raters=rule))
    row = row_of(result, "isbi15_training01")
    assert row["site"] == "ISBI" and row["timepoint"] == "01"
    assert row["t1"] == str(paths["t1"]) and row["t1"].endswith("_mprage_pp.nii")
    assert row["rater_masks"] == f"{paths['rater1']};{paths['rater2']}"
    if rule in ("rater1", "rater2"):
        assert row["mask"] == str(paths[rule]) and row["mask_rule"] == "single"
    else:
        assert row["mask"] == row["rater_masks"] and row["mask_rule"] == rule
    assert count(load_subject(row).lesion) == ISBI_COUNTS[rule]
    assert row["lesion_ml"] == pytest.approx(ISBI_COUNTS[rule] * MICCAI_VOXEL_ML)


def test_isbi_default_is_union(tmp_path: Path):
    write_isbi(tmp_path, "training01")
    row = row_of(index_dataset("isbi15", tmp_path), "isbi15_training01")
    assert row["mask_rule"] == "union"
    assert row["lesion_ml"] == pytest.approx(ISBI_COUNTS["union"] * MICCAI_VOXEL_ML)


@pytest.mark.parametrize("rule", ["union", "intersection", "rater2"])
def test_isbi_rater_on_another_grid_is_resampled(tmp_path: Path, rule: str):
    write_isbi(tmp_path, "training01", rater2_other_grid=True)
    row = row_of(index_dataset("isbi15", tmp_path, IndexOptions(isbi_raters=rule)),
                 "isbi15_training01")
    images = load_subject(row)
    if rule == "rater2":  # a single mask keeps its own grid
        assert images.lesion.shape == (12, 14, 10)
    else:  # combined on the first rater's grid
        assert images.lesion.shape == (10, 12, 8)
    assert count(images.lesion) == ISBI_COUNTS[rule]


def test_isbi_timepoint_choice(tmp_path: Path):
    write_isbi(tmp_path, "training01", timepoints=("01", "02"))
    write_isbi(tmp_path, "training02", timepoints=("02", "03"))
    default = index_dataset("isbi15", tmp_path)
    assert default.manifest["subject_id"].tolist() == ["isbi15_training01", "isbi15_training02"]
    assert default.manifest["timepoint"].tolist() == ["01", "02"]  # earliest of each subject
    assert row_of(default, "isbi15_training01")["lesion_ml"] == pytest.approx(
        ISBI_COUNTS["union"] * MICCAI_VOXEL_ML)
    chosen = index_dataset("isbi15", tmp_path, IndexOptions(isbi_timepoint="02"))
    row = row_of(chosen, "isbi15_training01")
    assert row["timepoint"] == "02" and "training01_02_flair_pp.nii" in row["flair"]
    assert row["lesion_ml"] == pytest.approx(ISBI_TP2_COUNTS["union"] * MICCAI_VOXEL_ML)


def test_isbi_absent_timepoint_names_subject_folder(tmp_path: Path):
    write_isbi(tmp_path, "training01", timepoints=("01", "02"))
    write_isbi(tmp_path, "training02", timepoints=("01",))
    folder = tmp_path / "training" / "training02"
    with pytest.raises(DataError) as info:
        index_dataset("isbi15", tmp_path, IndexOptions(isbi_timepoint="02"))
    assert info.value.path == str(folder)
    assert "time point 02 not found" in str(info.value) and "available: 01" in str(info.value)
    result = index_dataset("isbi15", tmp_path, IndexOptions(isbi_timepoint="02"), skip_bad=True)
    assert result.manifest["subject_id"].tolist() == ["isbi15_training01"]
    assert [p.path for p in result.problems] == [str(folder)]


def test_isbi_single_rater_needs_only_that_mask(tmp_path: Path):
    paths = write_isbi(tmp_path, "training01")["01"]
    paths["rater2"].unlink()
    row = row_of(index_dataset("isbi15", tmp_path, IndexOptions(isbi_raters="rater1")),
                 "isbi15_training01")
    assert row["rater_masks"] == str(paths["rater1"])
    with pytest.raises(DataError, match="missing.*training01_01_mask2.nii"):
        index_dataset("isbi15", tmp_path)


def test_isbi_gzipped_copy_is_accepted(tmp_path: Path):
    paths = write_isbi(tmp_path, "training01")["01"]
    for path in (paths["flair"], paths["rater1"]):
        nib.save(nib.load(str(path)), str(path) + ".gz")
        path.unlink()
    row = row_of(index_dataset("isbi15", tmp_path), "isbi15_training01")
    assert row["flair"] == str(paths["flair"]) + ".gz"
    assert row["lesion_ml"] == pytest.approx(ISBI_COUNTS["union"] * MICCAI_VOXEL_ML)


# ------------------------------------------------------------------------------------------
# MSSEG 2016


@pytest.mark.parametrize("choice", list(MSSEG_COUNTS))
def test_msseg_mask_choice(tmp_path: Path, choice: str):
    paths = write_msseg(tmp_path, "Center_01", "Patient_01")
    row = row_of(index_dataset("msseg16", tmp_path, IndexOptions(msseg_mask=choice)),
                 "msseg16_Center_01_Patient_01")
    raters = [str(p) for p in paths["raters"][:3]]
    assert row["rater_masks"] == ";".join(raters)
    if choice == "consensus":
        assert row["mask"] == str(paths["mask"]) and row["mask_rule"] == "single"
    elif choice.startswith("rater:"):
        assert row["mask"] == raters[int(choice[-1]) - 1] and row["mask_rule"] == "single"
    else:
        assert row["mask"] == ";".join(raters) and row["mask_rule"] == choice
    images = load_subject(row)
    assert count(images.lesion) == MSSEG_COUNTS[choice]
    assert row["lesion_ml"] == pytest.approx(MSSEG_COUNTS[choice] * MICCAI_VOXEL_ML)


def test_msseg_row_and_images_on_own_grids(tmp_path: Path):
    paths = write_msseg(tmp_path, "Center_01", "Patient_01")
    write_msseg(tmp_path, "Center_03", "Patient_02", seed=5, brain_mask=False)
    result = index_dataset("msseg16", tmp_path)
    assert result.manifest["site"].tolist() == ["Center_01", "Center_03"]
    row = row_of(result, "msseg16_Center_01_Patient_01")
    assert row["brain_mask"] == str(paths["brain_mask"])
    assert row["flair_shape"] == "10x12x8" and row["t1_shape"] == "8x10x20"
    assert row["t1_voxel_mm"] == "1.25x1.20x1.20"
    images = load_subject(row)
    assert images.t1.shape == (8, 10, 20) and images.flair.shape == (10, 12, 8)
    assert count(images.brain_mask) == 8 * 10 * 6
    other = row_of(result, "msseg16_Center_03_Patient_02")
    assert other["brain_mask"] == "" and load_subject(other).brain_mask is None


def test_msseg_missing_rater(tmp_path: Path):
    write_msseg(tmp_path, "Center_01", "Patient_01")
    folder = tmp_path / "Center_01" / "Patient_01"
    with pytest.raises(DataError) as info:
        index_dataset("msseg16", tmp_path, IndexOptions(msseg_mask="rater:5"))
    assert info.value.path == str(folder)
    assert "missing" in str(info.value) and "ManualSegmentation_5.nii.gz" in str(info.value)


# ------------------------------------------------------------------------------------------
# Ljubljana


def test_ljubljana_prefixed_and_unprefixed(tmp_path: Path):
    pre = write_ljubljana(tmp_path, "patient01", prefixed=True)
    unpre = write_ljubljana(tmp_path, "patient02", seed=4, prefixed=False)
    result = index_dataset("ljubljana", tmp_path)
    assert result.manifest["subject_id"].tolist() == ["ljubljana_patient01", "ljubljana_patient02"]
    assert set(result.manifest["site"]) == {"Ljubljana"}
    r1, r2 = row_of(result, "ljubljana_patient01"), row_of(result, "ljubljana_patient02")
    assert r1["flair"].endswith("patient01_FLAIR.nii.gz") and r1["mask"] == str(pre["mask"])
    assert r2["flair"] == str(unpre["flair"]) and r2["brain_mask"] == str(unpre["brain_mask"])
    n = box_size(LJUBLJANA_LESION)
    assert r1["lesion_ml"] == pytest.approx(n * MICCAI_VOXEL_ML)
    assert count(load_subject(r2).lesion) == n


# ------------------------------------------------------------------------------------------
# Cohorts, manifests, synthetic marker


def test_index_cohort_combines_all_datasets(tmp_path: Path):
    write_cohort(tmp_path)
    result = index_cohort(tmp_path)
    df = result.manifest
    assert result.problems == []
    assert df["dataset"].value_counts().to_dict() == {"miccai17": 2, "ljubljana": 2, "isbi15": 1,
                                                      "msseg16": 1}
    assert list(dict.fromkeys(df["dataset"])) == list(DATASETS)
    assert df["subject_id"].is_unique
    assert "miccai17_Amsterdam-GE3T_100" in set(df["subject_id"])
    assert list(df.columns) == MANIFEST_COLUMNS and not df["synthetic"].any()


def test_index_cohort_with_symlinked_dataset(tmp_path: Path):
    real = tmp_path / "downloads" / "MICCAI_WMH"
    write_miccai(real, "Utrecht", "0")
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "miccai17").symlink_to(real, target_is_directory=True)
    df = index_cohort(cohort).manifest
    assert df["subject_id"].tolist() == ["miccai17_Utrecht_0"]


def test_index_cohort_without_dataset_folders(tmp_path: Path):
    (tmp_path / "MICCAI").mkdir()
    with pytest.raises(DataError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(tmp_path)
    assert "no dataset folder" in str(info.value) and "miccai17/" in str(info.value)


def test_index_cohort_skip_bad(tmp_path: Path):
    write_cohort(tmp_path)
    BREAKERS["nan"](layout_paths("msseg16", tmp_path / "msseg16", "Center_01",
                                 "Patient_01")["flair"])
    (tmp_path / "isbi15" / "training").rename(tmp_path / "isbi15" / "elsewhere")
    with pytest.raises(DataError):
        index_cohort(tmp_path)
    result = index_cohort(tmp_path, skip_bad=True)
    assert set(result.manifest["dataset"]) == {"miccai17", "ljubljana"}
    messages = [str(p) for p in result.problems]
    assert any("FLAIR_preprocessed.nii.gz" in m and "NaN" in m for m in messages)
    assert any("no isbi15 subjects found" in m for m in messages)


def test_combine_manifests_rejects_duplicate_ids(tmp_path: Path):
    write_miccai(tmp_path / "a", "Utrecht", "0")
    write_miccai(tmp_path / "a", "Utrecht", "1")
    write_miccai(tmp_path / "b", "Utrecht", "1")
    a = index_dataset("miccai17", tmp_path / "a").manifest
    b = index_dataset("miccai17", tmp_path / "b").manifest
    with pytest.raises(DataError, match="duplicate subject ids: miccai17_Utrecht_1"):
        combine_manifests([a, b])
    assert combine_manifests([a]).equals(a)
    assert list(combine_manifests([]).columns) == MANIFEST_COLUMNS


def test_manifest_round_trip(tmp_path: Path):
    write_cohort(tmp_path / "data")
    (tmp_path / "data" / "SYNTHETIC_COHORT.json").write_text("{}")
    df = index_cohort(tmp_path / "data").manifest
    path = write_manifest(df, tmp_path / "out" / "manifest.csv")
    back = read_manifest(path)
    pd.testing.assert_frame_equal(back, df)
    assert back["synthetic"].dtype == bool and back["synthetic"].all()
    assert back["lesion_ml"].dtype == float
    row = back[back["dataset"] == "miccai17"].iloc[0]
    assert row["brain_mask"] == "" and row["timepoint"] == "" and row["ignore_labels"] == "2"
    assert row["lesion_labels"] == "1" and isinstance(row["lesion_labels"], str)
    assert count(load_subject(row).ignore) == box_size(MICCAI_OTHER)  # rows from CSV load too


def test_read_manifest_errors(tmp_path: Path):
    missing = tmp_path / "none.csv"
    with pytest.raises(DataError, match="manifest file not found") as info:
        read_manifest(missing)
    assert info.value.path == str(missing)
    partial = tmp_path / "partial.csv"
    partial.write_text("subject_id,dataset,flair\nx,miccai17,/a.nii.gz\n")
    with pytest.raises(DataError, match="missing columns: site, t1") as info:
        read_manifest(partial)
    assert info.value.path == str(partial)
    with pytest.raises(DataError, match="missing columns"):
        write_manifest(pd.DataFrame({"subject_id": ["x"]}), tmp_path / "w.csv")


@pytest.mark.parametrize("where,explicit,expected", [("root", None, True), ("parent", None, True),
                                                     (None, None, False), ("root", False, False),
                                                     (None, True, True)])
def test_synthetic_marker(tmp_path: Path, where, explicit, expected):
    root = tmp_path / "cohort" / "miccai17"
    write_miccai(root, "Utrecht", "0")
    if where:
        marker_dir = root if where == "root" else root.parent
        (marker_dir / "SYNTHETIC_COHORT.json").write_text("{}")
    df = index_dataset("miccai17", root, synthetic=explicit).manifest
    assert df["synthetic"].tolist() == [expected]


def test_progress_bar(tmp_path: Path, capsys):
    write_miccai(tmp_path, "Utrecht", "0")
    index_dataset("miccai17", tmp_path, progress=True)
    assert "indexing miccai17" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Bad input: each names the offending file / folder and the problem; skip_bad keeps the rest

# (dataset, file role, breaker, phrase, error names the subject folder rather than the file)
BAD_CASES = [
    ("miccai17", "flair", "drop", "missing", True),
    ("miccai17", "t1", "drop", "missing", True),
    ("miccai17", "mask", "drop", "missing", True),
    ("isbi15", "t1", "drop", "missing", True),
    ("isbi15", "rater2", "drop", "missing", True),
    ("msseg16", "flair", "drop", "missing", True),
    ("msseg16", "mask", "drop", "missing", True),
    ("ljubljana", "mask", "drop", "missing", True),
    ("ljubljana", "t1", "drop", "missing", True),
    ("miccai17", "flair", "truncate", "truncated", False),
    ("miccai17", "mask", "truncate", "truncated", False),
    ("isbi15", "flair", "truncate", "truncated", False),  # uncompressed .nii
    ("ljubljana", "t1", "garble", "unreadable", False),
    ("miccai17", "t1", "4d", "expected a 3D volume", False),
    ("msseg16", "mask", "4d", "expected a 3D volume", False),
    ("miccai17", "flair", "nan", "NaN or infinite", False),
    ("isbi15", "t1", "inf", "NaN or infinite", False),
    ("miccai17", "flair", "zero", "all voxels are zero", False),
    ("ljubljana", "t1", "zero", "all voxels are zero", False),
    ("msseg16", "brain_mask", "zero", "brain mask is empty", False),
    ("miccai17", "mask", "label3", "outside the dataset's label set", False),
    ("isbi15", "rater1", "label3", "outside the dataset's label set", False),
    ("msseg16", "brain_mask", "label3", "outside the dataset's label set", False),
    ("miccai17", "mask", "shift", "does not overlap", False),
    ("miccai17", "t1", "shift", "does not overlap", False),
    ("isbi15", "rater2", "shift", "does not overlap", False),
    ("msseg16", "brain_mask", "shift", "does not overlap", False),
    ("ljubljana", "brain_mask", "shift", "does not overlap", False),
]


def two_subjects(dataset: str, root: Path) -> tuple[dict, Path, str]:
    """Write a good subject and a second one to break; return the latter's paths, folder, id."""
    if dataset == "miccai17":
        write_miccai(root, "Utrecht", "0")
        paths = write_miccai(root, "Utrecht", "1", seed=7)
        return paths, root / "Utrecht" / "1", "miccai17_Utrecht_0"
    if dataset == "isbi15":
        write_isbi(root, "training01")
        paths = write_isbi(root, "training02", seed=7)["01"]
        return paths, root / "training" / "training02", "isbi15_training01"
    if dataset == "msseg16":
        write_msseg(root, "Center_01", "Patient_01")
        paths = write_msseg(root, "Center_01", "Patient_02", seed=7)
        return paths, root / "Center_01" / "Patient_02", "msseg16_Center_01_Patient_01"
    write_ljubljana(root, "patient01")
    paths = write_ljubljana(root, "patient02", seed=7, prefixed=False)
    return paths, root / "patient02", "ljubljana_patient01"


@pytest.mark.parametrize("dataset,role,breaker,phrase,names_folder", BAD_CASES,
                         ids=[f"{d}-{r}-{b}" for d, r, b, _, _ in BAD_CASES])
def test_bad_subject(tmp_path: Path, dataset, role, breaker, phrase, names_folder):
    paths, folder, good_id = two_subjects(dataset, tmp_path)
    bad_file = paths[role]
    BREAKERS[breaker](bad_file)
    expected_path = folder if names_folder else bad_file
    with pytest.raises(DataError) as info:
        index_dataset(dataset, tmp_path)
    err = info.value
    assert err.path == str(expected_path)
    assert phrase in str(err)
    if names_folder:  # the message also names the missing file
        assert str(bad_file.relative_to(folder)) in str(err)

    result = index_dataset(dataset, tmp_path, skip_bad=True)
    assert result.manifest["subject_id"].tolist() == [good_id]
    assert len(result.problems) == 1
    assert result.problems[0].path == str(expected_path) and phrase in str(result.problems[0])


def test_singleton_fourth_dimension_is_fine(tmp_path: Path):
    paths = write_miccai(tmp_path, "Utrecht", "0")
    make_4d(paths["flair"], frames=1)
    assert nib.load(str(paths["flair"])).shape == (10, 12, 8, 1)
    row = row_of(index_dataset("miccai17", tmp_path), "miccai17_Utrecht_0")
    assert row["flair_shape"] == "10x12x8"
    assert load_subject(row).flair.shape == (10, 12, 8)


def test_isbi_label2_is_outside_its_label_set(tmp_path: Path):
    paths = write_isbi(tmp_path, "training01")["01"]
    put_label(paths["rater1"], 2)
    with pytest.raises(DataError, match=r"mask labels \[2\] are outside") as info:
        index_dataset("isbi15", tmp_path)
    assert info.value.path == str(paths["rater1"])


def test_duplicate_subject_ids(tmp_path: Path):
    write_miccai(tmp_path, "Utrecht", "0")
    write_miccai(tmp_path, "Amsterdam/GE3T", "100")
    write_miccai(tmp_path, "Amsterdam-GE3T", "100")  # same id after '/' -> '-'
    with pytest.raises(DataError) as info:
        index_dataset("miccai17", tmp_path)
    assert "duplicate subject id miccai17_Amsterdam-GE3T_100" in str(info.value)
    assert str(tmp_path / "Amsterdam" / "GE3T" / "100") in str(info.value)
    assert str(tmp_path / "Amsterdam-GE3T" / "100") in str(info.value)
    result = index_dataset("miccai17", tmp_path, skip_bad=True)
    assert result.manifest["subject_id"].tolist() == ["miccai17_Utrecht_0"]
    assert len(result.problems) == 1 and "duplicate" in str(result.problems[0])


@pytest.mark.parametrize("dataset", DATASETS)
def test_root_without_subjects(tmp_path: Path, dataset: str):
    (tmp_path / "unrelated" / "folder").mkdir(parents=True)
    (tmp_path / "unrelated" / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as info:
        index_dataset(dataset, tmp_path)
    assert info.value.path == str(tmp_path)
    assert f"no {dataset} subjects found" in str(info.value)
    assert "expected the layout" in str(info.value)


def test_root_that_does_not_exist(tmp_path: Path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as info:
        index_dataset("miccai17", root)
    assert info.value.path == str(root)
    with pytest.raises(DataError, match="does not exist"):
        index_cohort(root)


def test_all_subjects_bad_is_still_an_error(tmp_path: Path):
    paths = write_miccai(tmp_path, "Utrecht", "0")
    BREAKERS["nan"](paths["flair"])
    with pytest.raises(DataError) as info:
        index_dataset("miccai17", tmp_path, skip_bad=True)
    assert info.value.path == str(tmp_path)
    assert "no usable miccai17 subjects" in str(info.value) and "NaN" in str(info.value)


def test_manifest_row_pointing_at_deleted_file(tmp_path: Path):
    paths = write_miccai(tmp_path, "Utrecht", "0")
    row = row_of(index_dataset("miccai17", tmp_path), "miccai17_Utrecht_0")
    paths["t1"].unlink()
    with pytest.raises(DataError, match="file not found") as info:
        load_subject(row)
    assert info.value.path == str(paths["t1"])


def test_load_subject_combines_masks_with_ignore_labels(tmp_path: Path):
    """Several masks with an ignore label: ignore = union of ignores, never over lesion."""
    paths = write_miccai(tmp_path, "Utrecht", "0")
    second = tmp_path / "rater2_wmh.nii.gz"
    write_mask(second, [(MICCAI_WMH, 2), (MICCAI_OTHER, 1)])  # labels swapped
    row = row_of(index_dataset("miccai17", tmp_path), "miccai17_Utrecht_0").to_dict()
    row.update(mask=f"{paths['mask']};{second}", mask_rule="union")
    images = load_subject(row)
    assert count(images.lesion) == box_size(MICCAI_WMH) + box_size(MICCAI_OTHER)
    assert count(images.ignore) == 0
    row.update(mask_rule="intersection")
    images = load_subject(row)
    assert count(images.lesion) == 0
    assert count(images.ignore) == box_size(MICCAI_WMH) + box_size(MICCAI_OTHER)
    row.update(mask_rule="vote")
    with pytest.raises(DataError, match="unknown mask_rule 'vote'"):
        load_subject(row)
