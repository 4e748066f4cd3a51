"""Reviewers' verdicts back into the flag: what the flags achieved at each site, and a site
threshold with a recall guarantee, written as a layer over the bundle (``wmhqc calibrate``).

Input: a triage output (its scan records) and the verdict file its group page exported
(:mod:`.verdicts`). A verdict of ``needs_correction`` or ``unusable`` means the scan should
have been reviewed: a failure. Per site (scans without a site form one group,
:data:`UNSPECIFIED`):

- **What the flags achieved**, each with its counts and a Wilson score 95 % interval: the
  review fraction (flagged of triaged scans), the precision (judged failed of the reviewed
  flagged scans) and the recall (flagged of the failures) with its one-sided Clopper–Pearson
  lower bound at the calibration's confidence. Recall counts only where the failures that
  passed unflagged can be seen: on the audit sample (scans marked at random by
  ``triage --audit-fraction``, flagged or not) or when every scan of the site has a verdict.
  Reviewers who look at flagged scans only never see what the flags miss, and the unflagged
  scans they chose to look at are not a random draw; the report says so instead of a number.
- **Contradictions**, for the site's lead: flagged scans judged acceptable, and scans that
  passed but were judged to need correction or unusable.
- **A site threshold** with the guarantee of ``qc/guarantee.py`` (recall of failures at least
  the target with the stated confidence), chosen on the site's calibration rows (every scan
  when all have verdicts, else the audit sample's scans with verdicts; no guarantee from
  others). The statistic is each scan's worst fold score (:func:`records.worst_fold_score`)
  and the rule one threshold for every fold with a scan flagged when any fold flags it, so the
  guarantee is for exactly the rule triage applies with the layer. Out-of-distribution scans
  and empty segmentations are flagged whatever the threshold: counted with their scores, they
  can only add flags to what the guarantee promises. Where the labelled failures are too few,
  the site keeps the bundle's rule and the report says how many it takes.

The result is a new layer folder (:mod:`.layer`), never an edit of the bundle. The promise
assumes the site's scans to come are exchangeable with those it was chosen on (same scanner,
protocol and population): recalibrate after a change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..qc import guarantee as g
from ..qc.evaluation import flag_cases
from ..study.environment import code_version
from ..study.steps import file_digest
from .bundle import Bundle
from .layer import bundle_sha256, write_layer
from .records import worst_fold_score
from .triage import group_table
from .verdicts import read_verdicts

#: The group of scans that carry no site (a site rule needs a site: triage ``--site``).
UNSPECIFIED = "unspecified"
INTERVAL = "Wilson score 95 % interval"
_Z95 = 1.959963984540054
#: The files of a layer written by calibration, beside ``layer.json``.
REPORT_MD, SITES_TSV, CONTRADICTIONS_TSV = "calibration.md", "sites.tsv", "contradictions.tsv"
STATISTIC = ("each scan's worst fold score (the fold QC score furthest toward failure): one "
             "threshold for every fold, a scan flagged when any fold flags it")
CONTRADICTION_COLUMNS = ("site", "participant_id", "session_id", "contradiction", "flagged",
                         "verdict", "qc_score", "worst_fold_score", "audit", "note", "reviewer",
                         "time", "line")


def wilson(k: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k`` of ``n`` (95 % by default; NaN, NaN when
    ``n`` is 0)."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else max(0.0, centre - half),
            1.0 if k == n else min(1.0, centre + half))


def _proportion(k: int, n: int) -> dict:
    low, high = wilson(k, n)
    return {"estimate": k / n if n else math.nan, "low": low, "high": high, "k": int(k),
            "n": int(n)}


def _site_name(value: object) -> str:
    """A record's site as a group name: :data:`UNSPECIFIED` for none (null, NaN, empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        return UNSPECIFIED
    return str(value)


