"""The command line as a whole: start-up cost, version, and the command table."""

import subprocess
import sys
from pathlib import Path

import pytest

from hemorrhage_hf import __version__
from hemorrhage_hf.cli import COMMANDS, build_parser, main
from hemorrhage_hf.commands.common import DTYPE_NAMES

HEAVY = ("torch", "transformers", "numpy", "matplotlib", "huggingface_hub")


@pytest.mark.parametrize("command", ["", "report", "sweep", "tasks", "card", "locate", "allocate"])
def test_help_loads_no_heavy_library(command):
    """`hemorrhage-hf --help` and `hemorrhage-hf report --help` answer in well under a second: nothing heavy loads."""
    script = (
        "import sys; from hemorrhage_hf.cli import build_parser; "
        f"build_parser(only={command!r}).format_help(); "
        f"print([name for name in {HEAVY!r} if name in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"hemorrhage-hf {__version__}"


def test_every_command_module_is_listed_and_builds():
    modules = {
        path.stem.replace("_", "-") for path in (Path(__file__).parent.parent / "hemorrhage_hf/commands").glob("*.py")
    }
    assert modules - {"--init--", "common"} == set(COMMANDS)
    subparsers = build_parser()._subparsers._group_actions[0]
    assert set(subparsers.choices) == set(COMMANDS)
    assert {action.dest: action.help for action in subparsers._choices_actions} == COMMANDS


def test_dtype_names_are_the_loader_dtypes():
    from hemorrhage_hf.models import DTYPES

    assert sorted(DTYPES) == list(DTYPE_NAMES)


def _help(command: str) -> str:
    return " ".join(build_parser(only=command)._subparsers._group_actions[0].choices[command].format_help().split())


@pytest.mark.parametrize(("command", "window", "max_tokens"), [("report", 512, 8192), ("sweep", 256, 4096)])
def test_help_shows_the_defaults_that_apply(command, window, max_tokens):
    text = _help(command)
    assert f"tokens per model input (default: {window})" in text
    assert f"or 'all' (default: {max_tokens})" in text
    specific = ["--modification", "int8"] if command == "report" else ["--family", "bits"]
    parsed = build_parser(only=command).parse_args([command, "--reference", "r", "--output", "o", *specific])
    assert (parsed.window, parsed.max_tokens) == (window, max_tokens)


def test_sweep_help_lists_every_family_with_its_template_and_the_fit_minimum():
    from hemorrhage_hf.sweep.families import FAMILIES

    text = _help("sweep")
    for name, family in FAMILIES.items():
        assert f"{name} {family.template} levels {','.join(family.default_levels)}" in text
    assert "kv kv{}" in text and "needs at least 5 levels" in text and "kl_mean 0.1" in text


@pytest.mark.parametrize("command", ["report", "tasks", "decode", "sweep", "quantize", "prune", "correct"])
def test_every_command_names_models_alike_and_takes_calibration_tokens(command):
    from hemorrhage_hf.commands.common import calibration_settings

    arguments = [command, "--reference", "default", "--calibration-sequences", "4", "--calibration-length", "128"]
    extra = {"sweep": ["--family", "sparsity:wanda"], "tasks": ["--task", "piqa"], "decode": ["--decoding", "none"]}
    arguments += extra.get(command, []) + (["--modification", "wanda-50"] if command != "sweep" else [])
    args = build_parser(only=command).parse_args([*arguments, "--output", "o"])
    settings = calibration_settings(args)
    assert (args.reference, settings.n_sequences, settings.seq_len) == ("default", 4, 128)


def test_max_tokens_all_means_the_whole_text():
    args = build_parser(only="report").parse_args(
        ["report", "--reference", "r", "--modification", "int8", "--max-tokens", "all", "--output", "o"]
    )
    assert args.max_tokens is None
    with pytest.raises(SystemExit):
        build_parser(only="report").parse_args(["report", "--reference", "r", "--modified", "m", "--max-tokens", "1"])


@pytest.mark.parametrize(
    "command", ["report", "locate", "decode", "correct", "tasks", "leaderboard", "sweep", "allocate"]
)
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_batch_size_below_one_is_refused_before_any_model_loads(command, value, capsys):
    # locate and tasks used to crash on 0 deep inside their batching loops.
    arguments = {
        "report": ["--modification", "int8"],
        "locate": ["--modification", "int8"],
        "decode": ["--decoding", "none"],
        "correct": ["--modification", "int8"],
        "tasks": ["--modification", "int8", "--task", "piqa"],
        "leaderboard": ["int8"],
        "sweep": ["--family", "bits"],
        "allocate": ["--map", "m", "--budget-bits", "4.5"],
    }[command]
    options = ["--batch-size", "--task-batch-size"] if command == "leaderboard" else ["--batch-size"]
    for option in options:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--reference", "r", *arguments, option, value, "--output", "o"])
        assert exit_.value.code == 2
        assert f"argument {option}: expected a whole number of at least 1, got '{value}'" in capsys.readouterr().err
