"""HTML reports of a triage run, in the manner of MRIQC but for segmentation QC.

The reader is the person who decides which segmentations to check by hand. Written at the root
of the triage output dataset (``*.html`` is in its ``.bidsignore``):

- ``sub-<label>.html``, one per participant, one section per scan: the QC flag in words and
  why, what a flag promises (the model card's test-fold figures), the segmentation, the
  uncertainty and the error map on the scan's own FLAIR, the scan's QC score among the
  study's validation cases, and the controls for the reviewer's own verdict;
- ``group_qc.html``: every scan in a table (flagged first) with the reviewers' verdicts, a
  plot whose points link to the subject pages, and the export of the verdicts as a TSV.

Two kinds of judgement appear and are kept apart in names: the *flag* (review recommended or
not), which triage computed and the page only shows, and the *reviewer's verdict*
(:data:`REVIEW_VERDICTS`), which a person gives on the page. A reviewer's verdict lives in the
browser's ``localStorage`` under the output's store key (:func:`verdict_store_key`, written into
every page), so the pages stay static files: they need no server, and the group page exports
the verdicts from ``file://`` as ``verdicts.tsv`` (:data:`VERDICT_COLUMNS`), the file that
``wmhqc calibrate`` reads. A scan in error gets one choice only, *unusable scan*: with no
segmentation there is nothing to accept or correct, but a reviewer confirming that the input
itself is unusable (not the pipeline at fault) is worth recording.

Pages are self-contained (inline CSS and script, PNG figures as base64 data URIs, the group
plot as inline SVG), so they open from ``file://`` or any server and make no network request
(their content security policy forbids any); hospitals often have none. Given the same
records, bundle and images they are byte-identical.

Inputs appear by their names relative to the raw dataset (``bids:raw:...``), as in the records;
the FLAIR behind a figure is found through the derivative's ``DatasetLinks.raw``. This module
reads records (:mod:`.records`) and never imports :mod:`.triage`, which calls it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import html
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.pool import Pool
from pathlib import Path
from urllib.parse import quote

import matplotlib
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..study.plots import diverging_limit
from ..study.steps import file_digest
from .bundle import MANIFEST, Bundle, deployed_operating_point
from .records import RECORD_SUFFIX, clip_dice, out_of_distribution, resolve_input

GROUP_HTML = "group_qc.html"
#: The reviewer's verdicts on a scan, as stored and exported, with their words on the page.
REVIEW_VERDICTS = {"acceptable": "segmentation acceptable",
                   "needs_correction": "needs correction",
                   "unusable": "unusable scan"}
#: The one verdict offered for a scan in error (it has no segmentation to judge).
ERROR_REVIEW_VERDICTS = ("unusable",)
#: The file the group page's export downloads, and its columns (``wmhqc calibrate`` reads it).
VERDICTS_TSV = "verdicts.tsv"
VERDICT_COLUMNS = ("participant_id", "session_id", "verdict", "note", "reviewer", "time")
#: ``localStorage`` keys: the verdicts of one output (a suffix from :func:`verdict_store_key`)
#: and the reviewer's name, shared by every output so it is typed once.
VERDICT_STORE_PREFIX = "wmhqc-verdicts:"
REVIEWER_STORE_KEY = "wmhqc-reviewer"
#: Nothing but the page itself: inline style and script, data-URI images, no request at all.
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")
#: Okabe-Ito colours, readable with colour-vision deficiency.
FLAGGED_COLOR, PASSED_COLOR, ERROR_COLOR = "#D55E00", "#0072B2", "#6b6b6b"
N_CUTS = 5
_RC = {"svg.hashsalt": "wmhqc", "svg.fonttype": "none", "font.size": 9}
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:1em 1.5em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin:.4em 0}h2{font-size:1.25em;border-bottom:1px solid #ccc;
padding-bottom:.2em;margin-top:1.6em}h3{font-size:1.05em;margin:1.2em 0 .4em}
.banner{background:#fff3cd;border:1px solid #e0b400;padding:.5em .8em;font-weight:600}
.verdict{padding:.6em .9em;border-left:6px solid;margin:.8em 0}
.verdict strong{font-size:1.2em}.verdict p{margin:.3em 0 0}
.review{border-color:#D55E00;background:#fbe9e0}.pass{border-color:#0072B2;background:#e3eef7}
.error{border-color:#6b6b6b;background:#eee}
.ood{border:2px solid #D55E00;padding:.5em .9em;margin:.8em 0}.ood ul{margin:.3em 0}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}
tr.review td:first-child{border-left:5px solid #D55E00}
tr.pass td:first-child{border-left:5px solid #0072B2}
tr.error td:first-child{border-left:5px solid #6b6b6b}
figure{margin:.8em 0}figcaption{font-size:.9em;color:#444}
img,svg{max-width:100%;height:auto}.brain img{background:#000}svg text{pointer-events:none}
svg a use{cursor:pointer}#scans td:first-child{white-space:nowrap}
.note{color:#555;font-size:.9em}nav a{margin-right:1em}
.audit{background:#fff3cd;border:2px dashed #b58900;padding:.3em .7em;font-weight:600}
span.audit{display:inline-block;padding:0 .3em;margin-left:.3em;font-size:.85em}
form.reviewer-verdict fieldset{border:2px solid #0072B2;padding:.5em .9em;margin:.8em 0}
form.reviewer-verdict legend{font-weight:600}
form.reviewer-verdict label{display:block;margin:.15em 0}
form.reviewer-verdict textarea{display:block;width:100%;max-width:40em;box-sizing:border-box}
.reviewer-verdict-status{color:#444;font-size:.9em;margin-left:.6em}
"""

