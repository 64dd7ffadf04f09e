"""``hemorrhage-hf leaderboard --reference REF CANDIDATE… --output DIR``: many candidates, one reference pass."""

from __future__ import annotations

import argparse

from .common import (
    GATE_FAILED,
    add_calibration_arguments,
    add_engine_argument,
    add_gate_arguments,
    add_model_arguments,
    add_reference_argument,
    add_task_arguments,
    add_text_arguments,
    calibration_settings,
    check_gates,
    load_options,
    tasks_from_arguments,
    text_source,
)

#: Tokens measured unless --max-tokens says otherwise, as for `report`.
DEFAULT_MAX_TOKENS = 8192
#: Figures a gate may name: each is checked for every candidate.
GATE_FIGURES = ("kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "delta_p_mean", "bits_per_weight")

EPILOG = """examples:
  hemorrhage-hf leaderboard --reference default int8 int4-g64 awq-int4-g64 bnb-nf4 --output out/board
  hemorrhage-hf leaderboard --reference ./my-model ./my-model-gptq ./my-model-awq int4-g64 --text-file wiki.valid.raw \\
      --fail-above kl_mean=0.1 --output out/board
  hemorrhage-hf leaderboard --reference default int8 int4-g64 int3-g64 --task arc-easy=data/arc/ARC-Easy \
      --task-limit 500 --output out/board

candidates: modification specs (applied to the reference) and models (folders, .gguf files, Hub ids), mixed freely.
cost: one reference pass into the exact store, then one forward pass per candidate; one candidate in memory at a time
tasks: lambada, arc-easy, arc-challenge, piqa, hellaswag, scored as `hemorrhage-hf tasks` scores them; each row gets
  the accuracy and its drop against the reference, neighbours McNemar's exact test on the items only one got right
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "leaderboard",
        description="Rank candidates against one reference: the reference runs once into an exact reference store, "
        "then each candidate is measured against it and freed. Writes leaderboard.json, .csv, .md and pareto.png "
        "(KL against effective bits per weight, Pareto frontier marked) into --output; each candidate is tested "
        "against the one ranked above it by a paired test on per-token KL.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reference_argument(parser)
    parser.add_argument("candidates", nargs="+", metavar="CANDIDATE", help="a spec, folder, .gguf file or Hub id")
    add_text_arguments(parser, max_tokens=DEFAULT_MAX_TOKENS)
    add_model_arguments(parser)
    add_engine_argument(parser)
    add_calibration_arguments(parser)
    add_gate_arguments(parser, GATE_FIGURES)
    add_task_arguments(
        parser, help="also score every candidate on a task from a local file/folder or a `datasets` id (repeatable)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip pareto.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for leaderboard.json/.csv/.md/.png")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..leaderboard import rank_candidates
    from ..render import leaderboard_markdown

    # Task data is read first: an unknown task or missing file stops the run before any model loads.
    tasks = tasks_from_arguments(args)
    board = rank_candidates(
        args.reference,
        args.candidates,
        source=text_source(args),
        load=load_options(args),
        calibration=calibration_settings(args),
        batch_size=args.batch_size,
        tasks=tasks,
        task_batch_size=args.task_batch_size,
        progress=not args.quiet,
    )
    board.save(args.output, plots=not args.no_plots)
    print(leaderboard_markdown(board.to_dict(), None))
    gates = args.fail_above + args.fail_below
    failed = [check_gates(gates, entry.row(), subject=entry.name) for entry in board.entries]
    return GATE_FAILED if any(failed) else 0
