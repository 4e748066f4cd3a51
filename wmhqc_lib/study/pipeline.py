"""The `make reproduce` chain: data, papermill-executed notebooks in order, then the book.

Steps are declared once in :data:`STEPS`; a later chapter joins the chain by appending a
:class:`Step`. A step is skipped when its notebook, parameters, upstream steps and (for the data
step) input files are unchanged since its last success; a failing step stops only the steps that
depend on it, and the run ends with a summary and a per-stage timing table.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Profile, load_profile

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
BOOK_FILES = ("_config.yml", "_toc.yml", "book")
#: Where chapter 07 writes its triage output, relative to the results folder; its HTML
#: reports are copied into the book's ``_static/triage``.
TRIAGE_REPORTS = "triage/output"
#: Where chapter 06 writes its tables as CSV (copied into the book's ``_static/tables``).
EVALUATION_TABLES = "evaluation"
#: The software versions of the run, per stage that ran a step and of the book's staging
#: (:func:`record_environment`), in the results folder; the book's first page shows them.
ENVIRONMENT_FILE = "environment.json"
#: Where the book's first page (the root of ``_toc.yml``) takes the versions table; a root page
#: without it gets the table at its end.
VERSIONS_MARKER = "<!-- wmhqc: versions of this build -->"


@dataclass(frozen=True)
class Step:
    """One notebook in the chain. ``per_fold`` steps run once per fold with a ``fold`` param."""

    notebook: str  # file name in notebooks/
    per_fold: bool = False
    depends: tuple[str, ...] = ()  # notebooks whose outputs this one reads
    watches_data: bool = False  # rerun when files under the data root change

    @property
    def name(self) -> str:
        return Path(self.notebook).stem


STEPS: list[Step] = [
    Step("01_data.ipynb", watches_data=True),
    Step("02_mc_unet.ipynb", per_fold=True, depends=("01_data",)),
    Step("03_uncertainty.ipynb", per_fold=True, depends=("02_mc_unet",)),
    Step("04_rec_unet.ipynb", per_fold=True, depends=("03_uncertainty",)),
    Step("05_dice_regression.ipynb", per_fold=True, depends=("04_rec_unet",)),
    Step("06_evaluation.ipynb", depends=("05_dice_regression",)),
    Step("07_triage.ipynb", depends=("05_dice_regression",)),
    Step("08_guarantee.ipynb", depends=("05_dice_regression",)),
]


@dataclass
class StepResult:
    step: str
    fold: int | None
    status: str  # ran / skipped / failed / blocked
    seconds: float = 0.0
    detail: str = ""
    output: str = ""


@dataclass
class RunConfig:
    """Everything a run needs; ``results_dir`` holds all outputs of one profile."""

    profile: Profile
    data_root: Path
    results_dir: Path
    folds: list[int] = field(default_factory=list)
    seed: int | None = None
    build_book: bool = True
    progress: bool = True

    @property
    def fold_list(self) -> list[int]:
        """The chosen folds, or every fold of the profile."""
        return self.folds or list(range(1, self.profile.folds.n_folds + 1))

    @property
    def executed_dir(self) -> Path:
        return self.results_dir / "notebooks"

    @property
    def stamp_dir(self) -> Path:
        return self.results_dir / "stamps"

    @property
    def log_dir(self) -> Path:
        return self.results_dir / "logs"

    @property
    def book_dir(self) -> Path:
        return self.results_dir / "book"


def default_data_root(profile: Profile) -> Path:
    """Where the embedded synthetic cohort of a profile lives (generated on first use)."""
    return REPO_ROOT / "data" / f"synthetic-{profile.name}"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tree_stamp(root: Path) -> str:
    """Digest of every file's path, size and mtime under ``root`` (cheap change detection)."""
    entries = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        for name in sorted(files):
            p = Path(dirpath) / name
            st = p.stat()
            entries.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return _digest(sorted(entries))


def step_outputs(cfg: RunConfig, step: Step, fold: int | None) -> tuple[Path, Path, Path]:
    """Executed notebook, stamp and log paths of one step (and fold)."""
    tag = step.name if fold is None else f"{step.name}-fold{fold}"
    folder = cfg.executed_dir if fold is None else cfg.executed_dir / f"fold{fold}"
    return folder / step.notebook, cfg.stamp_dir / f"{tag}.json", cfg.log_dir / f"{tag}.log"


