"""The walking pipeline on the shared smoke run: papermill runs every chapter, the book builds
offline, reruns skip finished steps. (How steps fail, wait and log: test_step_runner.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pandas as pd

from wmhqc_lib.config import load_profile
from wmhqc_lib.study import pipeline, report


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
    guarantee_page = (html / "notebooks" / "08_guarantee.html").read_text()
    assert "plotly-graph-div" in guarantee_page and "synthetic cohort" in guarantee_page
    assert "share_met" in guarantee_page  # the simulation table
    for table in ("tradeoff.csv", "simulation.csv"):
        assert len(pd.read_csv(results / "guarantee" / table)) >= 1, table
    timing = (results / "timing.txt").read_text().splitlines()  # every step, no temp file left
    assert [ln.split()[0] for ln in timing[1:]] == [
        "01_data", "02_mc_unet", "03_uncertainty", "04_rec_unet", "05_dice_regression",
        "06_evaluation", "07_triage", "08_guarantee"]
    assert [p.name for p in results.glob(".timing.txt.*")] == [".timing.txt.lock"]
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
    assert len(links) == len(report.TABLE_FILES)
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


def test_dice_regressors_stop_on_held_out_training_cases_never_on_validation(smoke_run):
    """Validation cases choose the carried score and its thresholds (issue 23): no regressor
    may have fitted or stopped on one. Each regressor's state names the cases it fitted and
    the ones that stopped it; both come from the fold's training cases only, disjointly."""
    _, results = smoke_run
    from wmhqc_lib.study.steps import fold_subjects

    states = sorted(Path(results).glob("fold*/dr/*/*/state.json"))
    assert states, "the smoke run trained no Dice regressor"
    for path in states:
        fold = int(path.parts[-5].removeprefix("fold"))
        split = fold_subjects(results, fold)
        key = json.loads(json.loads(path.read_text())["key"])
        fitted = {name.split(":")[0] for name in key["train"]}
        stopped = set(key["val"])
        assert stopped, f"{path}: stopped on no case"
        assert {split[s] for s in fitted} == {"train"}, path
        assert {split[s] for s in stopped} == {"train"}, path
        assert fitted.isdisjoint(stopped), path
