"""``wmhqc check-scale``: sizes that cannot work are refused before anything is built, and on the
smoke profile every network is timed and the projection follows from the measured times."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from wmhqc_lib import cli
from wmhqc_lib.config import PROFILES_FILE, load_profile
from wmhqc_lib.study import scale


def _profile_with(tmp_path, name: str, **sections):
    """The smoke profile with some keys changed, from a copy of profiles.yml."""
    data = yaml.safe_load(PROFILES_FILE.read_text())
    for section, values in sections.items():
        data["smoke"].setdefault(section, {}).update(values)
    path = tmp_path / "profiles.yml"
    path.write_text(yaml.safe_dump(data))
    return load_profile(name, path)


def test_every_shipped_profile_has_workable_sizes():
    for name in ("smoke", "cpu", "paper"):
        assert scale.check_sizes(load_profile(name)) == [], name


def test_sizes_that_cannot_work_are_each_named(tmp_path):
    profile = _profile_with(tmp_path, "smoke", mc_unet={"patch": [20, 16, 16], "mc_batch": 0},
                            rec_unet={"patch": [32, 32, 32]},
                            dice_regression={"input_pool": 4})
    problems = scale.check_sizes(profile)
    text = "\n".join(problems)
    assert "mc_unet.patch [20, 16, 16] is not a multiple of 8" in text
    assert "rec_unet.patch [32, 32, 32] is larger than preprocess.shape [24, 24, 24]" in text
    assert "mc_batch (0)" in text
    assert "input_pool 4 leaves nothing after 4 max-pools" in text
    with pytest.raises(scale.ScaleError, match="cannot run at its sizes"):
        scale.check_scale(profile, log=lambda _: None)


def test_cli_refuses_an_unworkable_profile_with_status_2(tmp_path, monkeypatch, capsys):
    profile = _profile_with(tmp_path, "smoke", preprocess={"shape": [24, 24, 20]})
    monkeypatch.setattr(cli, "load_profile", lambda name: profile)
    assert cli.main(["check-scale", "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "preprocess.shape [24, 24, 20] is not a multiple of 8" in err


def test_a_chunk_that_cannot_fit_is_refused_naming_the_setting(monkeypatch):
    # 10 MB: enough for a smoke training step (about 7 MB of activations and gradients), not
    # for the 5 samples of one MC chunk on the whole 24^3 grid (about 19 MB)
    monkeypatch.setattr(scale, "available_memory", lambda: (10 * 2**20, "host"))
    with pytest.raises(scale.ScaleError, match=r"chunks of 5 samples.*lower mc_unet\.mc_batch"):
        scale.check_scale(load_profile("smoke"), log=lambda _: None)


def test_case_counts_split_the_cohort_like_the_folds():
    counts = scale.case_counts(load_profile("cpu"))
    assert counts["all"] == 105  # the paper's 105 subjects, synthetic
    assert counts["train"] + counts["val"] + counts["test"] == counts["all"]
    assert counts["test"] == 21 and counts["val"] == 16  # 16 of 84 in the paper
    assert scale.case_counts(load_profile("cpu"), cases=40)["all"] == 40


@pytest.mark.slow
def test_check_scale_times_every_network_on_smoke_and_projects_from_those_times(tmp_path,
                                                                               capsys):
    out = tmp_path / "check_scale.md"
    assert cli.main(["check-scale", "--profile", "smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert set(stages) == {"MC U-net input batch", "MC U-net training step",
                           "MC U-net validation pass", "MC inference, one case",
                           "Rec U-net input batch", "Rec U-net training step",
                           "reconstruction, one case", "Dice regressor training step",
                           "Dice regressor prediction, one case"}
    for s in stages.values():
        assert s["seconds"] > 0 and s["first_s"] > 0 and s["host_peak_mb"] > 100, s
    assert stages["MC inference, one case"]["gflop"] > stages["MC U-net validation pass"]["gflop"]
    # the projection: the profile's counts times the steady times, plus the tracing once
    profile, counts = load_profile("smoke"), report["cases"]
    mc = profile.section("mc_unet")
    steady = {k: s["seconds"] for k, s in stages.items()}
    tracing = {k: max(s["first_s"] - s["seconds"], 0.0) for k, s in stages.items()}
    expected = mc["epochs"] * (mc["steps_per_epoch"] * (
        steady["MC U-net training step"] + steady["MC U-net input batch"])
        + counts["val"] * steady["MC U-net validation pass"]) \
        + tracing["MC U-net training step"] + tracing["MC U-net validation pass"]
    assert math.isclose(report["projection"]["MC U-net training"], expected, rel_tol=1e-9)
    assert math.isclose(report["projection"]["MC inference (every case)"],
                        counts["all"] * steady["MC inference, one case"]
                        + tracing["MC inference, one case"], rel_tol=1e-9)
    assert math.isclose(report["work"]["MC inference (every case)"],
                        counts["all"] * stages["MC inference, one case"]["gflop"], rel_tol=1e-9)
    assert report["work"]["MC U-net training"] > 3 * stages["MC U-net training step"]["gflop"]
    table = out.read_text()
    assert table in printed
    assert "| **whole study (2 folds)** |" in table and "MC inference, one case" in table
    assert "TFLOP per fold" in table