# The reviewer's verdicts in the browser: one script on every page. Subject pages save each
# form.reviewer-verdict as it changes; the group page reads the verdicts into its table, counts
# them and exports them. Text a reviewer typed is only ever set as textContent or a form value.
_REVIEW_JS_CONSTANTS = (f"var REVIEWER = {json.dumps(REVIEWER_STORE_KEY)};\n"
                        f"var LABELS = {json.dumps(REVIEW_VERDICTS)};\n"
                        f"var COLUMNS = {json.dumps(VERDICT_COLUMNS)};\n"
                        f"var TSV = {json.dumps(VERDICTS_TSV)};\n")
_REVIEW_JS = """
(function () {
"use strict";
var meta = document.querySelector('meta[name="wmhqc-verdict-store"]');
var KEY = meta ? meta.getAttribute("content") : "";
""" + _REVIEW_JS_CONSTANTS + """var store = null;
try { store = window.localStorage; store.getItem(REVIEWER); } catch (e) { store = null; }
function verdicts() {
  try {
    var data = JSON.parse(store.getItem(KEY) || "{}");
    return data && data.verdicts && typeof data.verdicts === "object" ? data.verdicts : {};
  } catch (e) { return {}; }
}
function put(scan, entry) {
  var all = verdicts();  /* read again: another page may have saved since */
  if (entry) { all[scan] = entry; } else { delete all[scan]; }
  store.setItem(KEY, JSON.stringify({"format": 1, "verdicts": all}));
}
function known(entry) {
  return !!entry && Object.prototype.hasOwnProperty.call(LABELS, entry.verdict);
}
function now() { return new Date().toISOString().replace(/\\.\\d+Z$/, "Z"); }
function saved(entry) {
  if (!entry) { return "No verdict saved."; }
  return (known(entry) ? "Saved: " + LABELS[entry.verdict] : "Note saved, no verdict chosen") +
    (entry.reviewer ? ", by " + entry.reviewer : "") + ", " + entry.time + ".";
}
var forms = Array.prototype.slice.call(document.querySelectorAll("form.reviewer-verdict"));
function bind(form) {
  var scan = form.getAttribute("data-scan");
  var radios = Array.prototype.slice.call(form.querySelectorAll('input[type="radio"]'));
  var note = form.querySelector("textarea"), name = form.querySelector('input[name="reviewer"]');
  var status = form.querySelector(".reviewer-verdict-status");
  function chosen() {
    var hit = radios.filter(function (r) { return r.checked; });
    return hit.length ? hit[0].value : "";
  }
  function show(entry) {
    radios.forEach(function (r) { r.checked = !!entry && r.value === entry.verdict; });
    note.value = entry && entry.note ? entry.note : "";
    name.value = entry && entry.reviewer ? entry.reviewer : (store.getItem(REVIEWER) || "");
    status.textContent = saved(entry);
  }
  function save() {
    var entry = {"verdict": chosen(), "note": note.value, "reviewer": name.value.trim(),
                 "time": now()};
    if (!entry.verdict && !entry.note) { entry = null; }
    put(scan, entry);
    status.textContent = saved(entry);
  }
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  radios.forEach(function (r) { r.addEventListener("change", save); });
  note.addEventListener("input", save);
  name.addEventListener("input", function () {
    store.setItem(REVIEWER, name.value.trim());
    if (chosen() || note.value) { save(); }
    forms.forEach(function (other) { other.wmhqcName(name.value); });
  });
  form.querySelector(".clear-verdict").addEventListener("click", function () {
    put(scan, null);
    show(null);
  });
  form.wmhqcName = function (value) {  /* a name typed in another form of this page */
    if (!verdicts()[scan] && name.value !== value) { name.value = value; }
  };
  show(verdicts()[scan]);
}
function clean(text) { return String(text || "").replace(/[\\t\\r\\n]/g, " "); }
function field(text) { var t = clean(text); return t.trim() ? t : "n/a"; }
var table = document.getElementById("scans");
var rows = table ? Array.prototype.slice.call(table.querySelectorAll("tr[data-scan]")) : [];
function render() {
  var all = verdicts(), n = 0;
  rows.forEach(function (row) {
    var entry = all[row.getAttribute("data-scan")];
    var cell = row.querySelector("td.reviewer-verdict");
    if (known(entry)) {
      n += 1;
      cell.textContent = LABELS[entry.verdict] +
        (entry.reviewer ? " (" + entry.reviewer + ")" : "");
      cell.setAttribute("data-verdict", entry.verdict);
      cell.title = entry.note || "";
    } else {
      cell.textContent = "not reviewed";
      cell.removeAttribute("data-verdict");
      cell.title = "";
    }
  });
  document.getElementById("review-count").textContent =
    n + " of " + rows.length + " scans reviewed (verdicts saved in this browser).";
}
function tsv() {
  var all = verdicts(), lines = [COLUMNS.join("\\t")];
  rows.forEach(function (row) {
    var entry = all[row.getAttribute("data-scan")];
    if (known(entry)) {
      lines.push([row.getAttribute("data-participant"), row.getAttribute("data-session"),
                  entry.verdict, field(entry.note), field(entry.reviewer), field(entry.time)]
                 .join("\\t"));
    }
  });
  return lines;
}
function exportVerdicts() {
  var lines = tsv();
  var blob = new Blob([lines.join("\\n") + "\\n"],
                      {"type": "text/tab-separated-values;charset=utf-8"});
  var link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = TSV;
  document.body.appendChild(link);
  link.click();
  setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  document.getElementById("export-status").textContent =
    "Exported " + (lines.length - 1) + " verdict(s) as " + TSV + ".";
}
if (!store || !KEY) {
  forms.forEach(function (form) {
    form.querySelector(".reviewer-verdict-status").textContent =
      "This browser keeps no storage for this page: verdicts cannot be saved here.";
    Array.prototype.forEach.call(form.elements, function (el) { el.disabled = true; });
  });
  if (table) {
    document.getElementById("review-count").textContent =
      "This browser keeps no storage for this page: no verdicts to show or export.";
    document.getElementById("export-verdicts").disabled = true;
  }
  return;
}
forms.forEach(bind);
if (table) {
  render();
  document.getElementById("export-verdicts").addEventListener("click", exportVerdicts);
  window.addEventListener("storage", function (e) { if (e.key === KEY) { render(); } });
  window.addEventListener("pageshow", render);
}
})();
"""


