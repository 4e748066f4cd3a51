"""The built book in a real browser: headless Chromium (Debian's) driven by Playwright, the
book served on 127.0.0.1 with every other host refused.

Every page of the table of contents must load with no console error, no failed request and no
request leaving the machine; plotly figures must draw their SVG, the nilearn figures and viewer
must be there, and moving the evaluation chapter's threshold slider must change the counts it
shows. A screenshot of the evaluation page is kept as a test artifact.

Chromium is the session's shared one (``tests/browsing.py``, skipped or failed where missing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from browsing import ARTIFACTS, Tab, served


@pytest.fixture(scope="module")
def served_book(smoke_run):
    """The smoke run's built book over HTTP on 127.0.0.1."""
    code, results = smoke_run
    assert code == 0
    with served(results / "book" / "_build" / "html") as base:
        yield base, results / "book"


@pytest.fixture(scope="module")
def tab(browser, served_book):
    """One page that the tests of this module navigate through the book."""
    tab = Tab(browser, served_book[0])
    yield tab
    tab.close()


def toc_pages(stage: Path) -> list[str]:
    """Every page of the staged table of contents, as paths relative to the HTML root."""
    toc = yaml.safe_load((stage / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", [toc]):
        walk(part.get("chapters"))
    return [f"{Path(f).with_suffix('')}.html" for f in files]


@pytest.mark.slow
def test_every_page_loads_offline_without_errors(tab, served_book):
    _, stage = served_book
    pages = toc_pages(stage)
    assert len(pages) >= 8  # intro, six chapters, notes
    counts = {}
    for rel in pages:
        page, watch = tab.open(rel)
        assert page.title(), rel
        assert not watch.problems, f"{rel}: {watch.problems[:5]}"
        counts[rel] = page.locator(".plotly-graph-div svg.main-svg").count()
    for chapter in ("01_data", "02_mc_unet", "03_uncertainty", "04_rec_unet",
                    "05_dice_regression", "06_evaluation", "07_triage", "08_guarantee"):
        assert counts[f"notebooks/{chapter}.html"] >= 1, f"{chapter}: no plotly figure drawn"


@pytest.mark.slow
def test_each_chapter_shows_only_the_parameters_of_its_run(tab, served_book):
    """A chapter shows one parameters cell, the one papermill injected with the run's values
    and headed as such, not the template's defaults above it. (The test run is itself smoke,
    so the cells are told apart by their tags, not by the values.)"""
    from wmhqc_lib.study.pipeline import RUN_PARAMETERS_HEADING

    chapters = [rel for rel in toc_pages(served_book[1]) if rel.startswith("notebooks/")]
    assert len(chapters) >= 7
    for rel in chapters:
        page, _ = tab.open(rel)
        shown = page.locator(".cell:has-text('profile_name =')")
        assert shown.count() == 1, rel
        assert "tag_injected-parameters" in shown.first.get_attribute("class"), rel
        assert shown.first.is_visible(), rel
        assert RUN_PARAMETERS_HEADING in shown.first.inner_text(), rel
        assert page.locator(".cell.tag_parameters").count() == 0, rel


@pytest.mark.slow
def test_nilearn_figures_and_viewer_are_present(tab):
    page, watch = tab.open("notebooks/04_rec_unet.html")
    images = page.locator("img[src*='_images/']")
    assert images.count() >= 1
    assert all(images.nth(i).evaluate("i => i.complete && i.naturalWidth > 0")
               for i in range(images.count()))  # decoded, not broken
    page, watch = tab.open("notebooks/03_uncertainty.html")
    frame = page.locator("iframe").first
    frame.wait_for()
    viewer = page.frame_locator("iframe").first
    viewer.locator("canvas").first.wait_for(timeout=15_000)  # brainsprite draws on a canvas
    assert not watch.problems, watch.problems[:5]


@pytest.mark.slow
def test_threshold_slider_changes_the_counts(tab):
    page, watch = tab.open("notebooks/06_evaluation.html")
    figure = page.locator(".plotly-graph-div:has(g.slider-container)").first
    figure.scroll_into_view_if_needed()
    title = figure.locator("g.infolayer text.gtitle")
    def flagged() -> int:
        match = re.search(r"(\d+) of (\d+) cases flagged for review", title.text_content())
        assert match, title.text_content()
        return int(match.group(1))

    rail = figure.locator("rect.slider-rail-rect")
    box = rail.bounding_box()
    counts = [flagged()]
    for fraction in (0.02, 0.98):  # click both ends of the rail, as a reader would
        page.mouse.click(box["x"] + fraction * box["width"], box["y"] + box["height"] / 2)
        page.wait_for_timeout(300)
        counts.append(flagged())
    assert counts[1] != counts[2], counts  # the shown counts follow the slider
    assert not watch.problems, watch.problems[:5]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "evaluation_page.png"), full_page=True)
    assert (ARTIFACTS / "evaluation_page.png").stat().st_size > 10_000


