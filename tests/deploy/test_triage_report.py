"""The triage HTML reports: a page per participant and the group page, self-contained and
offline, checked as files and in a real browser (the session's headless Chromium).

The pipeline tests read the shared triage run of conftest (good scans, a noise volume that is
unlike the training cohort, and broken inputs that end as errors); the text helpers are checked
on their own.
"""

from __future__ import annotations

import fnmatch
import html
import json
import re
import shutil
from html.parser import HTMLParser
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from browsing import ARTIFACTS, Tab, served

from wmhqc_lib.deploy import report as triage_report
from wmhqc_lib.deploy import triage


class _Page(HTMLParser):
    """What a page holds: tags, links, image sources, ids, text; HTML5 basics recorded."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.doctype, self.tags, self.ids, self.text = "", [], [], []
        self.links: list[str] = []  # of <a>: href or xlink:href (SVG)
        self.references: list[str] = []  # any href, xlink:href included
        self.sources: list[str] = []  # src
        self.row_classes: list[str] = []
        self.feed(text)
        self.close()

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        for name in ("href", "xlink:href"):
            if name in attrs:
                self.references.append(attrs[name])
                if tag == "a":
                    self.links.append(attrs[name])
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if tag == "tr" and attrs.get("class"):
            self.row_classes.append(attrs["class"])

    def handle_data(self, data):
        self.text.append(data)

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())


def _read(path: Path) -> _Page:
    return _Page(path.read_text(encoding="utf-8"))


def _pages(out: Path) -> list[Path]:
    return sorted(out.glob("*.html"))


# ---------------------------------------------------------------------------------------------
# Text helpers, no pipeline


def test_the_promise_reads_plainly_and_survives_undefined_values():
    card = {"test_operating_point": {
        "precision": {"estimate": 0.8, "low": 0.6, "high": 0.95},
        "recall": {"estimate": None, "low": None, "high": None},
        "review_fraction": {"estimate": 0.3, "low": float("nan"), "high": 0.4},
        "n_cases": 20, "n_failed": 0, "n_flagged": 6},
        "failure_auroc": {"estimate": None}, "failure": "lesion Dice < 0.5",
        "cohort": {"synthetic": True}}
    text = triage_report.promise_text(card)
    assert "0.80 (95 % CI 0.60 to 0.95) of flagged scans had truly failed" in text
    assert "failed segmentations that were flagged is undefined" in text
    assert "0.30 of scans were flagged" in text  # no interval with a NaN bound
    assert "Failure means lesion Dice < 0.5" in text and "synthetic" in text
    assert "nan" not in text.lower() and "None" not in text
    assert "undefined" in triage_report.promise_text({})  # an empty card still reads


def test_the_validation_sentence_counts_scores_at_least_this_bad():
    score, dice = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.9, 0.3, 0.2, 0.8])
    lower_better = triage_report.validation_sentence(0.25, score, dice, 0.5, False)
    assert lower_better.startswith("1 of the 2 validation cases")  # 0.3 failed, 0.4 did not
    higher_better = triage_report.validation_sentence(0.25, score, dice, 0.5, True)
    assert higher_better.startswith("1 of the 2 validation cases")  # 0.2 failed, 0.1 did not
    beyond = triage_report.validation_sentence(0.05, score, dice, 0.5, True)
    assert beyond.startswith("None of the 4")
    assert "undefined" in triage_report.validation_sentence(None, score, dice, 0.5, True)


# ---------------------------------------------------------------------------------------------
# The reports of the shared triage run


def test_every_participant_has_a_page_and_the_group_page_links_to_each(triaged):
    _, out = triaged
    table = triage.group_table(out)
    participants = set(table["participant_id"])
    for pid in participants:
        assert (out / f"{pid}.html").is_file(), pid
    group = _read(out / triage_report.GROUP_HTML)
    linked = set()
    for link in group.links:
        url = urlparse(link)
        assert not url.scheme and not url.netloc, link
        target = out / unquote(url.path)
        assert target.is_file(), link
        linked.add(target.stem)
        if url.fragment:  # the scan's section exists on that page
            assert unquote(url.fragment) in _read(target).ids, link
    assert linked == participants
    # flagged scans first, then passed ones, then errors; as many rows as records
    order = {"review": 0, "pass": 1, "error": 2}
    assert len(group.row_classes) == len(table)
    assert group.row_classes == sorted(group.row_classes, key=order.__getitem__)
    assert group.row_classes.count("review") == int(table["flagged"].eq(True).sum())
    n_ok, n_flag = int((table["status"] == "ok").sum()), int(table["flagged"].eq(True).sum())
    assert f"{len(table)} scan(s)" in group.plain and f"{n_flag} flagged" in group.plain
    # one plot point per triaged scan, each a link to its section
    svg = (out / triage_report.GROUP_HTML).read_text()
    points = re.findall(r'<a xlink:href="([^"]+)"', svg)
    assert len(points) == n_ok
    assert all((out / unquote(p.split("#")[0])).is_file() for p in points)


def test_a_scan_page_shows_verdict_promise_maps_and_the_validation_comparison(triaged):
    _, out = triaged
    page = _read(out / "sub-03.html")
    assert {"sub-03_ses-A", "sub-03_ses-B"} <= set(page.ids)
    assert len(page.ids) == len(set(page.ids))
    text = page.plain
    assert text.count("Review recommended") + text.count("No review needed") == 2
    assert "of flagged scans had truly failed" in text or "undefined" in text
    assert "Failure means lesion Dice" in text
    assert re.search(r"(\d+ of the \d+|None of the \d+) validation cases", text)
    assert "Predicted Dice" in text and "Lesion volume" in text and "Folds flagging" in text
    # per session: FLAIR with the mask, entropy, signed error, and the validation plot
    assert len(page.sources) == 8
    assert "not drawn" not in text and "not found" not in text


def test_the_noise_scan_page_says_it_is_unlike_the_training_cohort(triaged, smoke_bundle):
    _, out = triaged
    text = _read(out / "sub-badnoise.html").plain
    record = json.loads((out / "sub-badnoise/anat/sub-badnoise_desc-wmhqc_qc.json")
                        .read_text())
    reasons = triage.out_of_distribution(record["image_features"],
                                         smoke_bundle.info["feature_ranges"])
    assert reasons
    assert "This scan is unlike the training cohort" in text
    assert "carry no promise" in text
    assert all(r in text for r in reasons), reasons
    assert "Review recommended" in text


def test_an_error_scan_page_shows_the_error(triaged):
    _, out = triaged
    table = triage.group_table(out)
    errors = table[table["status"] == "error"]
    assert len(errors) >= 5
    for row in errors.itertuples():
        page = _read(out / f"{row.participant_id}.html")
        assert "Could not be triaged" in page.plain, row.participant_id
        assert " ".join(row.reason.split()) in page.plain, row.participant_id
        assert not page.sources  # no figures for a scan with none


def test_pages_are_self_contained_valid_and_labelled_synthetic(triaged, smoke_bundle):
    _, out = triaged
    assert smoke_bundle.card["cohort"]["synthetic"] is True
    pages = _pages(out)
    assert len(pages) == triage.group_table(out)["participant_id"].nunique() + 1
    for path in pages:
        raw = path.read_text(encoding="utf-8")
        page = _Page(raw)
        assert raw.startswith("<!DOCTYPE html>") and page.doctype.lower() == "doctype html"
        assert [page.tags.count(t) for t in ("html", "head", "body")] == [1, 1, 1], path.name
        assert page.tags[:page.tags.index("body")].count("title") == 1, path.name  # not SVG's
        assert len(page.ids) == len(set(page.ids)), path.name
        assert not re.search(r"<(script|link|iframe|object|embed)\b", raw), path.name
        assert "@import" not in raw and not re.search(r"url\((?!#)", raw), path.name
        for link in page.references + page.sources:
            assert not re.match(r"(https?:)?//", link, re.I), (path.name, link)
        assert all(s.startswith("data:image/png;base64,") for s in page.sources), path.name
        assert "Models trained on a synthetic cohort" in page.plain, path.name
        assert path.stat().st_size < 2_000_000, path.name
    # the html is not a BIDS file: the derivative's .bidsignore covers it
    patterns = (out / ".bidsignore").read_text().split()
    assert all(any(fnmatch.fnmatch(p.name, pat) for pat in patterns) for p in pages)


class _CountingPool:
    """A process pool that counts the calls handed to it (so the test knows the pages were
    drawn in its workers, not here)."""

    def __init__(self, pool):
        self.pool, self.calls = pool, 0

    def imap(self, fn, jobs):
        self.calls += 1
        return self.pool.imap(fn, jobs)


def test_pages_drawn_in_worker_processes_and_in_one_are_the_same_bytes(triaged, smoke_bundle,
                                                                      tmp_path):
    """The same records drawn twice into copies of the output: by a spawn pool's workers and
    in this process (``pool=None``); every page is the same bytes."""
    _, out = triaged
    table = triage.group_table(out)
    assert table["participant_id"].nunique() > 1  # more than one page for the workers
    folders = {name: tmp_path / name for name in ("workers", "here")}
    for folder in folders.values():
        shutil.copytree(out, folder, ignore=shutil.ignore_patterns("*.html"))
    with get_context("spawn").Pool(2) as pool:
        counting = _CountingPool(pool)
        in_workers = triage_report.write_reports(folders["workers"], table, smoke_bundle,
                                                 counting)
    assert counting.calls == 1
    here = triage_report.write_reports(folders["here"], table, smoke_bundle, None)
    assert sorted(p.name for p in in_workers) == sorted(p.name for p in here)
    pages = {name: {p.name: p.read_bytes() for p in _pages(folder)}
             for name, folder in folders.items()}
    assert len(pages["here"]) == table["participant_id"].nunique() + 1
    assert pages["workers"] == pages["here"]
    assert "not found" not in (folders["here"] / "sub-01.html").read_text()  # FLAIR drawn


def test_record_text_is_escaped(smoke_bundle, tmp_path):
    # text from a record is escaped, never markup
    record = {"status": "error", "source": "<b>x</b>", "reason": "bad <script>alert(1)</script>"}
    section = triage_report.scan_section(tmp_path, "sub-x", record, smoke_bundle)
    assert "<script>" not in section and "&lt;script&gt;" in section
    assert html.unescape(section).count("<b>x</b>") == 1


# ---------------------------------------------------------------------------------------------
# In a browser


@pytest.fixture(scope="module")
def served_reports(triaged):
    """The triage output over HTTP on 127.0.0.1."""
    _, out = triaged
    with served(out) as base:
        yield base, out


def _open(browser, base: str, rel: str):
    """A fresh tab on ``rel`` (this module opens two documents: a reused tab saves nothing)."""
    tab = Tab(browser, base)
    return tab.open(rel, settle_ms=200)


def _images_decoded(page) -> bool:
    return page.evaluate("Array.from(document.images)"
                         ".every(i => i.complete && i.naturalWidth > 0)")


@pytest.mark.slow
def test_the_reports_load_offline_and_a_plot_point_opens_its_page(browser, served_reports):
    base, out = served_reports
    page, watch = _open(browser, base, triage_report.GROUP_HTML)
    assert page.title() and page.locator("#group-plot svg").count() == 1
    points = page.locator("#group-plot svg a")
    assert points.count() >= 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "triage_group_qc.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # click the first point that is on top where it is drawn, as a reader would
    target = None
    for i in range(points.count()):
        box = points.nth(i).bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        href = page.evaluate("([x, y]) => { const a = document.elementFromPoint(x, y)"
                             "?.closest('a'); return a && a.getAttribute('xlink:href'); }",
                             [x, y])
        if href:
            target = href
            break
    assert target, "no plot point can be clicked"
    with page.expect_navigation():
        page.mouse.click(x, y)
    assert urlparse(page.url).path == "/" + target.split("#")[0], page.url
    page.wait_for_timeout(200)
    assert page.locator("h1").inner_text().startswith(target.split(".html")[0])
    assert _images_decoded(page)
    assert not watch.problems, watch.problems[:5]
    page.close()
    # a subject page with two sessions: every figure decodes, nothing leaves the machine
    page, watch = _open(browser, base, "sub-03.html")
    assert page.locator("img").count() == 8 and _images_decoded(page)
    assert page.locator("text=Models trained on a synthetic cohort").count() == 1
    assert not watch.problems, watch.problems[:5]
    page.close()
