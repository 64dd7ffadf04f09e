"""``hemorrhage-hf calibrate``: fit a decoding calibration of a modified model towards its reference and save it."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from .common import add_model_arguments, add_text_arguments, load_options, text_from_arguments

#: Name of the calibrated variant in a report (``report --calibration``) and of its output subfolder.
CALIBRATED = "calibrated"

EPILOG = """examples:
  hemorrhage-hf calibrate default --modification int4-g64 --output int4-calibration/
  hemorrhage-hf calibrate default ./my-pruned-model --text-file my-domain.txt --output pruned-calibration/
  hemorrhage-hf calibrate default --modification wanda-50 --families state_network \
      --text-file a-few-hundred-thousand-tokens.txt --sampled-tokens 131072 --output wanda-calibration/
  hemorrhage-hf report --reference default --modification int4-g64 --calibration int4-calibration/ --output out/

use it in Python:
  from transformers import LogitsProcessorList
  from hemorrhage_hf.correction.processor import DecodingCalibration
  calibration = DecodingCalibration.from_pretrained("int4-calibration/", vocab_size=model.config.vocab_size)
  model.generate(**inputs, logits_processor=LogitsProcessorList([calibration]))
"""


def add_parser(subparsers) -> None:
    from ..correction.network import DEFAULT_EPOCHS, DEFAULT_NETWORK_RANK, DEFAULT_NETWORK_WIDTH
    from ..correction.ops import FAMILIES
    from ..correction.processor import (
        DEFAULT_FAMILIES,
        DEFAULT_MAX_TOKENS,
        DEFAULT_RANK,
        LOGIT_MAX_TOKENS,
        NETWORK_MAX_TOKENS,
    )

    parser = subparsers.add_parser(
        "calibrate",
        help="fit a decoding calibration (a LogitsProcessor) that pulls a modified model back to its reference",
        description="Run the reference and the modified model over calibration text and fit a correction of the "
        "modified model's next-token scores that minimises KL(reference ‖ corrected modified). One window in five "
        "is held out; the command reports the KL there with and without the correction and warns when it does not "
        "help. Writes calibration.safetensors and calibration_config.json into --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "reference",
        metavar="REF",
        help="reference model: 'default' (embedded SmolLM2-135M-Instruct), a local folder, a .gguf file or a Hub id",
    )
    parser.add_argument("modified", metavar="MOD", nargs="?", help="the modified model (same forms as REF)")
    parser.add_argument(
        "--modification",
        metavar="SPEC",
        help="instead of MOD: apply this modification to a copy of the reference, e.g. int4-g64, wanda-50",
    )
    add_text_arguments(
        parser,
        max_tokens=None,
        max_tokens_help="fit on at most N tokens, in windows drawn from all over the text (default: "
        f"{DEFAULT_MAX_TOKENS}, or {NETWORK_MAX_TOKENS} with state_network; both models' predictions are kept "
        f"meanwhile, 4 bytes × vocabulary per token for at most {LOGIT_MAX_TOKENS} tokens, the rest as 2 × hidden "
        "numbers)",
    )
    add_model_arguments(parser)
    fit = parser.add_argument_group("correction")
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
    fit.add_argument(
        "--network-rank",
        type=int,
        default=DEFAULT_NETWORK_RANK,
        metavar="R",
        help=f"state_network: directions of the hidden state it reads and writes (default: {DEFAULT_NETWORK_RANK})",
    )
    fit.add_argument(
        "--network-width",
        type=int,
        default=DEFAULT_NETWORK_WIDTH,
        metavar="H",
        help=f"state_network: hidden units (default: {DEFAULT_NETWORK_WIDTH})",
    )
    fit.add_argument(
        "--network-epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        metavar="E",
        help=f"state_network: passes over the calibration text (default: {DEFAULT_EPOCHS})",
    )
    fit.add_argument(
        "--network-write-rank",
        type=int,
        default=None,
        metavar="K",
        help="state_network: after training, cut its write to the K directions of its change that "
        "move the KL most; the processor's cost per token scales with K (default: the rank, no cut)",
    )
    fit.add_argument(
        "--sampled-tokens",
        type=int,
        default=0,
        metavar="N",
        help="state_network: add N tokens the reference samples itself, after short prompts cut from "
        "the text, to the network's fit (more text for it when yours runs out; default: 0)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the saved calibration")
    parser.set_defaults(func=run)


def _families_argument(value: str) -> tuple[str, ...]:
    from ..correction.ops import FAMILIES

    families = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in families if name not in FAMILIES]
    if not families or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown correction families {unknown or value!r}; choose from {', '.join(FAMILIES)}"
        )
    return families


def run(args: argparse.Namespace) -> int:
    from ..comparison import resolve_pair
    from ..correction.processor import CalibrationWarning, DecodingCalibration
    from ..errors import HemorrhageError

    if (args.modified is None) == (args.modification is None):
        raise HemorrhageError("give exactly one of MOD (a modified model) or --modification SPEC")
    text, corpus_label = text_from_arguments(args)
    reference, modified, tokenizer = resolve_pair(
        args.reference,
        args.modified,
        modification=args.modification,
        load=load_options(args),
    )
    metadata = {
        "reference": args.reference,
        "modified": args.modified or f"{args.reference} + {args.modification}",
        "corpus": corpus_label,
        "window": args.window,
        "max_tokens": args.max_tokens,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        calibration = DecodingCalibration.fit(
            reference,
            modified,
            text,
            tokenizer=tokenizer,
            families=args.families,
            window=args.window,
            stride=args.stride,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            rank=args.rank,
            regularization=args.regularization,
            max_iterations=args.max_iterations,
            network_rank=args.network_rank,
            network_width=args.network_width,
            network_epochs=args.network_epochs,
            network_write_rank=args.network_write_rank,
            sampled_tokens=args.sampled_tokens,
            metadata=metadata,
            progress=not args.quiet,
        )
    folder = calibration.save_pretrained(Path(args.output))
    print(f"{calibration!r}: {calibration.summary.verdict()}")
    print(f"wrote {folder}")
    return 1 if any(issubclass(w.category, CalibrationWarning) for w in caught) else 0


def load_calibration(folder: str):
    from ..correction.processor import DecodingCalibration

    return DecodingCalibration.from_pretrained(folder)


def _comparison_rows(report) -> list[tuple[str, str, str]]:
    from ..render import summary_rows

    calibrated = dict(summary_rows(report.variants[CALIBRATED]))
    return [(label, value, calibrated[label]) for label, value in summary_rows(report)]


def side_by_side_table(report) -> str:
    """The report's summary rows for the modified model without and with its calibration, as console text."""
    rows = [("", "uncalibrated", CALIBRATED), *_comparison_rows(report)]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        f"{label:<{widths[0]}}  {plain:>{widths[1]}}  {fixed:>{widths[2]}}" for label, plain, fixed in rows
    )


def save_calibrated_report(report, output: Path, *, plots: bool) -> dict[str, Path]:
    """The calibrated variant's full report in ``output/calibrated/`` and a side-by-side Markdown table."""
    from ..atomic import atomic_write_text

    written = {
        f"{CALIBRATED}_{key}": path
        for key, path in report.variants[CALIBRATED].save(output / CALIBRATED, plots=plots).items()
    }
    lines = [
        "# Decoding calibration: side by side",
        "",
        f"- **Modified:** {report.metadata.get('modified', '?')}",
        f"- **Corpus:** {report.metadata.get('corpus', '?')}",
        "",
        "| figure | uncalibrated | calibrated |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {plain} | {fixed} |" for label, plain, fixed in _comparison_rows(report)]
    written["calibration_comparison"] = output / "calibration_comparison.md"
    atomic_write_text(written["calibration_comparison"], "\n".join(lines) + "\n")
    return written
