"""``medseg``: a thin command line over the Python API.

Heavy libraries are imported inside the commands, so ``medseg --help`` is instant. Errors caused by
input print one line (``error: ...``) and exit non-zero; ``--debug`` shows the traceback.

Exit codes: 0 success; 1 some cases failed (``segment``) or an unexpected error; 2 bad input, config
or command line, no case succeeded, or ``check`` found a problem.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

log = logging.getLogger("medseg")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after options; dotted overrides may come anywhere.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = getattr(args, "debug", False)  # flags default to SUPPRESS (see _parser)
    args.quiet = getattr(args, "quiet", False)
    _setup_logging(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from pipeline.errors import describe_error, find_medseg_error

        known = find_medseg_error(exc)  # MONAI wraps errors raised inside transforms
        if known is not None:
            print(f"error: {known}", file=sys.stderr)
            return known.exit_code
        print(f"error: {describe_error(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return 1


# --- commands -------------------------------------------------------------------------------------


def cmd_synth(args) -> int:
    from pipeline.synth import synthesize, synthesize_mr

    write = synthesize_mr if args.kind == "mr" else synthesize
    root = write(args.out_dir, cases=args.cases, seed=args.seed, test_fraction=args.test_fraction,
                 dicom_test_cases=args.dicom_test_cases)
    print(f"synthetic dataset: {root}")
    return 0


def cmd_convert(args) -> int:
    from pipeline.config import load_config
    from pipeline.convert import convert_folder

    config = load_config(args.config, args.overrides)
    rows = convert_folder(args.input_dir, args.output_dir, config.input, keep_paths=args.keep_paths)
    converted = [r for r in rows if r.status == "converted"]
    failed = [r for r in rows if r.status == "failed"]
    skipped = [r for r in rows if r.status == "skipped"]
    for r in failed:
        print(f"failed: {r.case_id} ({r.source}): {r.reason}", file=sys.stderr)
    print(f"converted {len(converted)} volume(s) into {args.output_dir} ({len(skipped)} skipped, "
          f"{len(failed)} failed); index: {args.output_dir}/index.csv")
    if not converted:
        print("error: nothing could be converted (see index.csv for the reasons)", file=sys.stderr)
        return 2
    return 1 if failed else 0


def cmd_check(args) -> int:
    from pipeline.dataset import check_dataset

    labels = dict(args.labels) if args.labels else None
    tolerance = {} if args.tolerance is None else {"affine_tolerance_mm": args.tolerance}
    report = check_dataset(args.dataset, labels=labels, split=args.split, progress=not args.quiet, **tolerance)
    for line in report.lines():
        print(f"error: {line}")
    print(f"{report.cases} case(s), {len(report.problems)} problem(s) ({report.layout} layout, {args.dataset})")
    return 0 if report.ok else 2


def cmd_plan(args) -> int:
    from pipeline.dataset import check_dataset
    from pipeline.plan import plan_dataset

    report = check_dataset(args.dataset, progress=not args.quiet)
    if not report.ok:
        for line in report.lines():
            print(f"error: {line}")
        print(f"{report.cases} case(s), {len(report.problems)} problem(s): fix them (medseg check {args.dataset}) "
              "and plan again")
        return 2
    result = plan_dataset(args.dataset, args.out, device=args.device, memory_gb=args.memory_gb, hours=args.hours,
                          check=False, progress=not args.quiet, infer_seconds=args.infer_seconds)
    for key, value, reason in result.choices:
        print(f"{key:<32} {str(value):<28} {reason}")
    if result.step_seconds is not None:
        print(f"measured training step: {result.step_seconds:.3f} s")
    if result.inference_estimate is not None:
        est = result.inference_estimate
        print(f"estimated segment network time: {est['estimated_seconds']:.1f} s for the median case "
              f"({est['windows']} windows x {est['seconds_per_window']:.3f} s, {est['threads']} thread(s)"
              + (f", {est['estimated_cpu_seconds']:.1f} CPU s" if "estimated_cpu_seconds" in est else "") + "); "
              f"{est['ct_estimated_seconds']:.0f} s for a 512x512x400 CT ({est['ct_windows']} windows)"
              + ("" if est["fits"] else f": OVER the {est['budget_seconds']:g} s budget"))
    print(f"plans: {result.plans}  fingerprint: {result.fingerprint}")
    print(f"train it: medseg train {result.plans}")
    return 0


def cmd_train(args) -> int:
    from pipeline import distributed
    from pipeline.config import load_config
    from pipeline.training import train

    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)
    world = distributed.World.from_env()  # under torchrun: rank 0 alone reports (and logs above warnings)
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        if args.fold == "all":
            from pipeline.training import train_folds

            results = train_folds(config, resume=args.resume, progress=not args.quiet)
        else:
            results = [train(config, resume=args.resume, progress=not args.quiet, fold=args.fold)]
    finally:
        distributed.teardown()
    if not world.is_main:
        return 0
    for result in results:
        print(f"best checkpoint: {result.best} (validation Dice {result.best_metric:.3f})")
        print(f"last checkpoint: {result.last}; log: {result.log_csv}")
    return 0


def cmd_cv(args) -> int:
    from pipeline.cv import run_cv

    result = run_cv(args.out_dir, device=args.device, progress=not args.quiet)
    if result.missing_folds:
        print(f"warning: no best.pt for fold(s) {result.missing_folds}: evaluated the other folds only",
              file=sys.stderr)
    for name, value in result.mean_dice.items():
        print(f"mean Dice {name}: {value:.4f}")
    for name, value in result.mean_dice_postprocessed.items():
        print(f"mean Dice {name} after post-processing: {value:.4f}")
    print(f"post-processing chosen: {result.chosen or 'none'}")
    print(f"out-of-fold predictions, metrics.csv, summary.json and postprocessing.json in {result.cv_dir}")
    return 0


def cmd_segment(args) -> int:
    from pipeline.distributed import World

    if not World.from_env().distributed:
        return _segment(args)
    # torchrun: every rank its shard, rank 0 merges the manifests (pipeline.batch.distributed)
    from pipeline.batch.distributed import segment_distributed
    from pipeline.errors import InputError

    if args.shard:
        raise InputError(f"--shard {args.shard} under torchrun: each rank takes shard RANK+1/WORLD_SIZE itself; "
                         "drop --shard (or run without torchrun, one --shard per process)")

    def run_shard(shard: str, device: str) -> int:
        return _segment(argparse.Namespace(**{**vars(args), "shard": shard, "device": device}))

    code = segment_distributed(run_shard, args.output_dir, args.device)
    if World.from_env().is_main:
        print(f"merged manifest of {World.from_env().size} ranks: {args.output_dir}/manifest.csv (exit code {code})")
    return code


def _segment(args) -> int:
    import time
    from pathlib import Path

    from pipeline.batch import exit_code, segment_folder, summarise
    from pipeline.batch.report import RunFiles, Shard
    from pipeline.distributed import World

    start = time.perf_counter()
    # `--model A B` takes what follows it: dotted overrides given after it are overrides, not models
    models = [m for m in args.model if "=" not in m or Path(m).exists()]
    args.overrides = list(args.overrides) + [m for m in args.model if m not in models]
    model = models[0] if len(models) == 1 else models
    select = None
    if args.overrides:  # input.* rules on top of the model's own
        from pipeline.config import override_config
        from pipeline.infer import Segmenter

        model = Segmenter.from_checkpoints(model, device=args.device, backend=args.backend, tta=args.tta)
        output_rules = [o for o in args.overrides if o.startswith("output.")]  # e.g. output.anatomic_region
        if output_rules:
            model.config = override_config(model.config, output_rules, allowed_prefix="output.")
        select = override_config(model.config, [o for o in args.overrides if o not in output_rules],
                                 allowed_prefix="input.").input
    from pipeline.archive.url import is_archive_url

    if is_archive_url(args.input_dir):
        return _segment_archive(args, model, select, start)
    if args.push or args.query or args.study:
        print("error: --push, --query and --study need a dicomweb+http(s):// address as the input", file=sys.stderr)
        return 2
    results = segment_folder(args.input_dir, args.output_dir, model, device=args.device, backend=args.backend,
                             overwrite=args.overwrite, shard=args.shard, dicom_seg=args.dicom_seg,
                             qc=not args.no_qc, progress=not args.quiet, select=select,
                             keep_paths=args.keep_paths, tta=args.tta, save_probabilities=args.save_probabilities,
                             probabilities_dtype=args.probabilities_dtype, rtstruct=args.rtstruct)
    s = summarise(results)
    for r in results:
        if r.status == "failed":
            print(f"failed: {r.case_id} ({r.source}): {r.error}", file=sys.stderr)
    skipped = [r for r in results if r.status == "skipped"]
    for r in skipped[:10]:
        print(f"skipped: {r.case_id or r.source}: {r.error}")
    if len(skipped) > 10:
        print(f"skipped: ... and {len(skipped) - 10} more (see the manifest)")
    print(f"segmented {s['done']}/{s['done'] + s['failed']} cases into {args.output_dir}"
          + (f"; {s['failed']} failed" if s["failed"] else "") + (f"; {s['skipped']} skipped" if skipped else ""))
    print(f"done {s['done']} ({s['resumed']} from an earlier run), skipped {s['skipped']}, failed {s['failed']}; "
          f"{s['lesions']} lesion(s), {s['lesion_volume_ml']:.2f} mL; {time.perf_counter() - start:.1f} s")
    files = RunFiles(Path(args.output_dir), Shard.parse(args.shard))
    if files.shard:
        print(f"manifest part: {files.manifest_csv}; when every shard is done: medseg manifest {args.output_dir}"
              + (" (under torchrun rank 0 does it)" if World.from_env().distributed else ""))
    else:
        print(f"manifest: {files.manifest_csv}  lesions: {files.lesions_csv}  report: {files.index_html}")
    return exit_code(results)


def _segment_archive(args, model, select, start: float) -> int:
    """``medseg segment dicomweb+http://HOST:PORT/dicom-web OUT ...``: :func:`pipeline.archive.run.segment_archive`."""
    import time

    from pipeline.archive.client import ClientOptions
    from pipeline.archive.run import ArchiveOptions, segment_archive
    from pipeline.batch import exit_code, summarise

    if args.shard or args.save_probabilities or args.keep_paths:
        print("error: --shard, --save-probabilities and --keep-paths are for folders, not DICOMweb archives",
              file=sys.stderr)
        return 2
    options = ArchiveOptions(query=args.query, studies=list(args.study or []), push=args.push,
                             credentials_file=args.credentials,
                             client=ClientOptions(ca_bundle=args.ca_bundle, insecure=args.insecure,
                                                  timeout_s=args.timeout))
    run = segment_archive(args.input_dir, args.output_dir, model, archive=options, device=args.device,
                          backend=args.backend, overwrite=args.overwrite, dicom_seg=args.dicom_seg,
                          qc=not args.no_qc, progress=not args.quiet, select=select, tta=args.tta,
                          rtstruct=args.rtstruct)
    results = run.results
    for r in results:
        if r.status == "failed":
            print(f"failed: {r.case_id}: {r.error}", file=sys.stderr)
        elif r.push_error:
            print(f"not pushed: {r.case_id}: {r.push_error}", file=sys.stderr)
    s = summarise(results)
    print(f"archive: {run.studies} study(ies), {run.series} series; retrieved {run.retrieved}, "
          f"{run.kept} kept from an earlier run" + (f"; stored {run.stored} file(s)" if args.push else ""))
    print(f"done {s['done']} ({s['resumed']} from an earlier run), skipped {s['skipped']}, failed {s['failed']}"
          + (f", not pushed {run.push_failed}" if args.push else "")
          + f"; {s['lesions']} lesion(s), {s['lesion_volume_ml']:.2f} mL; {time.perf_counter() - start:.1f} s")
    code = exit_code(results)
    return max(code, 1) if run.push_failed and s["done"] else code


