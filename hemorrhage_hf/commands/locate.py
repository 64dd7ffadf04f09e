"""``hemorrhage-hf locate REF --modification SPEC --output DIR``: the hemorrhage map, layer by layer."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    add_calibration_arguments,
    add_model_arguments,
    add_modified_arguments,
    add_reference_argument,
    add_text_arguments,
    modified_label,
    resolve_models,
    text_source,
)

EPILOG = """examples:
  hemorrhage-hf locate --reference default --modification int4-g64 --text-file wiki.valid.raw --output out/map
  hemorrhage-hf locate --reference default --modified ./my-quantized-model --parts --output out/map
  hemorrhage-hf locate --reference default --modification int4-g64 --linears --output out/map-linears
  hemorrhage-hf allocate --reference default --map out/map-linears --budget-bits 4.5 --output out/alloc

cost: 2 forward passes per window, plus per layer 2 hybrids (4 more with --parts, 14 more with --linears) that run
from that layer on
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "locate",
        help="find which decoder layers a modification's damage comes from",
        description="For every decoder layer (with --parts also its attention and its MLP, with --linears also each "
        "of its Linear layers), measure the KL against "
        "REF when only that layer is modified and when only that layer is restored; rank the layers by their share "
        "of the damage. Writes locate.json, locate.md and locate.png into --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reference_argument(parser)
    add_modified_arguments(parser)
    parser.add_argument("--parts", action="store_true", help="also split each layer into attention and MLP (3× cost)")
    parser.add_argument(
        "--linears",
        action="store_true",
        help="also split each layer into its 7 Linear layers (8× cost): the finest map, from which `allocate` gives "
        "single Linear layers their own format (refused where scales were migrated into the norms, as by awq-*)",
    )
    add_text_arguments(parser, max_tokens=512)
    add_model_arguments(parser)
    add_calibration_arguments(parser)
    parser.add_argument("--no-plots", action="store_true", help="skip locate.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for locate.json, locate.md, locate.png")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..locate import locate
    from ..render import hemorrhage_map_summary

    source = text_source(args)
    reference, modified, tokenizer = resolve_models(args, source)
    hmap = locate(
        reference,
        modified,
        source.windows(tokenizer),
        parts=args.parts,
        linears=args.linears,
        batch_size=args.batch_size,
        progress=not args.quiet,
        metadata={
            "reference": args.reference,
            "modified": modified_label(args),
            "modification": args.modification,
            "corpus": source.describe(),
            "window": args.window,
            "max_tokens": args.max_tokens,
        },
    )
    written = hmap.save(Path(args.output), plots=not args.no_plots)
    print(hemorrhage_map_summary(hmap))
    print("\nwrote " + ", ".join(str(path) for path in written.values()))
    return 0
