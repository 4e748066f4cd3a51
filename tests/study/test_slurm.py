"""SLURM submission: the job scripts, the sbatch chain (a stand-in sbatch on PATH) and the
``reproduce --stage`` split of the pipeline that the jobs run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import sbatch_lines, wmhqc_command, write_test_notebook

from wmhqc_lib.cli import main
from wmhqc_lib.config import load_profile
from wmhqc_lib.study import pipeline, slurm

# ---------------------------------------------------------------- helpers


def _option(cmd: list[str], name: str) -> list[str]:
    """Values after ``name`` up to the next option."""
    i = cmd.index(name) + 1
    values = []
    while i < len(cmd) and not cmd[i].startswith("--"):
        values.append(cmd[i])
        i += 1
    return values


def _fake_sbatch(tmp_path: Path, monkeypatch, fail_at: int | None = None) -> Path:
    """An ``sbatch`` first on PATH: records its argv (one line per call), prints job ids
    (``1001``, ``1002;clusterA``, ``1003``), or fails on call ``fail_at``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch_calls.txt"
    script = bindir / "sbatch"
    script.write_text(
        "#!/bin/bash\n"
        'echo "$*" >> "$FAKE_SBATCH_LOG"\n'
        'n=$(wc -l < "$FAKE_SBATCH_LOG")\n'
        'if [ "$n" = "${FAKE_SBATCH_FAIL_AT:-0}" ]; then\n'
        '  echo "sbatch: error: Batch job submission failed: Invalid account or '
        'account/partition combination specified" >&2; exit 1\n'
        "fi\n"
        'case "$n" in 1) echo 1001;; 2) echo "1002;clusterA";; *) echo 1003;; esac\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(log))
    if fail_at is not None:
        monkeypatch.setenv("FAKE_SBATCH_FAIL_AT", str(fail_at))
    return log


def _calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


# ---------------------------------------------------------------- job scripts


def test_array_spec_and_job_id_parsing():
    assert slurm.array_spec([1, 2, 3]) == "1-3"
    assert slurm.array_spec([3, 1]) == "1,3"
    assert slurm.array_spec([2]) == "2"
    assert slurm.array_spec(range(1, 6), max_parallel=2) == "1-5%2"
    assert slurm.parse_job_id("1001\n") == "1001"
    assert slurm.parse_job_id("1002;clusterA\n") == "1002"
    with pytest.raises(slurm.SlurmError, match="no job id"):
        slurm.parse_job_id("Submitted batch job\n")


def test_job_scripts_hold_the_cluster_settings_and_stage_commands(tmp_path):
    data = tmp_path / "data"
    jobs = slurm.plan("smoke", results_dir=tmp_path / "res", data_root=data, seed=7)
    assert jobs.folds == [1, 2]  # the smoke profile's n_folds
    settings = slurm.ClusterSettings(
        partition="gpu-long", account="proj42", time_data="01:00:00", time_fold="12:00:00",
        time_final="00:30:00", gpus=2, gpu_type="a100", cpus=8, mem="64G",
        extra_sbatch=("--qos=long", "#SBATCH --constraint=ib"),
        setup="module load cuda/12.2 && source .venv/bin/activate", backend="jax")
    scripts = slurm.write_scripts(jobs, settings)
    res = (tmp_path / "res").resolve()
    assert scripts == {k: res / "slurm" / f"{k}.sbatch" for k in ("data", "folds", "final")}
    assert (res / "logs").is_dir()  # SLURM does not create the log folder
    text = {k: p.read_text() for k, p in scripts.items()}
    opts = {k: sbatch_lines(t) for k, t in text.items()}
    for kind, time in (("data", "01:00:00"), ("folds", "12:00:00"), ("final", "00:30:00")):
        o = opts[kind]
        assert text[kind].startswith("#!/bin/bash\n")
        for want in ("--partition=gpu-long", "--account=proj42", f"--time={time}",
                     "--cpus-per-task=8", "--mem=64G", "--qos=long", "--constraint=ib",
                     f"--chdir={pipeline.REPO_ROOT}", f"--job-name=wmhqc-{kind}"):
            assert want in o, (kind, want)
        # every #SBATCH line precedes the first command, which sbatch requires
        body = [ln for ln in text[kind].splitlines()[1:] if ln and not ln.startswith("#")]
        last_sbatch = max(i for i, ln in enumerate(text[kind].splitlines())
                          if ln.startswith("#SBATCH"))
        assert text[kind].splitlines().index(body[0]) > last_sbatch
        assert "module load cuda/12.2 && source .venv/bin/activate" in body
        assert "export KERAS_BACKEND=jax" in body
        assert body.index("export KERAS_BACKEND=jax") < body.index(
            next(ln for ln in body if ln.startswith("wmhqc ")))
        assert f"cd {pipeline.REPO_ROOT}" in body
        cmd = wmhqc_command(text[kind])
        assert cmd[:2] == ["wmhqc", "reproduce"]
        assert _option(cmd, "--stage") == [kind]
        assert _option(cmd, "--profile") == ["smoke"]
        assert _option(cmd, "--results") == [str(res)]
        assert _option(cmd, "--data-root") == [str(data.resolve())]
        assert _option(cmd, "--seed") == ["7"]
    # GPUs and the array only for the fold tasks
    assert "--gres=gpu:a100:2" in opts["folds"] and "--array=1-2" in opts["folds"]
    assert not any(o.startswith(("--gres", "--gpus", "--array")) for k in ("data", "final")
                   for o in opts[k])
    assert f"--output={res}/logs/slurm-%A_%a.out" in opts["folds"]
    assert f"--output={res}/logs/slurm-data-%j.out" in opts["data"]
    assert f"--output={res}/logs/slurm-final-%j.out" in opts["final"]
    cmds = {k: wmhqc_command(t) for k, t in text.items()}
    assert _option(cmds["folds"], "--folds") == ["$SLURM_ARRAY_TASK_ID"]
    assert '--folds "$SLURM_ARRAY_TASK_ID"' in text["folds"]  # expanded by the shell
    assert "--no-book" in cmds["folds"] and "--no-book" in cmds["data"]
    assert "--folds" not in cmds["data"]
    assert "--no-book" not in cmds["final"]  # the final job builds the book
    assert _option(cmds["final"], "--folds") == ["1", "2"]


def test_chosen_folds_gpus_option_and_defaults(tmp_path):
    jobs = slurm.plan("paper", results_dir=tmp_path, folds=[3, 1])
    settings = slurm.ClusterSettings(partition="p", gpus=1, gpu_option="gpus",
                                     max_parallel=1, setup="", mem=None)
    text = {k: p.read_text() for k, p in slurm.write_scripts(jobs, settings).items()}
    folds = sbatch_lines(text["folds"])
    assert "--array=1,3%1" in folds and "--gpus=1" in folds
    assert not any(o.startswith(("--account", "--mem")) for o in folds)
    assert "KERAS_BACKEND" not in text["folds"]
    assert _option(wmhqc_command(text["final"]), "--folds") == ["1", "3"]
    for t in text.values():  # no data root: the jobs use the profile's synthetic cohort
        assert "--data-root" not in wmhqc_command(t)
    with pytest.raises(ValueError, match=r"outside 1\.\.2"):
        slurm.plan("smoke", results_dir=tmp_path, folds=[4])


def test_a_per_fold_step_needing_a_final_step_is_refused():
    steps = [pipeline.Step("a.ipynb"), pipeline.Step("b.ipynb", per_fold=True),
             pipeline.Step("c.ipynb"), pipeline.Step("d.ipynb", per_fold=True, depends=("c",))]
    with pytest.raises(ValueError, match="d needs c"):
        slurm._check_stages(steps)
    slurm._check_stages()  # the project's own chain splits cleanly


# ---------------------------------------------------------------- submission


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return ["slurm", "--profile", "smoke", "--results", str(tmp_path / "res"), "--partition",
            "gpu", "--account", "proj", "--gpus", "1", "--time-fold", "08:00:00", *extra]


def test_submit_chains_the_jobs_with_afterok(tmp_path, monkeypatch, capsys):
    log = _fake_sbatch(tmp_path, monkeypatch)
    assert main(_cli(tmp_path)) == 0
    script_dir = (tmp_path / "res" / "slurm").resolve()
    calls = _calls(log)
    assert [c[-1] for c in calls] == [str(script_dir / f"{k}.sbatch")
                                      for k in ("data", "folds", "final")]
    assert all(c[0] == "--parsable" for c in calls)
    assert not any(a.startswith("--dependency") for a in calls[0])
    assert "--dependency=afterok:1001" in calls[1]  # fold array after the data job
    assert "--dependency=afterok:1002" in calls[2]  # final after the whole array (id sans ;cluster)
    assert all("--kill-on-invalid-dep=yes" in c for c in calls[1:])
    assert json.loads((script_dir / "submitted.json").read_text()) == \
        {"data": "1001", "folds": "1002", "final": "1003"}
    out = capsys.readouterr().out
    assert "data job 1001 -> fold array 1002 (folds 1-2) -> final job 1003" in out
    folds = (script_dir / "folds.sbatch").read_text()
    assert "#SBATCH --gres=gpu:1" in folds and "#SBATCH --time=08:00:00" in folds


def test_dry_run_submits_nothing(tmp_path, monkeypatch, capsys):
    log = _fake_sbatch(tmp_path, monkeypatch)
    assert main(_cli(tmp_path, "--dry-run")) == 0
    assert not log.exists()
    out = capsys.readouterr().out.splitlines()
    script_dir = (tmp_path / "res" / "slurm").resolve()
    assert out[0] == f"sbatch --parsable {script_dir / 'data.sbatch'}"
    assert "--dependency=afterok:<data job id>" in out[1] and "folds.sbatch" in out[1]
    assert "--dependency=afterok:<folds job id>" in out[2] and "final.sbatch" in out[2]
    assert "nothing submitted" in out[3]
    assert all((script_dir / f"{k}.sbatch").exists() for k in ("data", "folds", "final"))
    assert not (script_dir / "submitted.json").exists()


def test_failing_sbatch_names_the_script(tmp_path, monkeypatch, capsys):
    _fake_sbatch(tmp_path, monkeypatch, fail_at=1)
    assert main(_cli(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "sbatch failed for" in err and "data.sbatch" in err and "(exit 1)" in err
    assert "Invalid account" in err


def test_failure_after_a_submission_lists_what_to_cancel(tmp_path, monkeypatch):
    log = _fake_sbatch(tmp_path, monkeypatch, fail_at=2)
    jobs = slurm.plan("smoke", results_dir=tmp_path / "res")
    with pytest.raises(slurm.SlurmError, match=r"folds\.sbatch.*already submitted: data 1001"):
        slurm.submit(jobs, slurm.ClusterSettings(partition="p"))
    assert len(_calls(log)) == 2  # the final job was not submitted
    with pytest.raises(slurm.SlurmError, match="not found on PATH"):
        slurm.submit(jobs, slurm.ClusterSettings(partition="p"),
                     sbatch=str(tmp_path / "no-sbatch"))


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_slurm_passes_the_variables():
    proc = subprocess.run(
        ["make", "-n", "slurm", "PROFILE=smoke", "PARTITION=gpu", "ACCOUNT=proj", "GPUS=2",
         "TIME=10:00:00", "FOLDS=1 2", "DATA_ROOT=/data/wmh", "DRY_RUN=1"],
        cwd=pipeline.REPO_ROOT, capture_output=True, text=True, check=True)
    line = " ".join(proc.stdout.replace("\\\n", " ").split())
    for want in ("wmhqc slurm --profile smoke --results results/smoke --partition gpu",
                 "--data-root /data/wmh", "--folds 1 2", "--account proj", "--gpus 2",
                 "--time-fold 10:00:00", "--dry-run"):
        assert want in line, want


# ---------------------------------------------------------------- reproduce --stage


def test_stages_split_the_chain():
    assert [s.name for s in pipeline.select_steps("data")] == ["01_data"]
    folds = pipeline.select_steps("folds")
    assert folds and all(s.per_fold for s in folds)
    final = pipeline.select_steps("final")
    assert not any(s.per_fold for s in final)
    assert sorted(pipeline.select_steps("data") + folds + final, key=pipeline.STEPS.index) \
        == pipeline.STEPS  # every step in exactly one stage
    steps = [pipeline.Step("a.ipynb"), pipeline.Step("b.ipynb", per_fold=True),
             pipeline.Step("c.ipynb"), pipeline.Step("d.ipynb", per_fold=True)]
    assert [pipeline.step_stage(s, steps) for s in steps] == ["data", "folds", "final", "folds"]
    assert pipeline.select_steps(None, steps) == steps
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.select_steps("book", steps)




@pytest.fixture
def tiny_chain(tmp_path, monkeypatch):
    """a (data) -> b (per fold) -> c (final), with a recording stand-in for papermill."""
    nbdir = tmp_path / "nb"
    nbdir.mkdir()
    for name in ("a", "b", "c"):
        write_test_notebook(nbdir / f"{name}.ipynb", f"print('{name}')")
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", nbdir)
    executed = []

    def fake_execute(cfg, step, fold):
        output = pipeline.step_outputs(cfg, step, fold)[0]
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("{}")
        executed.append((step.name, fold))

    monkeypatch.setattr(pipeline, "_execute", fake_execute)
    steps = [pipeline.Step("a.ipynb", watches_data=True),
             pipeline.Step("b.ipynb", per_fold=True, depends=("a",)),
             pipeline.Step("c.ipynb", depends=("b",))]
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("x")

    def cfg(folds):
        return pipeline.RunConfig(profile=load_profile("smoke"), data_root=data,
                                  results_dir=tmp_path / "results", folds=folds,
                                  progress=False)

    return steps, cfg, executed


def _status(results):
    return [(r.step, r.fold, r.status) for r in results]


def test_stage_runs_only_its_steps_and_reads_upstream_stamps(tiny_chain):
    steps, cfg, executed = tiny_chain
    # a fold task before the data job succeeded: blocked, and it does not run the data step
    early = pipeline.run_steps(cfg([1]), steps, stage="folds")
    assert _status(early) == [("b", 1, "blocked")]
    assert "run its stage first" in early[0].detail and executed == []
    assert _status(pipeline.run_steps(cfg([]), steps, stage="data")) == [("a", None, "ran")]
    # the array tasks, one fold each (in any order)
    assert _status(pipeline.run_steps(cfg([2]), steps, stage="folds")) == [("b", 2, "ran")]
    assert _status(pipeline.run_steps(cfg([1]), steps, stage="folds")) == [("b", 1, "ran")]
    assert _status(pipeline.run_steps(cfg([1, 2]), steps, stage="final")) == [("c", None, "ran")]
    assert executed == [("a", None), ("b", 2), ("b", 1), ("c", None)]
    # the same keys as a one-machine run: nothing reruns
    assert {r.status for r in pipeline.run_steps(cfg([1, 2]), steps)} == {"skipped"}
    # the data changed: the data job reruns, and the fold tasks see it through its stamp
    (cfg([]).data_root / "y.txt").write_text("y")
    assert _status(pipeline.run_steps(cfg([]), steps, stage="data")) == [("a", None, "ran")]
    assert _status(pipeline.run_steps(cfg([1]), steps, stage="folds")) == [("b", 1, "ran")]
    # the final job needs every fold: fold 2 is stale but recorded, fold 3 has no run
    blocked = pipeline.run_steps(cfg([1, 3]), steps, stage="final")
    assert _status(blocked) == [("c", None, "blocked")] and "needs b" in blocked[0].detail


def test_fold_stage_executes_a_realwrite_test_notebook(tmp_path, monkeypatch):
    nbdir = tmp_path / "nb"
    nbdir.mkdir()
    write_test_notebook(nbdir / "a.ipynb", "raise RuntimeError('the data step must not run')")
    write_test_notebook(nbdir / "b.ipynb", "assert fold == 2, fold\nprint('fold', fold)")
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", nbdir)
    steps = [pipeline.Step("a.ipynb"), pipeline.Step("b.ipynb", per_fold=True, depends=("a",))]
    cfg = pipeline.RunConfig(profile=load_profile("smoke"), data_root=tmp_path,
                             results_dir=tmp_path / "results", folds=[2], progress=False)
    output, stamp, _ = pipeline.step_outputs(cfg, steps[0], None)  # the data job's record
    output.parent.mkdir(parents=True)
    output.write_text("{}")
    stamp.parent.mkdir(parents=True)
    stamp.write_text(json.dumps({"key": "from-the-data-job"}))
    assert _status(pipeline.run_steps(cfg, steps, stage="folds")) == [("b", 2, "ran")]
    assert (cfg.executed_dir / "fold2" / "b.ipynb").exists()


def test_reproduce_stage_synthesizes_and_builds_only_where_it_should(tmp_path, monkeypatch):
    from wmhqc_lib.data import synth

    calls = []
    monkeypatch.setattr(synth, "generate_cohort", lambda *a, **k: calls.append("synth"))
    monkeypatch.setattr(pipeline, "run_steps",
                        lambda cfg, stage=None, only=(): calls.append(
                            ("steps", stage, cfg.data_root) + tuple(only)) or [])
    monkeypatch.setattr(pipeline, "build_book",
                        lambda cfg: calls.append("book") or tmp_path / "index.html")
    default = pipeline.default_data_root(load_profile("smoke")).resolve()
    expected = {"data": ["synth", ("steps", "data", default)],
                "folds": [("steps", "folds", default)],
                "final": [("steps", "final", default), "book"],
                None: ["synth", ("steps", None, default), "book"]}
    for stage, want in expected.items():
        calls.clear()
        assert pipeline.reproduce("smoke", results_dir=tmp_path, stage=stage) == 0
        assert calls == want, stage
    calls.clear()  # one step of a stage (a make target per fold and step): no book
    assert pipeline.reproduce("smoke", results_dir=tmp_path, stage="folds",
                              only=["03_uncertainty"]) == 0
    assert calls == [("steps", "folds", default, "03_uncertainty")]
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.reproduce("smoke", results_dir=tmp_path, stage="book")


def test_cli_reproduce_stage(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(pipeline, "reproduce", lambda *a, **k: seen.update(k) or 0)
    assert main(["reproduce", "--profile", "smoke", "--results", str(tmp_path), "--stage",
                 "folds", "--folds", "2", "--no-book"]) == 0
    assert seen["stage"] == "folds" and list(seen["folds"]) == [2] and seen["build"] is False
    assert main(["reproduce", "--profile", "smoke"]) == 0
    assert seen["stage"] is None and seen["build"] is True  # the default run is unchanged
    assert seen["only"] == []
    assert main(["reproduce", "--profile", "smoke", "--stage", "folds", "--folds", "3",
                 "--step", "02_mc_unet", "--step", "03_uncertainty"]) == 0
    assert seen["only"] == ["02_mc_unet", "03_uncertainty"] and list(seen["folds"]) == [3]
    with pytest.raises(SystemExit):
        main(["reproduce", "--stage", "book"])
    assert "invalid choice" in capsys.readouterr().err
