"""The ``wmhqc`` command line: data synthesis, indexing, preprocessing, folds, reproduction."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import PROFILES_FILE, load_profile, profile_names
from .data import datasets
from .data.io import DataError


def profile_name(value: str) -> str:
    """``--profile``: any section of the profiles file (a user's own too), checked when the
    arguments are parsed so that a typo fails at once with the profiles there are."""
    names = profile_names()
    if value not in names:
        raise argparse.ArgumentTypeError(
            f"unknown profile {value!r} (available: {', '.join(names)}; a profile is a "
            f"section of {PROFILES_FILE})")
    return value


def _profile(args: argparse.Namespace):
    profile = load_profile(args.profile)
    if getattr(args, "seed", None) is not None:
        profile = dataclasses.replace(profile, seed=args.seed)
    return profile


def _index_options(args: argparse.Namespace) -> datasets.IndexOptions:
    return datasets.IndexOptions(miccai_label2=args.miccai_label2,
                                 isbi_timepoint=args.isbi_timepoint,
                                 isbi_raters=args.isbi_raters, msseg_mask=args.msseg_mask)


def cmd_synth(args: argparse.Namespace) -> int:
    from .data import synth

    profile = _profile(args)
    table = synth.generate_cohort(args.out, profile, workers=args.workers, force=args.force)
    print(f"wrote a synthetic cohort of {len(table)} subjects to {args.out} "
          f"(profile {profile.name}, seed {profile.seed})")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    options = _index_options(args)
    if args.dataset:
        result = datasets.index_dataset(args.dataset, args.root, options,
                                        skip_bad=args.skip_bad, progress=True)
    else:
        result = datasets.index_cohort(args.root, options, skip_bad=args.skip_bad,
                                       progress=True)
    datasets.write_manifest(result.manifest, args.out)
    for problem in result.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"indexed {len(result.manifest)} subjects -> {args.out}"
          + (f" ({len(result.problems)} skipped)" if result.problems else ""))
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    frames = [datasets.read_manifest(p) for p in args.manifests]
    combined = datasets.combine_manifests(frames)
    datasets.write_manifest(combined, args.out)
    print(f"combined {len(combined)} subjects from {len(frames)} manifests -> {args.out}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .data import preprocess

    profile = _profile(args)
    manifest = datasets.read_manifest(args.manifest)
    table = preprocess.preprocess_cohort(manifest, args.cache, profile.preprocess,
                                         workers=args.workers, skip_bad=args.skip_bad)
    if args.out:
        table.to_csv(args.out, index=False)
    counts = table["status"].value_counts().to_dict()
    print(f"preprocessed {len(table)} subjects into {args.cache}: {counts}")
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    import pandas as pd

    from .data import folds

    profile = _profile(args)
    manifest = datasets.read_manifest(args.manifest)
    column = "lesion_ml"
    if args.preprocess_table:
        prep = pd.read_csv(args.preprocess_table)[["subject_id", "load_pct"]]
        manifest = manifest.merge(prep, on="subject_id")
        column = "load_pct"
    table = folds.make_folds(manifest, n_folds=args.n_folds or profile.folds.n_folds,
                             val_fraction=profile.folds.val_fraction,
                             n_load_bins=profile.folds.load_bins, seed=profile.seed,
                             load_column=column)
    table.to_csv(args.out, index=False)
    print(folds.fold_summary(table).to_string())
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .study import pipeline

    return pipeline.reproduce(args.profile, data_root=args.data_root, results_dir=args.results,
                              folds=args.folds or (), seed=args.seed, build=not args.no_book,
                              stage=args.stage, only=args.step)


def cmd_slurm(args: argparse.Namespace) -> int:
    from .study import slurm

    settings = slurm.ClusterSettings(
        partition=args.partition, account=args.account, time_data=args.time_data,
        time_fold=args.time_fold, time_final=args.time_final, gpus=args.gpus,
        gpu_option=args.gpu_option, gpu_type=args.gpu_type, cpus=args.cpus, mem=args.mem,
        max_parallel=args.max_parallel, extra_sbatch=tuple(args.sbatch_option),
        setup=args.setup, backend=args.backend)
    jobs = slurm.plan(args.profile, results_dir=args.results, folds=args.folds or (),
                      data_root=args.data_root, seed=args.seed)
    try:
        ids = slurm.submit(jobs, settings, dry_run=args.dry_run)
    except slurm.SlurmError as exc:
        print(f"wmhqc: error: {exc}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"dry run: scripts written to {jobs.script_dir}, nothing submitted")
    else:
        print(f"data job {ids['data']} -> fold array {ids['folds']} "
              f"(folds {slurm.array_spec(jobs.folds)}) -> final job {ids['final']}; "
              f"logs in {jobs.log_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate one score; a score the registry knows keeps its direction and Dice scale unless
    a flag says otherwise, so forgetting ``--lower-is-better`` cannot invert entropy. Without
    ``--quality-threshold`` a case fails below the library's lesion-Dice default (the study's)."""
    import json

    from .qc import evaluation

    cases = evaluation.read_cases(args.cases)
    known = [s for s in evaluation.QC_SCORES if s.column == args.score]
    if not known and args.higher_is_better is None:
        raise ValueError(f"score {args.score!r} is not a registered QC score "
                         f"({', '.join(s.column for s in evaluation.QC_SCORES)}): say its "
                         "direction with --higher-is-better or --lower-is-better")
    if known and args.higher_is_better is not None \
            and known[0].higher_is_better != args.higher_is_better:
        word = "higher" if known[0].higher_is_better else "lower"
        print(f"wmhqc: note: QC_SCORES declares {args.score!r} {word}-is-better; evaluating "
              f"as {'higher' if args.higher_is_better else 'lower'}-is-better as asked",
              file=sys.stderr)
    result = evaluation.evaluate_folds(
        cases, args.score, threshold=args.threshold, select=args.select_threshold,
        higher_is_better=args.higher_is_better, dice_scale=args.dice_scale,
        quality_threshold=(evaluation.QUALITY_THRESHOLD if args.quality_threshold is None
                           else args.quality_threshold),
        dice_column=args.dice_column)
    report = {"file": str(args.cases), **result.to_dict()}
    print(json.dumps(report, indent=2, allow_nan=False))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .deploy import bundle

    if args.confidence is not None and args.target_recall is None:
        args.export_parser.error("--confidence needs --target-recall (the confidence belongs "
                                 "to a target recall)")
    out = bundle.export_study(args.results, args.out, profile=args.profile, score=args.score,
                              folds=args.folds, overwrite=args.force,
                              target_recall=args.target_recall, confidence=args.confidence)
    guarantee = out.card.get("guarantee")
    card, _ = bundle.deployed_operating_point(out.card)
    rule = (f"recall guarantee: {guarantee['statement']}; one threshold, any fold flags"
            if guarantee else f"rule {out.info['threshold_rule']}, half the folds flag")
    shown = {k: ("undefined" if card[k]["estimate"] is None else f"{card[k]['estimate']:.2f}")
             for k in ("precision", "recall", "review_fraction")}
    print(f"exported {len(out.folds)} fold(s) to {args.out}: score {out.score.label}, "
          f"thresholds {[round(out.threshold(f), 4) for f in out.folds]} ({rule}); on the "
          f"study's test folds precision {shown['precision']}, recall {shown['recall']}, "
          f"review fraction {shown['review_fraction']}")
    return 0


def cmd_triage(args: argparse.Namespace) -> int:
    """The BIDS-App entry point; exit 0 when every scan has a verdict, 1 when none could be
    triaged, 3 when it finished with some scans in error, 2 for unusable arguments, inputs or
    bundle (see ``wmhqc_lib.deploy.triage``)."""
    from .deploy import bundle as bundle_mod
    from .deploy import layer, triage

    model = bundle_mod.load_bundle(args.model)
    if args.layer:
        model = layer.load_layer(args.layer, model)
    out = Path(args.output_dir)
    if args.analysis_level == "group":
        table = triage.write_group(out, model)
        ok = int((table["status"] == "ok").sum())
        print(f"group outputs rebuilt from {len(table)} scan record(s) in {out}")
        if not ok:
            return triage.EXIT_NONE
        return triage.EXIT_OK if ok == len(table) else triage.EXIT_SOME_ERRORS
    if args.flair or args.t1:
        if not (args.flair and args.t1):
            raise ValueError("single-scan mode needs both --flair and --t1")
        scans = [triage.single_scan(args.flair, args.t1, args.participant_id, args.site)]
    elif args.manifest:
        scans = triage.scans_from_manifest(args.manifest, args.site)
    else:
        scans = triage.discover_bids(args.bids_dir, args.participant_label, args.session_label,
                                     args.site)
    if not scans:
        raise ValueError(f"{args.bids_dir}: no scan found to triage")
    # the raw dataset is the scans' root: the BIDS folder, or the deepest folder holding every
    # input of a manifest or of --flair/--t1 (the records name the inputs relative to it)
    summary = triage.run_triage(model, scans, out, nprocs=args.nprocs,
                                progress=not args.quiet, group=not args.skip_group,
                                audit_fraction=args.audit_fraction)
    flagged = int(summary.table["flagged"].eq(True).sum())
    audited = int(summary.table["audit"].eq(True).sum())
    where = ("group files left to the group level" if args.skip_group
             else str(out / triage.GROUP_TSV))
    print(f"triaged {summary.n_ok} scan(s) ({summary.mean_seconds:.1f} s per scan), "
          f"{summary.n_error} error(s), {summary.n_skipped} already done; {flagged} flagged "
          f"for review" + (f", {audited} in the audit sample" if audited else "")
          + f"; {where}")
    return summary.exit_code


def _fraction(value: str) -> float:
    """``--audit-fraction``: a share between 0 and 1."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value}: must lie between 0 and 1")
    return number


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Per-site figures of the flags against the reviewers' verdicts, and a site layer."""
    from .deploy import bundle as bundle_mod
    from .deploy import calibrate

    model = bundle_mod.load_bundle(args.model)
    result = calibrate.calibrate(args.output_dir, model, args.verdicts,
                                 target_recall=args.target_recall, confidence=args.confidence)
    print(f"target: recall of failures >= {result.target_recall} with {result.confidence} "
          f"confidence; intervals: {calibrate.INTERVAL}")
    print(result.summary_text())
    n = len(result.contradictions)
    if args.layer_out:
        where = calibrate.write_calibration(result, model, args.layer_out)
        print(f"site layer written to {where} ({calibrate.REPORT_MD}, {calibrate.SITES_TSV}, "
              f"{n} contradiction(s) in {calibrate.CONTRADICTIONS_TSV}); triage with "
              f"--layer {where}")
    else:
        print(f"{n} verdict(s) contradict the flag; no layer written (--layer-out DIR writes "
              "one)")
    return 0


def cmd_check_scale(args: argparse.Namespace) -> int:
    import json
    import os
    import subprocess

    if args.backend:
        loaded = sys.modules.get("keras")
        if loaded is not None and loaded.backend.backend() != args.backend:
            # Keras fixes its backend at import: run the check in a fresh interpreter
            env = dict(os.environ, KERAS_BACKEND=args.backend)
            return subprocess.call([sys.executable, "-m", "wmhqc_lib.cli", *args.argv], env=env)
        os.environ["KERAS_BACKEND"] = args.backend
    from .study import scale

    report = scale.check_scale(_profile(args), cases=args.cases, repeats=args.repeats)
    table = report.table()
    if args.assume_tflops:
        table += "\n\n" + report.at_rate(args.assume_tflops)
    print("\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(report), indent=1))
        print(f"\nwritten: {args.out} and {args.out.with_suffix('.json').name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wmhqc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_profile(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", default=None, type=profile_name, metavar="NAME",
                       help="run profile: a section of wmhqc_lib/profiles.yml, such as smoke, "
                            "cpu, paper or one of your own (default: $WMHQC_PROFILE or cpu)")
        p.add_argument("--seed", type=int, default=None, help="override the profile's seed")

    data = sub.add_parser("data", help="cohort data: synthesize, index, preprocess, folds")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("synth", help="write the synthetic cohort in the datasets' layouts")
    p.add_argument("--out", required=True, type=Path)
    add_profile(p)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--force", action="store_true", help="regenerate even if present")
    p.set_defaults(func=cmd_synth)

    p = dsub.add_parser("index", help="find every subject of a dataset and write a manifest")
    p.add_argument("--dataset", choices=datasets.DATASETS, default=None,
                   help="the dataset's layout; omit for a cohort root holding dataset folders "
                        f"named {', '.join(datasets.DATASETS)}")
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--skip-bad", action="store_true",
                   help="leave bad subjects out (reported) instead of stopping")
    defaults = datasets.IndexOptions()
    p.add_argument("--miccai-label2", default=defaults.miccai_label2,
                   choices=("ignore", "lesion", "background"),
                   help="MICCAI WMH label 2 (other pathology); default: ignore (excluded from "
                        "lesion and from scoring, the challenge's rule)")
    p.add_argument("--isbi-timepoint", default=defaults.isbi_timepoint,
                   help="ISBI 2015 time point to use (default: the earliest)")
    p.add_argument("--isbi-raters", default=defaults.isbi_raters,
                   choices=datasets.ISBI_RATER_CHOICES,
                   help=f"how to combine the two ISBI raters (default: {defaults.isbi_raters})")
    p.add_argument("--msseg-mask", default=defaults.msseg_mask,
                   help="consensus, rater:N, intersection, union or majority "
                        f"(default: {defaults.msseg_mask})")
    p.set_defaults(func=cmd_index)

    p = dsub.add_parser("combine", help="join manifests of several datasets into one cohort")
    p.add_argument("manifests", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_combine)

    p = dsub.add_parser("preprocess", help="preprocess every manifest row into a cache")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None, help="write the per-case table here")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--skip-bad", action="store_true")
    add_profile(p)
    p.set_defaults(func=cmd_preprocess)

    p = dsub.add_parser("folds", help="stratified cross-validation folds")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--preprocess-table", type=Path, default=None,
                   help="stratify by load %% of brain volume from this table (default: "
                        "lesion volume from the manifest)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n-folds", type=int, default=None)
    add_profile(p)
    p.set_defaults(func=cmd_folds)

    p = sub.add_parser("reproduce", help="run the whole study and build the book")
    add_profile(p)
    p.add_argument("--data-root", type=Path, default=None,
                   help="real data (cohort root or one dataset); default: synthetic cohort")
    p.add_argument("--results", type=Path, default=None, help="default: results/<profile>")
    p.add_argument("--folds", type=int, nargs="*", default=None,
                   help="folds to run for per-fold steps (default: all)")
    p.add_argument("--no-book", action="store_true", help="skip the book build")
    p.add_argument("--stage", choices=("data", "folds", "final"), default=None,
                   help="run one part of the chain (as the cluster jobs do): data = all-fold "
                        "steps before the first per-fold one, folds = per-fold steps, final = "
                        "the remaining all-fold steps and the book (default: everything)")
    p.add_argument("--step", action="append", default=[], metavar="NAME",
                   help="run only this step of the chain or stage, e.g. 02_mc_unet (repeat "
                        "for more; its upstream steps must have run); no book")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("check-scale", help="time every network at a profile's sizes and "
                                           "project one fold and the whole study",
                       description="Check that the profile's sizes can work, build every "
                                   "network at them, time one training step of each, a "
                                   "whole-volume validation pass, the Monte Carlo inference of "
                                   "one full-size case, one reconstruction and one Dice "
                                   "regressor step on the device present, and project one "
                                   "fold and the study from the profile's epochs, steps and "
                                   "case counts. Exit status 2 when a size cannot work.")
    add_profile(p)
    p.add_argument("--backend", choices=("tensorflow", "jax"), default=None,
                   help="Keras backend (default: $KERAS_BACKEND, else TensorFlow when "
                        "installed, else JAX)")
    p.add_argument("--cases", type=int, default=None,
                   help="cases in the cohort (default: the profile's synthetic cohort)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per stage (median)")
    p.add_argument("--assume-tflops", type=float, default=None, metavar="RATE",
                   help="also project the study's convolution work at this sustained rate "
                        "(TFLOP/s) of a device not measured here, marked as a projection")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the table (Markdown) and the figures (JSON beside it)")
    p.set_defaults(func=cmd_check_scale)

    p = sub.add_parser("slurm", help="submit the study to a SLURM cluster (job array)",
                       description="Write three job scripts under <results>/slurm and submit "
                                   "them with sbatch: the data job, an array with one task "
                                   "per fold (after the data job), and the final all-fold "
                                   "job with the book (after the whole array).")
    add_profile(p)
    p.add_argument("--data-root", type=Path, default=None,
                   help="real data (cohort root or one dataset); default: synthetic cohort")
    p.add_argument("--results", type=Path, default=None, help="default: results/<profile>")
    p.add_argument("--folds", type=int, nargs="*", default=None,
                   help="array tasks, one per fold (default: all of the profile's folds)")
    p.add_argument("--partition", required=True)
    p.add_argument("--account", default=None)
    p.add_argument("--gpus", type=int, default=0, help="GPUs per fold task (default 0)")
    p.add_argument("--gpu-option", choices=("gres", "gpus"), default="gres",
                   help="request GPUs as --gres=gpu:N (default) or --gpus=N")
    p.add_argument("--gpu-type", default=None, help="e.g. a100: --gres=gpu:a100:N")
    p.add_argument("--time-data", default="02:00:00", help="data job limit (default 02:00:00)")
    p.add_argument("--time-fold", default="24:00:00",
                   help="limit per fold task (default 24:00:00)")
    p.add_argument("--time-final", default="02:00:00",
                   help="final job limit (default 02:00:00)")
    p.add_argument("--cpus", type=int, default=4, help="CPUs per job (default 4)")
    p.add_argument("--mem", default="32G", help="memory per job (default 32G)")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="at most this many fold tasks at once (--array=...%%N)")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option for every job (repeatable), written with =: "
                        "--sbatch-option=--qos=long")
    p.add_argument("--setup", default="source .venv/bin/activate",
                   help="shell line run in the repository before wmhqc (default: "
                        "'source .venv/bin/activate'), e.g. 'module load cuda && source ...'")
    p.add_argument("--backend", default=None, help="KERAS_BACKEND for the jobs, e.g. jax")
    p.add_argument("--dry-run", action="store_true",
                   help="only write the scripts and print the sbatch command lines")
    p.set_defaults(func=cmd_slurm)

    from .deploy import cluster

    p = sub.add_parser("triage-slurm", help="triage a BIDS dataset on a SLURM cluster "
                                            "(job array, then the group level)",
                       description=cluster.DESCRIPTION)
    cluster.add_arguments(p)
    p.set_defaults(func=cluster.cmd_triage_slurm)

    p = sub.add_parser("evaluate", help="metrics of one QC score from a per-case CSV (JSON)",
                       description="Evaluate one QC score against true Dice; prints one JSON "
                                   "object. Positive class = failed case (Dice < quality "
                                   "threshold); paper_* = the authors' swapped convention. "
                                   "With a split column only test rows are scored; with a "
                                   "fold column per-fold results are added. A score "
                                   "registered in QC_SCORES (e.g. mean_entropy_lesion) takes "
                                   "its direction and Dice scale from the registry unless a "
                                   "flag overrides them; any other column must say "
                                   "--higher-is-better or --lower-is-better (it is not "
                                   "guessed) and has no Dice scale unless --dice-scale.")
    p.add_argument("cases", type=Path, help="per-case CSV: a true Dice column and the score; "
                                             "optional fold and split (train/val/test)")
    p.add_argument("--score", required=True, help="the score column")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, default=None,
                     help="flag cases with score < T (> T with --lower-is-better)")
    how.add_argument("--select-threshold", default=None, metavar="{f1,youden,recall:R}",
                     help="choose each fold's threshold on its val rows, apply it to its test "
                          "rows (needs a split column)")
    direction = p.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher_is_better", action="store_const",
                           const=True, default=None,
                           help="a higher score means better quality (e.g. predicted Dice)")
    direction.add_argument("--lower-is-better", dest="higher_is_better", action="store_const",
                           const=False,
                           help="a lower score means better quality (e.g. entropy)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--dice-scale", dest="dice_scale", action="store_const", const=True,
                       default=None, help="the score predicts Dice: also report mae")
    scale.add_argument("--no-dice-scale", dest="dice_scale", action="store_const", const=False,
                       help="the score does not predict Dice: no mae")
    p.add_argument("--quality-threshold", type=float, default=None,
                   help="a case fails when its lesion Dice is below this (default 0.5, "
                        "qc/evaluation.py's QUALITY_THRESHOLD, as in the study; the paper's "
                        "0.75 was on two-class Dice)")
    p.add_argument("--dice-column", default="true_dice", help="default: true_dice")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a finished study as a QC model bundle",
                       description="Copy every fold's networks, the preprocessing settings, the "
                                   "QC score and each fold's validation-chosen threshold, and "
                                   "a model card of the study's test-fold operating point into "
                                   "a checksummed bundle for `wmhqc triage`.")
    p.add_argument("--results", required=True, type=Path, help="results/<profile> of a run")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--profile", default=None, type=profile_name, metavar="NAME",
                   help="the run's profile, a section of wmhqc_lib/profiles.yml (default: the "
                        "results folder's name)")
    p.add_argument("--score", default=None,
                   help="QC score to carry (default: lowest AURC on pooled validation rows)")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="folds to export (default: every fold of the profile)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--target-recall", type=float, default=None, metavar="R",
                   help="instead of a threshold per fold, one threshold whose recall of failed "
                        "segmentations is at least R with --confidence, chosen on the pooled "
                        "validation cases (a scan is flagged when any fold flags it); fails, "
                        "writing nothing, when too few failures were labelled")
    p.add_argument("--confidence", type=float, default=None, metavar="C",
                   help="confidence of --target-recall (default 0.9)")
    p.set_defaults(func=cmd_export, export_parser=p)

    p = sub.add_parser("triage", help="segment new scans and flag those to review (BIDS App)",
                       description="BIDS-App usage: wmhqc triage BIDS_DIR OUTPUT_DIR "
                                   "participant --model BUNDLE. Without BIDS: --manifest CSV "
                                   "or --flair F --t1 T (BIDS_DIR is then ignored; pass -). "
                                   "Writes a BIDS derivative dataset with group_qc.tsv; a "
                                   "rerun redoes only scans without a verdict or whose bundle "
                                   "or input files changed.",
                       epilog="exit status: 0 every scan has a verdict; 1 no scan could be "
                              "triaged; 2 unusable arguments, inputs or bundle; 3 finished, "
                              "but some scans are in error (their records and group_qc.tsv "
                              "say why).")
    p.add_argument("bids_dir", help="BIDS dataset root (or - with --manifest/--flair)")
    p.add_argument("output_dir", help="derivative dataset to write")
    p.add_argument("analysis_level", choices=("participant", "group"))
    p.add_argument("--model", required=True, help="bundle written by `wmhqc export`")
    p.add_argument("--participant-label", "--participant_label", nargs="+", default=(),
                   help="labels to triage (without sub-); default all")
    p.add_argument("--session-label", "--session_label", nargs="+", default=(),
                   help="sessions to triage (without ses-); default all")
    p.add_argument("--manifest", default=None, help="CSV with subject_id, flair, t1 columns")
    p.add_argument("--flair", default=None, help="one FLAIR (with --t1)")
    p.add_argument("--t1", default=None, help="its T1")
    p.add_argument("--participant-id", default="01", help="label for --flair/--t1 (default 01)")
    p.add_argument("--nprocs", type=int, default=1,
                   help="worker processes that preprocess the scans and draw the report pages")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--site", default=None,
                   help="site of the scans that have none (BIDS: participants.tsv's site "
                        "column; manifest: its site column); picks a --layer's site rule")
    p.add_argument("--layer", default=None, metavar="DIR",
                   help="site layer written by `wmhqc calibrate` for this bundle: the scans of "
                        "its calibrated sites get their site's threshold")
    p.add_argument("--audit-fraction", type=_fraction, default=0.0, metavar="F",
                   help="mark this share of all scans, flagged or not, as an audit sample for "
                        "review (drawn from the bundle's seed and each scan's participant and "
                        "session; default 0): the reviewers' verdicts on it measure recall")
    p.add_argument("--skip-group", action="store_true",
                   help="participant level: write the scans' files only, not group_qc.tsv "
                        "or the pages (for several processes sharing one output folder; run "
                        "the group level afterwards)")
    p.set_defaults(func=cmd_triage)

    p = sub.add_parser("calibrate", help="the flags against reviewers' verdicts per site, and "
                                         "a site layer with a recall guarantee",
                       description="Read a triage output's records and the verdicts.tsv its "
                                   "group page exported; print per site the realised recall, "
                                   "precision and review fraction of the flags (Wilson 95 % "
                                   "intervals), list the verdicts that contradict the flag, "
                                   "and re-choose each site's threshold with the recall "
                                   "guarantee on its audit sample (or on every scan when all "
                                   "were reviewed). With --layer-out, write them as a new site "
                                   "layer for `wmhqc triage --layer` (the bundle is never "
                                   "edited).",
                       epilog="exit status: 0 done; 2 unusable arguments, bundle, triage "
                              "output or verdict file (the message names the line).")
    p.add_argument("output_dir", help="triage output (derivative dataset) the verdicts are on")
    p.add_argument("--model", required=True, help="the bundle that triaged it")
    p.add_argument("--verdicts", required=True, help="verdicts.tsv exported by the group page")
    p.add_argument("--layer-out", default=None, metavar="DIR",
                   help="write the site layer into this new folder (not inside the bundle)")
    p.add_argument("--target-recall", type=float, default=0.9, metavar="R",
                   help="recall of failed segmentations each site threshold guarantees "
                        "(default 0.9)")
    p.add_argument("--confidence", type=float, default=0.9, metavar="C",
                   help="confidence of the guarantee (default 0.9)")
    p.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except (DataError, FileExistsError, FileNotFoundError, ValueError) as exc:  # BundleError too
        print(f"wmhqc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
