"""A site calibration layer: thresholds re-chosen on a site's own reviewed scans, laid over an
exported bundle without editing it.

The bundle is what the study measured; a layer is what a site learned since, from its
reviewers' verdicts (``wmhqc calibrate``, :mod:`.calibrate`). Keeping the two apart lets
anyone check either: the bundle's checksums still hold, the layer names the one bundle it was
written for (the SHA-256 of that bundle's manifest) and carries its own manifest, and
``wmhqc triage --layer`` refuses a layer written for another bundle or changed since. Layout
of a layer folder::

    layer.json          format, the base bundle's manifest SHA-256, the wmhqc version, the
                        target recall and confidence, the verdict file's SHA-256, and per site
                        either a rule (``sites``: threshold, combine "any", the guarantee, the
                        counts) or why there is none (``uncalibrated``)
    calibration.md      the report for people (``wmhqc calibrate`` prints its table)
    sites.tsv           one row per site: counts, realised recall, precision, review fraction
    contradictions.tsv  verdicts that contradict the flag, for the site's lead
    manifest.json       format and the SHA-256 of every file above

Loaded (:func:`load_layer`), it becomes the bundle's ``layer``: :meth:`Bundle.threshold` and
:meth:`Bundle.combine` then give a calibrated site's rule, and every other scan keeps the
bundle's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from ..study.steps import file_digest
from .bundle import MANIFEST, Bundle, verify_manifest

LAYER_FORMAT = 1
LAYER_JSON = "layer.json"
#: What marks a folder as a layer (and nothing else), so that a rewrite may replace it.
LAYER_KIND = "wmhqc site calibration layer"


class LayerError(ValueError):
    """A layer that cannot be written or trusted; says why."""


def bundle_sha256(bundle: Bundle) -> str:
    """SHA-256 of the bundle's manifest, which lists every file's: the bundle's identity."""
    return file_digest(bundle.root / MANIFEST)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def write_layer(out_dir: str | Path, bundle: Bundle, content: dict,
                files: Mapping[str, str] | None = None) -> Path:
    """Write a layer folder for ``bundle``: ``layer.json`` from ``content`` (its format, kind
    and base bundle filled in here), the text ``files`` by name, and the manifest of all.

    Refused inside the bundle's folder (a layer never edits the bundle) and over a folder
    that holds anything but an earlier layer. Written beside ``out_dir`` first and moved into
    place whole."""
    out_dir = Path(out_dir)
    if _inside(out_dir, bundle.root):
        raise LayerError(f"{out_dir}: inside the bundle {bundle.root}; a layer is written "
                         "beside the bundle, never into it")
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not _is_layer(out_dir))):
        raise LayerError(f"{out_dir}: exists and is not a site layer; choose another folder")
    files = dict(files or {})
    reserved = {LAYER_JSON, MANIFEST} & set(files)
    if reserved or any(Path(name).name != name for name in files):
        raise LayerError(f"layer files must be plain names other than {LAYER_JSON} and "
                         f"{MANIFEST}: {sorted(files)}")
    data = {"format": LAYER_FORMAT, "kind": LAYER_KIND, **content,
            "base_bundle": {"manifest_sha256": bundle_sha256(bundle),
                            "score": bundle.score.column,
                            "higher_is_better": bundle.score.higher_is_better,
                            "folds": bundle.folds}}
    _check_rules(data.get("sites", {}), out_dir / LAYER_JSON)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / LAYER_JSON).write_text(json.dumps(data, indent=1, allow_nan=False))
    for name, text in files.items():
        (tmp / name).write_text(text)
    listed = sorted(p for p in tmp.iterdir() if p.is_file())
    (tmp / MANIFEST).write_text(json.dumps({
        "format": LAYER_FORMAT,
        "files": {p.name: file_digest(p) for p in listed}}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)  # an earlier layer goes once the new is whole
    tmp.replace(out_dir)
    return out_dir


def _is_layer(folder: Path) -> bool:
    try:
        return json.loads((folder / LAYER_JSON).read_text()).get("kind") == LAYER_KIND
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _check_rules(sites: dict, where: Path) -> None:
    for site, rule in sites.items():
        threshold = rule.get("threshold") if isinstance(rule, dict) else None
        if not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise LayerError(f"{where}: site {site!r} has no finite threshold")
        if rule.get("combine", "any") not in ("any", "half"):
            raise LayerError(f"{where}: site {site!r}: unknown rule {rule.get('combine')!r}")


def load_layer(path: str | Path, bundle: Bundle) -> Bundle:
    """``bundle`` with the layer at ``path`` laid over it (``dataclasses.replace``; the loaded
    networks are shared). Checks the layer's format and every checksum of its manifest, and
    that it was written for this bundle (the SHA-256 of the bundle's manifest), before
    anything is used. The layer as loaded adds its ``name`` (as written), ``digest`` (the
    SHA-256 of its manifest, which records name) and ``root``."""
    root = Path(path)
    manifest = verify_manifest(root, what="wmhqc site layer", fmt=LAYER_FORMAT,
                               error=LayerError, changed_after="calibration",
                               again="calibrate again with this version")
    if LAYER_JSON not in (manifest.get("files") or {}):
        raise LayerError(f"{root / MANIFEST}: does not list {LAYER_JSON}")
    data = json.loads((root / LAYER_JSON).read_text())
    if data.get("kind") != LAYER_KIND or data.get("format") != LAYER_FORMAT:
        raise LayerError(f"{root / LAYER_JSON}: not a site layer of format {LAYER_FORMAT}")
    written_for = (data.get("base_bundle") or {}).get("manifest_sha256")
    this = bundle_sha256(bundle)
    if written_for != this:
        raise LayerError(f"{root}: written for another bundle (its base bundle's manifest "
                         f"SHA-256 {str(written_for)[:12]}..., this bundle's {this[:12]}... at "
                         f"{bundle.root}); calibrate this bundle's triage output instead")
    _check_rules(data.get("sites", {}), root / LAYER_JSON)
    loaded = data | {"digest": file_digest(root / MANIFEST), "root": str(root),
                     "name": data.get("name") or root.name}
    return dataclasses.replace(bundle, layer=loaded)
