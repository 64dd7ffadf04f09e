"""``hemorrhage-hf sweep REF --family F --levels L1,L2,...``: measure every strength, find the robustness threshold."""

from __future__ import annotations

import argparse

from ..measurement import distributed
from .common import (
    add_calibration_arguments,
    add_engine_argument,
    add_model_arguments,
    add_reference_argument,
    add_scoring_argument,
    add_task_arguments,
    add_text_arguments,
    add_top_k_argument,
    calibration_settings,
    load_options,
    tasks_from_arguments,
    text_source,
)

EPILOG = """examples:
  hemorrhage-hf sweep --reference default --family bits --levels 32,8,6,5,4,3,2 --text-file wiki.valid.raw \\
      --output out/bits
  hemorrhage-hf sweep --reference default --family sparsity:wanda --levels 0,10,20,30,40,50,60,70,80,90 \\
      --output out/wanda
  hemorrhage-hf sweep --reference default --family "int{{}}-g128-asym" --levels 8,6,4,3 \\
      --task arc-easy=ARC-Easy/test.jsonl --output out/asym
  hemorrhage-hf sweep --reference default --family top_p --levels 1,0.95,0.9,0.8,0.5 --output out/top-p
  hemorrhage-hf sweep --reference default --family gguf --levels f32,Q8_0,Q4_K_M,Q4_0,Q2_K --engine llama.cpp \
      --scoring llama.cpp --window 512 --output out/gguf

gguf: the reference converted by llama.cpp to OUTPUT/gguf/<name>-f32.gguf and quantized by llama-quantize to each
  level's type; with --engine llama.cpp every level runs in llama.cpp, with torch transformers dequantizes each file.

thresholds: each curve gets a fitted breakpoint (power-law growth, then exponential collapse; the fit needs at least
  5 levels with measurable damage, else it says why) and the level where its damage first crosses a tolerance.
  Default tolerances (damage): {tolerances}.

families (name, spec template, default levels; an identity level runs the unmodified model), or any spec template
with {{}} (e.g. "int{{}}-g128-asym"; a template with "={{}}" is a decoding family):
{families}
"""


def add_parser(subparsers) -> None:
    from ..sweep.families import DECODING_CURVES, MODEL_CURVES, describe_families

    tolerances = (
        ", ".join(f"{curve.key} {curve.tolerance:g}" for curve in (*MODEL_CURVES, *DECODING_CURVES[:2]))
        + ",\n  TASK accuracy drop 0.02 (ppl_ratio's damage is ratio − 1, top1_agreement's 1 − agreement)"
    )
    families = "\n".join("  " + line for line in describe_families().splitlines())
    parser = subparsers.add_parser(
        "sweep",
        description="Run the reference once into an exact reference store (its output head once, its final hidden "
        "state per token), then measure the modification at each level against it, so K levels cost K + 1 forward "
        "passes. Writes sweep.json, "
        "sweep.csv and one PNG per figure with the threshold marked (a fitted breakpoint with its 95 % interval, "
        "and the crossing of a tolerance). Rerunning into the same --output resumes an interrupted sweep.",
        epilog=EPILOG.format(tolerances=tolerances, families=families),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reference_argument(parser)
    parser.add_argument("--family", required=True, metavar="F", help="what to sweep (families are listed below)")
    parser.add_argument(
        "--levels", metavar="L1,L2,...", help="levels from the weakest to the strongest (default: the family's)"
    )
    parser.add_argument(
        "--identity-level",
        action="append",
        default=[],
        metavar="L",
        help="for a custom template: a level that means 'unmodified' (repeatable)",
    )
    add_top_k_argument(parser)
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the reference store (or top-k cache) lives (default: ~/.cache/hemorrhage_hf/reference-store)",
    )
    add_task_arguments(
        parser,
        help="also score a task at every level: lambada, arc-easy, arc-challenge, piqa, hellaswag, "
        "from a local file/folder or a `datasets` id (repeatable)",
    )
    parser.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="FIGURE=VALUE",
        help="damage tolerated before the tolerance rule fires, e.g. kl_mean=0.05, ppl_ratio=0.2 "
        "(ratio − 1), top1_agreement=0.05 (1 − agreement), TASK_accuracy_modified=0.02 (drop); defaults below",
    )
    add_calibration_arguments(parser)
    add_text_arguments(parser, max_tokens=4096, window=256)
    add_scoring_argument(parser)
    add_model_arguments(parser)
    add_engine_argument(parser)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG curves")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for sweep.json, sweep.csv and PNGs")
    parser.set_defaults(func=run)


