"""``hemorrhage-hf correct``: fit a decoding correction of a modified model towards its reference and save it."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from .common import (
    add_calibration_arguments,
    add_model_arguments,
    add_modified_arguments,
    add_reference_argument,
    add_text_arguments,
    modified_label,
    resolve_models,
    text_from_arguments,
)

#: Name of the corrected variant in a report (``report --correction``) and of its output subfolder.
CORRECTED = "corrected"

EPILOG = """examples:
  hemorrhage-hf correct --reference default --modification int4-g64 --text-file my-text.txt --output int4-correction/
  hemorrhage-hf correct --reference default --modified ./my-pruned-model --text-file my-domain.txt \\
      --output pruned-correction/
  hemorrhage-hf correct --reference default --modification wanda-50 --families state_network \\
      --text-file a-few-hundred-thousand-tokens.txt --sampled-tokens 131072 --output wanda-correction/
  hemorrhage-hf report --reference default --modification int4-g64 --correction int4-correction/ --output out/

use it in Python:
  from transformers import LogitsProcessorList
  from hemorrhage_hf.correction.processor import DecodingCorrection
  correction = DecodingCorrection.from_pretrained("int4-correction/", vocab_size=model.config.vocab_size)
  model.generate(**inputs, logits_processor=LogitsProcessorList([correction]))