def step_parameters(cfg: RunConfig, fold: int | None) -> dict:
    params = {"profile_name": cfg.profile.name, "data_root": str(cfg.data_root),
              "results_dir": str(cfg.results_dir), "seed": cfg.seed}
    if fold is not None:
        params["fold"] = fold
    return params


def library_digest() -> str:
    """Digest of the helper library's code and profiles: a change there reruns the steps (their
    own caches, such as preprocessed cases, keep the rerun cheap)."""
    lib = Path(__file__).resolve().parents[1]
    files = sorted(list(lib.rglob("*.py")) + list(lib.rglob("*.yml")))
    return _digest([(f.relative_to(lib).as_posix(), hashlib.sha256(f.read_bytes()).hexdigest())
                    for f in files])


def _step_key(cfg: RunConfig, step: Step, fold: int | None, upstream: dict[str, str]) -> str:
    parts = {
        "notebook": hashlib.sha256((NOTEBOOK_DIR / step.notebook).read_bytes()).hexdigest(),
        "library": library_digest(),
        "params": step_parameters(cfg, fold),
        "profile": cfg.profile.sections,
        "upstream": {d: upstream.get(d, "") for d in step.depends},
    }
    if step.watches_data:
        parts["data"] = _tree_stamp(cfg.data_root)
    return _digest(parts)


#: Kernel options of a pipeline step. ipykernel by default swaps the kernel's file descriptors
#: 1 and 2 for pipes, forwards what they carry to the notebook as stream output *and* echoes it
#: to the original descriptor: a line written to fd 2 (``log_progress``, TensorFlow's C++
#: logging) then reached the step log twice, once from the kernel's own stderr and once through
#: papermill's ``stderr_file``. Without that capture fd 2 is the log itself (each line once, and
#: not in the executed notebook), while ``sys.stderr`` writes (warnings) still come through
#: papermill.
STEP_KERNEL_ARGUMENTS = ("--IPKernelApp.capture_fd_output=False",)


def _kernel_manager_logging_to(log: Path):
    """A kernel manager whose kernel process writes its own stderr (TensorFlow's C++ start-up
    lines, ZMQ notices, :func:`~wmhqc_lib.nets.training.log_progress`) to the step's log, so
    the console keeps one line per step and papermill's progress bar."""
    from jupyter_client import AsyncKernelManager

    class StepKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            with open(log, "ab") as fh:  # the kernel keeps its own copy of the descriptor
                kw["stderr"] = fh
                return await super()._async_launch_kernel(kernel_cmd, **kw)

    return StepKernelManager


def _execute(cfg: RunConfig, step: Step, fold: int | None) -> None:
    import papermill as pm

    output, _, log = step_outputs(cfg, step, fold)
    output.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    with open(log, "a") as fh:  # appends, like the kernel process: neither overwrites the other
        pm.execute_notebook(str(NOTEBOOK_DIR / step.notebook), str(output),
                            parameters=step_parameters(cfg, fold), cwd=str(REPO_ROOT),
                            kernel_name="python3", progress_bar=cfg.progress,
                            stdout_file=fh, stderr_file=fh, log_output=False,
                            kernel_manager_class=_kernel_manager_logging_to(log),
                            extra_arguments=list(STEP_KERNEL_ARGUMENTS))


def _failure_detail(exc: Exception) -> str:
    name = type(exc).__name__
    cell = getattr(exc, "exec_count", None)
    ename = getattr(exc, "ename", "")
    evalue = getattr(exc, "evalue", str(exc))
    where = f" in cell [{cell}]" if cell is not None else ""
    return f"{name}{where}: {ename} {evalue}".strip()[:500]


STAGES = ("data", "folds", "final")


def step_stage(step: Step, steps: Sequence[Step] | None = None) -> str:
    """The stage of a step when the chain is split over jobs (``reproduce --stage``): ``data``
    = the all-fold steps before the first per-fold step, ``folds`` = the per-fold steps (one
    job per fold), ``final`` = the all-fold steps after the first per-fold step (then the book).
    """
    steps = list(STEPS if steps is None else steps)
    if step.per_fold:
        return "folds"
    first = next((i for i, s in enumerate(steps) if s.per_fold), len(steps))
    return "data" if steps.index(step) < first else "final"


