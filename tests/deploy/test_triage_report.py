"""The triage HTML reports: a page per participant and the group page, self-contained and
offline, checked as files and in a real browser (the session's headless Chromium), and the
reviewers' verdicts given on them: saved in the browser, shown on the group page and exported
as a TSV from ``file://``.

The pipeline tests read the shared triage run of conftest (good scans, a noise volume that is
unlike the training cohort, and broken inputs that end as errors) and never write into it; the
text helpers are checked on their own.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import html
import json
import re
import shutil
from datetime import UTC, datetime
from html.parser import HTMLParser
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
from browsing import ARTIFACTS, Tab, file_base, served

from wmhqc_lib.cli import main
from wmhqc_lib.deploy import calibrate, triage
from wmhqc_lib.deploy import report as triage_report


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


class _ReviewForms(HTMLParser):
    """The reviewer's verdict forms of a page or section: their attributes, the radio values
    (in order), the names of the text fields and the classes of the buttons."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.forms: list[dict] = []
        self._open = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and "reviewer-verdict" in (attrs.get("class") or "").split():
            self.forms.append({**attrs, "radios": [], "radio_names": set(), "fields": [],
                               "buttons": []})
            self._open = True
        elif not self._open:
            return
        form = self.forms[-1]
        if tag == "input" and attrs.get("type") == "radio":
            form["radios"].append(attrs.get("value"))
            form["radio_names"].add(attrs.get("name"))
        elif tag == "textarea" or (tag == "input" and attrs.get("type") == "text"):
            form["fields"].append(attrs.get("name"))
        elif tag == "button":
            form["buttons"].append(attrs.get("class"))

    def handle_endtag(self, tag):
        if tag == "form":
            self._open = False


_SECTION = re.compile(r'<section id="([^"]+)">(.*?)</section>', re.DOTALL)
_STORE_META = re.compile(r'<meta name="wmhqc-verdict-store" content="([^"]*)">')


def _read(path: Path) -> _Page:
    return _Page(path.read_text(encoding="utf-8"))


def _pages(out: Path) -> list[Path]:
    return sorted(out.glob("*.html"))


def _sections(path: Path) -> dict[str, str]:
    """A subject page's scan sections by id (sections hold no other section)."""
    return {html.unescape(a): body
            for a, body in _SECTION.findall(path.read_text(encoding="utf-8"))}


def _store_key(path: Path) -> str:
    found = _STORE_META.findall(path.read_text(encoding="utf-8"))
    assert len(found) == 1, path.name
    return html.unescape(found[0])


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


def test_a_guarantee_bundle_promises_its_guarantee_and_its_own_thresholds_figures():
    """With a recall guarantee the page states it and quotes the guaranteed threshold's test
    figures (its cost), not the profile rule's operating point the card keeps for comparison."""
    rule = {"recall": {"estimate": 0.5}, "review_fraction": {"estimate": 0.1},
            "precision": {"estimate": 0.9}, "n_cases": 20, "n_failed": 4}
    cost = {"recall": {"estimate": 1.0}, "review_fraction": {"estimate": 0.45},
            "precision": {"estimate": 0.4}, "n_cases": 20, "n_failed": 4}
    card = {"test_operating_point": rule, "guarantee": {
        "statement": "recall of failures >= 90% with 90% confidence, from 23 labelled "
                     "failures of which the threshold leaves 0 unflagged",
        "choosing_rows": "the pooled validation cases", "cost": cost}}
    text = triage_report.promise_text(card)
    assert text.startswith("Guarantee: recall of failures >= 90% with 90% confidence")
    assert "0.45 of scans were flagged" in text and "1.00 of failed" in text
    assert "0.10 of scans" not in text


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
        assert not re.search(r"<(link|iframe|object|embed)\b", raw), path.name
        # one inline script (the reviewers' verdicts), nothing loaded; a policy forbids requests
        assert re.findall(r"<script\b[^>]*>", raw) == ["<script>"], path.name
        assert raw.index("<script>") > raw.index("</footer>"), path.name
        assert "default-src 'none'" in raw[:raw.index("</head>")], path.name
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
    # text from a record is escaped, never markup, in the page and in the verdict form's data
    record = {"status": "error", "source": "<b>x</b>", "reason": "bad <script>alert(1)</script>",
              "participant_id": 'sub-"x<i>', "session_id": "ses-<u>'", "site": "<em>s</em>",
              "audit": True}
    section = triage_report.scan_section(tmp_path, 'sub-"x<i>', record, smoke_bundle)
    assert "<script>" not in section and "&lt;script&gt;" in section
    assert html.unescape(section).count("<b>x</b>") == 1
    assert not re.search(r"<(i|u|em)>", section)
    (form,) = _ReviewForms(section).forms
    assert (form["data-scan"], form["data-participant"], form["data-session"]) == \
        ('sub-"x<i>', 'sub-"x<i>', "ses-<u>'")
    assert form["id"] == 'reviewer-verdict-sub-"x<i>'
    plain = _Page(section).plain
    assert "Site: <em>s</em>" in plain and "Audit sample: please review" in plain


