"""``hemorrhage-hf``: one subcommand per module in :mod:`hemorrhage_hf.commands`.

Each command module defines ``add_parser(subparsers)`` (which sets ``func`` on its parser) and the function it
sets; adding a command is one new module and one line in :data:`COMMANDS`. Only the module of the command being
run is imported, and command modules import torch and transformers inside the functions that need them, so
``hemorrhage-hf --help`` and ``hemorrhage-hf report --help`` answer at once.

Example:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 0
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import HemorrhageError

#: Subcommand → its one-line summary in ``hemorrhage-hf --help`` (module ``commands.<name with _ for ->``).
COMMANDS = {
    "report": "measure how much a modified model bled versus its reference",
    "tasks": "compare two models' task accuracy and count flipped answers",
    "card": "write a report into a model card (Markdown section + model-index eval results)",
    "sweep": "measure a modification at several strengths and find its robustness threshold",
    "decode": "measure how decoding changes shift next-token distributions and generations",
    "correct": "fit a decoding correction (a LogitsProcessor) that pulls a modified model back to its reference",
    "quantize": "quantize a model with a spec and save the checkpoint",
    "prune": "prune a model with a spec and save the checkpoint",
    "expand": "insert decoder layers (duplicated, or identity-initialised) and save the checkpoint",
    "space": "serve the Gradio app that shows a comparison (Compare, Threshold and Model card tabs)",
    "install-metric": "install the `hemorrhage` evaluate metric into evaluate's module cache",
    "export-gguf": "convert the reference to GGUF and quantize it with llama.cpp's own tools",
    "install-llama-cpp": "build the llama.cpp engine and its converter/quantizer once (needs cmake, a C++ compiler)",
    "locate": "find which decoder layers a modification's damage comes from (the hemorrhage map)",
    "allocate": "pick a mixed-precision spec from a hemorrhage map under a bits-per-weight budget",
    "leaderboard": "rank many candidates (specs, folders, .gguf files) against one reference pass, with a Pareto plot",
}


class _Subcommands:
    """The subparsers action as command modules see it: each command's summary comes from :data:`COMMANDS`."""

    def __init__(self, action: argparse._SubParsersAction):
        self._action = action

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs["help"] = COMMANDS[name]
        return self._action.add_parser(name, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that command's options are built (the others are listed by name)."""
    parser = argparse.ArgumentParser(
        prog="hemorrhage-hf",
        description="Measure, locate and mitigate model hemorrhage (quality lost to quantization, pruning, "
        "decoding changes and layer expansion).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = _Subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for name in COMMANDS:
        if only is None or name == only:
            importlib.import_module(f"hemorrhage_hf.commands.{name.replace('-', '_')}").add_parser(subparsers)
        else:
            subparsers.add_parser(name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((argument for argument in argv if not argument.startswith("-")), "")
    args = build_parser(only=command if command in COMMANDS else "").parse_args(argv)
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
