"""``hemorrhage-hf``: one subcommand per module in :mod:`hemorrhage_hf.commands`.

Each command module defines ``add_parser(subparsers)`` (which sets ``func`` on its parser) and the function it
sets; adding a command is one new module and one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import HemorrhageError

COMMANDS = (
    "report",
    "install_metric",
    "card",
    "space",
    "quantize",
    "prune",
    "expand",
    "sweep",
    "tasks",
    "decode",
    "calibrate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hemorrhage-hf",
        description="Measure, locate and mitigate model hemorrhage (quality lost to quantization, pruning, "
        "decoding changes and layer expansion).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"hemorrhage_hf.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except HemorrhageError as error:
        print(f"hemorrhage-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hemorrhage-hf {args.command}: interrupted; no partial output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