# ---------------------------------------------------------------------------------------------
# The reviewers' verdicts: the controls and the store key, as files


def test_every_scan_section_has_the_reviewer_verdict_controls(triaged):
    """Three choices (the values ``wmhqc calibrate`` reads) on every triaged scan, the one
    choice that fits a scan in error, a note, the reviewer's name and a clear button."""
    _, out = triaged
    table = triage.group_table(out)
    kinds = set()
    for row in table.itertuples():
        anchor = triage_report.scan_anchor(row.record)
        section = _sections(out / f"{row.participant_id}.html")[anchor]
        (form,) = _ReviewForms(section).forms
        assert form["id"] == f"reviewer-verdict-{anchor}" and form["data-scan"] == anchor
        assert (form["data-participant"], form["data-session"]) == (row.participant_id,
                                                                    row.session_id)
        expected = (["acceptable", "needs_correction", "unusable"] if row.status == "ok"
                    else ["unusable"])
        assert form["radios"] == expected, anchor
        assert form["radio_names"] == {"verdict"}  # one group per form
        assert form["fields"] == ["note", "reviewer"] and form["buttons"] == ["clear-verdict"]
        kinds.add(row.status)
        # the QC flag stays apart from the reviewer's verdict
        flag = ("Review recommended" if row.flagged is True else
                "No review needed" if row.status == "ok" else "Could not be triaged")
        assert flag in _Page(section).plain and flag not in _Page(
            section[section.index("<form"):]).plain
    assert kinds == {"ok", "error"}
    text = _read(out / "sub-01.html").plain
    assert all(words in text for words in triage_report.REVIEW_VERDICTS.values())


def test_the_group_page_lists_every_scan_for_the_verdicts_and_offers_the_export(triaged):
    _, out = triaged
    table = triage.group_table(out)
    raw = (out / triage_report.GROUP_HTML).read_text(encoding="utf-8")
    rows = [tuple(html.unescape(v) for v in found) for found in re.findall(
        r'<tr class="\w+" data-scan="([^"]*)" data-participant="([^"]*)" '
        r'data-session="([^"]*)">', raw)]
    # in the table's order, named as group_qc.tsv names them (session n/a without one)
    tsv = pd.read_csv(out / "group_qc.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert rows == [(triage_report.scan_anchor(r), p, s) for r, p, s in
                    zip(table["record"], tsv["participant_id"], tsv["session_id"], strict=True)]
    assert "n/a" in {s for _, _, s in rows} and "ses-A" in {s for _, _, s in rows}
    assert raw.count('<td class="reviewer-verdict">') == len(table)
    page = _read(out / triage_report.GROUP_HTML)
    assert {"review-count", "export-verdicts", "export-status"} <= set(page.ids)
    assert re.search(r'<button type="button" id="export-verdicts">Export verdicts \(TSV\)'
                     r"</button>", raw)
    assert "QC flag" in page.plain and "reviewer verdict" in page.plain


