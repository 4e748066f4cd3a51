"""The walking pipeline: papermill runs the data notebook, the book builds offline, reruns skip
finished steps, and a failing step blocks only what depends on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pandas as pd
from conftest import write_test_notebook

from wmhqc_lib.config import load_profile
from wmhqc_lib.study import pipeline


def test_reproduce_smoke_builds_the_book(smoke_run):
    code, results = smoke_run
    assert code == 0
    html = results / "book" / "_build" / "html"
    assert (html / "index.html").exists()
    page = (html / "notebooks" / "01_data.html").read_text()
    assert "Synthetic cohort" in page
    assert "plotly-graph-div" in page  # the plotly figure is in the page as HTML
    assert "_static/plotly.min.js" in page and (html / "_static" / "plotly.min.js").exists()
    assert len(re.findall(r'<img[^>]+src="\.\./_images/[^"]+\.png"', page)) >= 2  # overlays
    assert "Lesion load per site (synthetic cohort)" in page
    for chapter in ("02_mc_unet", "03_uncertainty"):
        text = (html / "notebooks" / f"{chapter}.html").read_text()
        assert "plotly-graph-div" in text and "synthetic cohort" in text
    evaluation_page = (html / "notebooks" / "06_evaluation.html").read_text()
    assert '"sliders"' in evaluation_page  # the static threshold explorer
    assert "Table 1" in evaluation_page and "synthetic cohort" in evaluation_page
    assert (html / "book" / "reproduction_notes.html").exists()
    triage_page = (html / "notebooks" / "07_triage.html").read_text()
    assert "promised (study test folds" in triage_page and "synthetic" in triage_page
    assert "_static/triage/group_qc.html" in triage_page
    assert (results / "triage" / "bundle" / "manifest.json").exists()
    methods = (html / "book" / "methods.html").read_text()
    assert "The evaluation framework" in methods and "03_uncertainty.html" in methods
    uncertainty_page = (html / "notebooks" / "03_uncertainty.html").read_text()
    assert "Pearson r" in uncertainty_page
    assert len(re.findall(r'<img[^>]+src="\.\./_images/', uncertainty_page)) >= 1
    for chapter in ("04_rec_unet", "05_dice_regression"):
        text = (html / "notebooks" / f"{chapter}.html").read_text()
        assert "plotly-graph-div" in text and "synthetic cohort" in text, chapter
    rec_page = (html / "notebooks" / "04_rec_unet.html").read_text()
    assert "Pearson r" in rec_page and "validation SSIM" in rec_page
    assert "Figure 2: three test cases" in rec_page  # the 3 x 7 figure, drawn with nilearn
    assert len(re.findall(r'<img[^>]+src="\.\./_images/', rec_page)) >= 1
    assert "<iframe" in uncertainty_page and "brainsprite" in uncertainty_page  # view_img
    dr_page = (html / "notebooks" / "05_dice_regression.html").read_text()
    assert "MAE = " in dr_page and "widened variant" in dr_page


def test_book_pages_load_nothing_from_the_network(smoke_run):
    _, results = smoke_run
    for page in (results / "book" / "_build" / "html").rglob("*.html"):
        text = page.read_text()
        remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//[^"]+"', text)
        assert not remote, f"{page} loads {remote[:3]}"


def test_data_step_writes_its_artifacts(smoke_run, smoke_manifest):
    _, results = smoke_run
    data = results / "data"
    manifest = pd.read_csv(data / "manifest.csv")
    folds = pd.read_csv(data / "folds.csv")
    prep = pd.read_csv(data / "preprocess.csv")
    table = pd.read_csv(data / "cohort_table.csv")
    n = len(smoke_manifest)
    assert len(manifest) == len(prep) == n
    assert len(folds) == n * load_profile("smoke").folds.n_folds
    assert (folds[folds["split"] == "test"].groupby("subject_id").size() == 1).all()
    assert table.loc[table["site"] == "all", "subjects"].item() == n
    assert (prep["brain_outside_grid_fraction"] < 0.05).all()
    for path in (results / "notebooks").rglob("*.ipynb"):
        executed = nbformat.read(path, as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "error"]
        assert not errors, path
    cases = pd.read_csv(results / "fold1" / "cases.csv")
    assert len(cases) == n and set(cases["split"]) == {"train", "val", "test"}
    assert cases[["true_dice", "uncertainty_vs", "pairwise_dice"]].notna().all().all()
    assert len(list((results / "fold1" / "mc" / "native").glob("*_entropy.nii.gz"))) == \
        (cases["split"] == "test").sum()
    rec_columns = ["error_vs", "error_vs_abs", "mean_abs_error_lesion", "rec_ssim", "rec_mae"]
    assert cases[rec_columns].notna().all().all()
    assert len(list((results / "fold1" / "rec" / "maps").glob("*.npz"))) == n
    dr_columns = [f"dr_{k}{v}" for v in ("", "_widened") for k in ("image", "uncertainty",
                                                                    "error")]
    scored = cases["split"].isin(["val", "test"])
    assert cases.loc[scored, dr_columns].notna().all().all()
    assert cases.loc[~scored, dr_columns].isna().all().all()  # training rows left empty


def test_rerun_skips_unchanged_steps_and_reruns_changed_ones(smoke_run, smoke_cohort):
    _, results = smoke_run
    cfg = pipeline.RunConfig(profile=load_profile("smoke"), data_root=Path(smoke_cohort),
                             results_dir=results)
    cfg.folds = [1]
    assert {r.status for r in pipeline.run_steps(cfg)} == {"skipped"}
    cfg.seed = 99  # a parameter changed: the step runs again
    stamp = results / "stamps" / "01_data.json"
    before = json.loads(stamp.read_text())["key"]
    key = pipeline._step_key(cfg, pipeline.STEPS[0], None, {})
    assert key != before




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


def test_out_of_fold_inputs_train_on_maps_from_networks_that_never_saw_the_case(smoke_run,
                                                                                 tmp_path):
    """On a copy of the smoke run: out-of-fold inputs with compare_inputs train both sources.
    Every training case's maps come from the inner networks of the inner fold that held it
    out (its id is in no inner training run of that fold), the out-of-fold targets are native
    Dice of those maps, and both sources' predictions reach the case table."""
    import copy
    import dataclasses
    import shutil

    from wmhqc_lib.qc import regression
    from wmhqc_lib.study import out_of_fold, steps

    _, results = smoke_run
    work = tmp_path / "results"
    shutil.copytree(results, work, ignore=shutil.ignore_patterns("book", "notebooks"))
    smoke = load_profile("smoke")
    sections = copy.deepcopy(smoke.sections)
    # no widened variant: six regressors instead of twelve (widening has its own tests)
    sections["dice_regression"].update(inputs="out_of_fold", compare_inputs=True, widen={})
    profile = dataclasses.replace(smoke, sections=sections)
    steps.train_dice_regressors(profile, work, 1, progress=False)

    split = out_of_fold.inner_split(profile, work, 1)
    train = [s for s, sp in steps.fold_subjects(work, 1).items() if sp == "train"]
    assert set(split) == set(train) and set(split.values()) == {1, 2}
    oof = pd.read_csv(work / "fold1" / "oof" / "oof_cases.csv")
    assert sorted(oof["subject_id"]) == sorted(train)
    for inner in (1, 2):
        paths = out_of_fold.InnerPaths.under(work, 1, inner)
        trained_on = json.loads(json.loads((paths.mc_unet / "state.json").read_text())["key"])
        held = set(oof.loc[oof["inner"] == inner, "subject_id"])
        assert held and not held & set(trained_on["train"])
        assert {p.stem for p in (paths.mc / "maps").glob("*.npz")} == held
        assert {p.stem for p in (paths.rec / "maps").glob("*.npz")} == held
    assert oof["true_dice"].between(0, 1).all()
    assert json.loads((work / "fold1" / "oof" / "timing.json").read_text())["seconds"] > 0
    cases = pd.read_csv(work / "fold1" / "cases.csv")
    scored = cases["split"].isin(["val", "test"])
    for kind in regression.INPUT_KINDS:
        for column in (regression.column_name(kind), regression.column_name(kind) + "_in_sample"):
            assert cases.loc[scored, column].notna().all(), column
    side = regression.input_sources_side_by_side(cases, 0.5, main_source="out_of_fold")
    assert set(side["inputs"]) == {"in_sample", "out_of_fold"}


