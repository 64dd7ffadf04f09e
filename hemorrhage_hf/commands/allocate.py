"""``hemorrhage-hf allocate REF --map DIR --budget-bits 4.5 --output DIR``: mixed precision from the hemorrhage map,
judged on held-out text."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..errors import HemorrhageError
from .common import (
    add_calibration_arguments,
    add_model_arguments,
    add_reference_argument,
    add_text_arguments,
    calibration_settings,
    load_options,
    text_source,
)

EPILOG = """examples:
  hemorrhage-hf locate --reference default --modification int4-g64 --text-file wiki.valid.raw --output out/map
  hemorrhage-hf allocate --reference default --map out/map --budget-bits 4.5 --text-file wiki.valid.raw \
      --compare int4-g32 --output out/alloc
  hemorrhage-hf allocate --reference default --map out/map --base awq-int4-g64 --budget-bits 4.6 --output out/awq
  hemorrhage-hf report --reference default --modification "$(jq -r .spec out/alloc/allocate.json)" --output out/r

The held-out text starts after the tokens the map was measured on (--skip-tokens, default: the map's token count
when the text is the map's); text the map has seen is refused.
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "allocate",
        help="pick a mixed-precision spec from a hemorrhage map under a bits-per-weight budget",
        description="Give the layers (or layer parts) that carry the most damage in a `locate` map wider formats, "
        "greedily by estimated KL saved per extra bit, until the budget of effective bits per weight (scales "
        "included) is spent; then measure the mix and the uniform base on held-out text.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reference_argument(parser)
    parser.add_argument("--map", required=True, metavar="DIR", help="a `hemorrhage-hf locate` output (locate.json)")
    parser.add_argument(
        "--budget-bits",
        type=float,
        required=True,
        metavar="B",
        help="effective bits per Linear weight allowed, scales included (int4-g64 takes 4.25)",
    )
    parser.add_argument(
        "--family", default="bits", choices=["bits"], help="formats to upgrade to (default: %(default)s)"
    )
    parser.add_argument(
        "--base", metavar="SPEC", help="format everywhere else, e.g. awq-int4-g64 (default: the map's modification)"
    )
    parser.add_argument(
        "--compare", action="append", default=[], metavar="SPEC", help="also judge this spec (repeatable)"
    )
    parser.add_argument(
        "--skip-tokens", type=int, default=None, metavar="N", help="held-out text starts after N tokens (see below)"
    )
    parser.add_argument("--no-judge", action="store_true", help="only pick the spec; measure nothing")
    add_text_arguments(
        parser, max_tokens=1024, max_tokens_help="held-out tokens to judge on, or 'all' (default: %(default)s)"
    )
    add_model_arguments(parser)
    add_calibration_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for allocate.json and allocate.md")
    parser.set_defaults(func=run)


def held_out_skip(map_metadata: dict, corpus_label: str, skip_tokens: int | None) -> int:
    """Tokens to skip so the judging text is not the map's; :class:`HemorrhageError` if it would overlap."""
    if map_metadata.get("corpus") != corpus_label:
        return skip_tokens or 0
    seen = map_metadata.get("max_tokens")
    if seen is None:
        raise HemorrhageError(
            f"the map was measured on all of {corpus_label}: judge on another text (--text-file) so it is held out"
        )
    if skip_tokens is None:
        return seen
    if skip_tokens < seen:
        raise HemorrhageError(
            f"--skip-tokens {skip_tokens} would judge on tokens the map was measured on (the first {seen} of "
            f"{corpus_label}): use at least {seen}"
        )
    return skip_tokens


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..locate import HemorrhageMap
    from ..locate.allocate import allocate, base_quantization, measure_specs
    from ..modify import parse_spec
    from ..render import allocation_markdown

    hmap = HemorrhageMap.load(args.map)
    base = args.base or hmap.metadata.get("modification")
    if not base:
        raise HemorrhageError("the map was made from a --modified model: name the base format with --base")
    base_quantization(base)
    for spec in args.compare:
        parse_spec(spec)  # a bad spec fails before any model loads
    source = text_source(args)
    skip = held_out_skip(hmap.metadata, source.describe(), args.skip_tokens)
    reference, tokenizer = load_options(args).model(args.reference)
    allocation = allocate(reference, hmap, base=base, budget_bits=args.budget_bits, family=args.family)
    result = {"allocation": vars(allocation), "spec": allocation.spec, "map": str(args.map)}
    if not args.no_judge:
        held_out = dataclasses.replace(source, skip_tokens=skip)
        windows = held_out.windows(tokenizer)
        specs = list(dict.fromkeys([parse_spec(base).spec, allocation.spec, *args.compare]))
        result["held_out"] = {"corpus": source.describe(), "skip_tokens": skip, "n_windows": len(windows)}
        result["judged"] = measure_specs(
            reference,
            tokenizer,
            windows,
            specs,
            calibration=held_out.calibration_apart(calibration_settings(args)),
            progress=not args.quiet,
        )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "allocate.json", json.dumps(result, indent=2) + "\n")
    markdown = allocation_markdown(result)
    atomic_write_text(output / "allocate.md", markdown)
    print(markdown)
    return 0
