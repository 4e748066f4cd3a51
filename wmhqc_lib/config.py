"""Run profiles (smoke / cpu / paper) read from the single file ``profiles.yml``.

Every size, count and seed that a notebook or command uses comes from a profile, so the same
notebook runs as a seconds-long test or as the paper-scale study without edits.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILES_FILE = Path(__file__).with_name("profiles.yml")
#: The profiles the project ships; :func:`profile_names` lists every profile of a file,
#: including one a user adds.
PROFILE_NAMES = ("smoke", "cpu", "paper")


@dataclass(frozen=True)
class SynthSettings:
    """How the synthetic cohort is simulated (see :mod:`wmhqc_lib.data.synth`)."""

    voxel_scale: float
    working_mm: float
    subjects_scale: float
    min_subjects_per_site: int
    lesion_load_mean_pct: float
    lesion_load_sd_pct: float
    hard_cases: dict[str, float]
    isbi_timepoints: int
    workers: int


@dataclass(frozen=True)
class PreprocessSettings:
    """Target grid and normalisation of the preprocessed cache."""

    voxel_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    clip_percentiles: tuple[float, float]
    crop_margin_mm: float
    workers: int


@dataclass(frozen=True)
class FoldSettings:
    """Cross-validation design."""

    n_folds: int
    val_fraction: float
    load_bins: int


@dataclass(frozen=True)
class Profile:
    """One named run profile; ``sections`` keeps every section, including ones added later."""

    name: str
    seed: int
    synth: SynthSettings
    preprocess: PreprocessSettings
    folds: FoldSettings
    sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def section(self, key: str) -> dict[str, Any]:
        """A raw section (e.g. ``models``) as a plain dict, for steps without a typed class."""
        if key not in self.sections:
            raise KeyError(f"profile {self.name!r} has no section {key!r} in {PROFILES_FILE}")
        return copy.deepcopy(self.sections[key])


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_profiles(path: str | Path | None) -> tuple[Path, dict[str, Any]]:
    path = Path(path) if path else PROFILES_FILE
    with open(path) as fh:
        return path, yaml.safe_load(fh) or {}


def profile_names(path: str | Path | None = None) -> list[str]:
    """Every profile of the profiles file (its sections but ``defaults``), in file order, so
    that a profile a user adds is accepted wherever a profile name is."""
    return [k for k in _read_profiles(path)[1] if k != "defaults"]


def load_profile(name: str | None = None, path: str | Path | None = None) -> Profile:
    """Load a profile by name (default: ``$WMHQC_PROFILE`` or ``cpu``)."""
    name = name or os.environ.get("WMHQC_PROFILE", "cpu")
    path, raw = _read_profiles(path)
    if name not in raw or name == "defaults":
        known = ", ".join(k for k in raw if k != "defaults")
        raise ValueError(f"{path}: unknown profile {name!r} (known: {known})")
    merged = _merge(raw.get("defaults", {}), raw[name] or {})
    pre = merged["preprocess"]
    return Profile(
        name=name,
        seed=int(merged["seed"]),
        synth=SynthSettings(**merged["synth"]),
        preprocess=PreprocessSettings(
            voxel_mm=tuple(float(v) for v in pre["voxel_mm"]),
            shape=tuple(int(v) for v in pre["shape"]),
            clip_percentiles=tuple(float(v) for v in pre["clip_percentiles"]),
            crop_margin_mm=float(pre["crop_margin_mm"]),
            workers=int(pre["workers"]),
        ),
        folds=FoldSettings(**merged["folds"]),
        sections=merged,
    )
