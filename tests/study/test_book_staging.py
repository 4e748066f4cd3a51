"""The book shows each chapter's parameters as the run set them: one small notebook run by the
pipeline with a profile other than its template's default, staged and built as a one-page
book (seconds; the smoke run's full book is checked in test_browser.py)."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import nbformat
from conftest import write_test_notebook

from wmhqc_lib.config import load_profile
from wmhqc_lib.study import pipeline


def _page_text(page: Path) -> str:
    """The page's text as a reader sees it (tags dropped: highlighting splits code in spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_book_page_shows_only_the_run_parameters(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "book").mkdir(parents=True)
    shutil.copy2(pipeline.REPO_ROOT / "_config.yml", root / "_config.yml")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n"
                                   "  - file: notebooks/01_data\n")
    (root / "book" / "intro.md").write_text("# Intro\n\nA one-chapter book.\n")
    nbdir = root / "notebooks"
    nbdir.mkdir()
    write_test_notebook(nbdir / "01_data.ipynb", "print('ran with', profile_name)")
    nb = nbformat.read(nbdir / "01_data.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell("# A chapter"))  # a page needs a title
    nbformat.write(nb, nbdir / "01_data.ipynb")
    monkeypatch.setattr(pipeline, "REPO_ROOT", root)
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", nbdir)
    (tmp_path / "data").mkdir()
    cfg = pipeline.RunConfig(profile=load_profile("cpu"), data_root=tmp_path / "data",
                             results_dir=tmp_path / "results", progress=False)
    step = pipeline.Step("01_data.ipynb")
    assert [r.status for r in pipeline.run_steps(cfg, [step])] == ["ran"]

    index = pipeline.build_book(cfg)
    page = index.parent / "notebooks" / "01_data.html"
    source = page.read_text()
    assert source.count("tag_injected-parameters") == 1
    assert "tag_parameters" not in source  # the template's cell is not on the page
    text = _page_text(page)
    assert pipeline.RUN_PARAMETERS_HEADING in text
    assert 'profile_name = "cpu"' in text and "ran with cpu" in text
    assert 'profile_name = "smoke"' not in text and "# Parameters\n" not in text
    assert str(tmp_path) not in text and 'results_dir = "<results>"' in text

    # the staged notebook (the page's download) still holds both cells and reruns as it is
    staged = nbformat.read(cfg.book_dir / "notebooks" / "01_data.ipynb", as_version=4)
    template, injected = staged.cells[1], staged.cells[2]
    assert template.metadata["tags"] == ["parameters", "remove-cell"]
    assert injected.metadata["tags"] == ["injected-parameters"]
    names: dict = {}
    for cell in staged.cells[1:3]:
        exec(cell.source, names)  # noqa: S102 - the test's own notebook
    assert names["profile_name"] == "cpu" and names["fold"] == 0
    # the executed notebook of the run itself is papermill's, untouched
    executed = nbformat.read(cfg.executed_dir / "01_data.ipynb", as_version=4)
    assert "remove-cell" not in executed.cells[1].metadata["tags"]