def cmd_export(args) -> int:
    from pipeline.export import export_model

    result = export_model(args.checkpoint, args.out, format=args.format, overwrite=args.overwrite)
    print(f"exported {args.format}: {result.path} in {result.seconds:.1f} s (verified against the checkpoint: "
          f"largest logit difference {result.max_abs_diff:.2g})")
    return 0


def cmd_cache(args) -> int:
    from pipeline.infer.cache import clear_cache, list_cache

    if args.action == "clear":
        done = clear_cache(args.what)
        print(f"cache clear {args.what}: deleted {done['files']} file(s), {done['bytes'] / 1e6:.1f} MB")
        return 0
    listing = list_cache()
    cap = listing["max_bytes"]
    print(f"cache {listing['path']}: {listing['total_bytes'] / 1e6:.1f} MB "
          f"(cap {f'{cap / 1e9:.2f} GB' if cap else 'none'}, MEDSEG_CACHE_MAX_GB)")
    for kind, info in listing["kinds"].items():
        print(f"  {kind:<9} {info['files']:>4} file(s) {info['bytes'] / 1e6:>9.1f} MB")
        if not args.quiet:
            for entry in info["entries"]:
                print(f"    {entry['bytes'] / 1e6:>9.1f} MB  {', '.join(entry['files'])}")
    return 0


