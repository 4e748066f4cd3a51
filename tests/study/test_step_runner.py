"""The step runner on small test notebooks: a failing step blocks only what depends on it, a
failing fold does not stop the others, a step running elsewhere is waited for, and a kernel's
stderr reaches the step log (each line once)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from conftest import write_test_notebook

from wmhqc_lib.config import load_profile
from wmhqc_lib.study import pipeline


def test_failing_step_blocks_only_its_dependants(tmp_path, monkeypatch, smoke_cohort):
    nbdir = tmp_path / "nb"
    nbdir.mkdir()
    write_test_notebook(nbdir / "a_fail.ipynb", "raise RuntimeError('boom in step a')")
    write_test_notebook(nbdir / "b_needs_a.ipynb", "print('b')")
    write_test_notebook(nbdir / "c_alone.ipynb", "print('c')")
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", nbdir)
    steps = [pipeline.Step("a_fail.ipynb"),
             pipeline.Step("b_needs_a.ipynb", per_fold=True, depends=("a_fail",)),
             pipeline.Step("c_alone.ipynb", per_fold=True)]
    cfg = pipeline.RunConfig(profile=load_profile("smoke"), data_root=Path(smoke_cohort),
                             results_dir=tmp_path / "results", folds=[1, 2], progress=False)
    results = pipeline.run_steps(cfg, steps)
    status = [(r.step, r.fold, r.status) for r in results]
    assert status == [("a_fail", None, "failed"), ("b_needs_a", 1, "blocked"),
                      ("b_needs_a", 2, "blocked"), ("c_alone", 1, "ran"),
                      ("c_alone", 2, "ran")]
    assert "boom in step a" in results[0].detail
    kept = nbformat.read(cfg.executed_dir / "a_fail.ipynb", as_version=4)
    assert any(o.output_type == "error" for c in kept.cells if c.cell_type == "code"
               for o in c.outputs)
    assert (cfg.executed_dir / "fold2" / "c_alone.ipynb").exists()
    assert "failed" in pipeline.timing_table(results)


def _fold_chain(tmp_path, monkeypatch, smoke_cohort, b_source: str):
    nbdir = tmp_path / "nb"
    nbdir.mkdir(exist_ok=True)
    write_test_notebook(nbdir / "a.ipynb", "print('a')")
    write_test_notebook(nbdir / "b.ipynb", b_source)
    write_test_notebook(nbdir / "c.ipynb", "print('c', fold)")
    write_test_notebook(nbdir / "d.ipynb", "print('d')")
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", nbdir)
    steps = [pipeline.Step("a.ipynb"),
             pipeline.Step("b.ipynb", per_fold=True, depends=("a",)),
             pipeline.Step("c.ipynb", per_fold=True, depends=("b",)),
             pipeline.Step("d.ipynb", depends=("c",))]
    cfg = pipeline.RunConfig(profile=load_profile("smoke"), data_root=Path(smoke_cohort),
                             results_dir=tmp_path / "results", folds=[1, 2], progress=False)
    return steps, cfg


def test_a_failing_fold_does_not_stop_the_other_folds(tmp_path, monkeypatch, smoke_cohort):
    flag = tmp_path / "fold2-breaks"  # a transient fault (a full disk, a killed job)
    flag.touch()
    steps, cfg = _fold_chain(tmp_path, monkeypatch, smoke_cohort,
                             f"import os\nif fold == 2 and os.path.exists({str(flag)!r}):\n"
                             "    raise ValueError('fold 2 is broken')")
    results = pipeline.run_steps(cfg, steps)
    status = [(r.step, r.fold, r.status) for r in results]
    assert status == [("a", None, "ran"), ("b", 1, "ran"), ("b", 2, "failed"),
                      ("c", 1, "ran"), ("c", 2, "blocked"), ("d", None, "blocked")]
    assert "fold 2 is broken" in results[2].detail and "cell" in results[2].detail
    assert "c fold 2" in results[-1].detail
    summary = pipeline.run_summary(results)
    assert "3 ran" in summary and "1 failed" in summary and "2 blocked" in summary
    assert "fold2/b.ipynb" in summary  # the failed executed notebook is named and kept
    recorded = {(r.step, r.fold): r.status for r in pipeline.recorded_results(cfg, steps)}
    assert recorded[("b", 2)] == "failed" and recorded[("c", 1)] == "done"
    assert recorded[("d", None)] == "blocked"
    # a later stage's job sees the failure and its reason through the record
    final = pipeline.run_steps(cfg, steps, stage="final")
    assert [r.status for r in final] == ["blocked"] and "fold 2 is broken" in final[0].detail
    # fault gone: only fold 2 and the all-fold step run again; fold 1 keeps its finished work
    flag.unlink()
    again = [(r.step, r.fold, r.status) for r in pipeline.run_steps(cfg, steps)]
    assert again == [("a", None, "skipped"), ("b", 1, "skipped"), ("b", 2, "ran"),
                     ("c", 1, "skipped"), ("c", 2, "ran"), ("d", None, "ran")]
    assert not pipeline.failure_record(cfg, steps[1], 2).exists()


def test_a_step_running_elsewhere_is_waited_for(tmp_path, monkeypatch, smoke_cohort, capsys):
    import fcntl
    import threading

    steps, cfg = _fold_chain(tmp_path, monkeypatch, smoke_cohort, "print('b')")
    _, stamp, _ = pipeline.step_outputs(cfg, steps[0], None)
    stamp.parent.mkdir(parents=True)
    held = open(stamp.with_suffix(".lock"), "w")  # noqa: SIM115 - released by the timer
    fcntl.flock(held, fcntl.LOCK_EX)
    timer = threading.Timer(1.0, lambda: (fcntl.flock(held, fcntl.LOCK_UN), held.close()))
    timer.start()
    results = pipeline.run_steps(cfg, steps[:1])
    timer.join()
    assert [r.status for r in results] == ["ran"]
    assert "[wait] a: running in another process" in capsys.readouterr().out


def test_kernel_process_stderr_goes_to_the_step_log(tmp_path, monkeypatch, smoke_cohort, capfd):
    """Output the kernel process writes straight to its file descriptor 2 (TensorFlow's C++
    logging does) lands in the step's log, not between the progress lines on the console."""
    nbdir = tmp_path / "nb"
    nbdir.mkdir()
    write_test_notebook(nbdir / "a.ipynb", "import os\nos.write(2, b'FROM-THE-KERNEL-FD\\n')")
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", nbdir)
    cfg = pipeline.RunConfig(profile=load_profile("smoke"), data_root=Path(smoke_cohort),
                             results_dir=tmp_path / "results", progress=False)
    assert [r.status for r in pipeline.run_steps(cfg, [pipeline.Step("a.ipynb")])] == ["ran"]
    assert "FROM-THE-KERNEL-FD" not in capfd.readouterr().err
    assert "FROM-THE-KERNEL-FD" in (cfg.log_dir / "a.log").read_text()


