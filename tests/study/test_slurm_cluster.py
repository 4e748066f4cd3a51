"""The study's SLURM path on a real single-node cluster (``tests/slurm_cluster.py``): the data
job, the fold array and the final job of ``wmhqc slurm``, submitted with the real ``sbatch``."""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime

import pandas as pd

from wmhqc_lib.cli import main
from wmhqc_lib.study import pipeline

pytest_plugins = ["slurm_cluster"]


def test_the_cluster_runs_a_job_array_and_a_dependent_job(slurm_cluster, tmp_path):
    """The cluster itself: a 3-task array, then a job after it (``afterany``)."""
    script = tmp_path / "array.sh"
    script.write_text("#!/bin/bash\n"
                      f"#SBATCH --output={tmp_path}/task-%a.out\n"
                      "#SBATCH --cpus-per-task=1 --mem=100M\n"
                      'echo "task $SLURM_ARRAY_TASK_ID"\n')
    array = slurm_cluster.run("sbatch", "--parsable", "--array=1-3", str(script)).strip()
    after = slurm_cluster.run("sbatch", "--parsable", f"--dependency=afterany:{array}",
                              f"--output={tmp_path}/after.out", "--wrap",
                              f"ls {tmp_path} > {tmp_path}/seen.txt").strip()
    states = slurm_cluster.wait(array, after, timeout=120)
    assert states == {f"{array}_1": "COMPLETED", f"{array}_2": "COMPLETED",
                      f"{array}_3": "COMPLETED", after: "COMPLETED"}, states
    for k in (1, 2, 3):
        assert (tmp_path / f"task-{k}.out").read_text() == f"task {k}\n"
    seen = (tmp_path / "seen.txt").read_text().split()
    assert {"task-1.out", "task-2.out", "task-3.out"} <= set(seen)  # it ran after the array
    print(f"cluster started in {slurm_cluster.started_in:.1f} s")


def _times(cluster, job_id: str) -> dict[str, tuple[datetime, datetime]]:
    """(start, end) of each job or array task, as the controller recorded them."""
    return {key: (datetime.fromisoformat(f["StartTime"]), datetime.fromisoformat(f["EndTime"]))
            for key, f in cluster.jobs(job_id).items()}


def test_wmhqc_slurm_runs_the_smoke_study_as_a_chain_of_real_jobs(slurm_cluster, smoke_cohort,
                                                                     tmp_path, monkeypatch,
                                                                     capsys):
    """``wmhqc slurm`` on the smoke profile, both folds: the data job, a 2-task fold array
    and the final job run in that order on the cluster and leave the study's outputs: every
    step's record, each fold's notebooks, the all-fold tables over both folds, the book."""
    slurm_cluster.use(monkeypatch)
    results = tmp_path / "results"
    code = main(["slurm", "--profile", "smoke", "--results", str(results),
                 "--data-root", str(smoke_cohort), "--partition", slurm_cluster.partition,
                 "--cpus", "1", "--mem", "6G", "--time-data", "00:20:00",
                 "--time-fold", "00:30:00", "--time-final", "00:30:00",
                 "--setup", f"source {shlex.quote(sys.prefix)}/bin/activate"])
    assert code == 0, capsys.readouterr().err
    ids = json.loads((results / "slurm" / "submitted.json").read_text())
    assert f"data job {ids['data']} -> fold array {ids['folds']} (folds 1-2) -> final job " \
           f"{ids['final']}" in capsys.readouterr().out
    states = slurm_cluster.wait(ids["data"], ids["folds"], ids["final"], timeout=900)
    logs = results / "logs"
    assert states == {ids["data"]: "COMPLETED", f"{ids['folds']}_1": "COMPLETED",
                      f"{ids['folds']}_2": "COMPLETED", ids["final"]: "COMPLETED"}, \
        (states, *(p.read_text()[-3000:] for p in sorted(logs.glob("slurm-*.out"))))
    # in order: the array after the data job, the final job after both tasks
    data = _times(slurm_cluster, ids["data"])[ids["data"]]
    tasks = _times(slurm_cluster, ids["folds"])
    final = _times(slurm_cluster, ids["final"])[ids["final"]]
    assert set(tasks) == {f"{ids['folds']}_1", f"{ids['folds']}_2"}
    for start, end in tasks.values():
        assert data[1] <= start and end <= final[0], (data, tasks, final)
    # each job ran its own stage: the data step once, each fold's steps in its own task
    fold_steps = [s.name for s in pipeline.select_steps("folds")]
    data_log = (logs / f"slurm-data-{ids['data']}.out").read_text()
    assert "01_data" in data_log and not any(s in data_log for s in fold_steps)
    for k in (1, 2):
        task_log = (logs / f"slurm-{ids['folds']}_{k}.out").read_text()
        assert f"task {k} on " in task_log and "01_data" not in task_log
        assert f"{len(fold_steps)} ran, 0 skipped, 0 failed, 0 blocked" in task_log
        for step in fold_steps:
            assert (results / "stamps" / f"{step}-fold{k}.json").is_file(), (step, k)
            assert (results / "notebooks" / f"fold{k}" / f"{step}.ipynb").is_file()
            assert f"[run ] {step} fold {k} -> " in task_log
            assert f"[run ] {step} fold {3 - k} -> " not in task_log
    final_log = (logs / f"slurm-final-{ids['final']}.out").read_text()
    for step in pipeline.select_steps("final"):
        assert (results / "stamps" / f"{step.name}.json").is_file(), step.name
    assert f"{len(pipeline.select_steps('final')) + 1} ran, 0 skipped, 0 failed, 0 blocked" \
        in final_log  # the all-fold steps and the book
    cases = pd.read_csv(results / "evaluation" / "cases_all_folds.csv")
    assert sorted(cases["fold"].unique()) == [1, 2]
    assert (results / "book" / "_build" / "html" / "index.html").is_file()
