"""Submit the study to a SLURM cluster: a data job, a job array with one task per fold, and a
final job for the all-fold chapters and the book.

The chain of :data:`wmhqc_lib.study.pipeline.STEPS` is split into the stages of
:func:`wmhqc_lib.study.pipeline.step_stage`; each job runs ``wmhqc reproduce --stage S``:

1. ``data.sbatch``: the all-fold steps before the first per-fold step (today ``01_data``);
2. ``folds.sbatch``: ``--array=<folds>``, task ``k`` runs the per-fold steps of fold ``k``
   (``--folds $SLURM_ARRAY_TASK_ID``); it starts after the data job succeeded
   (``--dependency=afterok:<data id>``) and never reruns the data step;
3. ``final.sbatch``: the remaining all-fold steps and the book, after every array task
   succeeded (``--dependency=afterok:<array id>``).

Scripts are written to ``<results>/slurm/``, job logs to ``<results>/logs/``. Only GPU-bound
work sits in the fold tasks, so only they request GPUs.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_profile
from . import pipeline

JOB_KINDS = ("data", "folds", "final")  # submission order; each is a pipeline stage


class SlurmError(RuntimeError):
    """sbatch is missing, failed or printed no job id."""


@dataclass
class ClusterSettings:
    """What the cluster needs to know about the jobs; ``None`` leaves a line out."""

    partition: str | None = None
    account: str | None = None
    time_data: str = "02:00:00"
    time_fold: str = "24:00:00"
    time_final: str = "02:00:00"
    gpus: int = 0  # per fold task; the data and final jobs get none
    gpu_option: str = "gres"  # "gres": --gres=gpu[:type]:N, "gpus": --gpus=[type:]N
    gpu_type: str | None = None  # e.g. "a100"
    cpus: int = 4
    mem: str | None = "32G"
    max_parallel: int | None = None  # array throttle: --array=1-5%2
    extra_sbatch: tuple[str, ...] = ()  # more #SBATCH options, e.g. "--qos=long"
    setup: str = "source .venv/bin/activate"  # shell line(s) run before wmhqc
    backend: str | None = None  # KERAS_BACKEND for the jobs (jax, tensorflow, torch)
    job_name: str = "wmhqc"
    kill_on_invalid_dep: bool = True  # a failed upstream job cancels its dependants

    def time_of(self, kind: str) -> str:
        return {"data": self.time_data, "folds": self.time_fold, "final": self.time_final}[kind]


@dataclass
class StudyJobs:
    """The study a submission runs; ``folds`` are the array's task ids."""

    profile: str
    results_dir: Path
    folds: list[int]
    data_root: Path | None = None  # None: the profile's synthetic cohort
    seed: int | None = None
    repo_root: Path = pipeline.REPO_ROOT
    scripts: dict[str, Path] = field(default_factory=dict)  # kind -> written script

    @property
    def script_dir(self) -> Path:
        return self.results_dir / "slurm"

    @property
    def log_dir(self) -> Path:
        return self.results_dir / "logs"


def array_spec(folds: Sequence[int], max_parallel: int | None = None) -> str:
    """``1-5`` for a contiguous range, else ``1,3,4``; ``%N`` throttles."""
    folds = sorted(set(folds))
    if not folds:
        raise ValueError("no folds to submit")
    contiguous = folds == list(range(folds[0], folds[-1] + 1))
    spec = (f"{folds[0]}-{folds[-1]}" if contiguous and len(folds) > 1
            else ",".join(str(f) for f in folds))
    return spec + (f"%{max_parallel}" if max_parallel else "")


def plan(profile: str | None = None, results_dir: str | Path | None = None,
         folds: Sequence[int] = (), data_root: str | Path | None = None,
         seed: int | None = None) -> StudyJobs:
    """Resolve the profile, paths (absolute) and folds (default: all of the profile's)."""
    prof = load_profile(profile)
    n_folds = prof.folds.n_folds
    chosen = sorted(set(folds)) or list(range(1, n_folds + 1))
    bad = [f for f in chosen if not 1 <= f <= n_folds]
    if bad:
        raise ValueError(f"folds {bad} are outside 1..{n_folds} (profile {prof.name!r})")
    _check_stages()
    results = Path(results_dir or pipeline.REPO_ROOT / "results" / prof.name)
    return StudyJobs(profile=prof.name, results_dir=results.resolve(), folds=chosen,
                     data_root=Path(data_root).resolve() if data_root else None, seed=seed)