def test_each_progress_line_reaches_the_step_log_once(tmp_path, monkeypatch, smoke_cohort):
    """A training step's epoch lines (``log_progress``, written to the kernel's own stderr),
    C-level stderr and Python ``sys.stderr`` writes each appear once in the step log, and the
    progress lines stay out of the executed notebook. ipykernel skips its fd capture, which
    doubled every such line, when it sees pytest's variable: the kernel here runs without it,
    as in ``make reproduce``."""
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    nbdir = tmp_path / "nb"
    nbdir.mkdir()
    write_test_notebook(nbdir / "a.ipynb",
                        "import os, sys\nfrom wmhqc_lib.nets.training import log_progress\n"
                        "for epoch in (1, 2):\n    log_progress(f'EPOCH-LINE {epoch}')\n"
                        "os.write(2, b'FD2-LINE\\n')\nprint('PY-STDERR-LINE', file=sys.stderr)")
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", nbdir)
    cfg = pipeline.RunConfig(profile=load_profile("smoke"), data_root=Path(smoke_cohort),
                             results_dir=tmp_path / "results", progress=False)
    assert [r.status for r in pipeline.run_steps(cfg, [pipeline.Step("a.ipynb")])] == ["ran"]
    lines = (cfg.log_dir / "a.log").read_text().splitlines()
    for line in ("EPOCH-LINE 1", "EPOCH-LINE 2", "FD2-LINE", "PY-STDERR-LINE"):
        assert lines.count(line) == 1, (line, lines)
    executed = nbformat.read(cfg.executed_dir / "a.ipynb", as_version=4)
    shown = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code"
                    for o in c.outputs)
    assert "EPOCH-LINE" not in shown and "PY-STDERR-LINE" in shown


def test_a_fold_that_breaks_after_a_success_blocks_the_final_stage(tmp_path, monkeypatch,
                                                                   smoke_cohort):
    """The split chain (``make -j``, SLURM): fold 2 succeeded once, then fails when rerun by its
    own job. Its later steps' old successes no longer count, so the final job is blocked
    instead of evaluating stale fold-2 results."""
    flag = tmp_path / "fold2-breaks"
    steps, cfg = _fold_chain(tmp_path, monkeypatch, smoke_cohort,
                             f"import os\nif fold == 2 and os.path.exists({str(flag)!r}):\n"
                             "    raise ValueError('fold 2 broke')")
    assert {r.status for r in pipeline.run_steps(cfg, steps)} == {"ran"}
    flag.touch()
    pipeline.step_outputs(cfg, steps[1], 2)[1].unlink()  # fold 2's b must run again
    cfg.folds = [2]
    fold2 = pipeline.run_steps(cfg, steps, stage="folds")
    assert [(r.step, r.status) for r in fold2] == [("b", "failed"), ("c", "blocked")]
    cfg.folds = [1, 2]
    final = pipeline.run_steps(cfg, steps, stage="final")
    assert [r.status for r in final] == ["blocked"] and "fold 2 broke" in final[0].detail


def test_one_step_of_a_fold_runs_on_the_records_of_the_steps_before_it(tmp_path, monkeypatch,
                                                                       smoke_cohort):
    """``reproduce --stage folds --folds K --step NAME`` (one make target per fold and step):
    only that step runs; it is blocked until its upstream step has a successful record."""
    import pytest

    steps, cfg = _fold_chain(tmp_path, monkeypatch, smoke_cohort, "print('b', fold)")
    assert [r.status for r in pipeline.run_steps(cfg, steps, stage="data")] == ["ran"]
    cfg.folds = [2]
    early = pipeline.run_steps(cfg, steps, stage="folds", only=["c"])
    assert [(r.step, r.fold, r.status) for r in early] == [("c", 2, "blocked")]
    assert "run its stage first" in early[0].detail
    for name in ("b", "c"):
        ran = pipeline.run_steps(cfg, steps, stage="folds", only=[name])
        assert [(r.step, r.fold, r.status) for r in ran] == [(name, 2, "ran")]
    assert not (cfg.executed_dir / "fold1").exists()  # fold 1 was not asked for
    with pytest.raises(ValueError, match="step.s. d not in stage folds"):
        pipeline.run_steps(cfg, steps, stage="folds", only=["d"])
    with pytest.raises(ValueError, match="step.s. 99_nothing not in stage folds"):
        pipeline.reproduce("smoke", data_root=smoke_cohort, results_dir=tmp_path / "r",
                           stage="folds", only=["99_nothing"])
    assert not (tmp_path / "r").exists()  # refused before any work
