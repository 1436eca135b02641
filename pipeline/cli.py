"""``medseg``: a thin command line over the Python API.

Heavy libraries are imported inside the commands, so ``medseg --help`` is instant. Errors caused by
input print one line (``error: ...``) and exit non-zero; ``--debug`` shows the traceback.

Exit codes: 0 success; 1 some cases failed (``segment``) or an unexpected error; 2 bad input, config
or command line, or no case succeeded.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

log = logging.getLogger("medseg")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
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
    from pipeline.synth import synthesize

    root = synthesize(args.out_dir, cases=args.cases, seed=args.seed, test_fraction=args.test_fraction,
                      dicom_test_cases=args.dicom_test_cases)
    print(f"synthetic dataset: {root}")
    return 0


def cmd_convert(args) -> int:
    from pipeline.config import load_config
    from pipeline.convert import convert_folder

    config = load_config(args.config, args.overrides)
    rows = convert_folder(args.input_dir, args.output_dir, config.input)
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


def cmd_train(args) -> int:
    from pipeline.config import load_config
    from pipeline.training import train

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume, progress=not args.quiet)
    print(f"best checkpoint: {result.best} (validation Dice {result.best_metric:.3f})")
    print(f"last checkpoint: {result.last}; log: {result.log_csv}")
    return 0


def cmd_segment(args) -> int:
    from pipeline.infer import segment_folder

    results = segment_folder(args.input_dir, args.output_dir, args.model, device=args.device,
                             progress=not args.quiet)
    done = [r for r in results if r.status == "done"]
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.case_id} ({r.source}): {r.error}", file=sys.stderr)
    print(f"segmented {len(done)}/{len(results)} cases into {args.output_dir}" + (f"; {len(failed)} failed" if failed else ""))
    if not done:
        return 2
    return 1 if failed else 0


def cmd_evaluate(args) -> int:
    from pipeline.evaluate import evaluate_folder

    rows, summary = evaluate_folder(args.pred_dir, args.gt_dir, args.out)
    _print_case_table(rows)
    _print_summary(summary)
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


def _print_case_table(rows) -> None:
    print(f"{'case':<16}{'dice':>7}{'gt':>5}{'pred':>6}{'tp':>5}{'fp':>5}{'fn':>5}")
    for r in rows:
        dice = f"{r.dice:.3f}" if r.lesions_gt else "  -  "
        print(f"{r.case_id:<16}{dice:>7}{r.lesions_gt:>5}{r.lesions_pred:>6}{r.lesion_tp:>5}{r.lesion_fp:>5}{r.lesion_fn:>5}")


def _print_summary(s: dict) -> None:
    print(f"cases: {s['n_cases']}  lesion recall: {s['lesion_recall']:.2f}  lesion precision: {s['lesion_precision']:.2f}")
    print(f"mean lesion Dice: {s['mean_dice']:.2f}")


# --- argument parsing ----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.9], got {text!r}") from None
    if not 0.0 <= value <= 0.9:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.9], got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser("synth", parents=[common], help="generate a synthetic CT lesion dataset (nnU-Net/MSD layout)")
    p.add_argument("out_dir")
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
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", parents=[common], help="train a model from a YAML config")
    p.add_argument("config", help="YAML config, e.g. configs/lesion3d.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 model.features=16")
    p.add_argument("--resume", action="store_true", help="continue from train.out_dir/last.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("segment", parents=[common], help="segment every scan under a folder")
    p.add_argument("input_dir", help="folder of NIfTI files and/or DICOM series (searched recursively)")
    p.add_argument("output_dir", help="masks are written as <case>_seg.nii.gz")
    p.add_argument("--model", required=True, help="checkpoint written by `medseg train` (best.pt)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", parents=[common], help="Dice and lesion detection of masks vs ground truth")
    p.add_argument("pred_dir", help="folder of <case>_seg.nii.gz")
    p.add_argument("gt_dir", help="folder of <case>.nii.gz (e.g. labelsTs)")
    p.add_argument("--out", default=None, help="write metrics.csv and summary.json here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", parents=[common], help="synthesize, train, segment and evaluate end to end")
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
                        stream=sys.stderr)
    if not args.debug:
        warnings.filterwarnings("ignore")
        for noisy in ("monai", "pydicom", "nibabel", "PIL"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
