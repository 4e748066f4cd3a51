"""``wmhqc triage-slurm``: the job scripts (dry run, no cluster), and a triage of a small BIDS
set as a real SLURM job array and group job on the test cluster (``tests/slurm_cluster.py``),
compared with a local ``wmhqc triage`` of the same participants."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import sbatch_lines, wmhqc_command

from wmhqc_lib.cli import main
from wmhqc_lib.deploy import triage
from wmhqc_lib.study import pipeline

pytest_plugins = ["slurm_cluster"]

PARTICIPANTS = ("01", "02", "03")  # the good ones of bids_input; sub-03 has two sessions


@pytest.fixture(scope="module")
def small_bids(bids_input, tmp_path_factory) -> Path:
    """sub-01, sub-02 and sub-03 (two sessions) of ``bids_input``, in a dataset of their own."""
    root = tmp_path_factory.mktemp("bids_slurm")
    shutil.copy(bids_input / "dataset_description.json", root)
    for label in PARTICIPANTS:
        shutil.copytree(bids_input / f"sub-{label}", root / f"sub-{label}")
    return root


# ---------------------------------------------------------------- scripts (no cluster)


def test_dry_run_writes_the_participant_list_and_both_scripts(small_bids, smoke_bundle,
                                                              tmp_path, capsys):
    out = tmp_path / "derivatives"
    layer = tmp_path / "layer"
    layer.mkdir()
    bundle_root = smoke_bundle.root.resolve()
    code = main(["triage-slurm", str(small_bids), str(out), "--model", str(smoke_bundle.root),
                 "--layer", str(layer), "--partition", "short", "--account", "lab",
                 "--time", "00:10:00", "--time-group", "00:05:00", "--cpus", "3",
                 "--mem", "4G", "--gpus", "1", "--max-parallel", "2",
                 "--sbatch-option=--qos=fast", "--setup", "module load cuda", "--backend",
                 "jax", "--dry-run"])
    assert code == 0
    folder = out.resolve() / "logs" / "slurm"
    assert (folder / "participants.txt").read_text() == "01\n02\n03\n"
    text = {level: (folder / f"triage_{level}.sbatch").read_text()
            for level in ("participant", "group")}
    opts = {level: sbatch_lines(t) for level, t in text.items()}
    for level, time in (("participant", "00:10:00"), ("group", "00:05:00")):
        for want in ("--partition=short", "--account=lab", f"--time={time}", "--cpus-per-task=3",
                     "--mem=4G", "--qos=fast", f"--chdir={pipeline.REPO_ROOT}",
                     f"--job-name=wmhqc-triage-{level}"):
            assert want in opts[level], (level, want)
        body = [ln for ln in text[level].splitlines() if ln and not ln.startswith("#")]
        assert body[:4] == ["set -eo pipefail", f"cd {pipeline.REPO_ROOT}", "module load cuda",
                            "export KERAS_BACKEND=jax"]
    # one task per participant, two at once; GPUs only for the tasks
    assert "--array=1-3%2" in opts["participant"] and "--gres=gpu:1" in opts["participant"]
    assert not any(o.startswith(("--array", "--gres")) for o in opts["group"])
    assert f"--output={folder}/participant-%A_%a.out" in opts["participant"]
    assert f"--output={folder}/group-%j.out" in opts["group"]
    task = wmhqc_command(text["participant"])
    group = wmhqc_command(text["group"])
    common = ["--model", str(bundle_root), "--layer", str(layer.resolve())]
    assert task == ["wmhqc", "triage", str(small_bids.resolve()), str(out.resolve()),
                    "participant", *common, "--participant-label", "$label", "--skip-group",
                    "--quiet", "--nprocs", "3"]
    assert '--participant-label "$label"' in text["participant"]  # expanded by the shell
    assert group == ["wmhqc", "triage", str(small_bids.resolve()), str(out.resolve()), "group",
                     *common]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"sbatch --parsable {folder / 'triage_participant.sbatch'}"
    assert printed[1] == ("sbatch --parsable '--dependency=afterany:<participant job id>' "
                          f"{folder / 'triage_group.sbatch'}")
    assert "3 participant(s)" in printed[2] and "nothing submitted" in printed[2]
    assert not (folder / "submitted.json").exists()


def test_each_array_task_runs_the_participant_on_its_line(small_bids, smoke_bundle, tmp_path):
    """The participant script run by bash as task 2 (a stand-in wmhqc records its arguments):
    it triages the second participant of the list; outside an array it refuses."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "wmhqc").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$WMHQC_ARGS"\n')
    (stub / "wmhqc").chmod(0o755)
    out = tmp_path / "derivatives"
    assert main(["triage-slurm", str(small_bids), str(out), "--model", str(smoke_bundle.root),
                 "--participant-label", "03", "02", "--setup", f"export PATH={stub}:$PATH",
                 "--dry-run"]) == 0
    script = out / "logs" / "slurm" / "triage_participant.sbatch"
    assert (script.parent / "participants.txt").read_text() == "02\n03\n"  # dataset order
    env = dict(os.environ, WMHQC_ARGS=str(tmp_path / "args.txt"), SLURM_ARRAY_TASK_ID="2")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args[args.index("--participant-label") + 1] == "03"
    assert "[slurm] participant 03" in proc.stdout
    env["SLURM_ARRAY_TASK_ID"] = "7"  # no such line
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "no line 7 in" in proc.stderr
    del env["SLURM_ARRAY_TASK_ID"]
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "job array" in proc.stderr