def select_steps(stage: str | None, steps: Sequence[Step] | None = None,
                 only: Sequence[str] = ()) -> list[Step]:
    """The steps one stage runs, in chain order (all of them for ``None``), narrowed to the
    names in ``only`` when given; an unknown stage or step is a ValueError."""
    steps = list(STEPS if steps is None else steps)
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    chosen = [s for s in steps if stage is None or step_stage(s, steps) == stage]
    unknown = sorted(set(only) - {s.name for s in chosen})
    if unknown:
        raise ValueError(f"step(s) {', '.join(unknown)} not in "
                         f"{'stage ' + stage if stage else 'the chain'} (its steps: "
                         f"{', '.join(s.name for s in chosen)})")
    return [s for s in chosen if not only or s.name in only]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def failure_record(cfg: RunConfig, step: Step, fold: int | None) -> Path:
    """Where a failed step leaves its error (removed by its next success), so that a later
    stage's job (``make -j`` or SLURM) can say which fold failed and why."""
    _, stamp, _ = step_outputs(cfg, step, fold)
    return stamp.with_suffix(".failed.json")


def _recorded_keys(cfg: RunConfig, step: Step, folds: Sequence[int]
                   ) -> dict[int | None, str | None]:
    """Stamp keys of a step's earlier successful runs (another stage's job), per fold; None
    where a fold has no successful run."""
    keys: dict[int | None, str | None] = {}
    for fold in (folds if step.per_fold else [None]):
        output, stamp, _ = step_outputs(cfg, step, fold)
        ok = stamp.exists() and output.exists() and not failure_record(cfg, step, fold).exists()
        keys[fold] = _read_json(stamp).get("key", "") if ok else None
    return keys