def test_one_verdict_store_key_per_output(triaged, smoke_bundle, tmp_path):
    """Every page of an output names the same key; another output (fewer scans, a changed
    input, another bundle) gets another; what does not identify a scan (its timing) does not
    change it."""
    _, out = triaged
    keys = {_store_key(p) for p in _pages(out)}
    assert len(keys) == 1
    key = keys.pop()
    assert re.fullmatch(r"wmhqc-verdicts:[0-9a-f]{20}", key)
    table = triage.group_table(out)
    records = {rel: json.loads((out / rel).read_text()) for rel in table["record"]}
    assert triage_report.verdict_store_key(records, smoke_bundle) == key
    # another output of the same bundle, with two of the scans, drawn in a folder of its own
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("*.html"))
    for folder in other.glob("sub-*"):
        if folder.is_dir() and folder.name not in ("sub-01", "sub-badnan"):
            shutil.rmtree(folder)
    written = triage_report.write_reports(other, triage.group_table(other), smoke_bundle)
    assert len(written) == 3
    other_keys = {_store_key(p) for p in written}
    assert len(other_keys) == 1 and key not in other_keys
    rel = next(r for r, rec in records.items() if rec.get("inputs_sha256"))
    changed = {**records, rel: {**records[rel], "inputs_sha256": {"flair": "0" * 64,
                                                                  "t1": "0" * 64}}}
    assert triage_report.verdict_store_key(changed, smoke_bundle) != key
    fake = tmp_path / "bundle"
    fake.mkdir()
    manifest = (smoke_bundle.root / "manifest.json").read_text()
    (fake / "manifest.json").write_text(manifest + "\n")
    another = dataclasses.replace(smoke_bundle, root=fake)
    assert triage_report.verdict_store_key(records, another) != key
    slower = {**records, rel: {**records[rel], "seconds": 99.0}}
    assert triage_report.verdict_store_key(slower, smoke_bundle) == key


def test_site_and_audit_sample_show_where_records_have_them(triaged, smoke_bundle):
    """Records may carry ``site`` and ``audit``; pages show them when present and read as
    before when absent."""
    _, out = triaged
    rel = "sub-01/anat/sub-01_desc-wmhqc_qc.json"
    rec = {k: v for k, v in json.loads((out / rel).read_text()).items()
           if k not in ("site", "audit")}
    bare = triage_report.scan_section(out, "sub-01", rec, smoke_bundle)
    assert "Audit sample" not in bare and "<th>Site</th>" not in bare
    marked = triage_report.scan_section(out, "sub-01", {**rec, "site": "Hospital <A>",
                                                        "audit": True}, smoke_bundle)
    plain = _Page(marked).plain
    assert "Audit sample: please review" in plain and "Site Hospital <A>" in plain
    assert marked.index('class="audit"') < marked.index("Review recommended" if rec["flagged"]
                                                        else "No review needed")
    unknown = triage_report.scan_section(out, "sub-01", {**rec, "site": None, "audit": False},
                                         smoke_bundle)
    assert "Site n/a" in _Page(unknown).plain and "Audit sample" not in unknown
    # the group table: a site column and the audit marker only where the table has them
    table = triage.group_table(out).drop(columns=["site", "audit"], errors="ignore")
    store = "wmhqc-verdicts:" + "0" * 20
    plain_page = _Page(triage_report.group_page(table, smoke_bundle, verdict_store=store))
    assert "site" not in [t.strip() for t in plain_page.text] and \
        "audit sample" not in plain_page.plain
    sites = ["<b>north</b>" if i % 2 else None for i in range(len(table))]
    audit = [i == 1 for i in range(len(table))]
    page = triage_report.group_page(table.assign(site=sites, audit=audit), smoke_bundle,
                                    verdict_store=store)
    assert "<b>" not in page
    parsed = _Page(page)
    assert "site" in [t.strip() for t in parsed.text]
    assert parsed.plain.count("<b>north</b>") == sites.count("<b>north</b>")
    assert parsed.plain.count("audit sample: please review") == 1
    row = re.findall(r"<tr class[^>]*>.*?</tr>", page)[1]
    assert "audit sample: please review" in row and "&lt;b&gt;north" in row


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


