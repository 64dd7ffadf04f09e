"""``hemorrhage-hf install-metric``: make ``evaluate.load("hemorrhage")`` work offline by its bare name."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "install-metric",
        description="Write the metric into evaluate's module cache (under $HF_MODULES_CACHE, by default "
        "~/.cache/huggingface/modules) so that evaluate.load('hemorrhage') works offline with the bare name. "
        "`make install` runs this.",
    )
    parser.add_argument("--modules-cache", default=None, help="evaluate's dynamic modules folder (default: evaluate's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..metric import install_metric

    path = install_metric(args.modules_cache)
    print(f"installed the hemorrhage metric at {path}")
    return 0
