"""``hemorrhage-hf space``: serve the Gradio Space locally (127.0.0.1 by default)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "space",
        description="Serve the hemorrhage Space on this machine. Visitors pick models from an allow-list "
        "(default: the embedded SmolLM2-135M-Instruct; the operator sets others with "
        "HEMORRHAGE_SPACE_MODELS='label=source,...'); a model path typed by a visitor is never loaded.",
    )
    parser.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or $GRADIO_SERVER_PORT)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..space import build_demo, launch

    launch(build_demo(), host=args.host, port=args.port)
    return 0