def parse_tolerances(arguments: list[str]) -> dict[str, float]:
    from ..errors import HemorrhageError

    tolerances = {}
    for argument in arguments:
        key, _, value = argument.partition("=")
        try:
            tolerances[key.strip()] = float(value)
        except ValueError:
            raise HemorrhageError(f"--tolerance takes FIGURE=NUMBER, got {argument!r}") from None
    return tolerances


def run(args: argparse.Namespace) -> int:
    from ..errors import HemorrhageError
    from ..models import model_label
    from ..render import sweep_table
    from ..sweep.runner import SweepOptions, resolve_family, run_sweep

    family = resolve_family(args.family, identity_levels=args.identity_level)
    levels = [level.strip() for level in args.levels.split(",")] if args.levels else None
    tolerances = parse_tolerances(args.tolerance)
    tasks = tasks_from_arguments(args)
    source = text_source(args)
    gguf_levels = None
    if family.kind == "gguf":
        reference, tokenizer, gguf_levels = _gguf_reference(args, source.text)
    elif args.engine != "torch":
        raise HemorrhageError("--engine llama.cpp runs GGUF files: sweep the gguf family with it")
    else:
        reference, tokenizer = load_options(args).model(args.reference)
    windows = source.windows(tokenizer)
    result = run_sweep(
        reference,
        tokenizer,
        windows,
        family,
        levels,
        tasks=tasks,
        calibration=source.calibration_apart(calibration_settings(args)),
        options=SweepOptions(
            top_k=args.top_k,
            batch_size=args.batch_size,
            task_batch_size=args.task_batch_size,
            cache_root=args.cache_dir,
            tolerances=tolerances,
            plots=not args.no_plots,
            progress=not args.quiet,
        ),
        output_dir=args.output,
        metadata={
            "reference": model_label(args.reference),
            "corpus": source.describe(),
            "window": args.window,
            "stride": args.stride or args.window,
            "max_tokens": args.max_tokens,
            "n_windows": len(windows),
            "dtype": args.dtype,
            "engine": args.engine,
            "scoring": args.scoring,
        },
        gguf_levels=gguf_levels,
    )
    if not distributed.is_main_process():
        return 0  # every process holds the merged sweep; the first one reports it
    print(sweep_table(result))
    print(f"\nwrote {args.output}/sweep.json, sweep.csv" + ("" if args.no_plots else " and sweep_*.png"))
    return 0


def _gguf_reference(args: argparse.Namespace, text: str):
    """(reference, tokenizer, levels) of a gguf sweep: REF converted once to OUTPUT/gguf/<name>-f32.gguf."""
    from pathlib import Path

    from ..llamacpp.engine import ENGINE_NAME, LlamaCppModel
    from ..llamacpp.export import GgufLevels, convert, reference_checkpoint
    from ..models import load_model, load_tokenizer

    checkpoint = reference_checkpoint(args.reference)
    folder = Path(args.output) / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    base = convert(checkpoint, folder / f"{checkpoint.name}-f32.gguf")
    if args.engine == ENGINE_NAME:
        reference, tokenizer = LlamaCppModel(base), load_tokenizer(str(checkpoint))
        reference.check_tokenizer(tokenizer, text)
    else:
        reference, tokenizer = load_model(str(checkpoint), dtype=args.dtype)
    return reference, tokenizer, GgufLevels(base, folder, engine=args.engine)
