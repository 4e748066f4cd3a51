"""Reviewers' verdict files: what people found when they looked at triaged scans.

The group page of a triage output exports the verdicts given on its pages as ``verdicts.tsv``
(``deploy/report.py``), one line per reviewed scan, with the columns :data:`COLUMNS`: the scan
(``participant_id`` ``sub-01`` and ``session_id`` ``ses-A`` or ``n/a``, as in
``group_qc.tsv``), the ``verdict`` (:data:`VERDICTS`), a free ``note``, the ``reviewer`` and
the ``time`` (ISO 8601). Fields are separated by tabs and never quoted (the page turns tabs and
line breaks in a note into spaces); ``n/a`` or an empty field is "not given".

A verdict file decides a site's threshold (``wmhqc calibrate``), so a mistake in it must stop
the calibration, not be read around: every problem is an error that names the file and the
line (1-based, the header being line 1). A reviewer may be left unnamed (a page's name field
is optional, and an unnamed verdict still says what the scan is); a time may be absent, but
one that is given must parse.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd

#: A reviewer's verdicts on a scan (the values of the ``verdict`` column).
VERDICTS = ("acceptable", "needs_correction", "unusable")
#: Verdicts that mean the scan should have gone to review: failed, for recall.
FAILED_VERDICTS = ("needs_correction", "unusable")
#: The header of a verdict file.
COLUMNS = ("participant_id", "session_id", "verdict", "note", "reviewer", "time")
_NOT_GIVEN = ("", "n/a")


class VerdictError(ValueError):
    """A verdict file that cannot be used; the message names the file, the line and why."""

    def __init__(self, path: str | Path, line: int, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{self.path}, line {line}: {problem}")

    def __reduce__(self):
        return VerdictError, (self.path, self.line, self.problem)


def _time(text: str) -> datetime | None:
    return None if text in _NOT_GIVEN else datetime.fromisoformat(text)


def read_verdicts(path: str | Path, group_table: pd.DataFrame) -> pd.DataFrame:
    """The verdicts of ``path`` on the scans of a triage output (``group_table``: its
    ``participant_id`` and ``session_id`` columns, as :func:`triage.group_table` gives them).

    One row per line, in file order, with :data:`COLUMNS` (note and reviewer ``""`` when not
    given; time a timezone-aware or naive ``datetime``, or None), ``line`` (its line in the
    file) and ``failed`` (the verdict is one of :data:`FAILED_VERDICTS`). Raises
    :class:`VerdictError` for a missing or unknown column, a line with too few or too many
    fields, a scan not in the triage output, an unknown verdict, a second verdict on one scan
    (naming both lines) or a time that is not ISO 8601; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: verdict file not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise VerdictError(path, 1, f"not UTF-8 text ({exc})") from None
    if not lines or not lines[0].strip():
        raise VerdictError(path, 1, f"no header; expected the columns {', '.join(COLUMNS)}")
    header = [h.strip() for h in lines[0].split("\t")]
    missing = [c for c in COLUMNS if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    if missing or unknown or len(set(header)) != len(header):
        problems = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + (
            [f"unknown column(s) {', '.join(repr(c) for c in unknown)}"] if unknown else []) + (
            ["a column named twice"] if len(set(header)) != len(header) else [])
        raise VerdictError(path, 1, f"{'; '.join(problems)} (a verdict file has the tab-"
                           f"separated columns {', '.join(COLUMNS)})")
    known = {(str(p), str(s)) for p, s in zip(group_table["participant_id"],
                                             group_table["session_id"], strict=True)}
    participants = {p for p, _ in known}
    seen: dict[tuple[str, str], int] = {}
    rows = []
    for number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != len(header):
            raise VerdictError(path, number, f"{len(fields)} tab-separated field(s), the "
                               f"header has {len(header)}")
        row = {name: value.strip() for name, value in zip(header, fields, strict=True)}
        scan = (row["participant_id"], row["session_id"] or "n/a")
        if scan not in known:
            where = ("no scan of this participant" if scan[0] not in participants else
                     f"no session {scan[1]!r} of {scan[0]} (its sessions: "
                     f"{', '.join(sorted(s for p, s in known if p == scan[0]))})")
            raise VerdictError(path, number, f"participant {scan[0]!r}, session {scan[1]!r} "
                               f"is not in the triage output: {where}")
        if row["verdict"] not in VERDICTS:
            raise VerdictError(path, number, f"unknown verdict {row['verdict']!r} (allowed: "
                               f"{', '.join(VERDICTS)})")
        if scan in seen:
            raise VerdictError(path, number, f"a second verdict on {scan[0]} {scan[1]}: lines "
                               f"{seen[scan]} and {number}; keep one")
        seen[scan] = number
        try:
            when = _time(row["time"])
        except ValueError:
            raise VerdictError(path, number, f"time {row['time']!r} is not ISO 8601 (e.g. "
                               "2024-05-01T14:03:00Z)") from None
        rows.append({"participant_id": scan[0], "session_id": scan[1],
                     "verdict": row["verdict"],
                     "note": "" if row["note"] in _NOT_GIVEN else row["note"],
                     "reviewer": "" if row["reviewer"] in _NOT_GIVEN else row["reviewer"],
                     "time": when, "line": number,
                     "failed": row["verdict"] in FAILED_VERDICTS})
    return pd.DataFrame(rows, columns=[*COLUMNS, "line", "failed"])
