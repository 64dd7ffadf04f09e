"""``hemorrhage-hf install-llama-cpp``: build llama-cpp-python and llama.cpp's programs once (``make install``)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "install-llama-cpp",
        help="build the llama.cpp engine and llama.cpp's converter/quantizer once (needs cmake and a C++ compiler)",
        description="Download the llama-cpp-python sdist, build and install its wheel (kept, so it is never rebuilt), "
        "and build llama-quantize, llama-imatrix and llama-perplexity from the same source into the cache folder "
        "($HEMORRHAGE_HF_LLAMA_CPP, else ~/.cache/hemorrhage_hf/llama.cpp). Does nothing when all is built.",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, metavar="N", help="parallel compile jobs (default: all cores)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..llamacpp.tools import install

    install(jobs=args.jobs)
    return 0