@contextlib.contextmanager
def _step_lock(cfg: RunConfig, step: Step, fold: int | None, label: str):
    """Exclusive lock of one step and fold, so that two processes (``make -j``, two shells, an
    array task rerun by hand) never run it at once; the second one waits, then finds it done."""
    _, stamp, _ = step_outputs(cfg, step, fold)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with open(stamp.with_suffix(".lock"), "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[wait] {label}: running in another process", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _upstream_key(step: Step, fold: int | None, dep: Step, keys: dict, folds: Sequence[int]
                  ) -> str:
    """The key a step sees for one dependency: the same fold's run of a per-fold dependency,
    all folds' runs for an all-fold step."""
    if not dep.per_fold:
        return keys.get((dep.name, None)) or ""
    if step.per_fold:
        return keys.get((dep.name, fold)) or ""
    return _digest([keys.get((dep.name, k)) or "" for k in folds])


def _blocking(step: Step, fold: int | None, by_name: dict[str, Step],
              failed: dict[str, dict[int | None, str]]) -> list[str]:
    """Which failures stop this step at this fold: the same fold of a per-fold dependency
    (other folds go on), any fold for an all-fold step."""
    reasons = []
    for name in step.depends:
        bad = failed.get(name, {})
        dep = by_name.get(name)
        if dep is not None and dep.per_fold and step.per_fold:
            bad = {k: v for k, v in bad.items() if k == fold}
        for k, why in bad.items():
            where = f"{name}" if k is None or step.per_fold else f"{name} fold {k}"
            reasons.append(f"{where} ({why})" if why else where)
    return reasons


def run_steps(cfg: RunConfig, steps: Sequence[Step] = tuple(STEPS),
              stage: str | None = None, only: Sequence[str] = ()) -> list[StepResult]:
    """Run every step in order; return what ran, was skipped, failed or was blocked.

    A failure is tracked per fold: a fold whose step fails blocks that fold's later steps and
    the all-fold steps after it, while the other folds go on. With ``stage`` only that stage's
    steps run (see :func:`step_stage`), and with ``only`` just the named ones of them (one
    make target per fold and step); the other steps are neither run nor reported, and their
    recorded successful runs stand in as upstream (a step that needs one without such a
    record is blocked).
    """
    chosen = {s.name for s in select_steps(stage, steps, only)}
    by_name = {s.name: s for s in steps}
    results: list[StepResult] = []
    keys: dict[tuple[str, int | None], str] = {}  # (step, fold) -> key of its successful run
    failed: dict[str, dict[int | None, str]] = {}  # step -> {fold: why} not available
    folds = cfg.fold_list
    for step in steps:
        if step.name not in chosen:  # run by another stage's job: use its recorded runs
            for fold, key in _recorded_keys(cfg, step, folds).items():
                if key is None:
                    record = _read_json(failure_record(cfg, step, fold))
                    failed.setdefault(step.name, {})[fold] = (
                        f"{record.get('status', 'failed')}: {record.get('detail', '')}"
                        if record else
                        f"no successful run under {cfg.results_dir}: run its stage first")
                else:
                    keys[(step.name, fold)] = key
            continue
        for fold in (folds if step.per_fold else [None]):
            label = step.name if fold is None else f"{step.name} fold {fold}"
            blocked = _blocking(step, fold, by_name, failed)
            if blocked:
                results.append(StepResult(step.name, fold, "blocked",
                                          detail=f"needs {'; '.join(blocked)}"[:500]))
                failed.setdefault(step.name, {})[fold] = f"blocked: {results[-1].detail}"
                _record_failure(cfg, step, fold, {"status": "blocked",
                                                  "detail": results[-1].detail})
                continue
            upstream = {d: _upstream_key(step, fold, by_name[d], keys, folds)
                        for d in step.depends if d in by_name}
            key = _step_key(cfg, step, fold, upstream)
            output, stamp, log = step_outputs(cfg, step, fold)
            with _step_lock(cfg, step, fold, label):
                if stamp.exists() and output.exists() and _read_json(stamp).get("key") == key:
                    print(f"[skip] {label}: unchanged since last run ({output})", flush=True)
                    results.append(StepResult(step.name, fold, "skipped", output=str(output)))
                    keys[(step.name, fold)] = key
                    continue
                results.append(_run_one(cfg, step, fold, key, label))
            if results[-1].status == "ran":
                keys[(step.name, fold)] = key
            else:
                failed.setdefault(step.name, {})[fold] = f"failed: {results[-1].detail}"
    return results


def _record_failure(cfg: RunConfig, step: Step, fold: int | None, record: dict) -> None:
    """A failed or blocked step: its earlier success no longer stands (its stamp goes), and
    why is kept for later stages and the whole-study table."""
    step_outputs(cfg, step, fold)[1].unlink(missing_ok=True)
    path = failure_record(cfg, step, fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _run_one(cfg: RunConfig, step: Step, fold: int | None, key: str, label: str
             ) -> StepResult:
    """Execute one step (the caller holds its lock); record success or failure."""
    output, stamp, log = step_outputs(cfg, step, fold)
    print(f"[run ] {label} -> {output} (log {log})", flush=True)
    start = time.perf_counter()
    stamp.unlink(missing_ok=True)
    try:
        _execute(cfg, step, fold)
    except Exception as exc:  # papermill wraps the notebook's error
        seconds = time.perf_counter() - start
        detail = _failure_detail(exc)
        print(f"[FAIL] {label} after {seconds:.0f} s: {detail}", flush=True)
        _record_failure(cfg, step, fold, {"status": "failed", "detail": detail,
                                          "seconds": round(seconds, 1),
                                          "output": str(output), "log": str(log)})
        return StepResult(step.name, fold, "failed", seconds, detail, str(output))
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps({"key": key, "seconds": round(seconds, 1)}))
    failure_record(cfg, step, fold).unlink(missing_ok=True)
    print(f"[done] {label} in {seconds:.0f} s", flush=True)
    return StepResult(step.name, fold, "ran", seconds, output=str(output))


def recorded_results(cfg: RunConfig, steps: Sequence[Step] = tuple(STEPS)) -> list[StepResult]:
    """The whole study as its step records say, whichever process or job ran each step: the
    last run's seconds of every finished step, the error of every failed one, ``missing``
    where neither exists. Printed at the end of a split run (``make -j``, SLURM)."""
    folds = cfg.fold_list
    rows = []
    for step in steps:
        for fold in (folds if step.per_fold else [None]):
            output, stamp, _ = step_outputs(cfg, step, fold)
            failure = _read_json(failure_record(cfg, step, fold))
            done = _read_json(stamp) if stamp.exists() and output.exists() else {}
            if failure:
                rows.append(StepResult(step.name, fold, failure.get("status", "failed"),
                                       failure.get("seconds", 0.0),
                                       failure.get("detail", ""), failure.get("output", "")))
            elif done:
                rows.append(StepResult(step.name, fold, "done", done.get("seconds", 0.0),
                                       output=str(output)))
            else:
                rows.append(StepResult(step.name, fold, "missing"))
    return rows


def shown_path(path: str | Path, cfg: RunConfig) -> str:
    """How the book shows a path of the building machine: relative to the repository when
    inside it, else named by what it is, so the same book built in two folders is the same."""
    path = Path(path).resolve()
    for root, name in ((REPO_ROOT.resolve(), None), (cfg.results_dir.resolve(), "<results>")):
        if path == root or root in path.parents:
            rel = path.relative_to(root).as_posix()
            return rel if name is None else f"{name}/{rel}".rstrip("/.")
    if path == Path(cfg.data_root).resolve():
        return "<data root>"
    return f"<outside the repository>/{path.name}"


#: The comment that opens the injected-parameters cell on a book page, in place of papermill's
#: ``# Parameters``: the page shows this cell alone, so it says whose values these are.
RUN_PARAMETERS_HEADING = "# Parameters of this run"


def _present_parameters(notebook: Path, cfg: RunConfig) -> None:
    """Show a staged notebook's parameters as this run set them, and only those.

    papermill keeps the template's ``parameters`` cell (the defaults, ``profile_name =
    "smoke"``) above the cell it injects, so a page first showed values the run did not use.
    The template's cell gets Jupyter Book's ``remove-cell`` tag: gone from the page, still in
    the notebook, which therefore reruns as it is. The injected cell is headed as the run's
    own and shows paths with :func:`shown_path`.
    """
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    if not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells):
        return  # not run by papermill with parameters: the template's values are the run's
    paths = sorted({str(cfg.results_dir), str(cfg.data_root), str(Path(cfg.results_dir).resolve()),
                    str(Path(cfg.data_root).resolve())}, key=len, reverse=True)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
        elif "injected-parameters" in tags:
            lines = cell.source.split("\n")
            if lines and lines[0].startswith("#"):  # papermill's "# Parameters"
                lines = lines[1:]
            source = "\n".join([RUN_PARAMETERS_HEADING, *lines])
            for path in paths:
                source = source.replace(path, shown_path(path, cfg))
            cell.source = source
    nbformat.write(nb, notebook)