def test_bad_submissions_fail_before_sbatch(small_bids, smoke_bundle, tmp_path, capsys):
    out = tmp_path / "derivatives"
    base = ["triage-slurm", str(small_bids), str(out), "--model", str(smoke_bundle.root),
            "--dry-run"]
    assert main([*base, "--participant-label", "01", "99"]) == 2
    assert "no FLAIR for participant(s) 99" in capsys.readouterr().err
    assert main([*base, "--layer", str(tmp_path / "nolayer")]) == 2
    assert "nolayer: layer not found" in capsys.readouterr().err
    assert main(["triage-slurm", str(small_bids), str(out), "--model", str(tmp_path),
                 "--dry-run"]) == 2
    assert "not a wmhqc model bundle" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(small_bids / "dataset_description.json", empty)
    assert main(["triage-slurm", str(empty), str(out), "--model", str(smoke_bundle.root),
                 "--dry-run"]) == 2
    assert "no sub-*" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a refused submission


# ---------------------------------------------------------------- on the real cluster


def _same(a, b, where: str = "record") -> list[str]:
    """Where two records differ: numbers to 1e-6 (relative), everything else exactly; the
    run times (``*seconds``) are left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{where}.{k}: only in one" for k in set(a) ^ set(b)]
        for k in sorted(set(a) & set(b)):
            if not k.endswith("seconds"):
                diffs += _same(a[k], b[k], f"{where}.{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _same(x, y, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) else [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def test_triage_runs_as_a_real_job_array_then_the_group_job(slurm_cluster, small_bids,
                                                            smoke_bundle, tmp_path, monkeypatch,
                                                            capsys):
    """Three array tasks (one participant each) and the group job, all COMPLETED; every scan's
    record says ok and equals a local ``wmhqc triage`` of the same participants, and the group
    job built ``group_qc.tsv`` from the tasks' records."""
    slurm_cluster.use(monkeypatch)
    out = tmp_path / "cluster"
    code = main(["triage-slurm", str(small_bids), str(out), "--model", str(smoke_bundle.root),
                 "--cpus", "1", "--mem", "3G", "--time", "00:20:00", "--time-group", "00:20:00",
                 "--setup", f"source {shlex.quote(sys.prefix)}/bin/activate"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    folder = out / "logs" / "slurm"
    ids = json.loads((folder / "submitted.json").read_text())
    assert f"participant array {ids['participant']} (3 task(s)" in printed.out
    assert f"group job {ids['group']}" in printed.out and str(folder.resolve()) in printed.out
    # the same participants triaged here, while the cluster works
    local = tmp_path / "local"
    assert main(["triage", str(small_bids), str(local), "participant", "--model",
                 str(smoke_bundle.root), "--quiet"]) == 0
    array, group = ids["participant"], ids["group"]
    states = slurm_cluster.wait(array, group, timeout=900)
    logs = {p.name: p.read_text() for p in folder.glob("*.out")}
    assert states == {f"{array}_1": "COMPLETED", f"{array}_2": "COMPLETED",
                      f"{array}_3": "COMPLETED", group: "COMPLETED"}, (states, logs)
    for k, label in enumerate(PARTICIPANTS, start=1):
        assert f"[slurm] participant {label}" in logs[f"participant-{array}_{k}.out"]
    # every scan: a record that says ok, the same as the local run's, and the same mask
    scans = triage.discover_bids(small_bids)
    assert len(scans) == 4
    for scan in scans:
        remote, here = triage.read_record(out, scan), triage.read_record(local, scan)
        assert remote is not None and remote["status"] == "ok", (scan.prefix, remote)
        assert here["status"] == "ok"
        assert not _same(remote, here), (scan.prefix, _same(remote, here))
        masks = [np.asarray(nib.load(d / scan.output("mask")).dataobj) for d in (out, local)]
        assert np.array_equal(*masks), scan.prefix
    # the group table: built by the group job, after every task, from all four records
    tsv = out / triage.GROUP_TSV
    assert f"group outputs rebuilt from 4 scan record(s) in {out.resolve()}" \
        in logs[f"group-{group}.out"]
    ended = max(datetime.fromisoformat(f["EndTime"]) for f in slurm_cluster.jobs(array).values())
    started = datetime.fromisoformat(slurm_cluster.jobs(group)[group]["StartTime"])
    assert ended <= started
    assert datetime.fromtimestamp(tsv.stat().st_mtime) >= started.replace(microsecond=0)
    table = pd.read_csv(tsv, sep="\t").drop(columns="seconds")
    assert table.equals(pd.read_csv(local / triage.GROUP_TSV, sep="\t").drop(columns="seconds"))
    assert (out / "group_qc.html").is_file()
    assert all((out / f"sub-{label}.html").is_file() for label in PARTICIPANTS)



def test_the_group_job_runs_after_a_failed_task(slurm_cluster, bids_input, smoke_bundle,
                                                tmp_path, monkeypatch):
    """A participant whose FLAIR has no T1: its task fails (exit 1: no scan triaged; its record
    says why), and the group job still runs (``afterany``) and puts the error in
    ``group_qc.tsv``."""
    slurm_cluster.use(monkeypatch)
    bids = tmp_path / "bids"
    bids.mkdir()
    shutil.copy(bids_input / "dataset_description.json", bids)
    shutil.copytree(bids_input / "sub-badnot1", bids / "sub-badnot1")
    out = tmp_path / "cluster"
    assert main(["triage-slurm", str(bids), str(out), "--model", str(smoke_bundle.root),
                 "--cpus", "1", "--mem", "3G", "--time", "00:20:00", "--time-group", "00:20:00",
                 "--setup", f"source {shlex.quote(sys.prefix)}/bin/activate"]) == 0
    folder = out / "logs" / "slurm"
    ids = json.loads((folder / "submitted.json").read_text())
    array, group = ids["participant"], ids["group"]
    states = slurm_cluster.wait(array, group, timeout=600)
    jobs = {**slurm_cluster.jobs(array), **slurm_cluster.jobs(group)}
    assert states == {f"{array}_1": "FAILED", group: "FAILED"}, states
    # wmhqc triage's exit status 1, no scan triaged, in both: said, not hidden
    assert jobs[f"{array}_1"]["ExitCode"] == jobs[group]["ExitCode"] == "1:0"
    log = (folder / f"group-{group}.out").read_text()
    assert f"group outputs rebuilt from 1 scan record(s) in {out.resolve()}" in log
    table = pd.read_csv(out / triage.GROUP_TSV, sep="\t")
    assert table["participant_id"].tolist() == ["sub-badnot1"]
    assert table["status"].tolist() == ["error"] and "T1w" in table["reason"].iloc[0]