def test_book_pages_show_no_path_of_the_building_machine(smoke_run, smoke_cohort):
    """The same book built in two folders is the same book: no page names the repository,
    the results folder or the data root by its absolute path."""
    _, results = smoke_run
    html = results / "book" / "_build" / "html"
    machine = {str(pipeline.REPO_ROOT.resolve()), str(Path(results).resolve()),
               str(Path(smoke_cohort).resolve())}
    pages = list(html.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        text = page.read_text(errors="replace")
        for path in machine:
            assert path not in text, f"{page.relative_to(html)} shows {path}"
    params = (html / "notebooks" / "01_data.html").read_text()
    assert "&lt;results&gt;" in params or "<results>" in params


def test_evaluation_tables_ship_with_the_book_as_csv(smoke_run):
    _, results = smoke_run
    html = results / "book" / "_build" / "html"
    page = (html / "notebooks" / "06_evaluation.html").read_text()
    links = re.findall(r'href="(\.\./_static/tables/[^"]+\.csv)"', page)
    assert len(links) == 4
    for link in links:
        table = pd.read_csv(html / "notebooks" / link)
        assert len(table) > 0
    cases = pd.read_csv(html / "_static" / "tables" / "cases_all_folds.csv")
    assert {"subject_id", "fold", "split", "true_dice"} <= set(cases.columns)
    assert not cases.astype(str).apply(lambda c: c.str.startswith("/")).any().any()


def test_training_chapters_show_a_summary_and_the_log_keeps_the_epochs(smoke_run):
    _, results = smoke_run
    html = results / "book" / "_build" / "html" / "notebooks"
    for chapter in ("02_mc_unet", "04_rec_unet", "05_dice_regression"):
        page = (html / f"{chapter}.html").read_text()
        assert not re.search(r"epoch \d+: loss", page), chapter
    log = (results / "logs" / "02_mc_unet-fold1.log").read_text()
    assert re.search(r"epoch 1: loss", log)
