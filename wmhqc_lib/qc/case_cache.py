"""Per-case results kept on disk, so a step that is interrupted continues with the first case
it had not finished, and a finished case is never computed twice.

Layout under a step's folder: ``maps/<subject>.npz`` (what the case's computation saved) and
``rows/<subject>.json`` (its row of the step's per-case table, written last, so a row on disk
means the case is complete).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

Case = TypeVar("Case")


def cached_case_rows(cases: Iterable[Case], out_dir: str | Path,
                     subject_id: Callable[[Case], str],
                     compute: Callable[[Case, Path], dict], *,
                     stamp: Callable[[Case], Mapping] | None = None,
                     desc: str, progress: bool = True) -> list[dict]:
    """One row per case, in order.

    A case whose map file and row exist, and whose stored row agrees with ``stamp(case)`` (what
    its result depends on beyond the folder, such as the model), is read back. Any other case is
    computed: ``compute(case, map_path)`` saves its maps to ``map_path`` and returns its row,
    which is stored with the stamp.
    """
    out_dir = Path(out_dir)
    rows = []
    for case in tqdm(cases, desc=desc, unit="case", disable=not progress):
        sid = subject_id(case)
        map_path = out_dir / "maps" / f"{sid}.npz"
        row_path = out_dir / "rows" / f"{sid}.json"
        expected = dict(stamp(case)) if stamp else {}
        if map_path.exists() and row_path.exists():
            row = json.loads(row_path.read_text())
            if all(row.get(k) == v for k, v in expected.items()):
                rows.append(row)
                continue
        map_path.parent.mkdir(parents=True, exist_ok=True)
        row = {**compute(case, map_path), **expected}
        row_path.parent.mkdir(parents=True, exist_ok=True)
        row_path.write_text(json.dumps(row))
        rows.append(row)
    return rows