def scan_table(out_dir: str | Path, bundle: Bundle) -> pd.DataFrame:
    """Every scan record of a triage output: identity, site (:data:`UNSPECIFIED` when none),
    status, flag, audit mark, the record's QC score and its worst fold score for ``bundle``'s
    score, and whether it was flagged out of distribution or for an empty segmentation.
    Refuses records made with another bundle: their scores are another model's."""
    import json

    out_dir = Path(out_dir)
    table = group_table(out_dir)
    if table.empty:
        raise ValueError(f"{out_dir}: no scan record (sub-*/**/*_desc-wmhqc_qc.json); triage "
                         "into this folder first")
    this = bundle_sha256(bundle)
    hib = bundle.score.higher_is_better
    rows, foreign = [], []
    for rel in table["record"]:
        rec = json.loads((out_dir / rel).read_text())
        ok = rec.get("status") == "ok"
        if ok and (rec.get("bundle") or {}).get("manifest_sha256") != this:
            foreign.append(rel)
        rows.append({"participant_id": rec.get("participant_id"),
                     "session_id": rec.get("session_id") or "n/a",
                     "site": _site_name(rec.get("site")), "status": rec.get("status"),
                     "flagged": bool(rec.get("flagged")) if ok else None,
                     "audit": bool(rec.get("audit", False)),
                     "qc_score": rec.get("qc_score"),
                     "worst_fold_score": worst_fold_score(rec, hib) if ok else None,
                     "forced_flag": bool(rec.get("out_of_distribution")
                                         or rec.get("empty_segmentation")),
                     "rule_source": (rec.get("rule") or {}).get("source", "bundle"),
                     "record": rel})
    if foreign:
        raise ValueError(f"{out_dir}: {len(foreign)} record(s) were triaged with another bundle "
                         f"than {bundle.root} (e.g. {foreign[0]}); calibrate with the bundle "
                         "that triaged them, or triage again")
    return pd.DataFrame(rows)


@dataclass
class SiteCalibration:
    """What calibration found at one site."""

    site: str
    counts: dict
    review_fraction: dict
    precision: dict
    recall: dict | None  # None: not measurable here (``recall_note`` says why)
    recall_note: str
    basis: str | None  # the calibration rows: "every scan", "audit sample" or None
    basis_note: str
    guarantee: g.RecallGuarantee | None
    rule: dict | None  # the layer's rule for this site; None: the bundle's rule stays
    no_rule_reason: str = ""
    site_review_fraction: float | None = None  # share of the site's scans the rule would flag

    def row(self) -> dict:
        """One row of ``sites.tsv``."""
        out = {"site": self.site, **self.counts}
        for name, d in (("review_fraction", self.review_fraction),
                        ("precision", self.precision), ("recall", self.recall or {})):
            for key in ("estimate", "low", "high", "k", "n"):
                out[f"{name}_{key}" if key != "estimate" else name] = d.get(key)
        out["recall_lower_bound"] = (self.recall or {}).get("lower_bound")
        out["recall_basis"] = self.basis if self.recall else None
        out["recall_note"] = self.recall_note
        out["calibration_rows"] = self.basis
        gu = self.guarantee
        out.update({"calibration_n": gu.n_rows if gu else None,
                    "calibration_failures": gu.n_failures if gu else None,
                    "failures_needed": gu.failures_needed if gu else None,
                    "allowed_misses": gu.allowed_misses if gu else None,
                    "site_threshold": self.rule["threshold"] if self.rule else None,
                    "site_combine": self.rule["combine"] if self.rule else None,
                    "review_fraction_calibration_rows": gu.review_fraction if gu else None,
                    "review_fraction_site_threshold": self.site_review_fraction,
                    "rule": "site threshold" if self.rule else "bundle's rule",
                    "why": gu.statement() if self.rule else self.no_rule_reason})
        return out