def cmd_validate(args) -> int:
    from pipeline.io.validate import validate_dicom

    failed = 0
    for path in args.files:
        result = validate_dicom(path)
        print(f"{path}: {result.iod or '?'}: {len(result.errors)} error(s), {len(result.warnings)} warning(s)")
        for line in result.errors + (result.warnings if not args.quiet else []):
            print(f"  {line}")
        failed += bool(result.errors)
    return 1 if failed else 0


def cmd_manifest(args) -> int:
    from pathlib import Path

    from pipeline.batch.report import rebuild_reports

    rows = rebuild_reports(args.output_dir)
    counts = {status: sum(r.get("status") == status for r in rows) for status in ("done", "skipped", "failed")}
    lesions = sum(int(r.get("lesion_count") or 0) for r in rows if r.get("status") == "done")
    print(f"{len(rows)} cases: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; "
          f"{lesions} lesion(s) -> {Path(args.output_dir) / 'manifest.csv'}, lesions.csv, index.html")
    if counts["failed"] and not counts["done"]:
        return 2
    return 1 if counts["failed"] else 0


def cmd_evaluate(args) -> int:
    from pipeline.evaluate import EvaluationOptions, evaluate_folder

    options = EvaluationOptions(labels=tuple(args.labels) if args.labels else None,
                                nsd_tolerance_mm=args.nsd_tolerance, min_overlap_iou=args.min_overlap_iou,
                                size_bins_mm3=tuple(args.size_bins))
    rows, summary = evaluate_folder(args.pred_dir, args.gt_dir, args.out, options, progress=not args.quiet)
    _print_case_table(rows)
    _print_summary(summary)
    if args.out:
        print(f"metrics.csv, summary.json and plots in {args.out}")
    return 0


