"""What a triage record is named and holds, shared by the code that writes records
(:mod:`.triage`) and the code that reads them into pages (:mod:`.report`).

It sits below both, so imports point one way: ``triage -> report -> records`` and
``triage -> records``. Nothing here loads a network or draws a figure.

Inputs are named in records, sidecars and pages by BIDS URIs relative to the raw dataset
(``bids:raw:sub-01/anat/sub-01_FLAIR.nii.gz``); where that dataset lies is written once, in the
derivative's ``dataset_description.json`` (``DatasetLinks.raw``), so an output folder carries no
location of the inputs in its records and can be moved or shared as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

#: Name suffix of a scan's record, after the scan's entity prefix.
RECORD_SUFFIX = "desc-wmhqc_qc.json"
#: The prefix of a BIDS URI into the raw (input) dataset.
RAW_URI = "bids:raw:"


def out_of_distribution(features: dict[str, float], ranges: dict[str, dict]) -> list[str]:
    """Reasons a scan is unlike the training cohort: each image feature outside the cohort's
    widened range (see :data:`bundle.OOD_MARGIN`), and sheared voxel axes."""
    reasons = []
    for name, r in ranges.items():
        value = features.get(name)
        if value is None or not math.isfinite(value):
            reasons.append(f"{name} could not be computed")
        elif not r["low"] <= value <= r["high"]:
            reasons.append(f"{name} {value:.3g} beyond {r['low']:.3g} to {r['high']:.3g} "
                           f"(the training cohort's {r['min']:.3g} to {r['max']:.3g}, widened)")
    if features.get("axis_skew_deg", 0.0) > 1.0:
        reasons.append(f"voxel axes sheared by {features['axis_skew_deg']:.1f} degrees")
    return list(dict.fromkeys(reasons))


def clip_dice(value: float | None) -> float | None:
    """A Dice for people: the regressors' linear output clipped to [0, 1] (a Dice of -0.23
    means nothing to the reader); None stays None."""
    if value is None or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value)))


def worst_fold_score(record: dict, higher_is_better: bool) -> float | None:
    """The fold QC score of a record furthest toward failure (the lowest of a
    higher-is-better score, the highest otherwise): with one threshold for every fold, "any
    fold flags" is this score beyond the threshold, so a site's threshold is calibrated on
    it. None for a record without fold scores (a scan in error) or with a non-finite one:
    such a scan leaves the calibration rows (its statistic is undefined) even where another
    fold flagged it in triage, which biases nothing unless scores go missing with failure."""
    values = [f.get("qc_score") for f in record.get("per_fold") or []]
    if not values or any(v is None or not math.isfinite(float(v)) for v in values):
        return None
    values = [float(v) for v in values]
    return min(values) if higher_is_better else max(values)


def raw_uri(relative: str) -> str:
    """``bids:raw:<relative>``: an input named relative to the raw dataset's root."""
    return RAW_URI + Path(relative).as_posix()


def raw_root(out_dir: str | Path) -> Path | None:
    """The raw dataset's folder as the derivative's ``dataset_description.json`` links it
    (``DatasetLinks.raw``, a ``file://`` URI); None when it is absent or not a local folder."""
    try:
        desc = json.loads((Path(out_dir) / "dataset_description.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    link = str((desc.get("DatasetLinks") or {}).get("raw") or "")
    url = urlparse(link)
    if url.scheme != "file":
        return None
    return Path(unquote(url.path))


def resolve_input(out_dir: str | Path, name: str | None) -> Path | None:
    """The file a record's input name points at: a ``bids:raw:`` URI resolved against the raw
    dataset that ``out_dir`` links to (an absolute path, as older records hold, as it is);
    None when it cannot be resolved."""
    if not name:
        return None
    if name.startswith(RAW_URI):
        root = raw_root(out_dir)
        return None if root is None else root / name.removeprefix(RAW_URI)
    return Path(name) if Path(name).is_absolute() else None


def relative_name(path: str | Path, root: str | Path | None) -> str:
    """``path`` relative to ``root`` (POSIX separators; symbolic links are not followed, so a
    DataLad dataset's annexed files keep their names); the bare file name when there is no
    root or ``path`` lies outside it, so no location of the inputs is ever written."""
    absolute = os.path.abspath(path)
    if root is not None:
        base = os.path.abspath(root)
        if os.path.commonpath([absolute, base]) == base:
            return Path(os.path.relpath(absolute, base)).as_posix()
    return Path(absolute).name


def without_root(text: str, root: str | Path | None) -> str:
    """``text`` (an error message, say) with every spelling of ``root`` (as given, absolute,
    symbolic links resolved) taken out of the paths it names, which become relative to it."""
    if root is None or not text:
        return text
    spellings = {str(root), os.path.abspath(root), str(Path(root).resolve())}
    spellings = sorted({s.rstrip("/") for s in spellings} - {"", "."}, key=len, reverse=True)
    # the root as a whole path: not inside a longer one, followed by a separator or by no
    # further character of a file name
    pattern = re.compile("|".join(f"(?<![\\w./-]){re.escape(s)}(?:/|(?![\\w-]|\\.[\\w-]))"
                                  for s in spellings))
    return pattern.sub(lambda m: "" if m.group(0).endswith("/") else ".", text)
