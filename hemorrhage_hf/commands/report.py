"""``hemorrhage-hf report``: measure one modified model against its reference and write the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..measurement import distributed
from ..render import SUMMARY_ROWS
from .common import (
    add_calibration_arguments,
    add_device_map_argument,
    add_engine_argument,
    add_gate_arguments,
    add_model_arguments,
    add_modified_arguments,
    add_reference_argument,
    add_scoring_argument,
    add_text_arguments,
    add_top_k_argument,
    calibration_settings,
    check_gates,
    load_options,
    modified_label,
    text_source,
)
from .correct import CORRECTED, load_correction, save_corrected_report

#: Tokens measured unless --max-tokens says otherwise: 16 windows of 512, half a minute for SmolLM2 on 2 quiet CPU
#: cores (BENCHMARKS.md); the whole of a long text can take hours.
DEFAULT_MAX_TOKENS = 8192

EPILOG = """examples:
  hemorrhage-hf report --reference default --modification int4-g64 --output out/
  hemorrhage-hf report --reference default --modified ./pruned --text-file wiki.valid.raw --layers --output out/
  hemorrhage-hf report --reference gguf/model-f32.gguf --modified gguf/model-Q4_K_M.gguf --engine llama.cpp \
      --scoring llama.cpp --text-file wiki.test.raw --output out/
  hemorrhage-hf report --reference ./my-model --modified ./my-model-int4 --fail-above kl_mean=0.1 --output out/
"""


def layer_map_argument(value: str) -> list[int]:
    try:
        return [int(item) for item in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {value!r}") from None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        description="Run the reference and the modified model over identical token windows and report perplexity "
        "of both, KL divergence, top-1 agreement, Δp of the true token, optional per-layer drift and attention "
        "divergence, and a severity grade. Writes report.json, report.md and PNG plots into --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reference_argument(parser)
    add_modified_arguments(parser)
    add_text_arguments(parser, max_tokens=DEFAULT_MAX_TOKENS)
    add_scoring_argument(parser)
    add_model_arguments(parser)
    add_engine_argument(parser)
    add_device_map_argument(parser)
    parser.add_argument("--layers", action="store_true", help="also measure per-layer hidden-state drift")
    parser.add_argument(
        "--attention",
        action="store_true",
        help="also measure per-layer attention divergence (Jensen–Shannon; runs eager attention, slower)",
    )
    parser.add_argument(
        "--layer-map",
        metavar="I,J,...",
        type=layer_map_argument,
        help="comma-separated modified layer for each reference layer (models of different depth)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="hold one model at a time: run the reference into an exact reference store, free it, then run the "
        "modified model (halves peak memory; every figure stays exact; no --layers)",
    )
    add_top_k_argument(parser)
    parser.add_argument(
        "--correction",
        metavar="DIR",
        help="also measure the modified model corrected by this decoding correction (from `hemorrhage-hf "
        "correct`), from the same forward passes: its report goes to OUTPUT/corrected/, and a side-by-side table "
        "to the console and OUTPUT/correction_comparison.md",
    )
    add_calibration_arguments(parser)
    add_gate_arguments(parser, [key for key, _, _ in SUMMARY_ROWS])
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for report.json, report.md and plots")
    parser.set_defaults(func=run)


def measurement_plan(args: argparse.Namespace, corpus_label: str) -> str:
    """One line saying what is about to run and how to make it bigger or smaller, before any model loads."""
    amount = "all tokens" if args.max_tokens is None else f"the first {args.max_tokens} tokens"
    return (
        f"measuring {amount} of {corpus_label} in windows of {args.window}: {args.reference} against "
        f"{modified_label(args)} "
        "(--max-tokens N or all sets the amount)"
    )


def run(args: argparse.Namespace) -> int:
    from ..comparison import MeasureOptions, compare
    from ..render import console_table, variant_table

    source = text_source(args)
    correction = load_correction(args.correction) if args.correction else None  # bad folders fail before models load
    if not args.quiet:
        print(measurement_plan(args, source.describe()), file=sys.stderr)
    report = compare(
        args.reference,
        args.modified,
        modification=args.modification,
        source=source,
        load=load_options(args),
        calibration=calibration_settings(args),
        options=MeasureOptions(
            batch_size=args.batch_size,
            layers=args.layers,
            attention=args.attention,
            layer_map=args.layer_map,
            sequential=args.sequential,
            top_k=args.top_k,
            progress=not args.quiet,
            modified_variants={CORRECTED: correction.correct_sequence} if correction else None,
        ),
    )
    if not distributed.is_main_process():
        return 0  # under `accelerate launch` every process holds the merged report; the first one writes it
    written = report.save(Path(args.output), plots=not args.no_plots)
    print(console_table(report))
    if correction is not None:
        written.update(save_corrected_report(report, Path(args.output), plots=not args.no_plots))
        print("\n" + variant_table(report, CORRECTED, plain="uncorrected"))
    print("\nwrote " + ", ".join(str(path) for path in written.values()))
    return check_gates([*args.fail_above, *args.fail_below], report.figures)
