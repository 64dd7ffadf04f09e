"""``hemorrhage-hf card``: put a report's "Hemorrhage report" section and eval results into a model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import HemorrhageError

EPILOG = """examples:
  hemorrhage-hf report --reference my-model --modified my-model-int4 --output out/
  hemorrhage-hf tasks --reference my-model --modified my-model-int4 --task piqa --limit 200 --output out/
  hemorrhage-hf card out/report.json --readme my-model-int4/README.md --model-name my-model-int4 --tasks out/tasks.json
  hemorrhage-hf card out/report.json            # print the section only
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "card",
        description="Insert or update the 'Hemorrhage report' section of a model card between hemorrhage-hf "
        "markers, and merge the report's figures into the card's model-index. Everything else in the card is kept "
        "byte for byte, and running it twice changes nothing. A missing README is created from a template.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "report", metavar="REPORT", help="report.json written by `hemorrhage-hf report` (or its folder)"
    )
    parser.add_argument("--readme", metavar="PATH", help="the model card to update (default: print the section)")
    parser.add_argument("--model-name", help="model-index name (needed when the card has no model-index yet)")
    parser.add_argument("--base-model", metavar="HUB_ID", help="the base model's Hub id (default: from the report)")
    parser.add_argument("--dataset-name", help="how to name the measured text in the card (default: from the report)")
    parser.add_argument("--dataset-type", help="model-index dataset type, ideally a Hub dataset id")
    parser.add_argument(
        "--threshold",
        metavar="SWEEP_JSON",
        help="sweep.json written by `hemorrhage-hf sweep`: its robustness threshold goes into the card",
    )
    parser.add_argument(
        "--tasks",
        metavar="JSON",
        help="tasks.json written by `hemorrhage-hf tasks` (or a JSON list of compare_answers() results, each "
        "with a 'task' name)",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not copy the report's PNG plots next to the card")
    parser.set_defaults(func=run)


def _read_json(path: str, what: str):
    from ..atomic import read_json

    return read_json(path, missing=f"{what} file not found: {path}")


def task_results(data, source: str) -> list[dict]:
    """The task results of a ``tasks.json`` written by `hemorrhage-hf tasks` (``{"tasks": {name: figures}}``), or
    of a JSON list of :func:`~hemorrhage_hf.tasks.flips.compare_answers` results each with a ``"task"`` name."""
    if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
        return [{"task": name, **figures} for name, figures in data["tasks"].items()]
    if isinstance(data, list):
        return data
    raise HemorrhageError(
        f"{source} holds neither the tasks.json that `hemorrhage-hf tasks` writes nor a JSON list of task results"
    )


def run(args: argparse.Namespace) -> int:
    from ..cards import CardOptions, copy_plots, render_section, threshold_from_sweep, write_card
    from ..measurement.report import HemorrhageReport

    report_path = Path(args.report)
    if report_path.is_dir():
        report_path = report_path / "report.json"
    report = HemorrhageReport.load(report_path)
    tasks = task_results(_read_json(args.tasks, "task results"), args.tasks) if args.tasks else []
    options = CardOptions(
        model_name=args.model_name,
        base_model=args.base_model,
        dataset_type=args.dataset_type,
        dataset_name=args.dataset_name,
        tasks=tasks,
        threshold=threshold_from_sweep(_read_json(args.threshold, "sweep")) if args.threshold else None,
    )
    if args.readme is None:
        print(render_section(report, options), end="")
        return 0
    readme = Path(args.readme)
    if not args.no_plots:
        options.plots = copy_plots(report_path.parent, readme)
    changed = write_card(readme, report, options)
    print(f"{'updated' if changed else 'unchanged'}: {readme}")
    return 0
