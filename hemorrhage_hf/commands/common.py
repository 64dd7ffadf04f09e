"""Arguments several commands share, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse

from ..corpus import PYTHON_DOCS
from ..models import DTYPES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32",
        help="dtype the models run in (log-probabilities are always computed in fp32). Default: fp32.",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow a Hub model's own Python code to run (off by default: it executes code from the model repo)",
    )


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--text-file", metavar="F", help="UTF-8 text file to measure on (default: the prose of Python's own docs)"
    )
    source.add_argument(
        "--dataset", metavar="ID",
        help="a `datasets` id or local dataset path (with --dataset-config/--split/--column); needs the Hub for ids",
    )
    parser.add_argument("--dataset-config", default=None, help="dataset configuration name, e.g. wikitext-2-raw-v1")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--column", default="text", help="dataset text column (default: text)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N", help="measure on the first N tokens only")
    parser.add_argument("--window", type=int, default=512, metavar="W", help="tokens per model input (default: 512)")
    parser.add_argument(
        "--stride", type=int, default=None, metavar="S",
        help="start a window every S tokens; each token is scored once, with up to W−S tokens of extra context "
        "(default: W, i.e. non-overlapping windows)",
    )
    parser.add_argument("--batch-size", type=int, default=1, metavar="B", help="windows per forward pass (default: 1)")


def text_from_arguments(args: argparse.Namespace) -> tuple[str, str]:
    """(text, label) the arguments name."""
    from ..corpus import dataset_text, load_corpus

    if args.dataset:
        label = f"{args.dataset}{'/' + args.dataset_config if args.dataset_config else ''}:{args.split}"
        return dataset_text(args.dataset, config=args.dataset_config, split=args.split, column=args.column), label
    source = args.text_file or PYTHON_DOCS
    return load_corpus(source), source