def _ship(source: Path, pattern: str, target: Path) -> None:
    """Replace ``target`` with the files of ``source`` matching ``pattern`` (if any)."""
    shutil.rmtree(target, ignore_errors=True)
    if source.is_dir():
        target.mkdir()
        for file in source.glob(pattern):
            shutil.copy2(file, target / file.name)


def record_environment(cfg: RunConfig, name: str) -> dict[str, dict[str, str]]:
    """Record this process's software versions as ``name`` (a stage, or ``book``) in the
    results folder's :data:`ENVIRONMENT_FILE`, under a lock since fold jobs may finish at once;
    returns every record. A book built with other versions than its steps ran with says so."""
    import tempfile

    from .environment import environment

    mine = environment()
    path = cfg.results_dir / ENVIRONMENT_FILE
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.results_dir / f".{ENVIRONMENT_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            records = {**_read_json(path), name: mine}
            fd, tmp = tempfile.mkstemp(dir=cfg.results_dir, prefix=f".{ENVIRONMENT_FILE}.")
            with os.fdopen(fd, "w") as fh:
                json.dump(records, fh, indent=2)
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return records


def _show_versions(stage: Path, records: dict[str, dict[str, str]]) -> None:
    """Write the versions table into the staged book's first page (the root of ``_toc.yml``),
    at :data:`VERSIONS_MARKER` or, without it, at the page's end."""
    import yaml

    from .environment import versions_markdown

    root = yaml.safe_load((stage / "_toc.yml").read_text()).get("root")
    page = stage / f"{root}.md"
    if not root or not page.is_file():
        raise RuntimeError(f"{stage / '_toc.yml'}: its root {root!r} is not a Markdown page "
                           "in the book; the versions of this build go on the first page")
    table = ("These versions ran this build (recorded in the results folder's "
             f"`{ENVIRONMENT_FILE}`):\n\n" + versions_markdown(records, "book"))
    text = page.read_text()
    if VERSIONS_MARKER in text:
        text = text.replace(VERSIONS_MARKER, table, 1)
    else:
        text = text.rstrip("\n") + "\n\n## Versions of this build\n\n" + table + "\n"
    page.write_text(text)