def _check_stages(steps: Sequence[pipeline.Step] | None = None) -> None:
    """The three jobs run stage after stage: a per-fold step may not need a final-stage step."""
    steps = list(pipeline.STEPS if steps is None else steps)
    final = {s.name for s in pipeline.select_steps("final", steps)}
    for s in pipeline.select_steps("folds", steps):
        late = [d for d in s.depends if d in final]
        if late:
            raise ValueError(f"per-fold step {s.name} needs {', '.join(late)}, an all-fold "
                             "step after the first per-fold step: the data / fold array / "
                             "final jobs cannot run that order")


def reproduce_command(jobs: StudyJobs, kind: str) -> list[str]:
    """The ``wmhqc reproduce`` command line one job runs."""
    cmd = ["wmhqc", "reproduce", "--profile", jobs.profile, "--stage", kind,
           "--results", str(jobs.results_dir)]
    if jobs.data_root is not None:
        cmd += ["--data-root", str(jobs.data_root)]
    if jobs.seed is not None:
        cmd += ["--seed", str(jobs.seed)]
    if kind == "folds":
        cmd += ["--folds", "$SLURM_ARRAY_TASK_ID", "--no-book"]
    elif kind == "final":
        cmd += ["--folds", *(str(f) for f in jobs.folds)]
    else:
        cmd += ["--no-book"]
    return cmd


def shell_arg(arg: str) -> str:
    """One word of a job's command line: ``$VARIABLE`` in double quotes (the job's shell
    expands it), anything else quoted as it is."""
    return f'"{arg}"' if arg.startswith("$") else shlex.quote(arg)


def sbatch_options(settings, *, name: str, time: str, output: Path, chdir: Path,
                   array: str | None = None, gpus: int = 0) -> list[str]:
    """The ``#SBATCH`` options of one wmhqc job (without the ``#SBATCH`` prefix).

    ``settings`` is a :class:`ClusterSettings` or any object with its resource fields
    (``partition``, ``account``, ``cpus``, ``mem``, ``gpu_option``, ``gpu_type``,
    ``extra_sbatch``), such as the triage jobs' settings; ``gpus`` are this job's GPUs."""
    opts = [f"--job-name={name}"]
    if settings.partition:
        opts.append(f"--partition={settings.partition}")
    if settings.account:
        opts.append(f"--account={settings.account}")
    opts.append(f"--time={time}")
    opts += ["--nodes=1", "--ntasks=1", f"--cpus-per-task={settings.cpus}"]
    if settings.mem:
        opts.append(f"--mem={settings.mem}")
    if array:
        opts.append(f"--array={array}")
    if gpus:
        kind_ = f"{settings.gpu_type}:" if settings.gpu_type else ""
        if settings.gpu_option == "gpus":
            opts.append(f"--gpus={kind_}{gpus}")
        elif settings.gpu_option == "gres":
            opts.append(f"--gres=gpu:{kind_}{gpus}")
        else:
            raise ValueError(f"gpu_option must be 'gres' or 'gpus', not "
                             f"{settings.gpu_option!r}")
    opts += [f"--output={output}", f"--chdir={chdir}"]
    for line in settings.extra_sbatch:
        line = line.strip()
        opts.append(line[len("#SBATCH"):].strip() if line.startswith("#SBATCH") else line)
    return opts


def _sbatch_options(jobs: StudyJobs, settings: ClusterSettings, kind: str) -> list[str]:
    folds = kind == "folds"
    log = jobs.log_dir / ("slurm-%A_%a.out" if folds else f"slurm-{kind}-%j.out")
    return sbatch_options(settings, name=f"{settings.job_name}-{kind}",
                          time=settings.time_of(kind), output=log, chdir=jobs.repo_root,
                          array=array_spec(jobs.folds, settings.max_parallel) if folds else None,
                          gpus=settings.gpus if folds else 0)


def preamble(settings, repo_root: Path) -> list[str]:
    """The lines every job runs before its ``wmhqc`` command: strict shell, the checkout, the
    site's setup (environment modules, the virtual environment), the Keras backend, and a line
    in the log naming the job and the node."""
    lines = ["set -eo pipefail",  # no -u: module and activate scripts read unset variables
             f"cd {shlex.quote(str(repo_root))}"]
    if settings.setup:
        lines.append(settings.setup)
    if settings.backend:
        lines.append(f"export KERAS_BACKEND={shlex.quote(settings.backend)}")
    lines.append('echo "[slurm] job ${SLURM_JOB_ID:-?} task ${SLURM_ARRAY_TASK_ID:-none} on '
                 '$(hostname)"')
    return lines