# verdicts given on the subject pages, opened from file:// (no server), and exported from the
# group page; one browser context, so the pages share the browser's storage as a reader's do
_REVIEWER = "Dr. Synthetic Reviewer"
_NOTE = "missed lesion\tleft frontal\nsee slice 3"
_ISO_UTC = "%Y-%m-%dT%H:%M:%SZ"


def _form(page, anchor: str):
    return page.locator(f'form.reviewer-verdict[data-scan="{anchor}"]')


@pytest.mark.slow
def test_verdicts_given_on_pages_from_file_urls_are_exported_as_tsv(browser, triaged,
                                                                    smoke_bundle, tmp_path,
                                                                    capsys):
    _, out = triaged
    table = triage.group_table(out)
    assert (table["participant_id"] == "sub-badnan").any()
    base = file_base(out)
    key = _store_key(out / triage_report.GROUP_HTML)
    start = datetime.now(UTC).replace(microsecond=0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(accept_downloads=True)
    try:
        tab = Tab(context, base)
        # a verdict with a note (a tab and a newline in it) and the reviewer's name
        page, watch = tab.open("sub-01.html", settle_ms=100)
        assert page.url.startswith("file://")
        form = _form(page, "sub-01")
        assert form.locator('input[name="reviewer"]').input_value() == ""
        form.locator('input[value="needs_correction"]').check()
        form.locator("textarea").fill(_NOTE)
        form.locator('input[name="reviewer"]').fill(_REVIEWER)
        assert "Saved: needs correction, by " + _REVIEWER in form.locator(
            ".reviewer-verdict-status").inner_text()
        # reopened, the page shows the saved verdict
        page, watch = tab.open("sub-01.html", settle_ms=100)
        form = _form(page, "sub-01")
        assert form.locator('input[value="needs_correction"]').is_checked()
        assert not form.locator('input[value="acceptable"]').is_checked()
        assert form.locator("textarea").input_value() == _NOTE
        assert form.locator('input[name="reviewer"]').input_value() == _REVIEWER
        saved = json.loads(page.evaluate("k => localStorage.getItem(k)", key))
        assert set(saved["verdicts"]) == {"sub-01"}
        assert not watch.problems, watch.problems[:5]
        # another participant: the name is remembered; one verdict given, one given and cleared
        page, watch = tab.open("sub-03.html", settle_ms=100)
        session_a, session_b = _form(page, "sub-03_ses-A"), _form(page, "sub-03_ses-B")
        assert session_a.locator('input[name="reviewer"]').input_value() == _REVIEWER
        session_a.locator('input[value="unusable"]').check()
        session_a.locator(".clear-verdict").click()
        assert not session_a.locator('input[value="unusable"]').is_checked()
        session_b.locator('input[value="acceptable"]').check()
        page.screenshot(path=str(ARTIFACTS / "triage_verdict_form.png"), full_page=False)
        assert not watch.problems, watch.problems[:5]
        # a scan in error: one choice only
        page, watch = tab.open("sub-badnan.html", settle_ms=100)
        error_form = _form(page, "sub-badnan")
        assert error_form.locator('input[type="radio"]').count() == 1
        error_form.locator('input[value="unusable"]').check()
        assert not watch.problems, watch.problems[:5]
        # the group page from file:// shows the verdicts and their count, and exports them
        page, watch = tab.open(triage_report.GROUP_HTML, settle_ms=100)

        def cell(anchor: str):
            return page.locator(f'tr[data-scan="{anchor}"] td.reviewer-verdict')

        assert cell("sub-01").inner_text() == f"needs correction ({_REVIEWER})"
        assert cell("sub-01").get_attribute("data-verdict") == "needs_correction"
        assert cell("sub-03_ses-B").inner_text() == f"segmentation acceptable ({_REVIEWER})"
        assert cell("sub-03_ses-A").inner_text() == "not reviewed"
        assert cell("sub-badnan").get_attribute("data-verdict") == "unusable"
        assert page.locator("#review-count").inner_text().startswith(
            f"3 of {len(table)} scans reviewed")
        with page.expect_download() as info:
            page.locator("#export-verdicts").click()
        download = info.value
        assert download.suggested_filename == triage_report.VERDICTS_TSV
        exported = tmp_path / triage_report.VERDICTS_TSV
        download.save_as(exported)
        page.screenshot(path=str(ARTIFACTS / "triage_verdicts_group.png"), full_page=True)
        assert not watch.problems, watch.problems[:5]
    finally:
        context.close()
    end = datetime.now(UTC)
    lines = exported.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "participant_id\tsession_id\tverdict\tnote\treviewer\ttime"
    assert lines[-1] == ""  # each row ends with a newline
    rows = [line.split("\t") for line in lines[1:-1]]
    assert all(len(r) == 6 for r in rows), rows
    expected = {"sub-01": ["sub-01", "n/a", "needs_correction",
                           "missed lesion left frontal see slice 3", _REVIEWER],
                "sub-03_ses-B": ["sub-03", "ses-B", "acceptable", "n/a", _REVIEWER],
                "sub-badnan": ["sub-badnan", "n/a", "unusable", "n/a", _REVIEWER]}
    order = [a for a in map(triage_report.scan_anchor, table["record"]) if a in expected]
    assert [r[:5] for r in rows] == [expected[a] for a in order]  # the group table's order
    for r in rows:  # when each verdict was saved, in UTC
        assert start <= datetime.strptime(r[5], _ISO_UTC).replace(tzinfo=UTC) <= end, r
    # the file the browser wrote is what `wmhqc calibrate` reads, unedited
    layer_dir = tmp_path / "layer"
    assert main(["calibrate", str(out), "--model", str(smoke_bundle.root), "--verdicts",
                 str(exported), "--layer-out", str(layer_dir)]) == 0
    said = capsys.readouterr().out
    result = calibrate.calibrate(out, smoke_bundle, exported)
    judged = {a: expected[a][2] for a in expected}
    ok = {triage_report.scan_anchor(rel): st == "ok"
          for rel, st in zip(table["record"], table["status"], strict=True)}
    flags = {triage_report.scan_anchor(rel): bool(f)
             for rel, f in zip(table["record"], table["flagged"], strict=True)}
    reviewed = [a for a in judged if ok[a]]  # a scan in error has no flag to judge
    assert result.n_verdicts == 3
    assert result.n_verdicts_on_errors == sum(not ok[a] for a in judged)
    assert sum(s.counts["n_reviewed"] for s in result.sites) == len(reviewed)
    failed = {a: judged[a] != "acceptable" for a in reviewed}
    assert sum(s.counts["n_judged_failed"] for s in result.sites) == sum(failed.values())
    contradicting = {a for a in reviewed if flags[a] != failed[a]}
    listed = {p if s == "n/a" else f"{p}_{s}" for p, s in
              zip(result.contradictions["participant_id"], result.contradictions["session_id"],
                  strict=True)}
    assert listed == contradicting
    # two reviewed scans of a partly reviewed site: no calibration rows, so no site threshold
    assert all(s.rule is None for s in result.sites)
    assert "no layer" not in said and (layer_dir / "layer.json").is_file()
    assert f"{len(contradicting)} contradiction(s)" in said