@dataclass
class Calibration:
    """The per-site results of :func:`calibrate`, and what they were computed from."""

    target_recall: float
    confidence: float
    bundle_sha256: str
    score: str
    higher_is_better: bool
    verdict_file: Path
    verdict_sha256: str
    n_records: int
    n_verdicts: int
    n_verdicts_on_errors: int
    sites: list[SiteCalibration]
    contradictions: pd.DataFrame
    bundle_rule: str = ""
    notes: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One row per site (``sites.tsv``)."""
        return pd.DataFrame([s.row() for s in self.sites])

    def layer_content(self, name: str) -> dict:
        """``layer.json`` (less what :func:`layer.write_layer` adds)."""
        from ..qc.evaluation import to_jsonable

        rules, uncalibrated = {}, {}
        for s in self.sites:
            entry = {"counts": s.counts, "calibration_rows": s.basis,
                     "guarantee": s.guarantee.to_dict() if s.guarantee else None,
                     "review_fraction_site_threshold": s.site_review_fraction}
            if s.rule:
                rules[s.site] = s.rule | entry
            else:
                uncalibrated[s.site] = entry | {
                    "reason": s.no_rule_reason,
                    "failures_needed": g.failures_needed(self.target_recall, self.confidence)}
        return to_jsonable({
            "name": name,
            "created_by": {"name": "wmhqc", "version": code_version()},
            "target_recall": self.target_recall, "confidence": self.confidence,
            "method": g.METHOD, "statistic": STATISTIC,
            "verdicts": {"file": self.verdict_file.name, "sha256": self.verdict_sha256,
                         "n": self.n_verdicts},
            "triage_output": {"records": self.n_records},
            "sites": rules, "uncalibrated": uncalibrated})

    def summary_text(self) -> str:
        """The per-site table for the terminal."""
        lines = []
        for s in self.sites:
            c = s.counts
            rule = (f"site threshold {s.rule['threshold']:.4g} (any fold flags)" if s.rule
                    else f"bundle's rule: {s.no_rule_reason}")
            lines.append(
                f"{s.site}: {c['n_triaged']} triaged, {c['n_flagged']} flagged, "
                f"{c['n_reviewed']} reviewed ({c['n_reviewed_audit']} of {c['n_audit']} "
                f"audit), {c['n_judged_failed']} judged failed; recall "
                f"{_show(s.recall)}; precision {_show(s.precision)}; review fraction "
                f"{_show(s.review_fraction)}; {rule}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """``calibration.md``: the report for people."""
        target, conf = f"{self.target_recall:.0%}", f"{self.confidence:.0%}"
        lines = [
            "# Site calibration of the QC flags", "",
            f"- Bundle: manifest SHA-256 `{self.bundle_sha256}`; QC score `{self.score}` "
            f"({'higher' if self.higher_is_better else 'lower'} is better); its rule: "
            f"{self.bundle_rule}.",
            f"- Verdicts: `{self.verdict_file.name}` (SHA-256 `{self.verdict_sha256}`), "
            f"{self.n_verdicts} verdict(s) on {self.n_records} triaged scan record(s)"
            + (f"; {self.n_verdicts_on_errors} on scans in error, which have no flag to judge "
               "and are left out" if self.n_verdicts_on_errors else "") + ".",
            "- A verdict of needs correction or unusable counts as a failure (the scan should "
            "have gone to review); acceptable as a success.",
            f"- Intervals: {INTERVAL}; recall also with its one-sided Clopper-Pearson lower "
            f"bound at {conf} confidence.",
            f"- Site thresholds: recall of failures >= {target} with {conf} confidence, by "
            f"{g.METHOD}; statistic: {STATISTIC}. Out-of-distribution scans and empty "
            "segmentations are flagged whatever the threshold.",
            "- The promise holds for scans exchangeable with those a threshold was chosen on "
            "(same site, scanner, protocol, population and segmenter); calibrate again after "
            "a change.", *[f"- {n}" for n in self.notes], ""]
        for s in self.sites:
            lines += _site_markdown(s, self, self.contradictions[
                self.contradictions["site"] == s.site])
        return "\n".join(lines)


def _show(d: dict | None) -> str:
    if not d or d.get("estimate") is None or not math.isfinite(d["estimate"]):
        return "not measured"
    return (f"{d['estimate']:.2f} ({d['k']}/{d['n']}, 95 % CI {d['low']:.2f} to "
            f"{d['high']:.2f})")


def _site_markdown(s: SiteCalibration, cal: Calibration, contra: pd.DataFrame) -> list[str]:
    c = s.counts
    lines = [f"## Site {s.site}", "",
             f"- {c['n_triaged']} scan(s) triaged ({c['n_error']} more in error), "
             f"{c['n_flagged']} flagged, {c['n_audit']} in the audit sample.",
             f"- {c['n_reviewed']} reviewed: {c['n_reviewed_flagged']} flagged, "
             f"{c['n_reviewed_unflagged']} unflagged, {c['n_reviewed_audit']} of the audit "
             f"sample; {c['n_judged_failed']} judged failed.",
             f"- Review fraction (flagged of triaged): {_show(s.review_fraction)}.",
             f"- Precision (judged failed of the reviewed flagged scans): "
             f"{_show(s.precision)}.",
             f"- Recall (flagged of the failures): {_show(s.recall)}"
             + (f", lower bound {s.recall['lower_bound']:.2f} at {cal.confidence:.0%} "
                "confidence" if s.recall and math.isfinite(s.recall['lower_bound']) else "")
             + f". {s.recall_note}", ""]
    gu = s.guarantee
    if s.rule:
        lines += [f"**Site threshold {s.rule['threshold']:.4g}**, a scan flagged when any fold "
                  f"flags it: {gu.statement()}.", "",
                  f"- Chosen on {s.basis_note}: {gu.n_rows} scan(s), {gu.n_failures} judged "
                  f"failed; it flags {gu.review_fraction:.0%} of them.",
                  f"- On all {c['n_triaged']} triaged scans of the site it would flag "
                  f"{s.site_review_fraction:.0%} (the flags as triaged: "
                  f"{s.review_fraction['estimate']:.0%}).", ""]
    else:
        reason = s.no_rule_reason[:1].upper() + s.no_rule_reason[1:]
        lines += [f"**No site threshold: the bundle's rule stays.** {reason}.", ""]
        if gu is not None and not gu.feasible:
            lines += [f"- The guarantee needs at least {gu.failures_needed} labelled failures "
                      f"among the calibration rows; {gu.n_failures} so far.", ""]
    if len(contra):
        lines += [f"Verdicts that contradict the flag ({len(contra)}):", "",
                  "| participant | session | flag | verdict | QC score | worst fold | note | "
                  "reviewer |", "|---|---|---|---|---|---|---|---|"]
        for r in contra.itertuples():
            lines.append(f"| {r.participant_id} | {r.session_id} | "
                         f"{'flagged' if r.flagged else 'passed'} | {r.verdict} | "
                         f"{_num(r.qc_score)} | {_num(r.worst_fold_score)} | "
                         f"{_cell(r.note)} | {_cell(r.reviewer)} |")
        lines.append("")
    else:
        lines += ["No verdict contradicts the flag.", ""]
    return lines


def _num(value) -> str:
    return "n/a" if value is None or not np.isfinite(float(value)) else f"{float(value):.4g}"


def _cell(text: str) -> str:
    return (text or "not given").replace("|", "\\|")


def _site(scans: pd.DataFrame, site: str, target: float, conf: float, hib: bool
          ) -> SiteCalibration:
    ok = scans[scans["status"] == "ok"]
    rev = ok[ok["verdict"].notna()]
    failed = rev["failed"].astype(bool)
    flagged = rev["flagged"].astype(bool)
    counts = {"n_triaged": len(ok), "n_error": int((scans["status"] != "ok").sum()),
              "n_flagged": int(ok["flagged"].astype(bool).sum()),
              "n_audit": int(ok["audit"].sum()), "n_reviewed": len(rev),
              "n_reviewed_flagged": int(flagged.sum()),
              "n_reviewed_unflagged": int((~flagged).sum()),
              "n_reviewed_audit": int(rev["audit"].sum()),
              "n_judged_failed": int(failed.sum())}
    review = _proportion(counts["n_flagged"], len(ok))
    precision = _proportion(int((failed & flagged).sum()), int(flagged.sum()))
    if len(ok) and len(rev) == len(ok):
        basis, cal = "every scan", rev
        basis_note = "every triaged scan of the site (all have a verdict)"
    elif counts["n_audit"]:
        audit = ok[ok["audit"]]
        missing = audit[audit["verdict"].isna()]
        basis, cal = "audit sample", audit
        basis_note = f"the audit sample (all {len(audit)} audited scans have a verdict)"
        if len(missing):
            # flagged audit scans get reviewed anyway, unflagged ones may be skipped: the
            # reviewed part of the sample is then no random draw, and recall from it is inflated
            basis, cal = None, rev.iloc[:0]
            unflagged = int((~missing["flagged"].astype(bool)).sum())
            basis_note = (f"{len(missing)} of the {len(audit)} audit-sample scans have no "
                          f"verdict ({unflagged} of them unflagged): an audit sample with gaps "
                          "is no random draw any more (flagged scans are reviewed anyway), so "
                          "neither recall nor a site threshold is taken from it; review the "
                          "rest of the sample")
    else:
        basis, cal = None, rev.iloc[:0]
        basis_note = (f"{len(rev)} of {len(ok)} scans reviewed and no audit sample: verdicts on "
                      "the scans reviewers chose (flagged ones, mostly) overstate recall; "
                      "triage with --audit-fraction, or review every scan")
    recall, note = None, ""
    if basis is not None:
        cal_failed = cal["failed"].astype(bool)
        caught = int((cal_failed & cal["flagged"].astype(bool)).sum())
        recall = _proportion(caught, int(cal_failed.sum()))
        recall["lower_bound"] = g.recall_lower_bound(caught, int(cal_failed.sum()), conf)
        note = (f"Measured on {basis_note}." if cal_failed.any() else
                f"No failure among {basis_note}: recall has nothing to count yet.")
    elif counts["n_audit"]:
        note = f"Not measured: {basis_note}."
    elif counts["n_reviewed_unflagged"] == 0:
        note = ("Not measurable: only flagged scans were reviewed, so the failures the flags "
                "missed are unseen; an audit sample (triage --audit-fraction) shows them.")
    else:
        note = (f"Not measured: {counts['n_reviewed_unflagged']} unflagged scan(s) were "
                "reviewed, but chosen by the reviewers, not drawn at random; an audit sample "
                "(triage --audit-fraction) makes recall measurable.")
    gu = rule = None
    reason, site_rf = "", None
    if basis is not None:
        gu = g.guaranteed_threshold(cal["worst_fold_score"].to_numpy(float),
                                    cal["failed"].to_numpy(bool), target, conf, hib)
        if gu.feasible:
            new = flag_cases(ok["worst_fold_score"].to_numpy(float), gu.threshold, hib)
            site_rf = float(np.mean(new | ok["forced_flag"].to_numpy(bool)))
        if site == UNSPECIFIED:
            reason = ("these scans carry no site, and a site rule needs one (participants.tsv "
                      "site column, a manifest's site column or triage --site)")
        elif not gu.feasible:
            reason = gu.statement()
        else:
            rule = {"threshold": float(gu.threshold), "combine": "any"}
    else:
        reason = f"no calibration rows: {basis_note}"
    return SiteCalibration(site, counts, review, precision, recall, note, basis, basis_note, gu,
                           rule, reason, site_rf)


def _contradictions(scans: pd.DataFrame) -> pd.DataFrame:
    rev = scans[(scans["status"] == "ok") & scans["verdict"].notna()]
    flagged, failed = rev["flagged"].astype(bool), rev["failed"].astype(bool)
    out = rev[(flagged & ~failed) | (~flagged & failed)].copy()
    out["contradiction"] = np.where(out["flagged"].astype(bool), "flagged, judged acceptable",
                                    "passed, judged " + out["verdict"].astype(str))
    out["time"] = [t.isoformat() if t is not None and not pd.isna(t) else "" for t in out["time"]]
    out["line"] = out["line"].astype(int)
    return (out.sort_values(["site", "flagged", "participant_id", "session_id"])
            [list(CONTRADICTION_COLUMNS)].reset_index(drop=True))


def _bundle_rule(bundle: Bundle) -> str:
    thresholds = ", ".join(f"fold {f}: {bundle.threshold(f):.4g}" for f in bundle.folds)
    combine = bundle.combine()
    return (f"thresholds {thresholds}; flagged when "
            + ("any fold flags" if combine == "any" else "at least half of the folds flag"))


def calibrate(out_dir: str | Path, bundle: Bundle, verdict_file: str | Path, *,
              target_recall: float = 0.9, confidence: float = g.DEFAULT_CONFIDENCE
              ) -> Calibration:
    """Per-site figures, contradictions and site thresholds from a triage output and its
    verdict file (see the module docstring). Raises ``ValueError`` (a
    :class:`verdicts.VerdictError` naming the line) for a verdict file that cannot be used."""
    g.check_target(target_recall, confidence)
    out_dir, verdict_file = Path(out_dir), Path(verdict_file)
    scans = scan_table(out_dir, bundle)
    verdicts = read_verdicts(verdict_file, scans)
    scans = scans.merge(verdicts, on=["participant_id", "session_id"],
                        how="left", validate="one_to_one")
    on_errors = int(((scans["status"] != "ok") & scans["verdict"].notna()).sum())
    hib = bundle.score.higher_is_better
    sites = sorted(scans["site"].unique(), key=lambda s: (s == UNSPECIFIED, s))
    results = [_site(scans[scans["site"] == s], s, target_recall, confidence, hib)
               for s in sites]
    notes = []
    if (scans["rule_source"] == "layer").any():
        notes.append("some scans were triaged with an earlier site layer: their flags are "
                     "that layer's; the thresholds here are chosen on the scores, whichever "
                     "rule flagged")
    return Calibration(float(target_recall), float(confidence), bundle_sha256(bundle),
                       bundle.score.column, hib, verdict_file, file_digest(verdict_file),
                       len(scans), len(verdicts), on_errors, results, _contradictions(scans),
                       _bundle_rule(bundle), notes)


def write_calibration(calibration: Calibration, bundle: Bundle, layer_out: str | Path) -> Path:
    """The calibration as a new layer folder over ``bundle`` (:func:`layer.write_layer`):
    ``layer.json``, ``calibration.md``, ``sites.tsv`` and ``contradictions.tsv``."""
    layer_out = Path(layer_out)
    files = {REPORT_MD: calibration.markdown(),
             SITES_TSV: calibration.table().to_csv(sep="\t", index=False, na_rep="n/a",
                                                   float_format="%.6g"),
             CONTRADICTIONS_TSV: calibration.contradictions.to_csv(
                 sep="\t", index=False, na_rep="n/a", float_format="%.6g")}
    return write_layer(layer_out, bundle, calibration.layer_content(layer_out.name), files)
