"""Arguments several commands share, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse

from ..corpus import PYTHON_DOCS
from ..models import DTYPES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="dtype the models run in (log-probabilities are always computed in fp32). Default: fp32.",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a Hub model's own Python code to run (off by default: it executes code from the model repo)",
    )


def add_device_map_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="accelerate device map for models that do not fit one device, e.g. 'auto' (spreads over GPUs, CPU "
        "and disk offload). Default: load on the CPU",
    )


def add_text_arguments(
    parser: argparse.ArgumentParser,
    *,
    max_tokens: int | None = None,
    max_tokens_help: str = "measure on the first N tokens only",
) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--text-file", metavar="F", help="UTF-8 text file to measure on (default: the prose of Python's own docs)"
    )
    source.add_argument(
        "--dataset",
        metavar="ID",
        help="a `datasets` id or local dataset path (with --dataset-config/--split/--column); needs the Hub for ids",
    )
    parser.add_argument("--dataset-config", default=None, help="dataset configuration name, e.g. wikitext-2-raw-v1")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--column", default="text", help="dataset text column (default: text)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N", help=max_tokens_help)
    parser.add_argument("--window", type=int, default=512, metavar="W", help="tokens per model input (default: 512)")
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        metavar="S",
        help="start a window every S tokens; each token is scored once, with up to W−S tokens of extra context "
        "(default: W, i.e. non-overlapping windows)",
    )
    parser.add_argument("--batch-size", type=int, default=1, metavar="B", help="windows per forward pass (default: 1)")


def load_options(args: argparse.Namespace):
    """The :class:`~hemorrhage_hf.comparison.LoadOptions` the model arguments name."""
    from ..comparison import LoadOptions

    return LoadOptions(
        dtype=args.dtype,
        device_map=getattr(args, "device_map", None),
        trust_remote_code=args.trust_remote_code,
    )


def text_from_arguments(args: argparse.Namespace) -> tuple[str, str]:
    """(text, label) the arguments name."""
    from ..corpus import dataset_text, load_corpus

    if args.dataset:
        label = f"{args.dataset}{'/' + args.dataset_config if args.dataset_config else ''}:{args.split}"
        return dataset_text(args.dataset, config=args.dataset_config, split=args.split, column=args.column), label
    source = args.text_file or PYTHON_DOCS
    return load_corpus(source), source


def add_spec_command(subparsers, *, name: str, family: str, help: str, description: str, epilog: str) -> None:
    """A ``NAME REF SPEC --output DIR`` command applying one spec of ``family`` (quantize, prune, expand)."""
    parser = subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "reference", metavar="REF", help="'default' (embedded SmolLM2-135M-Instruct), a folder, a .gguf or a Hub id"
    )
    parser.add_argument("spec", metavar="SPEC", help=f"the {family} spec to apply")
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder for the modified checkpoint (safetensors)"
    )
    if family != "expansion":
        calibration = parser.add_argument_group("calibration (for specs that look at activations or gradients)")
        calibration.add_argument(
            "--calibration-text",
            default=PYTHON_DOCS,
            metavar="F",
            help="UTF-8 text file to calibrate on (default: the prose of Python's own docs)",
        )
        calibration.add_argument("--calibration-sequences", type=int, default=16, metavar="N", help="default: 16")
        calibration.add_argument(
            "--calibration-length", type=int, default=512, metavar="L", help="tokens each (default: 512)"
        )
        calibration.add_argument("--seed", type=int, default=0, help="where the sequences are drawn (default: 0)")
    add_model_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run_spec_command, family=family)


def _run_spec_command(args: argparse.Namespace) -> int:
    from ..integrations.optimum import APPLIERS
    from ..modify.calibration import CalibrationSettings

    applier_class = APPLIERS[args.family]
    applier_class.check_spec(args.spec)  # before seconds of model loading
    applier = applier_class.from_pretrained(args.reference, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    calibration = (
        CalibrationSettings(args.calibration_text, args.calibration_sequences, args.calibration_length, args.seed)
        if args.family != "expansion"
        else None
    )
    path = applier.apply_and_save(args.output, spec=args.spec, calibration=calibration, progress=not args.quiet)
    print(f"wrote {args.spec} of {args.reference} to {path}")
    return 0