"""


def add_parser(subparsers) -> None:
    from ..correction.corrections import FAMILIES
    from ..correction.fit import DEFAULT_FAMILIES, DEFAULT_MAX_TOKENS, LOGIT_MAX_TOKENS, NETWORK_MAX_TOKENS
    from ..correction.network import DEFAULT_EPOCHS, DEFAULT_NETWORK_RANK, DEFAULT_NETWORK_WIDTH
    from ..correction.ops import DEFAULT_RANK

    parser = subparsers.add_parser(
        "correct",
        help="fit a decoding correction (a LogitsProcessor) that pulls a modified model back to its reference",
        description="Run the reference and the modified model over fit text and fit a correction of the "
        "modified model's next-token scores that minimises KL(reference ‖ corrected modified). The text is split by "
        "document (WikiText-style articles, else contiguous parts) into fit, select and report shares, 3 : 1 : 1: "
        "the families are fitted on the first, every choice is made on the second, and the command reports the KL "
        "and PPL ratio on the third, documents the fit never used, with and without the correction. Those gains "
        "hold for text like the fit text: fit on text like the one you will generate. Exits 1, with a warning, when "
        "the correction does not help there or raises the PPL ratio. Writes correction.safetensors and "
        "correction_config.json into --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reference_argument(parser)
    add_modified_arguments(parser)
    add_calibration_arguments(parser)
    add_text_arguments(
        parser,
        max_tokens=None,
        max_tokens_help="read at most N tokens over the fit, select and report shares, in windows drawn from all "
        "over each (default: "
        f"{DEFAULT_MAX_TOKENS}, or {NETWORK_MAX_TOKENS} with state_network; both models' predictions are kept "
        f"meanwhile, 4 bytes × vocabulary per token for at most {LOGIT_MAX_TOKENS} tokens, the rest as 2 × hidden "
        "numbers)",
    )
    add_model_arguments(parser)
    fit = parser.add_argument_group("correction families")
    fit.add_argument(
        "--families",
        default=",".join(DEFAULT_FAMILIES),
        type=_families_argument,
        metavar="F,G",
        help=f"comma-separated corrections to fit, from {', '.join(FAMILIES)} (default: {','.join(DEFAULT_FAMILIES)})",
    )
    fit.add_argument(
        "--rank",
        type=int,
        default=DEFAULT_RANK,
        metavar="R",
        help=f"rank of the low-rank biases, previous_token and state_bias (default: {DEFAULT_RANK})",
    )
    fit.add_argument(
        "--regularization",
        type=float,
        default=1e-4,
        metavar="L",
        help="weight of the squared norm of the per-token tensors (default: 1e-4)",
    )
    fit.add_argument(
        "--max-iterations",
        type=int,
        default=40,
        metavar="N",
        help="L-BFGS iterations of the families fitted around the closed-form state_bias (default: 40)",
    )
    network = parser.add_argument_group("state_network family (opt-in; NetworkOptions)")
    network.add_argument(
        "--network-rank",
        type=int,
        default=DEFAULT_NETWORK_RANK,
        metavar="R",
        help=f"state_network: directions of the hidden state it reads and writes (default: {DEFAULT_NETWORK_RANK})",
    )
    network.add_argument(
        "--network-width",
        type=int,
        default=DEFAULT_NETWORK_WIDTH,
        metavar="H",
        help=f"state_network: hidden units (default: {DEFAULT_NETWORK_WIDTH})",
    )
    network.add_argument(
        "--network-epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        metavar="E",
        help=f"state_network: passes over the fit text (default: {DEFAULT_EPOCHS})",
    )
    network.add_argument(
        "--network-write-rank",
        type=int,
        default=None,
        metavar="K",
        help="state_network: after training, cut its write to the K directions of its change that "
        "move the KL most; the processor's cost per token scales with K (default: the rank, no cut)",
    )
    network.add_argument(
        "--sampled-tokens",
        type=int,
        default=0,
        metavar="N",
        help="state_network: add N tokens the reference samples itself, after short prompts cut from "
        "the text, to the network's fit (more text for it when yours runs out; default: 0)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the saved correction")
    parser.set_defaults(func=run)


def _families_argument(value: str) -> tuple[str, ...]:
    from ..correction.corrections import FAMILIES

    families = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in families if name not in FAMILIES]
    if not families or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown correction families {unknown or value!r}; choose from {', '.join(FAMILIES)}"
        )
    return families


def run(args: argparse.Namespace) -> int:
    from ..correction.fit import LogitFitOptions, NetworkOptions
    from ..correction.processor import CorrectionWarning, DecodingCorrection

    text, corpus_label = text_from_arguments(args)
    reference, modified, tokenizer = resolve_models(args)
    metadata = {
        "reference": args.reference,
        "modified": modified_label(args),
        "corpus": corpus_label,
        "window": args.window,
        "max_tokens": args.max_tokens,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorrectionWarning)
        correction = DecodingCorrection.fit(
            reference,
            modified,
            text,
            tokenizer=tokenizer,
            families=args.families,
            window=args.window,
            stride=args.stride,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            logit_fit=LogitFitOptions(args.rank, args.regularization, args.max_iterations),
            network=NetworkOptions(
                args.network_rank, args.network_width, args.network_epochs, args.network_write_rank, args.sampled_tokens
            ),
            metadata=metadata,
            progress=not args.quiet,
        )
    folder = correction.save_pretrained(Path(args.output))
    print(f"{correction!r}: {correction.summary.verdict()}")
    print(f"wrote {folder}")
    return 1 if any(issubclass(w.category, CorrectionWarning) for w in caught) else 0


def load_correction(folder: str):
    from ..correction.processor import DecodingCorrection

    return DecodingCorrection.from_pretrained(folder)


def save_corrected_report(report, output: Path, *, plots: bool) -> dict[str, Path]:
    """The corrected variant's full report in ``output/corrected/`` and a side-by-side Markdown table."""
    from ..atomic import atomic_write_text
    from ..render import variant_markdown

    written = {
        f"{CORRECTED}_{key}": path
        for key, path in report.variants[CORRECTED].save(output / CORRECTED, plots=plots).items()
    }
    written["correction_comparison"] = output / "correction_comparison.md"
    markdown = variant_markdown(report, CORRECTED, title="Decoding correction: side by side", plain="uncorrected")
    atomic_write_text(written["correction_comparison"], markdown)
    return written