# ---------------------------------------------------------------------------------------------
# Entry point


def write_reports(out_dir: Path, table: pd.DataFrame, bundle: Bundle,
                  pool: Pool | None = None) -> list[Path]:
    """Write every participant's page and the group page; return their paths.

    ``table`` is ``triage.group_table`` of ``out_dir`` (one row per scan record). With a
    process ``pool`` the participants' pages (three brain figures per scan, about a second
    each) are drawn in its workers; the pages are the same bytes either way."""
    out_dir = Path(out_dir)
    records = {rel: _read_record(out_dir / rel) for rel in table["record"]}
    store = verdict_store_key(records, bundle)
    portable = dataclasses.replace(bundle, networks=[])  # the loaded networks stay here
    jobs = [(out_dir, participant, [(scan_anchor(rel), records[rel]) for rel in rels], portable,
             store) for participant, rels in _by_participant(table).items()]
    if pool is not None and len(jobs) > 1:
        written = list(pool.imap(_write_subject_page, jobs))
    else:
        written = [_write_subject_page(job) for job in jobs]
    with _quiet(), matplotlib.rc_context(_RC):
        path = out_dir / GROUP_HTML
        _write_text(path, group_page(_with_review_fields(table, records), bundle,
                                     verdict_store=store))
        written.append(path)
    return written


def _write_subject_page(job: tuple[Path, str, list[tuple[str, dict]], Bundle, str]) -> Path:
    """One participant's page written (also in a worker process); returns its path."""
    out_dir, participant, scans, bundle, store = job
    path = out_dir / subject_page_name(participant)
    with _quiet(), matplotlib.rc_context(_RC):
        _write_text(path, subject_page(out_dir, participant, scans, bundle,
                                       verdict_store=store))
    return path


def verdict_store_key(records: Mapping[str, dict], bundle: Bundle) -> str:
    """The ``localStorage`` key under which the pages of one triage output keep the reviewers'
    verdicts: :data:`VERDICT_STORE_PREFIX` and 20 hex digits of a SHA-256 over the bundle's
    manifest and, per record (by path relative to the output), the scan's participant, session,
    input name and input digests.

    Every page of a file:// output shares one browser storage with every other output on the
    machine, so the key must tell outputs apart; it is built from what the output holds, never
    from where it lies, so the pages stay the same bytes wherever they are drawn and name no
    folder. A rerun that changes no scan keeps the key (and the verdicts); adding or replacing
    a scan, or another bundle, starts a fresh store (export the verdicts first)."""
    manifest = Path(bundle.root) / MANIFEST
    digest = hashlib.sha256()
    digest.update((file_digest(manifest) if manifest.is_file()
                   else json.dumps(bundle.card, sort_keys=True, default=str)).encode())
    for rel in sorted(records):
        rec = records[rel]
        identity = [rel, rec.get("participant_id"), rec.get("session_id"), rec.get("source"),
                    rec.get("inputs_sha256")]
        digest.update(b"\n" + json.dumps(identity, sort_keys=True, default=str).encode())
    return VERDICT_STORE_PREFIX + digest.hexdigest()[:20]


def _with_review_fields(table: pd.DataFrame, records: Mapping[str, dict]) -> pd.DataFrame:
    """``table`` with the records' ``site`` and ``audit`` where it lacks those columns (records
    written before triage knew them have neither: None)."""
    extra = {name: [records.get(rel, {}).get(name) for rel in table["record"]]
             for name in ("site", "audit") if name not in table.columns}
    return table.assign(**extra) if extra else table


def subject_page_name(participant_id: str) -> str:
    """``sub-01.html``: the page of one participant, at the output root."""
    return f"{participant_id}.html"


def scan_anchor(record_rel: str) -> str:
    """A scan's section id on its subject page: the record's entity prefix (sub-03_ses-A)."""
    return Path(record_rel).name.removesuffix(f"_{RECORD_SUFFIX}")


def _scan_link(participant_id: str, record_rel: str) -> str:
    return f"{quote(subject_page_name(participant_id))}#{quote(scan_anchor(record_rel))}"


def _by_participant(table: pd.DataFrame) -> dict[str, list[str]]:
    """Record paths per participant, participants and sessions in order (not flag order)."""
    ordered = table.sort_values(["participant_id", "session_id", "record"])
    return {p: list(g["record"]) for p, g in ordered.groupby("participant_id", sort=True)}


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:  # keep the other pages
        return {"status": "error", "reason": f"record unreadable: {exc}"}


