"""The command line as a whole: start-up cost, version, and the command table."""

import subprocess
import sys
from pathlib import Path

import pytest

from hemorrhage_hf import __version__
from hemorrhage_hf.cli import COMMANDS, build_parser, main
from hemorrhage_hf.commands.common import DTYPE_NAMES

HEAVY = ("torch", "transformers", "numpy", "matplotlib", "huggingface_hub")


@pytest.mark.parametrize("command", ["", "report", "sweep", "tasks", "card"])
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
