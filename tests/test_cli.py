"""The command line: each data subcommand on the smoke cohort, and clear errors with exit 2."""

from __future__ import annotations

import pandas as pd

from wmhqc_lib.cli import main
from wmhqc_lib.config import load_profile


def test_index_and_folds_commands(smoke_cohort, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    assert main(["data", "index", "--root", str(smoke_cohort), "--out", str(manifest)]) == 0
    table = pd.read_csv(manifest)
    assert set(table["dataset"]) == {"miccai17", "isbi15", "msseg16", "ljubljana"}
    single = tmp_path / "isbi.csv"
    assert main(["data", "index", "--dataset", "isbi15", "--root",
                 str(smoke_cohort / "isbi15"), "--out", str(single),
                 "--isbi-raters", "intersection"]) == 0
    isbi = pd.read_csv(single)
    assert set(isbi["mask_rule"]) == {"intersection"} and len(isbi) >= 2
    folds = tmp_path / "folds.csv"
    assert main(["data", "folds", "--manifest", str(manifest), "--out", str(folds),
                 "--profile", "smoke"]) == 0
    assert "test" in capsys.readouterr().out
    assert len(pd.read_csv(folds)) == load_profile("smoke").folds.n_folds * len(table)


def test_combine_refuses_duplicate_subjects(smoke_cohort, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    main(["data", "index", "--dataset", "ljubljana", "--root", str(smoke_cohort / "ljubljana"),
          "--out", str(manifest)])
    code = main(["data", "combine", str(manifest), str(manifest), "--out",
                 str(tmp_path / "c.csv")])
    assert code == 2
    assert "ljubljana_patient01" in capsys.readouterr().err


def test_bad_root_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["data", "index", "--dataset", "miccai17", "--root", str(missing), "--out",
                 str(tmp_path / "m.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "wmhqc: error" in err
    assert not (tmp_path / "m.csv").exists()


def test_synth_refuses_a_folder_made_with_other_settings(smoke_cohort, capsys):
    code = main(["data", "synth", "--out", str(smoke_cohort), "--profile", "smoke",
                 "--seed", "12345"])
    assert code == 2
    assert "other settings" in capsys.readouterr().err


def test_profile_option_takes_any_profile_of_the_file(tmp_path, monkeypatch, capsys):
    """``--profile`` names any section of the profiles file, a user's own included; an unknown
    name fails while parsing, with exit 2 and the profiles that exist."""
    import pytest
    import yaml

    from wmhqc_lib import config
    from wmhqc_lib.cli import build_parser

    raw = yaml.safe_load(config.PROFILES_FILE.read_text())
    raw["my_lab"] = {"folds": {"n_folds": 3}}
    own = tmp_path / "profiles.yml"
    own.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setattr(config, "PROFILES_FILE", own)
    parser = build_parser()
    for name in (*config.PROFILE_NAMES, "my_lab"):
        assert parser.parse_args(["reproduce", "--profile", name]).profile == name
    args = parser.parse_args(["export", "--results", str(tmp_path / "my_lab"), "--out",
                              str(tmp_path / "b"), "--profile", "my_lab"])
    assert args.profile == "my_lab"
    assert load_profile("my_lab").folds.n_folds == 3
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["data", "synth", "--out", str(tmp_path / "c"), "--profile", "nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown profile 'nope'" in err and "smoke, cpu, paper, my_lab" in err
    assert not (tmp_path / "c").exists()


def test_triage_and_calibrate_options_are_checked_when_parsed(capsys):
    """``--audit-fraction`` must be a share; ``calibrate`` needs its bundle and verdict file."""
    import pytest

    for bad in ("1.5", "-0.1", "some"):
        with pytest.raises(SystemExit) as exc:
            main(["triage", "bids", "out", "participant", "--model", "m",
                  "--audit-fraction", bad])
        assert exc.value.code == 2 and "--audit-fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "out", "--model", "m"])
    assert exc.value.code == 2 and "--verdicts" in capsys.readouterr().err
    code = main(["calibrate", "nowhere", "--model", "no_bundle", "--verdicts", "v.tsv"])
    assert code == 2 and "not a wmhqc model bundle" in capsys.readouterr().err