def stage_book(cfg: RunConfig, steps: Sequence[Step] = tuple(STEPS)) -> Path:
    """Lay out the book sources with the executed notebooks in place of the templates.

    A per-fold chapter shows its first executed fold in full; the other folds become
    sub-pages of that chapter in the staged table of contents. The first page gets the
    software versions of this build (:func:`record_environment`).
    """
    import plotly
    import yaml

    stage = cfg.book_dir
    for name in BOOK_FILES:
        src = REPO_ROOT / name
        dst = stage / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    nb_dst = stage / "notebooks"
    shutil.rmtree(nb_dst, ignore_errors=True)
    nb_dst.mkdir(parents=True)
    extra_folds: dict[str, list[str]] = {}
    for step in steps:
        if not step.per_fold:
            executed = cfg.executed_dir / step.notebook
            if executed.exists():
                shutil.copy2(executed, nb_dst / step.notebook)
            continue
        folds = sorted(int(p.parent.name[4:]) for p in
                       cfg.executed_dir.glob(f"fold*/{step.notebook}"))
        for i, fold in enumerate(folds):
            src = cfg.executed_dir / f"fold{fold}" / step.notebook
            if i == 0:
                shutil.copy2(src, nb_dst / step.notebook)
            else:
                (nb_dst / f"fold{fold}").mkdir(exist_ok=True)
                shutil.copy2(src, nb_dst / f"fold{fold}" / step.notebook)
                extra_folds.setdefault(f"notebooks/{step.name}", []).append(
                    f"notebooks/fold{fold}/{step.name}")
    for executed in nb_dst.rglob("*.ipynb"):
        _present_parameters(executed, cfg)
    toc = yaml.safe_load((stage / "_toc.yml").read_text())
    for part in toc.get("parts", [toc]):
        for chapter in part.get("chapters", []):
            if chapter.get("file") in extra_folds:
                chapter["sections"] = [{"file": f} for f in extra_folds[chapter["file"]]]
    (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    _show_versions(stage, record_environment(cfg, "book"))
    static = stage / "_static"
    static.mkdir(exist_ok=True)
    shutil.copy2(Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
                 static / "plotly.min.js")
    # chapter outputs linked from their pages: the evaluation tables as CSV, the triage reports
    _ship(cfg.results_dir / EVALUATION_TABLES, "*.csv", static / "tables")
    _ship(cfg.results_dir / TRIAGE_REPORTS, "*.html", static / "triage")
    return stage


def build_book(cfg: RunConfig, strict: bool = True) -> Path:
    """Build the HTML book from the staged sources; returns the path of its index page."""
    stage = stage_book(cfg)
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(stage), "--builder",
           "html"]
    if strict:
        cmd += ["--warningiserror", "--keep-going"]
    log = cfg.log_dir / "book.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(stage))
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"jupyter-book build failed (log {log}):\n{tail}")
    return stage / "_build" / "html" / "index.html"


TIMING_FILE = "timing.txt"  # every step's last recorded seconds, rewritten by each run


def timing_table(results: Sequence[StepResult]) -> str:
    """Per-stage timing and status, as printed at the end of every run."""
    lines = [f"{'stage':<28} {'fold':>4} {'status':<8} {'seconds':>8}  detail"]
    for r in results:
        fold = "" if r.fold is None else str(r.fold)
        lines.append(f"{r.step:<28} {fold:>4} {r.status:<8} {r.seconds:>8.1f}  {r.detail}")
    return "\n".join(lines)