def _write_text(path: Path, text: str) -> None:
    """Atomic, so a reader never sees half a page."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Nilearn and matplotlib warn about resampling, empty overlays and the like; the reader
    of a triage run cannot act on those."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------
# Text


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: object, fmt: str = ".3g") -> str:
    """A number for people; ``n/a`` for None or NaN (JSON writes NaN as null)."""
    return format(value, fmt) if _finite(value) else "n/a"


def _estimate(d: dict | None) -> str | None:
    """``0.80 (95 % CI 0.60 to 0.90)``; None when the estimate is undefined."""
    if not d or not _finite(d.get("estimate")):
        return None
    text = f"{d['estimate']:.2f}"
    if _finite(d.get("low")) and _finite(d.get("high")):
        text += f" (95 % CI {d['low']:.2f} to {d['high']:.2f})"
    return text


def promise_text(card: dict) -> str:
    """What a flag promises, in words: the study's test-fold precision, recall and review
    fraction, saying plainly where one is undefined (no flagged or no failed test case). A
    bundle exported with a recall guarantee states the guarantee first, and its test-fold
    figures are those of the guaranteed threshold (not of the profile's rule)."""
    guarantee = card.get("guarantee")
    op, _ = deployed_operating_point(card)
    lead = (f"Guarantee: {guarantee['statement']} (threshold chosen on "
            f"{guarantee.get('choosing_rows', 'the validation cases')}). ") if guarantee else ""
    counts = ""
    if _finite(op.get("n_cases")):
        counts = f" ({op['n_cases']} cases, {op.get('n_failed', 'n/a')} failed"
        counts += ", synthetic cohort)" if (card.get("cohort") or {}).get("synthetic") else ")"
    precision, recall = _estimate(op.get("precision")), _estimate(op.get("recall"))
    review, auroc = _estimate(op.get("review_fraction")), _estimate(card.get("failure_auroc"))
    parts = [
        f"{precision} of flagged scans had truly failed" if precision else
        "the share of flagged scans that had truly failed is undefined (no test scan was "
        "flagged)",
        f"{recall} of failed segmentations were flagged" if recall else
        "the share of failed segmentations that were flagged is undefined (no test "
        "segmentation failed)",
    ]
    text = f"{lead}In the study's test folds{counts}, {parts[0]} and {parts[1]}"
    text += f"; {review} of scans were flagged for review." if review else "."
    text += f" Failure means {card.get('failure') or 'n/a'}."
    text += (f" Failure AUROC {auroc}." if auroc else
             " Failure AUROC undefined (every test case failed, or none did).")
    return text


def _ood_reasons(rec: dict, bundle: Bundle) -> list[str]:
    """Why a scan is unlike the training cohort: recomputed from its image features, else read
    from the record's reason."""
    if not rec.get("out_of_distribution"):
        return []
    ranges = bundle.info.get("feature_ranges") or {}
    reasons = out_of_distribution(rec.get("image_features") or {}, ranges) if ranges else []
    if not reasons:
        _, _, tail = (rec.get("reason") or "").partition("unlike the training cohort: ")
        reasons = [r for r in tail.split("; ") if r] or ["see the reason above"]
    return reasons


def _folds_text(rec: dict) -> str:
    per_fold = rec.get("per_fold") or []
    if per_fold:
        k = sum(bool(f.get("flagged")) for f in per_fold)
        return f"{k} of {len(per_fold)} fold models ({_num(rec.get('folds_flagging'), '.0%')})"
    return _num(rec.get("folds_flagging"), ".0%")


def _predicted_text(rec: dict) -> str:
    """The predicted Dice in [0, 1] (clipped here too, for records written before it was)."""
    dice = rec.get("predicted_dice")
    if not _finite(dice):
        return "not available (the bundle has no Dice regressor)"
    text = f"{clip_dice(dice):.2f}"
    if _finite(rec.get("predicted_dice_sd")):
        text += f" ± {rec['predicted_dice_sd']:.2f} (SD over fold models"
        rng = rec.get("predicted_dice_range") or []
        if len(rng) == 2 and all(_finite(v) for v in rng):
            text += f"; range {clip_dice(rng[0]):.2f} to {clip_dice(rng[1]):.2f}"
        text += ")"
    return text


# ---------------------------------------------------------------------------------------------
# Figures


def _png_uri(fig: Figure) -> str:
    """The figure as a PNG data URI (no file next to the page to lose)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, facecolor=fig.get_facecolor(),
                metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(width: float, height: float, **kwargs) -> Figure:
    """A figure on the Agg canvas, outside pyplot: no GUI backend, nothing left to close."""
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _cuts(img: nib.Nifti1Image) -> list[float] | None:
    """Axial cuts (mm) spread over the image's non-zero voxels; None when it has none."""
    data = np.asarray(img.dataobj)
    ijk = np.argwhere(np.isfinite(data) & (data > 0))
    if not len(ijk):
        return None
    z = nib.affines.apply_affine(img.affine, ijk)[:, 2]
    lo, hi = np.percentile(z, [10, 90])
    return sorted({round(float(v), 1) for v in np.linspace(lo, hi, N_CUTS)})


def _brain_png(kind: str, overlay: nib.Nifti1Image, flair: nib.Nifti1Image | None,
               cuts: list[float]) -> str:
    """One row of axial cuts: the mask outlined on the FLAIR, or a map over it."""
    from nilearn import plotting

    fig = _new_figure(1.9 * len(cuts) + 0.6, 2.2, facecolor="black")
    common = {"figure": fig, "display_mode": "z", "cut_coords": cuts, "draw_cross": False,
              "black_bg": True, "dim": -0.3}
    data = np.asarray(overlay.dataobj, dtype=np.float32)
    if kind == "mask":
        if flair is not None:
            display = plotting.plot_anat(flair, colorbar=False, **common)
            if np.any(data > 0.5):
                display.add_contours(overlay, levels=[0.5], colors=FLAGGED_COLOR,
                                     linewidths=1.0)
        else:
            display = plotting.plot_roi(overlay, bg_img=None, cmap="autumn", **common)
    elif kind == "entropy":
        vmax = max(1.0, float(np.nanmax(data)) if data.size else 1.0)
        display = plotting.plot_stat_map(overlay, bg_img=flair, cmap="inferno", vmin=0.0,
                                         vmax=vmax, symmetric_cbar=False, threshold=0.02,
                                         **common)
    else:  # signed error: 0 in the middle of a diverging map, symmetric limits
        vmax = diverging_limit(data)
        display = plotting.plot_stat_map(overlay, bg_img=flair, cmap="RdBu_r", vmax=vmax,
                                         symmetric_cbar=True, threshold=0.05 * vmax,
                                         **common)
    del display  # the figure is not pyplot's: nothing to close (display.close() would fail)
    return _png_uri(fig)


_BRAIN_PANELS = (
    ("mask", "Segmentation: the WMH mask (outline) on the FLAIR"),
    ("entropy", "Uncertainty: MC entropy (bits), mean over fold models; bright = unsure"),
    ("error", "Signed reconstruction error: red where the reconstruction is brighter than the "
              "FLAIR, blue where darker (prediction zeroed); large errors hint at missed or "
              "spurious lesions"),
)


def brain_figures(out_dir: Path, rec: dict) -> str:
    """The three map figures of a scan as HTML; a note in place of any that cannot be drawn
    (a moved input, a deleted map), so one missing file does not cost the whole report."""
    files = rec.get("files") or {}
    flair_path = resolve_input(out_dir, (rec.get("inputs") or {}).get("flair"))
    parts = []
    flair = None
    if flair_path is not None and flair_path.is_file():
        flair = nib.load(flair_path)
    else:
        parts.append(f'<p class="note">Input FLAIR {_esc(rec.get("source", ""))} not found '
                     "where it was triaged: maps are drawn without it.</p>")
    try:
        mask = nib.load(out_dir / files["mask"])
        cuts = _cuts(mask) or (_cuts(flair) if flair is not None else None) or [0.0]
    except (KeyError, OSError, ValueError) as exc:
        return "".join(parts) + f'<p class="note">No figures: mask unreadable ({_esc(exc)}).</p>'
    for kind, caption in _BRAIN_PANELS:
        try:
            img = mask if kind == "mask" else nib.load(out_dir / files[kind])
            uri = _brain_png(kind, img, flair, cuts)
        except Exception as exc:  # noqa: BLE001 - any drawing failure becomes a note
            parts.append(f'<p class="note">{_esc(caption)}: not drawn ({_esc(exc)}).</p>')
            continue
        parts.append(f'<figure class="brain"><img src="{uri}" alt="{_esc(caption)}">'
                     f"<figcaption>{_esc(caption)}</figcaption></figure>")
    return "".join(parts)


def _reference(bundle: Bundle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The study's validation cases: fold, score and true Dice (finite ones only)."""
    ref = bundle.info.get("validation_reference") or {}
    score = np.array([np.nan if v is None else v for v in ref.get("score", [])], dtype=float)
    dice = np.array([np.nan if v is None else v for v in ref.get("true_dice", [])], dtype=float)
    fold = np.asarray(ref.get("fold", [0] * len(score)))
    keep = np.isfinite(score) & np.isfinite(dice)
    return fold[keep], score[keep], dice[keep]


def validation_sentence(score: float | None, ref_score: np.ndarray, ref_dice: np.ndarray,
                        quality: float, higher_is_better: bool) -> str:
    """How often validation cases with a score at least this bad failed: the plain-words
    meaning of the scan's score."""
    if not len(ref_score):
        return "The bundle holds no validation cases to compare this score with."
    if not _finite(score):
        return "This scan's QC score is undefined, so it cannot be placed among them."
    worse = ref_score <= score if higher_is_better else ref_score >= score
    failed = ref_dice < quality
    n_all = len(ref_score)
    base = f" Overall, {int(failed.sum())} of the {n_all} validation cases failed."
    if not worse.any():
        return (f"None of the {n_all} validation cases had a score as bad as this scan's; it "
                "lies beyond the study's validation range." + base)
    return (f"{int((worse & failed).sum())} of the {int(worse.sum())} validation cases with a "
            f"score at least this bad failed (true Dice < {quality:g})." + base)


def validation_figure(score: float | None, bundle: Bundle) -> str:
    """The scan's score (vertical line) over the validation cases' score against true Dice,
    failed and passed cases in two colours, each fold's threshold dashed."""
    _, x, y = _reference(bundle)
    quality = float(bundle.info.get("quality_threshold", 0.5))
    spec = bundle.score
    synthetic = (bundle.card.get("cohort") or {}).get("synthetic")
    fig = _new_figure(6.4, 3.8)
    ax = fig.add_subplot()
    failed = y < quality
    ax.scatter(x[failed], y[failed], s=22, color=FLAGGED_COLOR,
               label=f"failed (Dice < {quality:g})")
    ax.scatter(x[~failed], y[~failed], s=22, color=PASSED_COLOR, marker="s", label="passed")
    for i, fold in enumerate(bundle.folds):
        ax.axvline(bundle.threshold(fold), color="#555", ls="--", lw=1,
                   label="fold thresholds" if i == 0 else None)
    ax.axhline(quality, color="#999", ls=":", lw=1)
    if _finite(score):
        ax.axvline(score, color="black", lw=2, label="this scan")
    direction = "higher" if spec.higher_is_better else "lower"
    ax.set_xlabel(f"{spec.label} ({direction} is better)")
    ax.set_ylabel("true Dice")
    ax.set_title("Study validation cases" + (" (synthetic cohort)" if synthetic else ""))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png_uri(fig)


# ---------------------------------------------------------------------------------------------
# Subject pages


def _page(title: str, body: str, bundle: Bundle, verdict_store: str) -> str:
    """A complete HTML5 document: inline style and script, the output's verdict store key, the
    synthetic banner where it applies."""
    synthetic = (bundle.card.get("cohort") or {}).get("synthetic")
    banner = ('<p class="banner" id="synthetic">Models trained on a synthetic cohort: every '
              "figure and promise on this page describes synthetic data, not patients.</p>"
              if synthetic else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="wmhqc-verdict-store" content="{_esc(verdict_store)}">\n'
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"{banner}\n{body}\n{_footer(bundle)}\n<script>{_REVIEW_JS}</script>\n"
            "</body>\n</html>\n")


def _footer(bundle: Bundle) -> str:
    card = bundle.card
    cohort = card.get("cohort") or {}
    kind = "synthetic" if cohort.get("synthetic") else "real"
    return ('<footer class="note"><hr>wmhqc triage report. Bundle: profile '
            f"{_esc(card.get('profile', bundle.info.get('profile', 'n/a')))}, QC score "
            f"{_esc(bundle.score.label)}, folds {_esc(bundle.folds)}, code "
            f"{_esc(card.get('code_version', 'n/a'))}; trained on a {kind} cohort of "
            f"{_esc(cohort.get('n_subjects', 'n/a'))} subjects "
            f"({_esc(', '.join(cohort.get('datasets') or []))}).</footer>")


def subject_page(out_dir: Path, participant: str, scans: Sequence[tuple[str, dict]],
                 bundle: Bundle, *, verdict_store: str) -> str:
    """One participant's page: a section per scan (session), in session order; ``scans`` are
    (section id, record) pairs, the maps read from ``out_dir``; the reviewers' verdicts are
    kept under ``verdict_store`` (:func:`verdict_store_key`)."""
    nav = ['<nav><a href="group_qc.html">← all scans</a>']
    if len(scans) > 1:
        nav += [f'<a href="#{quote(a)}">{_esc(_scan_title(r, a))}</a>' for a, r in scans]
    sections = [scan_section(out_dir, anchor, rec, bundle) for anchor, rec in scans]
    body = (f"{' '.join(nav)}</nav>\n<h1>{_esc(participant)}: WMH segmentation QC</h1>\n"
            + "\n".join(sections))
    return _page(f"{participant}: WMH segmentation QC", body, bundle, verdict_store)


def _scan_title(rec: dict, anchor: str) -> str:
    session = rec.get("session_id")
    return session if session and session != "n/a" else anchor


def scan_section(out_dir: Path, anchor: str, rec: dict, bundle: Bundle) -> str:
    """One scan: QC flag, cohort warning, facts, the card's promise, figures, the reviewer's
    verdict controls, per-fold table. A scan in error shows why and the verdict controls with
    the one choice that fits it (:data:`ERROR_REVIEW_VERDICTS`)."""
    head = (f'<section id="{_esc(anchor)}">\n<h2>{_esc(_scan_title(rec, anchor))}'
            f' <span class="note">({_esc(rec.get("source", anchor))})</span></h2>\n'
            + _audit_marker(rec))
    if rec.get("status") != "ok":
        return (head + '<div class="verdict error"><strong>Could not be triaged</strong>'
                f"<p>Status: error. Reason: {_esc(rec.get('reason') or 'unknown')}</p></div>\n"
                + (f"<p>Site: {_esc(rec['site'])}</p>\n" if rec.get("site") is not None
                   else "")
                + review_form(anchor, rec, ERROR_REVIEW_VERDICTS) + "\n</section>")
    parts = [head, _flag_box(rec, bundle), _ood_block(rec, bundle), _facts(rec, bundle),
             f"<h3>What a flag means</h3><p>{_esc(promise_text(bundle.card))}</p>"]
    parts.append("<h3>Segmentation and QC maps</h3>" + brain_figures(Path(out_dir), rec))
    parts.append(review_form(anchor, rec))
    parts.append(_validation_block(rec, bundle))
    parts.append(_per_fold_table(rec))
    return "\n".join(parts) + "\n</section>"


def _is_audit(value: object) -> bool:
    """An ``audit`` field that says yes (a JSON true, or numpy's from a table column)."""
    return isinstance(value, bool | np.bool_) and bool(value)


def _audit_marker(rec: dict) -> str:
    if not _is_audit(rec.get("audit")):
        return ""
    return ('<p class="audit"><strong>Audit sample: please review</strong> this scan whatever '
            "its flag. It was drawn at random so that the reviewers' verdicts can show how many "
            "failed segmentations the flags miss.</p>\n")


def review_form(anchor: str, rec: dict, choices: Sequence[str] = tuple(REVIEW_VERDICTS)) -> str:
    """The controls of the reviewer's verdict on one scan: a radio per choice (values from
    :data:`REVIEW_VERDICTS`), a note, the reviewer's name and a clear button. The page's script
    saves them in ``localStorage`` as they change and shows them again on the next visit."""
    scan = _esc(anchor)
    radios = "".join(f'<label><input type="radio" name="verdict" value="{_esc(value)}"> '
                     f"{_esc(REVIEW_VERDICTS[value])}</label>" for value in choices)
    participant = rec.get("participant_id") or "n/a"
    session = rec.get("session_id") or "n/a"
    return (f'<form class="reviewer-verdict" id="reviewer-verdict-{scan}" data-scan="{scan}" '
            f'data-participant="{_esc(participant)}" data-session="{_esc(session)}">'
            "<fieldset><legend>Your verdict on this scan</legend>"
            f"{radios}"
            '<label>Note <textarea name="note" rows="2"></textarea></label>'
            '<label>Reviewer <input type="text" name="reviewer" autocomplete="name"></label>'
            '<button type="button" class="clear-verdict">clear this verdict</button>'
            '<span class="reviewer-verdict-status" aria-live="polite">Verdicts are kept in this '
            "browser and need JavaScript.</span>"
            '<p class="note">Saved in this browser as you choose or type; the group page '
            "exports every verdict as a TSV. This is your judgement of the segmentation, "
            "apart from the QC flag above.</p>"
            "</fieldset></form>")


def _flag_box(rec: dict, bundle: Bundle) -> str:
    """The QC flag of triage in words (not the reviewer's verdict)."""
    if rec.get("flagged"):
        return ('<div class="verdict review"><strong>Review recommended</strong>'
                f"<p>Why: {_esc(rec.get('reason') or 'flagged')}.</p></div>")
    why = rec.get("reason") or (f"the QC score ({bundle.score.label}) is within the "
                                f"validation-chosen threshold in most fold models "
                                f"({_folds_text(rec)} flag it)")
    return f'<div class="verdict pass"><strong>No review needed</strong><p>Why: {_esc(why)}.' \
           "</p></div>"


def _ood_block(rec: dict, bundle: Bundle) -> str:
    reasons = _ood_reasons(rec, bundle)
    if not reasons:
        return ""
    items = "".join(f"<li>{_esc(r)}</li>" for r in reasons)
    return ('<div class="ood"><strong>This scan is unlike the training cohort</strong>; the '
            f"study's figures below carry no promise for it:<ul>{items}</ul></div>")


def _facts(rec: dict, bundle: Bundle) -> str:
    spec = bundle.score
    direction = "higher" if spec.higher_is_better else "lower"
    rows = [("QC score", f"{_num(rec.get('qc_score'), '.4g')} ({spec.label}, mean over fold "
                         f"models; {direction} is better)"),
            ("Folds flagging", _folds_text(rec)),
            ("Predicted Dice", _predicted_text(rec)),
            ("Lesion volume", f"{_num(rec.get('lesion_ml'), '.1f')} ml"
                              + (" (nothing segmented)" if rec.get("empty_segmentation")
                                 else "")),
            ("Out of distribution", "yes" if rec.get("out_of_distribution") else "no"),
            *([("Site", rec["site"] if rec["site"] is not None else "n/a")]
              if "site" in rec else []),
            ("Input", rec.get("source", "n/a")),
            ("Triage time", f"{_num(rec.get('seconds'), '.1f')} s")]
    cells = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="facts">{cells}</table>'


def _validation_block(rec: dict, bundle: Bundle) -> str:
    _, x, y = _reference(bundle)
    score = rec.get("qc_score")
    sentence = validation_sentence(score, x, y, float(bundle.info.get("quality_threshold", 0.5)),
                                   bundle.score.higher_is_better)
    figure = ""
    if len(x):
        figure = (f'<figure><img src="{validation_figure(score, bundle)}" alt="This scan\'s QC '
                  'score among the validation cases"><figcaption>Validation cases of the study: '
                  "QC score against true Dice; the solid line is this scan, dashed lines the "
                  "fold thresholds.</figcaption></figure>")
    return f"<h3>This score among the study's validation cases</h3>{figure}<p>{_esc(sentence)}</p>"


def _per_fold_table(rec: dict) -> str:
    rows = "".join(f"<tr><td>{_esc(f.get('fold'))}</td><td>{_num(f.get('threshold'), '.4g')}"
                   f"</td><td>{_num(f.get('qc_score'), '.4g')}</td>"
                   f"<td>{'yes' if f.get('flagged') else 'no'}</td></tr>"
                   for f in rec.get("per_fold") or [])
    if not rows:
        return ""
    name = rec.get("qc_score_name")
    if name in (rec.get("scores_of_fold_samples") or []):
        note = ("Each fold model's QC score reads its own MC samples (no mask); the delivered "
                "segmentation is the mean of the fold models' MC means cut at 0.5.")
    elif name in (rec.get("scores_on_delivered_mask") or []):
        note = ("Each fold model's QC score is computed on the delivered segmentation (the mean "
                "of the fold models' MC means cut at 0.5), with that fold's own networks and "
                "MC maps.")
    else:
        note = ""
    return ("<h3>Per fold model</h3><table><tr><th>fold</th><th>threshold</th><th>QC score</th>"
            f"<th>flags</th></tr>{rows}</table>"
            + (f'<p class="note">{_esc(note)}</p>' if note else ""))


# ---------------------------------------------------------------------------------------------
# Group page


def _status_class(row: tuple) -> str:
    if row.status != "ok":
        return "error"
    return "review" if row.flagged is True else "pass"


def group_page(table: pd.DataFrame, bundle: Bundle, *, verdict_store: str) -> str:
    """Summary line, the scans table (flagged first, as ``table`` is ordered) with links to the
    subject pages and the reviewers' verdicts (read from ``verdict_store`` in the browser), the
    export of those verdicts, and the plot of every scan. ``table`` may hold ``site`` and
    ``audit`` columns; they are shown where present."""
    n = len(table)
    ok = table["status"] == "ok"
    n_flag = int((ok & table["flagged"].eq(True)).sum())
    n_err = int((~ok).sum())
    summary = (f"{n} scan(s) of {table['participant_id'].nunique()} participant(s): {n_flag} "
               f"flagged for review, {int(ok.sum()) - n_flag} passed, {n_err} error(s).")
    body = (f"<h1>WMH segmentation QC: all scans</h1>\n<p class=\"summary\">{_esc(summary)}</p>"
            f"\n<p>{_esc(promise_text(bundle.card))}</p>\n{group_plot(table, bundle)}\n"
            f"<h2>Scans</h2>\n{_review_bar(len(table))}\n{_group_table(table)}")
    return _page("WMH segmentation QC: all scans", body, bundle, verdict_store)


def _review_bar(n_scans: int) -> str:
    """How many scans have a reviewer's verdict (filled in by the script), and the export."""
    columns = ", ".join(VERDICT_COLUMNS)
    return ('<p><span id="review-count">Reviewers\' verdicts are read from this browser\'s '
            f"storage, which needs JavaScript ({n_scans} scan(s)).</span> "
            '<button type="button" id="export-verdicts">Export verdicts (TSV)</button> '
            '<span class="reviewer-verdict-status" id="export-status" aria-live="polite">'
            "</span></p>\n"
            f'<p class="note">The export downloads {VERDICTS_TSV}, one row per scan with a '
            f"verdict in this browser, in the table's order: {_esc(columns)}. "
            "Verdicts given in another browser or on another machine are not here.</p>")


def _row_text(value: object) -> str:
    """A table value as text; ``n/a`` where missing (None, NaN)."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "n/a"
    return str(value)


def _group_table(table: pd.DataFrame) -> str:
    with_site = "site" in table.columns and table["site"].notna().any()
    head = ["participant", "session", *(["site"] if with_site else []), "status", "QC flag",
            "reviewer verdict", "QC score", "predicted Dice", "folds flagging", "lesion ml",
            "reason"]
    rows = []
    for row in table.itertuples(index=False):
        flag = {"review": "review", "pass": "no review", "error": "—"}[_status_class(row)]
        if _is_audit(getattr(row, "audit", None)):
            flag += ' <span class="audit">audit sample: please review</span>'
        cells = [f'<a href="{_scan_link(row.participant_id, row.record)}">'
                 f"{_esc(row.participant_id)}</a>", _esc(row.session_id),
                 *([_esc(_row_text(row.site))] if with_site else []), _esc(row.status),
                 flag, None, _num(row.qc_score, ".4g"),
                 _num(clip_dice(row.predicted_dice), ".2f"), _num(row.folds_flagging, ".0%"),
                 _num(row.lesion_ml, ".1f"), _esc(row.reason or "")]
        anchor = _esc(scan_anchor(row.record))
        tds = "".join('<td class="reviewer-verdict">—</td>' if c is None else f"<td>{c}</td>"
                      for c in cells)
        rows.append(f'<tr class="{_status_class(row)}" data-scan="{anchor}" '
                    f'data-participant="{_esc(_row_text(row.participant_id))}" '
                    f'data-session="{_esc(_row_text(row.session_id))}">{tds}</tr>')
    heads = "".join(f"<th>{h}</th>" for h in head)
    return f'<table id="scans"><tr>{heads}</tr>\n' + "\n".join(rows) + "\n</table>"


def group_plot(table: pd.DataFrame, bundle: Bundle) -> str:
    """Every triaged scan as a point (QC score against predicted Dice, or lesion volume when
    there is none), flagged and passed in two colours; each point links to its subject page.
    Inline SVG, since matplotlib writes a marker's URL as an SVG link and SVG needs no script."""
    ok = table[(table["status"] == "ok") & pd.to_numeric(table["qc_score"]).notna()]
    use_dice = pd.to_numeric(ok["predicted_dice"]).notna().any()
    ycol, ylabel = (("predicted_dice", "predicted Dice") if use_dice else
                    ("lesion_ml", "lesion volume (ml)"))
    shown = ok[pd.to_numeric(ok[ycol]).notna()]
    if shown.empty:
        return '<p class="note">No triaged scan to plot.</p>'
    spec = bundle.score
    synthetic = (bundle.card.get("cohort") or {}).get("synthetic")
    fig = _new_figure(6.8, 4.2)
    ax = fig.add_subplot()
    for flag, color, marker, label in ((True, FLAGGED_COLOR, "o", "review recommended"),
                                       (False, PASSED_COLOR, "s", "no review needed")):
        part = shown[shown["flagged"].eq(True) == flag]
        if part.empty:
            continue
        points = ax.scatter(part["qc_score"].astype(float), part[ycol].astype(float), s=42,
                            color=color, marker=marker, label=f"{label} ({len(part)})")
        points.set_urls([_scan_link(p, r) for p, r in zip(part["participant_id"],
                                                          part["record"], strict=True)])
        if len(shown) <= 30:
            for row in part.itertuples(index=False):
                ax.annotate(scan_anchor(row.record), (row.qc_score, getattr(row, ycol)),
                            fontsize=7, xytext=(4, 3), textcoords="offset points")
    for i, fold in enumerate(bundle.folds):
        ax.axvline(bundle.threshold(fold), color="#555", ls="--", lw=1,
                   label="fold thresholds" if i == 0 else None)
    if use_dice:
        ax.axhline(float(bundle.info.get("quality_threshold", 0.5)), color="#999", ls=":", lw=1)
    direction = "higher" if spec.higher_is_better else "lower"
    ax.set_xlabel(f"{spec.label} ({direction} is better)")
    ax.set_ylabel(ylabel)
    ax.set_title("Triaged scans" + (" (models from a synthetic cohort)" if synthetic else ""))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    titles = {_scan_link(p, r): f"{scan_anchor(r)}: open its page"
              for p, r in zip(shown["participant_id"], shown["record"], strict=True)}
    hidden = len(ok) - len(shown)
    note = f" {hidden} scan(s) without a {ylabel} are not shown." if hidden else ""
    return (f'<figure id="group-plot">{_svg(fig, titles)}<figcaption>Every triaged scan; click '
            f"a point to open its page. Errors are listed in the table only.{_esc(note)}"
            "</figcaption>"
            "</figure>")


def _svg(fig: Figure, titles: dict[str, str]) -> str:
    """The figure as an inline ``<svg>`` element: no XML prolog or DOCTYPE, no RDF metadata
    (its namespace URLs look like links to tools that scan pages for them), no date; each
    link opens in the same tab and gets a ``<title>``, the tooltip naming the scan."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg"):],
                  flags=re.DOTALL)

    def titled(match: re.Match) -> str:  # same tab: matplotlib asks for a new one
        label = titles.get(html.unescape(match.group(1)))
        return (f'<a xlink:href="{match.group(1)}">'
                + (f"<title>{_esc(label)}</title>" if label else ""))

    return re.sub(r'<a xlink:href="([^"]*)"(?: target="_blank")?>', titled, text)
