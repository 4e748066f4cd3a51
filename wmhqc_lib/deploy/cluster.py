"""Triage of a BIDS dataset on a SLURM cluster: a job array with one participant per task,
then the group level.

``wmhqc triage-slurm BIDS_DIR OUTPUT_DIR --model BUNDLE`` lists the participants
(:func:`wmhqc_lib.deploy.triage.discover_bids`) and writes, under ``OUTPUT_DIR/logs/slurm/``
(``logs/`` is in the derivative dataset's ``.bidsignore``):

1. ``participants.txt``, one label per line;
2. ``triage_participant.sbatch``: ``--array=1-N[%M]``; task ``k`` triages the participant on
   line ``k`` (``wmhqc triage ... participant --participant-label L --skip-group``), so each
   task writes only its own participant's files and records;
3. ``triage_group.sbatch``: ``wmhqc triage ... group``, submitted with
   ``--dependency=afterany:<array id>``: it runs once every task has ended, whether or not some
   failed, and builds ``group_qc.tsv`` and the pages from the records there are (a failed
   scan's record says why).

Both jobs ``cd`` into the checkout and run the setup line (the virtual environment by default)
before ``wmhqc``. A rerun of the same command submits the array again; its tasks skip the scans
whose records are up to date, as a local ``wmhqc triage`` does.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..study import pipeline
from ..study.slurm import (
    SlurmError,
    array_spec,
    preamble,
    sbatch_options,
    shell_arg,
    submit_chain,
)

LEVELS = ("participant", "group")  # submission order: the array, then the group job
PARTICIPANTS_FILE = "participants.txt"


@dataclass
class TriageSettings:
    """What the cluster needs to know about the triage jobs; ``None`` leaves a line out."""

    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    time: str = "02:00:00"  # per participant task
    time_group: str = "01:00:00"
    cpus: int = 2  # per job; a task preprocesses its sessions in this many processes
    mem: str | None = "16G"
    gpus: int = 0  # per participant task; the group job gets none
    gpu_option: str = "gres"  # "gres": --gres=gpu[:type]:N, "gpus": --gpus=[type:]N
    gpu_type: str | None = None
    max_parallel: int | None = None  # array throttle: --array=1-500%50
    extra_sbatch: tuple[str, ...] = ()  # more #SBATCH options, e.g. "--qos=short"
    setup: str = "source .venv/bin/activate"  # shell line(s) run in the checkout before wmhqc
    backend: str | None = None  # KERAS_BACKEND for the jobs
    job_name: str = "wmhqc-triage"
    kill_on_invalid_dep: bool = False  # unused: the group job waits with afterany


@dataclass
class TriageJobs:
    """One submission: the dataset, the outputs, the bundle (and layer) and the participants,
    one array task each, in the order of ``participants.txt``."""

    bids_dir: Path
    output_dir: Path
    model: Path
    participants: list[str]
    layer: Path | None = None
    repo_root: Path = pipeline.REPO_ROOT  # the checkout the jobs run in
    scripts: dict[str, Path] = field(default_factory=dict)  # level -> written script

    @property
    def script_dir(self) -> Path:
        """Scripts, the participant list, the job ids and the job logs."""
        return self.output_dir / "logs" / "slurm"

    @property
    def participants_file(self) -> Path:
        return self.script_dir / PARTICIPANTS_FILE


def plan(bids_dir: str | Path, output_dir: str | Path, model: str | Path,
         participants: Sequence[str] = (), layer: str | Path | None = None) -> TriageJobs:
    """The participants to triage (every one with a FLAIR, or those named) and absolute paths.

    The bundle is loaded (its checksums checked) here, once, so that a wrong ``--model`` fails
    before anything is submitted rather than in every task; so does a named participant that
    has no FLAIR in the dataset."""
    from .bundle import load_bundle
    from .triage import discover_bids

    bids = Path(bids_dir).resolve()
    scans = discover_bids(bids, participants)
    absent = sorted({s.participant for s in scans if s.flair is None})
    if absent:
        raise ValueError(f"{bids}: no FLAIR for participant(s) {', '.join(absent)} "
                         "(labels are given without sub-)")
    labels = list(dict.fromkeys(s.participant for s in scans))
    if not labels:
        raise ValueError(f"{bids}: no sub-*/[ses-*/]anat/*_FLAIR.nii[.gz] to triage")
    load_bundle(model)
    if layer is not None and not Path(layer).exists():
        raise FileNotFoundError(f"{layer}: layer not found")
    return TriageJobs(bids_dir=bids, output_dir=Path(output_dir).resolve(),
                      model=Path(model).resolve(), participants=labels,
                      layer=Path(layer).resolve() if layer is not None else None)


def triage_command(jobs: TriageJobs, settings: TriageSettings, level: str) -> list[str]:
    """The ``wmhqc triage`` command line of one job (``$label``: the task's participant)."""
    cmd = ["wmhqc", "triage", str(jobs.bids_dir), str(jobs.output_dir), level,
           "--model", str(jobs.model)]
    if jobs.layer is not None:
        cmd += ["--layer", str(jobs.layer)]
    if level == "participant":
        cmd += ["--participant-label", "$label", "--skip-group", "--quiet",
                "--nprocs", str(settings.cpus)]
    return cmd


def job_script(jobs: TriageJobs, settings: TriageSettings, level: str) -> str:
    """The text of one job script (``level``: participant or group)."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r} (known: {', '.join(LEVELS)})")
    n = len(jobs.participants)
    if level == "participant":
        opts = sbatch_options(settings, name=f"{settings.job_name}-participant",
                              time=settings.time, output=jobs.script_dir / "participant-%A_%a.out",
                              chdir=jobs.repo_root,
                              array=array_spec(range(1, n + 1), settings.max_parallel),
                              gpus=settings.gpus)
        what = f"one participant per array task ({n} in {PARTICIPANTS_FILE})"
    else:
        opts = sbatch_options(settings, name=f"{settings.job_name}-group",
                              time=settings.time_group, output=jobs.script_dir / "group-%j.out",
                              chdir=jobs.repo_root)
        what = "group_qc.tsv and the pages, from the records of every task"
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts),
             f"# wmhqc triage, {level} level: {what}", *preamble(settings, jobs.repo_root)]
    if level == "participant":
        listing = shlex.quote(str(jobs.participants_file))
        lines += [': "${SLURM_ARRAY_TASK_ID:?submit this script as a job array (sbatch '
                  '--array)}"',
                  f'label=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {listing})',
                  f'[ -n "$label" ] || {{ echo "no line $SLURM_ARRAY_TASK_ID in {listing}" >&2;'
                  " exit 2; }",
                  'echo "[slurm] participant $label"']
    lines.append(" ".join(shell_arg(a) for a in triage_command(jobs, settings, level)))
    return "\n".join(lines) + "\n"


def write_scripts(jobs: TriageJobs, settings: TriageSettings) -> dict[str, Path]:
    """Write ``participants.txt`` and the two job scripts (the folder also takes the logs,
    which SLURM does not create)."""
    jobs.script_dir.mkdir(parents=True, exist_ok=True)
    jobs.participants_file.write_text("\n".join(jobs.participants) + "\n")
    for level in LEVELS:
        path = jobs.script_dir / f"triage_{level}.sbatch"
        path.write_text(job_script(jobs, settings, level))
        path.chmod(0o755)
        jobs.scripts[level] = path
    return dict(jobs.scripts)


def submit(jobs: TriageJobs, settings: TriageSettings, dry_run: bool = False,
           sbatch: str = "sbatch") -> dict[str, str | None]:
    """Write the scripts, submit the array, then the group job after it (``afterany``).

    Returns ``{level: job id}`` (``None`` for both with ``dry_run``, which only writes the
    scripts and prints the sbatch command lines); the ids also go to ``submitted.json``."""
    scripts = write_scripts(jobs, settings)
    return submit_chain([(level, scripts[level]) for level in LEVELS], settings,
                        record=jobs.script_dir / "submitted.json", dry_run=dry_run,
                        sbatch=sbatch, dependency="afterany")


# ---------------------------------------------------------------------------------------------
# The command line (``wmhqc triage-slurm``)

DESCRIPTION = ("Triage a BIDS dataset on a SLURM cluster: write OUTPUT_DIR/logs/slurm/"
               "participants.txt and two job scripts, then submit a job array with one "
               "participant per task (wmhqc triage ... participant --skip-group) and the group "
               "level after the whole array, even when some tasks failed (afterany).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``wmhqc triage-slurm``."""
    defaults = TriageSettings()
    p.add_argument("bids_dir", help="BIDS dataset root")
    p.add_argument("output_dir", help="derivative dataset to write")
    p.add_argument("--model", required=True, help="bundle written by `wmhqc export`")
    p.add_argument("--layer", default=None,
                   help="site calibration layer to triage with (as `wmhqc triage --layer`)")
    p.add_argument("--participant-label", "--participant_label", nargs="+", default=(),
                   help="labels to triage (without sub-); default all")
    p.add_argument("--partition", default=None, help="default: the cluster's default")
    p.add_argument("--account", default=None)
    p.add_argument("--time", default=defaults.time,
                   help=f"limit per participant task (default {defaults.time})")
    p.add_argument("--time-group", default=defaults.time_group,
                   help=f"group job limit (default {defaults.time_group})")
    p.add_argument("--cpus", type=int, default=defaults.cpus,
                   help=f"CPUs per job (default {defaults.cpus})")
    p.add_argument("--mem", default=defaults.mem, help=f"memory per job (default {defaults.mem})")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per participant task (default 0)")
    p.add_argument("--gpu-option", choices=("gres", "gpus"), default="gres",
                   help="request GPUs as --gres=gpu:N (default) or --gpus=N")
    p.add_argument("--gpu-type", default=None, help="e.g. a100: --gres=gpu:a100:N")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="at most this many participant tasks at once (--array=...%%N)")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option for both jobs (repeatable), written with =: "
                        "--sbatch-option=--qos=short")
    p.add_argument("--setup", default=defaults.setup,
                   help="shell line run in the checkout before wmhqc (default: "
                        f"'{defaults.setup}'), e.g. 'module load cuda && source ...'")
    p.add_argument("--backend", default=None, help="KERAS_BACKEND for the jobs, e.g. jax")
    p.add_argument("--dry-run", action="store_true",
                   help="only write the scripts and print the sbatch command lines")


def cmd_triage_slurm(args: argparse.Namespace) -> int:
    """Submit (or with ``--dry-run`` write) the triage jobs; exit 1 when sbatch fails."""
    settings = TriageSettings(
        partition=args.partition, account=args.account, time=args.time,
        time_group=args.time_group, cpus=args.cpus, mem=args.mem, gpus=args.gpus,
        gpu_option=args.gpu_option, gpu_type=args.gpu_type, max_parallel=args.max_parallel,
        extra_sbatch=tuple(args.sbatch_option), setup=args.setup, backend=args.backend)
    jobs = plan(args.bids_dir, args.output_dir, args.model, args.participant_label, args.layer)
    try:
        ids = submit(jobs, settings, dry_run=args.dry_run)
    except SlurmError as exc:
        print(f"wmhqc: error: {exc}", file=sys.stderr)
        return 1
    n = len(jobs.participants)
    if args.dry_run:
        print(f"dry run: {n} participant(s) and the scripts written to {jobs.script_dir}, "
              "nothing submitted")
    else:
        print(f"participant array {ids['participant']} ({n} task(s), one participant each) "
              f"-> group job {ids['group']} (after the whole array); logs in "
              f"{jobs.script_dir}")
    return 0
