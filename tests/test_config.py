"""Run profiles: the shipped smoke / cpu / paper profiles, deep overrides, and errors."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from wmhqc_lib.config import (
    PROFILE_NAMES,
    PROFILES_FILE,
    FoldSettings,
    PreprocessSettings,
    Profile,
    SynthSettings,
    load_profile,
)


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_shipped_profiles_load(name):
    profile = load_profile(name)
    assert isinstance(profile, Profile) and profile.name == name
    assert isinstance(profile.synth, SynthSettings)
    assert isinstance(profile.preprocess, PreprocessSettings)
    assert isinstance(profile.folds, FoldSettings)
    assert profile.seed == 2024
    assert len(profile.preprocess.shape) == len(profile.preprocess.voxel_mm) == 3
    assert all(isinstance(v, int) for v in profile.preprocess.shape)
    assert all(isinstance(v, float) for v in profile.preprocess.voxel_mm)
    assert profile.preprocess.clip_percentiles == (0.5, 99.5)
    assert 0 < profile.folds.val_fraction < 0.5
    assert set(profile.synth.hard_cases) == {"tiny_lesions", "low_contrast", "high_noise",
                                             "ghosting", "other_pathology"}


def test_paper_profile():
    paper = load_profile("paper")
    assert paper.preprocess.shape == (128, 128, 128)
    assert paper.preprocess.voxel_mm == (1.5, 1.5, 1.5)
    assert paper.synth.voxel_scale == 1.0 and paper.synth.working_mm == 1.0
    assert paper.synth.workers == 8 and paper.preprocess.workers == 8
    # Keys the paper profile does not set come from the defaults.
    assert paper.folds.n_folds == 5
    assert paper.synth.lesion_load_mean_pct == 1.48
    assert paper.preprocess.crop_margin_mm == 4.0


def test_cpu_profile_is_the_defaults():
    cpu = load_profile("cpu")
    assert cpu.folds.n_folds == 5
    assert cpu.folds.val_fraction == pytest.approx(0.1905)
    assert cpu.folds.load_bins == 3
    assert cpu.synth.subjects_scale == 1.0
    with open(PROFILES_FILE) as fh:
        defaults = yaml.safe_load(fh)["defaults"]
    assert cpu.sections["synth"] == defaults["synth"]
    assert cpu.sections["preprocess"] == defaults["preprocess"]


def test_smoke_profile_overrides_deep_keys():
    smoke, cpu = load_profile("smoke"), load_profile("cpu")
    assert smoke.folds.n_folds == 2
    assert smoke.folds.val_fraction == 0.4 and cpu.folds.val_fraction == pytest.approx(0.1905)
    assert smoke.folds.load_bins == cpu.folds.load_bins  # not overridden: kept
    assert smoke.synth.working_mm == 4.0 and smoke.synth.subjects_scale == 0.1
    assert smoke.synth.hard_cases == cpu.synth.hard_cases
    assert smoke.preprocess.shape == (24, 24, 24)
    assert smoke.preprocess.clip_percentiles == cpu.preprocess.clip_percentiles


def test_default_profile_from_environment(monkeypatch):
    monkeypatch.setenv("WMHQC_PROFILE", "smoke")
    assert load_profile().name == "smoke"
    monkeypatch.delenv("WMHQC_PROFILE")
    assert load_profile().name == "cpu"
    monkeypatch.setenv("WMHQC_PROFILE", "smoke")
    assert load_profile("paper").name == "paper"  # an explicit name wins


@pytest.mark.parametrize("name", ["nope", "defaults", "Smoke"])
def test_unknown_profile_names_the_file(name):
    with pytest.raises(ValueError, match="unknown profile") as err:
        load_profile(name)
    message = str(err.value)
    assert str(PROFILES_FILE) in message
    assert repr(name) in message
    assert "smoke, cpu, paper" in message


CUSTOM = textwrap.dedent("""\
    defaults:
      seed: 7
      synth:
        voxel_scale: 2.0
        working_mm: 2.0
        subjects_scale: 1.0
        min_subjects_per_site: 2
        lesion_load_mean_pct: 1.5
        lesion_load_sd_pct: 1.4
        hard_cases: {tiny_lesions: 0.1, ghosting: 0.05}
        isbi_timepoints: 2
        workers: 2
      preprocess:
        voxel_mm: [4, 4, 4]
        shape: [48, 56, 48]
        clip_percentiles: [1, 99]
        crop_margin_mm: 4
        workers: 2
      folds: {n_folds: 5, val_fraction: 0.2, load_bins: 3}
      models: {epochs: 10, optimizer: {name: adam, lr: 0.001}}
    mine:
      synth:
        working_mm: 3.0
        hard_cases: {ghosting: 0.5}
      preprocess:
        voxel_mm: [2, 2, 2]
      models:
        optimizer: {lr: 0.01}
    empty:
    """)


@pytest.fixture
def custom_file(tmp_path):
    path = tmp_path / "profiles.yml"
    path.write_text(CUSTOM)
    return path


def test_custom_file_deep_merge(custom_file):
    mine = load_profile("mine", path=custom_file)
    assert mine.seed == 7
    assert mine.synth.working_mm == 3.0
    assert mine.synth.voxel_scale == 2.0
    assert mine.synth.hard_cases == {"tiny_lesions": 0.1, "ghosting": 0.5}
    assert mine.preprocess.voxel_mm == (2.0, 2.0, 2.0)  # lists are replaced whole
    assert mine.preprocess.shape == (48, 56, 48)
    assert mine.preprocess.clip_percentiles == (1.0, 99.0)
    assert mine.preprocess.crop_margin_mm == 4.0
    assert isinstance(mine.preprocess.crop_margin_mm, float)
    assert mine.folds == FoldSettings(n_folds=5, val_fraction=0.2, load_bins=3)
    assert mine.section("models") == {"epochs": 10, "optimizer": {"name": "adam", "lr": 0.01}}


def test_custom_file_empty_profile_is_the_defaults(custom_file):
    empty = load_profile("empty", path=custom_file)
    assert empty.synth.working_mm == 2.0 and empty.synth.hard_cases["ghosting"] == 0.05
    assert empty.section("models")["optimizer"]["lr"] == 0.001
    # Merging "mine" did not leak into the defaults.
    load_profile("mine", path=custom_file)
    assert load_profile("empty", path=custom_file).synth.working_mm == 2.0


def test_custom_file_unknown_profile_names_it(custom_file):
    with pytest.raises(ValueError, match="unknown profile 'smoke'") as err:
        load_profile("smoke", path=custom_file)
    assert str(custom_file) in str(err.value)
    assert "mine, empty" in str(err.value)


def test_missing_profiles_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_profile("cpu", path=tmp_path / "absent.yml")


def test_section_is_a_copy_and_missing_section_errors(custom_file):
    mine = load_profile("mine", path=custom_file)
    models = mine.section("models")
    models["optimizer"]["lr"] = 99.0
    assert mine.section("models")["optimizer"]["lr"] == 0.01
    assert mine.section("folds") == {"n_folds": 5, "val_fraction": 0.2, "load_bins": 3}
    with pytest.raises(KeyError, match="has no section 'qc'") as err:
        mine.section("qc")
    assert "'mine'" in str(err.value)
    with pytest.raises(KeyError, match="no section .no_such_section."):
        load_profile("cpu").section("no_such_section")


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_guarantee_section_is_complete_in_every_profile(name):
    """Chapter 08 and benchmarks/guarantee.py read these keys; sizes name the study's counts."""
    from wmhqc_lib.qc import guarantee

    settings = load_profile(name).section("guarantee")
    for key in ("targets", "simulation_targets"):
        values = settings[key]
        assert values == sorted(values) and all(0 < t < 1 for t in values), key
    assert all(0 < c < 1 for c in [settings["confidence"], *settings["simulation_confidences"]])
    assert isinstance(settings["draws"], int) and settings["draws"] >= 100
    sizes = guarantee.calibration_sizes(settings["calibration_sizes"], 80, 185)
    assert list(sizes.values()) == [80, 185]


def test_guarantee_draws_grow_from_smoke_to_paper():
    draws = {n: load_profile(n).section("guarantee")["draws"] for n in PROFILE_NAMES}
    assert draws["smoke"] < draws["cpu"] <= draws["paper"]