def cmd_demo(args) -> int:
    from pipeline.config import load_config
    from pipeline.demo import run_demo

    config = load_config(args.config, args.overrides)
    result = run_demo(config, args.out, progress=not args.quiet)
    _print_case_table(result.cases)
    failed = [r for r in result.segmented if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.case_id}: {r.error}", file=sys.stderr)
    s = result.summary
    print(f"cases: {s['n_cases']}  lesion recall: {s['lesion_recall']:.2f}  lesion precision: "
          f"{s['lesion_precision']:.2f}  time: {s['seconds']:.0f} s  -> {args.out}/summary.json")
    print(f"mean lesion Dice: {s['mean_dice']:.2f}")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    from pipeline.benchmarks.bench import print_table, run_bench, save_results

    if args.ensemble:  # only the ensemble's memory against one model's
        from pipeline.benchmarks.ensemble_rss import ensemble_rss, print_ensemble_rss

        results = ensemble_rss(args.config, args.work_dir, ensemble=args.ensemble, tta=args.tta,
                               repeats=args.repeats, overrides=args.overrides, reduced=not args.full_size,
                               progress=None if not args.quiet else (lambda line: None))
        print_ensemble_rss(results)
        if args.json:
            print(f"results: {save_results(results, args.json)}")
        return 0

    if args.rss_vs_n:  # peak RSS and time of segment against the number of slices
        from pipeline.benchmarks.rss_vs_n import print_rss_vs_n, rss_vs_n

        results = rss_vs_n(args.work_dir, args.model, large=args.large, repeats=args.repeats,
                           progress=None if not args.quiet else (lambda line: None))
        print_rss_vs_n(results)
        if args.json:
            print(f"results: {save_results(results, args.json)}")
        return 0

    if args.levers:  # every inference speed lever against the reference pass, with the accuracy contract
        from pipeline.benchmarks.levers import print_levers, run_levers, select_levers

        results = run_levers(args.model, args.data, repeats=args.repeats, max_cases=args.max_cases,
                             levers=select_levers(args.lever),
                             large_shape=args.large_shape, work_dir=args.work_dir,
                             progress=None if not args.quiet else (lambda line: None))
        print_levers(results)
        if args.json:
            print(f"results: {save_results(results, args.json)}")
        return 0

    results = run_bench(args.config, args.work_dir, repeats=args.repeats, quick=args.quick,
                        overrides=args.overrides, compare_on=args.compare_on,
                        progress=None if not args.quiet else (lambda line: None))
    print_table(results)
    if args.json:
        print(f"results: {save_results(results, args.json)}")
    return 0