def job_script(jobs: StudyJobs, settings: ClusterSettings, kind: str) -> str:
    """The text of one job script (``kind``: data, folds or final)."""
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r} (known: {', '.join(JOB_KINDS)})")
    steps = [s.name for s in pipeline.select_steps(kind)]
    what = {"data": "data preparation", "folds": "one fold per array task",
            "final": "all-fold chapters and the book"}[kind]
    lines = ["#!/bin/bash",
             *(f"#SBATCH {o}" for o in _sbatch_options(jobs, settings, kind)),
             f"# wmhqc {kind} job ({what}): {', '.join(steps) or 'no notebooks'}"
             + (" + book" if kind == "final" else ""),
             *preamble(settings, jobs.repo_root)]
    lines.append(" ".join(shell_arg(a) for a in reproduce_command(jobs, kind)))
    return "\n".join(lines) + "\n"


def write_scripts(jobs: StudyJobs, settings: ClusterSettings) -> dict[str, Path]:
    """Write ``data.sbatch``, ``folds.sbatch`` and ``final.sbatch`` (and make the log folder,
    which SLURM does not create)."""
    jobs.script_dir.mkdir(parents=True, exist_ok=True)
    jobs.log_dir.mkdir(parents=True, exist_ok=True)
    for kind in JOB_KINDS:
        path = jobs.script_dir / f"{kind}.sbatch"
        path.write_text(job_script(jobs, settings, kind))
        path.chmod(0o755)
        jobs.scripts[kind] = path
    return dict(jobs.scripts)


def sbatch_command(script: Path, after: str | None, settings: ClusterSettings,
                   sbatch: str = "sbatch", dependency: str = "afterok") -> list[str]:
    """``sbatch --parsable [--dependency=<dependency>:<after>] script``; ``afterok`` waits for
    success (and with ``kill_on_invalid_dep`` cancels the job when ``after`` fails),
    ``afterany`` for the end, whatever the outcome."""
    cmd = [sbatch, "--parsable"]
    if after:
        cmd.append(f"--dependency={dependency}:{after}")
        if settings.kill_on_invalid_dep and dependency == "afterok":
            cmd.append("--kill-on-invalid-dep=yes")
    return cmd + [str(script)]


def parse_job_id(stdout: str) -> str:
    """``sbatch --parsable`` prints ``123`` or ``123;cluster``."""
    first = stdout.strip().splitlines()[0].strip() if stdout.strip() else ""
    job_id = first.split(";")[0].strip()
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {stdout.strip()!r}")
    return job_id


def run_sbatch(cmd: Sequence[str], submitted: dict[str, str | None]) -> str:
    """Run one ``sbatch --parsable ... SCRIPT`` command line and return the job id; an error
    names the script and lists the jobs ``submitted`` before it, to cancel."""
    script = cmd[-1]
    done = ", ".join(f"{k} {v}" for k, v in submitted.items() if v)
    hint = f" (already submitted: {done}; scancel them)" if done else ""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise SlurmError(f"{cmd[0]!r} not found on PATH; --dry-run only writes the scripts "
                         f"under {Path(script).parent}{hint}") from exc
    if proc.returncode != 0:
        raise SlurmError(f"sbatch failed for {script} (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()}{hint}")
    try:
        return parse_job_id(proc.stdout)
    except SlurmError as exc:
        raise SlurmError(f"{exc} for {script}{hint}") from None


def submit_chain(scripts: Sequence[tuple[str, Path]], settings, *, record: Path,
                 dry_run: bool = False, sbatch: str = "sbatch",
                 dependency: str = "afterok") -> dict[str, str | None]:
    """Submit ``(name, script)`` pairs in order, each with ``--dependency=<dependency>`` on the
    one before; ``{name: job id}``, also written to ``record``. ``dry_run`` only prints the
    sbatch command lines (ids ``None``). An sbatch failure names the jobs already submitted."""
    ids: dict[str, str | None] = {}
    after: str | None = None
    for name, script in scripts:
        if dry_run:
            shown = sbatch_command(script, after and f"<{after} job id>", settings, sbatch,
                                   dependency)
            print(" ".join(shlex.quote(a) for a in shown))
            ids[name], after = None, name
            continue
        ids[name] = run_sbatch(sbatch_command(script, after, settings, sbatch, dependency), ids)
        after = ids[name]
        print(f"submitted {name} job {ids[name]}: {script}", flush=True)
    if not dry_run:
        record.write_text(json.dumps(ids, indent=2) + "\n")
    return ids


def submit(jobs: StudyJobs, settings: ClusterSettings, dry_run: bool = False,
           sbatch: str = "sbatch") -> dict[str, str | None]:
    """Write the scripts and submit them in order, each after the previous one succeeded.

    Returns ``{kind: job id}`` (``None`` for every job with ``dry_run``, which only writes the
    scripts and prints the sbatch command lines); the ids also go to ``submitted.json``.
    """
    scripts = write_scripts(jobs, settings)
    return submit_chain([(kind, scripts[kind]) for kind in JOB_KINDS], settings,
                        record=jobs.script_dir / "submitted.json", dry_run=dry_run,
                        sbatch=sbatch)