@pytest.mark.slow
def test_both_sliders_recompute_the_counts_in_the_static_page(tab):
    """The kernel-free explorer: the score slider changes what is flagged, the quality slider
    changes what counts as failed, and the numbers match the library's for the same position."""
    import json

    import numpy as np

    page, watch = tab.open("notebooks/06_evaluation.html")
    box = page.locator(".wmhqc-explorer").first
    box.scroll_into_view_if_needed()
    data = json.loads(box.locator("script[type='application/json']").text_content())

    def shown() -> dict[str, str]:
        return {k: box.locator(f"td[data-out={k}]").text_content()
                for k in ("flagged", "failed", "caught", "precision", "recall", "review")}

    def move(name: str, value: int) -> None:
        box.locator(f"input[name={name}]").evaluate(
            "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)

    move("score", 0)
    low = shown()
    move("score", len(data["thresholds"]) - 1)
    high = shown()
    assert low["flagged"] != high["flagged"], (low, high)
    move("quality", 0)
    few = shown()["failed"]
    move("quality", len(data["qualities"]) - 1)
    many = shown()["failed"]
    assert int(few) < int(many), (few, many)
    # the page's numbers at one position against the library's definitions
    middle = len(data["thresholds"]) // 2
    move("score", middle)
    t, q = data["thresholds"][middle], data["qualities"][-1]
    score, dice = np.array(data["score"]), np.array(data["dice"])
    flagged = score < t if data["higher"] else score > t
    failed = dice < q
    assert int(shown()["flagged"]) == int(flagged.sum())
    assert int(shown()["caught"]) == int((flagged & failed).sum())
    assert not watch.problems, watch.problems[:5]


@pytest.mark.slow
def test_evaluation_page_content_fits_its_column(tab):
    """No table, figure or explorer of the evaluation chapter is wider than the text column at
    1400 x 1000 (collapsed blocks count only when opened: they are hidden until then)."""
    page, watch = tab.open("notebooks/06_evaluation.html", (1400, 1000))
    column, wide = page.evaluate("""() => {
      const col = document.querySelector('article.bd-article') || document.querySelector('main');
      const width = col.getBoundingClientRect().width;
      const wide = [];
      for (const el of col.querySelectorAll(
          'table, .plotly-graph-div, img, .wmhqc-explorer, .cell_output svg')) {
        const box = el.getBoundingClientRect();
        const hidden = box.width === 0 || el.closest('.toggle-hidden, details:not([open])')
          || !el.checkVisibility({opacityProperty: true, visibilityProperty: true});
        if (hidden) continue;  // a collapsed block: the full table is shown when opened
        const w = Math.max(box.width, el.scrollWidth || 0);
        if (w > width + 1) wide.push([el.tagName, Math.round(w)]);
      }
      return [width, wide];
    }""")
    assert column > 500, column
    assert not wide, (column, wide)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "evaluation_1400x1000.png"))
    assert not watch.problems, watch.problems[:5]
