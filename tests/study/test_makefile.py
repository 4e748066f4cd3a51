"""The Makefile's chain, read with ``make -n`` (nothing runs): a data stage, one target per fold
and step that ``make -j`` can run side by side, a final stage over every fold, and
``make lab``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def dry_run(*args: str) -> str:
    proc = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_reproduce_is_a_data_stage_fold_step_targets_and_a_final_stage(tmp_path):
    from wmhqc_lib.study.pipeline import STEPS

    out = dry_run("reproduce-final", "PROFILE=cpu", f"RESULTS={tmp_path}")
    lines = [ln for ln in out.splitlines() if "wmhqc reproduce" in ln]
    assert "--stage data" in lines[0]
    runs = [(ln.split("--folds ")[1].split()[0], ln.split("--step ")[1])
            for ln in lines if "--stage folds" in ln]
    per_fold = [s.name for s in STEPS if s.per_fold]
    # step by step across the folds: every fold's first step before any fold's second, so
    # make -j keeps its lanes busy to the end
    assert runs == [(f, s) for s in per_fold for f in ("1", "2", "3", "4", "5")]
    assert lines[-1].endswith("--stage final --folds 1 2 3 4 5")
    assert all(f"--results {tmp_path}" in ln and "--profile cpu" in ln for ln in lines)


def test_one_fold_is_its_chain_in_order(tmp_path):
    from wmhqc_lib.study.pipeline import STEPS

    out = dry_run("reproduce-fold-3", "PROFILE=cpu", f"RESULTS={tmp_path}")
    runs = [ln.split("--step ")[1] for ln in out.splitlines() if "--stage folds --folds 3" in ln]
    assert runs == [s.name for s in STEPS if s.per_fold]
    assert "--folds 1 " not in out and "--stage final" not in out


def test_two_folds_side_by_side_for_smoke_and_cpu_one_for_paper(tmp_path):
    for profile in ("smoke", "cpu"):
        out = dry_run("reproduce", f"PROFILE={profile}", f"RESULTS={tmp_path}")
        assert "-j2 reproduce-final" in out, profile
    paper = dry_run("reproduce", "PROFILE=paper", f"RESULTS={tmp_path}")
    submake = next(ln for ln in paper.splitlines() if ln.endswith(" reproduce-final"))
    assert not any(word.startswith("-j") for word in submake.split())  # one fold at a time
    assert "-j4 reproduce-final" in dry_run("reproduce", "JOBS=4", f"RESULTS={tmp_path}")
    chosen = dry_run("reproduce-final", "FOLDS=2 4", "DATA_ROOT=/data/wmh", f"RESULTS={tmp_path}")
    assert "--stage folds --folds 2 --step" in chosen and "--stage folds --folds 4 --step" in chosen
    assert "--folds 1 " not in chosen
    assert "--stage final --folds 2 4" in chosen and "--data-root /data/wmh" in chosen


def test_fold_processes_share_the_cores_out(tmp_path):
    def threads(*args: str) -> set[str]:
        out = dry_run("reproduce-fold-1", f"RESULTS={tmp_path}", *args).replace("\\\n", " ")
        line = next(ln for ln in out.splitlines() if "--stage folds" in ln)
        return {w for w in line.split() if w.startswith(("TF_NUM_INTRAOP", "OMP_NUM"))}

    assert threads("JOBS=2", "CORES=2") == {"TF_NUM_INTRAOP_THREADS=1", "OMP_NUM_THREADS=1"}
    assert threads("JOBS=1", "CORES=8") == {"TF_NUM_INTRAOP_THREADS=8", "OMP_NUM_THREADS=8"}
    assert threads("JOBS=4", "CORES=2") == {"TF_NUM_INTRAOP_THREADS=1", "OMP_NUM_THREADS=1"}


def test_lab_registers_the_kernel_and_opens_the_notebooks():
    out = dry_run("lab")
    assert "ipykernel install --sys-prefix --name wmhqc" in out
    assert "jupyter lab --notebook-dir=. notebooks/" in out
