"""``hemorrhage-hf decode``: how far decoding changes move the next-token distribution and the generations."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    add_calibration_arguments,
    add_model_arguments,
    add_modified_arguments,
    add_reference_argument,
    add_text_arguments,
    load_options,
    resolve_models,
    text_source,
)

EPILOG = """examples:
  hemorrhage-hf decode --reference default --decoding temperature=0.7 --decoding top_p=0.9 --output out/
  hemorrhage-hf decode --reference default --modification int4-g64 --decoding none --output out/
  hemorrhage-hf decode --reference default --decoding typical_p=0.5 --reference-decoding temperature=0.8 --greedy \\
      --output out/

a decoding is name=value[,name=value...] with temperature, top_k, top_p, typical_p, repetition_penalty; "none" is the
plain softmax. Each --decoding runs on the modified model when one is given, else on the reference model.
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "decode",
        description="Over real contexts, compare each decoding's processed next-token distribution with the "
        "reference decoding's (total variation, Jensen–Shannon, KL, top-1 agreement), then generate from prompts "
        "taken from the text with both and compare the continuations (token agreement, first divergence). "
        "Writes decoding.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reference_argument(parser)
    add_modified_arguments(parser, required=False)
    parser.add_argument(
        "--decoding", action="append", required=True, metavar="SPEC", help="a decoding to compare (repeatable)"
    )
    parser.add_argument(
        "--reference-decoding",
        default="none",
        metavar="SPEC",
        help="what the others are compared with (default: %(default)s)",
    )
    parser.add_argument(
        "--prompts",
        type=int,
        default=8,
        metavar="N",
        help="prompts for generation, taken from the text (default: %(default)s)",
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=32, metavar="T", help="tokens per prompt (default: %(default)s)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=32, metavar="T", help="tokens generated per prompt (default: %(default)s)"
    )
    parser.add_argument(
        "--greedy", action="store_true", help="generate greedily instead of sampling (seeded per prompt)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt 0's sampling (prompt i uses seed + i)")
    add_text_arguments(parser, max_tokens=2048, window=256)
    add_calibration_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for decoding.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json
    from ..measurement.decoding import Decoding, corpus_prompts, decoding_divergence, generation_divergence
    from ..measurement.engine import run_environment
    from ..models import model_label
    from ..render import decoding_table

    decodings = [Decoding.parse(spec) for spec in args.decoding]
    reference_decoding = Decoding.parse(args.reference_decoding)
    source = text_source(args)
    if args.modified or args.modification:
        reference, modified, tokenizer = resolve_models(args)
    else:
        (reference, tokenizer), modified = load_options(args).model(args.reference), None
    windows = source.windows(tokenizer)
    distributions = decoding_divergence(
        reference,
        windows,
        decodings,
        reference_decoding=reference_decoding,
        modified=modified,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    prompts = corpus_prompts(windows, n_prompts=args.prompts, prompt_tokens=args.prompt_tokens)
    generations = [
        generation_divergence(
            reference,
            prompts,
            decoding,
            reference_decoding=reference_decoding,
            modified=modified,
            sample=not args.greedy,
            max_new_tokens=args.new_tokens,
            seed=args.seed,
            pad_token_id=tokenizer.pad_token_id,
            progress=not args.quiet,
        )
        for decoding in decodings
    ]
    output = {
        "reference": model_label(args.reference),
        "modified": args.modified or args.modification or "(same model)",
        "corpus": source.describe(),
        **run_environment(),
        "distributions": distributions,
        "generations": generations,
    }
    path = Path(args.output) / "decoding.json"
    write_json(path, output)
    print(decoding_table(distributions, generations))
    print(f"\nwrote {path}")
    return 0
