"""``hemorrhage-hf tasks``: task accuracy of a reference and a modified model, the drop, and the answers that
flipped."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    add_calibration_arguments,
    add_engine_argument,
    add_model_arguments,
    add_modified_arguments,
    add_reference_argument,
    add_task_arguments,
    modified_label,
    resolve_models,
    tasks_from_arguments,
)

EPILOG = """examples:
  hemorrhage-hf tasks --reference default --modification int4-g64 --task arc-easy=data/arc/ARC-Easy --limit 200 \\
      --output out/
  hemorrhage-hf tasks --reference default --modified ./pruned --task piqa=data/piqa --task lambada=data/lambada \\
      --output out/

tasks: lambada (greedy last word), arc-easy, arc-challenge, piqa, hellaswag (log-likelihood of each choice,
  normalised by its length in characters). NAME alone loads the usual `datasets` id (needs the Hub).
tasks.json holds each task's answers; feed them to evaluate.load("hemorrhage", "answers").
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tasks",
        description="Score both models on zero-shot tasks the way lm-evaluation-harness does and report accuracy "
        "of each with its standard error, the accuracy drop, and flips in both directions. Writes tasks.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reference_argument(parser)
    add_modified_arguments(parser)
    add_task_arguments(
        parser,
        help="a task and its data file, folder or `datasets` id (repeatable)",
        required=True,
        option_prefix="--",
    )
    add_calibration_arguments(parser)
    add_model_arguments(parser)
    add_engine_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for tasks.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json
    from ..measurement.engine import run_environment
    from ..models import model_label
    from ..render import tasks_table
    from ..tasks.scoring import task_hemorrhage

    tasks = tasks_from_arguments(args)
    reference, modified, tokenizer = resolve_models(args)
    results = {}
    for task in tasks:
        results[task.name] = {
            "source": task.source,
            **task_hemorrhage(
                reference, modified, tokenizer, task, batch_size=args.task_batch_size, progress=not args.quiet
            ),
        }
    output = {
        "reference": model_label(args.reference),
        "modified": modified_label(args, model_label(args.reference)),
        **run_environment(),
        "tasks": results,
    }
    path = Path(args.output) / "tasks.json"
    write_json(path, output)
    print(tasks_table(results))
    print(f"\nwrote {path}")
    return 0