def write_timing(cfg: RunConfig) -> Path:
    """``timing.txt``: every step's record, read and written under a lock, since two fold jobs
    may finish at once (the later one sees the earlier one's record)."""
    import tempfile

    path = cfg.results_dir / TIMING_FILE
    with open(cfg.results_dir / f".{TIMING_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fd, tmp = tempfile.mkstemp(dir=cfg.results_dir, prefix=f".{TIMING_FILE}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(timing_table(recorded_results(cfg)) + "\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def reproduce(profile_name: str = "cpu", data_root: str | Path | None = None,
              results_dir: str | Path | None = None, folds: Sequence[int] = (),
              seed: int | None = None, build: bool = True, stage: str | None = None,
              only: Sequence[str] = ()) -> int:
    """Synthesize data if needed, run every step, build the book; returns an exit code.

    ``stage`` (``data``, ``folds`` or ``final``, see :func:`step_stage`) runs one part of the
    chain, for a cluster job per part: only the data stage synthesizes the default cohort,
    only the final stage (or a whole run) builds the book. ``only`` narrows the stage to the
    named steps (``make reproduce`` runs each fold's steps as separate targets).
    """
    from ..data import synth

    select_steps(stage, only=only)  # an unknown stage or step fails here, before any work
    profile = load_profile(profile_name)
    results = []
    overall = time.perf_counter()
    if data_root is None and stage not in (None, "data"):
        data_root = default_data_root(profile)  # made by the data stage's job
    if data_root is None:
        data_root = default_data_root(profile)
        start = time.perf_counter()
        fresh = not (Path(data_root) / synth.MARKER_FILE).exists()
        print(f"[data] synthetic cohort for profile '{profile.name}' at {data_root}"
              + (" (generating)" if fresh else " (exists)"), flush=True)
        # the default folder is the project's own cache: an outdated cohort is replaced
        try:
            synth.generate_cohort(data_root, profile)
        except FileExistsError:
            print(f"[data] {data_root} holds a cohort made with other settings: regenerating",
                  flush=True)
            fresh = True
            synth.generate_cohort(data_root, profile, force=True)
        results.append(StepResult("synthesize data", None, "ran" if fresh else "skipped",
                                  time.perf_counter() - start))
    cfg = RunConfig(profile=profile, data_root=Path(data_root).resolve(),
                    results_dir=Path(results_dir or REPO_ROOT / "results" / profile.name).resolve(),
                    folds=list(folds), seed=seed)
    results += run_steps(cfg, stage=stage, only=only)
    failed = [r for r in results if r.status in ("failed", "blocked")]
    if any(r.status == "ran" and r.step != "synthesize data" for r in results):
        record_environment(cfg, stage or "all")  # the versions this stage's steps ran with
    if build and stage in (None, "final") and not only and not failed:
        start = time.perf_counter()
        try:
            index = build_book(cfg)
            results.append(StepResult("book", None, "ran", time.perf_counter() - start))
            print(f"[book] {index}", flush=True)
        except RuntimeError as exc:
            results.append(StepResult("book", None, "failed", time.perf_counter() - start,
                                      str(exc).splitlines()[0]))
            print(exc, file=sys.stderr)
            failed.append(results[-1])
    results.append(StepResult("total", None, "", time.perf_counter() - overall))
    print("\n" + timing_table(results), flush=True)
    if stage == "final":  # the folds ran in other processes: the whole study from its records
        print(f"\nWhole study, from the step records under {cfg.results_dir}:\n"
              + timing_table(recorded_results(cfg)), flush=True)
    if cfg.results_dir.exists():
        write_timing(cfg)
    print("\n" + run_summary(results), flush=True)
    if failed:
        print(f"\n{len(failed)} step(s) failed or were blocked; executed notebooks of failed "
              f"steps are kept for reading under {cfg.executed_dir}", file=sys.stderr)
        return 1
    return 0


def run_summary(results: Sequence[StepResult]) -> str:
    """One line of counts, then each failure with its notebook, cell and error."""
    counts = {k: sum(r.status == k for r in results)
              for k in ("ran", "skipped", "failed", "blocked")}
    lines = ["summary: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
    for r in results:
        if r.status in ("failed", "blocked"):
            where = r.step if r.fold is None else f"{r.step} fold {r.fold}"
            lines.append(f"  {r.status} {where}: {r.detail}"
                         + (f"\n    executed notebook kept: {r.output}" if r.output else ""))
    return "\n".join(lines)
