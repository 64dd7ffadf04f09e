"""The README's quick start runs as written (at tiny sizes): quantize → report → tasks → card, each command
reading what the one before wrote."""

import os
import re
import shlex
import stat
from pathlib import Path

import pytest
from conftest import shared_data_path
from huggingface_hub import ModelCard

from hemorrhage_hf.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
#: What the test shrinks: fewer tokens and task items, and the task data where this machine keeps it.
TINY = {"--max-tokens 4096": "--max-tokens 256 --window 128", "--limit 200": "--limit 8"}


def quick_start_commands() -> list[list[str]]:
    """The `hemorrhage-hf` lines of the README's quick-start block, shrunk to tiny sizes."""
    block = re.search(r"## Quick start[^\n]*\n+```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert block, "README.md has no quick-start block"
    commands = []
    for line in block.group(1).splitlines():
        for large, small in TINY.items():
            line = line.replace(large, small)
        line = line.replace("piqa=data/piqa", f"piqa={shared_data_path('piqa')}")
        words = shlex.split(line)
        assert words[0] == "hemorrhage-hf", line
        commands.append(words[1:])
    return commands


@pytest.mark.heavy
def test_the_readme_quick_start_chain_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = quick_start_commands()
    assert [command[0] for command in commands] == ["quantize", "report", "tasks", "card"]
    umask = os.umask(0o022)
    try:
        for command in commands:
            assert main(command) == 0, command
    finally:
        os.umask(umask)
    capsys.readouterr()
    card = ModelCard.load(tmp_path / "my-model-int4" / "README.md")
    metrics = {result.metric_type for result in card.data.eval_results}
    assert {"kl_divergence", "perplexity_ratio", "accuracy", "flip_rate"} <= metrics
    assert "| piqa | 8 |" in card.text and "Q4_1 GGUF" in card.text  # the task row; what `default` really is
    assert card.data.base_model is None  # `default` is not the Hub checkpoint's weights: no claim of its id
    for written in ("out/report.json", "out/tasks.json", "my-model-int4/README.md"):
        assert stat.S_IMODE((tmp_path / written).stat().st_mode) == 0o644, written  # as any file under umask 022