def _print_case_table(rows) -> None:
    import math

    def number(value: float, digits: int) -> str:
        return "-" if math.isnan(value) else f"{value:.{digits}f}"

    print(f"{'case':<16}{'label':>6}{'dice':>7}{'hd95mm':>8}{'nsd':>7}{'gt':>5}{'pred':>6}{'tp':>5}{'fp':>5}{'fn':>5}")
    for r in rows:
        dice = f"{r.dice:.3f}" if r.lesions_gt else "-"
        print(f"{r.case_id:<16}{r.label:>6}{dice:>7}{number(r.hd95_mm, 1):>8}{number(r.nsd, 3):>7}{r.lesions_gt:>5}"
              f"{r.lesions_pred:>6}{r.lesion_tp:>5}{r.lesion_fp:>5}{r.lesion_fn:>5}")


def _print_summary(s: dict) -> None:
    print(f"cases: {s['n_cases']}  lesion recall: {s['lesion_recall']:.2f}  lesion precision: {s['lesion_precision']:.2f}")
    for label, stats in s.get("per_label", {}).items():
        m = stats["metrics"]
        print(f"label {label} over all {stats['n_cases']} cases: Dice {m['dice']['mean']:.3f} ± {m['dice']['std']:.3f}"
              f"  HD95 median {m['hd95_mm']['median']:.2f} mm  NSD mean {m['nsd']['mean']:.3f}  ({stats['n_both_empty']}"
              f" without the label, distances undefined in {stats['n_distance_undefined']})")
    print(f"mean lesion Dice: {s['mean_dice']:.2f}")


# --- argument parsing ----------------------------------------------------------------------------


def _fold(text: str):
    """``--fold``: a fold number >= 0, or ``all``."""
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number (0, 1, ...) or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a fold number >= 0 or 'all', got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _shard(text: str) -> str:
    from pipeline.batch.report.outputs import Shard
    from pipeline.errors import InputError

    try:
        return str(Shard.parse(text))
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _label_pair(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a non-negative integer value, e.g. lesion=1; "
                                         f"got {text!r}")
    return name, int(value)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.9], got {text!r}") from None
    if not 0.0 <= value <= 0.9:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.9], got {value}")
    return value


_KEEP_PATHS_HELP = ("write full source paths in the outputs and logs (default: relative to INPUT_DIR, with "
                    "folders named after a patient's name, ID or accession number replaced by patient-<hash>)")


def _parser() -> argparse.ArgumentParser:
    from pipeline.config.schema import (  # torch-free
        BACKENDS,
        CACHE_KINDS,
        EXPORT_FORMATS,
        PROBABILITY_DTYPES,
        SYNTH_KINDS,
        TTA_MODES,
    )

    # The flags work before or after the command; SUPPRESS keeps a subcommand's copy from resetting
    # a flag given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, warnings and errors only")

    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Lesion segmentation for CT/MR scans (DICOM series or NIfTI); masks in the source geometry.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", parents=[common],
                       help="generate a synthetic lesion dataset: CT, or FLAIR + T1c MR (nnU-Net layout)")
    p.add_argument("out_dir")
    p.add_argument("--kind", choices=SYNTH_KINDS, default="ct",
                   help="ct: one CT channel, label lesion; mr: FLAIR + T1c, labels oedema and core")
    p.add_argument("--cases", type=_positive_int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=_fraction, default=0.25)
    p.add_argument("--dicom-test-cases", type=int, default=2, help="test cases written as DICOM series")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", parents=[common],
                       help="write every scan under a folder (DICOM series, NRRD, ...) as <case>.nii.gz + index.csv")
    p.add_argument("input_dir", help="folder of DICOM series and/or volume files (searched recursively)")
    p.add_argument("output_dir", help="NIfTI files and index.csv are written here")
    p.add_argument("overrides", nargs="*", help="selection and repair rules, e.g. input.modalities=[CT] "
                                                "input.on_missing_slices=resample")
    p.add_argument("--config", default=None, help="YAML config whose input: section to use (default: built-in)")
    p.add_argument("--keep-paths", action="store_true", help=_KEEP_PATHS_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("check", parents=[common],
                       help="read every file of a dataset (nnU-Net v2, MSD, plain folder) and list every problem")
    p.add_argument("dataset", help="dataset folder: imagesTr/ + labelsTr/, with or without dataset.json")
    p.add_argument("--labels", type=_label_pair, nargs="+", default=None, metavar="NAME=VALUE",
                   help="the allowed label values, e.g. background=0 lesion=1 (default: dataset.json's labels)")
    p.add_argument("--split", choices=("Tr", "Ts"), default="Tr", help="imagesTr/labelsTr (default) or imagesTs/labelsTs")
    p.add_argument("--tolerance", type=_non_negative_float, default=None, metavar="MM",
                   help="largest difference of two grids' affine entries (voxel axes, origin) in mm (default 0.001)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", parents=[common],
                       help="choose a complete training config from a dataset (spacing, patch, network, schedule)")
    p.add_argument("dataset", help="dataset folder: imagesTr/ + labelsTr/, with or without dataset.json")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where plans.yaml and fingerprint.json go (default: runs/plan/<dataset folder name>)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where training will run (cpu: steps timed here, training fitted to --hours, default 0.5)")
    p.add_argument("--memory-gb", type=_positive_float, default=None, metavar="N",
                   help="memory a training step may use (default: 25%% of the RAM on cpu, the GPU's memory on cuda)")
    p.add_argument("--hours", type=_positive_float, default=None, metavar="H",
                   help="training time budget; steps are timed on this machine (default on cpu: 0.5)")
    p.add_argument("--infer-seconds", type=_non_negative_float, default=None, metavar="S",
                   help="network time segment may take on the median training case; windows are timed on this "
                        "machine, and features, depth, then spacing step down to fit (default on cpu: 30; "
                        "0: estimate only; none on cuda)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", parents=[common], help="train a model from a YAML config")
    p.add_argument("config", help="YAML config, e.g. configs/lesion3d.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 model.features=16")
    p.add_argument("--resume", action="store_true", help="continue from train.out_dir/last.pt")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (sets train.device)")
    p.add_argument("--fold", type=_fold, default=None, metavar="K|all",
                   help="cross-validation fold K (0-based, < data.folds) into train.out_dir/fold_K, or 'all' "
                        "(every fold in turn; finished folds are skipped); splits: train.out_dir/splits.json")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", parents=[common],
                       help="evaluate the folds of `train --fold` on their validation cases, choose post-processing")
    p.add_argument("out_dir", help="the train.out_dir of the folds (holding splits.json and fold_K/best.pt)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("segment", parents=[common], help="segment every scan under a folder")
    p.add_argument("input_dir", help="folder of NIfTI files and/or DICOM series (searched recursively), or a "
                                     "DICOMweb archive: dicomweb+http(s)://HOST:PORT/PATH")
    p.add_argument("output_dir", help="masks are written as <case>_seg.nii.gz")
    p.add_argument("overrides", nargs="*", help="input selection/repair rules on top of the model's, e.g. "
                                                "input.modalities=[CT] input.on_gantry_tilt=resample; "
                                                "output.anatomic_region=SCT:10200004:Liver for SEG/RTSTRUCT")
    p.add_argument("--model", required=True, nargs="+", metavar="MODEL",
                   help="checkpoint written by `medseg train` (best.pt); several, or a training folder (its "
                        "fold_*/best.pt), for an ensemble averaging their softmax probabilities")
    p.add_argument("--tta", default=None, choices=TTA_MODES,
                   help="test-time augmentation (default: the model's inference.tta); mirror: average over the "
                        "flips of the spatial axes (3D: 8, 2D: 4)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write <case>_prob.nii.gz in the source geometry (binary: P(lesion), 3D; more "
                        "classes: one channel per class, 4D x,y,z,c)")
    p.add_argument("--probabilities-dtype", default="uint8", choices=PROBABILITY_DTYPES,
                   help="uint8: round(p*255) (default); float16: float16 values, stored as float32 (NIfTI-1 has "
                        "no 16-bit float)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="how the network runs (default: the model's inference.backend, auto: the fastest one "
                        "whose masks agree with torch fp32, measured once on this machine; int8: "
                        "inference.precision=int8)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every case (default: keep cases already done with the same model and settings)")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="process shard I of N (1-based), e.g. 2/4: N processes can share one output folder")
    p.add_argument("--dicom-seg", action="store_true", help="also write <case>_seg.dcm (DICOM SEG) for DICOM series")
    p.add_argument("--rtstruct", action="store_true",
                   help="also write <case>_rtstruct.dcm (RT Structure Set, one ROI per label) for DICOM series")
    p.add_argument("--no-qc", action="store_true", help="no QC pictures (qc/<case>.png)")
    p.add_argument("--keep-paths", action="store_true", help=_KEEP_PATHS_HELP)
    archive = p.add_argument_group("DICOMweb archive (INPUT_DIR = dicomweb+http(s)://HOST:PORT/PATH)")
    archive.add_argument("--query", default=None, metavar="KEY=VALUE&...",
                         help="QIDO-RS search, e.g. \"Modality=CT&StudyDate=20240101-20241231\"")
    archive.add_argument("--study", nargs="+", default=None, metavar="UID", help="only these StudyInstanceUIDs")
    archive.add_argument("--push", action="store_true",
                         help="store each <case>_seg.dcm (and <case>_rtstruct.dcm) back with STOW-RS; implies --dicom-seg")
    archive.add_argument("--credentials", default=None, metavar="FILE",
                         help="mode-0600 file: user:password, bearer TOKEN or JSON (default: the environment, "
                              "MEDSEG_DICOMWEB_USER/MEDSEG_DICOMWEB_PASSWORD or MEDSEG_DICOMWEB_TOKEN)")
    archive.add_argument("--ca-bundle", default=None, metavar="FILE", help="PEM file of the CA to trust for https")
    archive.add_argument("--insecure", action="store_true", help="do not verify the archive's TLS certificate")
    archive.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S",
                         help="seconds to wait for each answer of the archive (default 60; each request is "
                              "tried 3 times, with back-off, before its series fails)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("export", parents=[common],
                       help="export a checkpoint as ONNX, TorchScript or a MONAI bundle, with what segment needs")
    p.add_argument("checkpoint", help="checkpoint written by `medseg train` (best.pt)")
    p.add_argument("out", help="the file (onnx, torchscript) or folder (bundle) to write")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                   help="onnx (default): spec in metadata_props; torchscript: spec as medseg.json extra file; "
                        "bundle: a MONAI bundle folder for `python -m monai.bundle run`")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("cache", parents=[common],
                       help="list or clear the model cache (ONNX exports, int8 models, OpenVINO IR, backend choices)")
    p.add_argument("action", choices=("list", "clear"), help="list: size and files per kind; clear: delete them")
    p.add_argument("--what", choices=(*CACHE_KINDS, "all"), default="all",
                   help="with clear: only this kind (default all)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("manifest", parents=[common],
                       help="merge shard manifests (or rebuild from sidecars): manifest, lesions.csv, index.html")
    p.add_argument("output_dir", help="the OUTPUT_DIR of `medseg segment`")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("validate", parents=[common],
                       help="check DICOM files (e.g. the SEG/RTSTRUCT of segment) with dciodvfy (dicom3tools)")
    p.add_argument("files", nargs="+", help="DICOM files; prints each one's errors and warnings, exit 1 on errors")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("evaluate", parents=[common],
                       help="Dice, HD95, ASSD, NSD and lesion detection of masks vs ground truth")
    p.add_argument("pred_dir", help="folder of <case>_seg.nii.gz (or <case>.nii.gz)")
    p.add_argument("gt_dir", help="folder of <case>.nii.gz (e.g. labelsTs)")
    p.add_argument("--out", default=None, help="write metrics.csv, summary.json and PNG plots here")
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="label values to evaluate (default: every foreground label in any mask)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                   help="tolerance of the normalised surface Dice in mm (default 1.0)")
    p.add_argument("--min-overlap-iou", type=float, default=0.0, metavar="X",
                   help="IoU a ground-truth lesion needs with the predicted components overlapping it to count "
                        "as detected (default 0: any overlap)")
    p.add_argument("--size-bins", type=float, nargs="+", default=[100.0, 1000.0], metavar="MM3",
                   help="lesion volume bin edges in mm³ (default 100 1000: <100, 100-1000, >=1000)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", parents=[common], help="synthesize, train, segment and evaluate end to end")
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", parents=[common],
                       help="speed and memory on synthetic CT: segment vs plain MONAI, GFLOP/s, peak RSS, loading, training")
    p.add_argument("config", nargs="?", default="configs/lesion3d.yaml",
                   help="the model, preprocessing and inference settings to measure (default: the 3D reference)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. inference.backend=torch")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--work-dir", default="runs/bench", help="synthetic cases, models and outputs (reused)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (medians)")
    p.add_argument("--quick", action="store_true", help="only the 256x256x128 case, 2 training steps (a smoke run)")
    p.add_argument("--compare-on", choices=("small", "large"), default="small",
                   help="the case for segment vs plain MONAI (default: 256x256x128)")
    p.add_argument("--ensemble", type=_positive_int, default=None, metavar="N",
                   help="only measure the peak RSS of segmenting the 512x512x400 case with N models (and --tta) "
                        "against one model, in the same run (--repeats runs each, medians)")
    p.add_argument("--tta", choices=TTA_MODES, default="mirror", help="with --ensemble: the TTA (default mirror)")
    p.add_argument("--full-size", action="store_true",
                   help="with --ensemble: the config's own network and spacing (default: features 4, a 2x2x2.5 "
                        "mm grid and the torch backend, so 8N passes fit in minutes on a CPU)")
    p.add_argument("--levers", action="store_true",
                   help="only the inference speed levers (overlap, skip_empty, cascade, backend x precision) "
                        "against the reference pass "
                        "(overlap 0.5, fp32, no skipping) on held-out cases, with the accuracy contract")
    p.add_argument("--rss-vs-n", action="store_true",
                   help="only the peak RSS, wall and CPU seconds of segmenting 512x512xN synthetic CTs (N = 200, 400, "
                        "800) with --model, each in a child process, and their slopes (bytes per source voxel, "
                        "seconds per slice)")
    p.add_argument("--large", action="store_true", help="with --rss-vs-n: also N = 1600")
    p.add_argument("--model", default="runs/demo/model/best.pt",
                   help="with --levers or --rss-vs-n: the trained checkpoint")
    p.add_argument("--data", default="data/demo", help="with --levers: the dataset whose 'test' cases are used")
    p.add_argument("--lever", action="append", default=None, metavar="NAME",
                   help="with --levers: only this lever (repeatable; the reference always runs), e.g. overlap_0.25")
    p.add_argument("--max-cases", type=_positive_int, default=None, help="with --levers: at most this many cases")
    p.add_argument("--large-shape", type=_positive_int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="with --levers: also time one segment of a synthetic CT of this shape (e.g. 512 512 400), "
                        "the reference against the best lever meeting the contract")
    p.set_defaults(func=cmd_bench)
    return parser


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
                        stream=sys.stderr)
    if not args.debug:
        warnings.filterwarnings("ignore")
        for noisy in ("monai", "pydicom", "nibabel", "PIL"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
