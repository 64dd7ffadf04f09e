"""Determinism and interruption: the same command gives byte-identical output; SIGINT leaves no partial file."""

import json
import os
import signal
import subprocess
import sys

import pytest

from hemorrhage_hf.atomic import atomic_path, atomic_write_text


def _report_command(text_file, output, *extra):
    return [
        sys.executable,
        "-m",
        "hemorrhage_hf.cli",
        "report",
        "--reference",
        "default",
        "--modification",
        "int4-g64",
        "--text-file",
        str(text_file),
        "--window",
        "128",
        "--quiet",
        "--no-plots",
        "--output",
        str(output),
        *extra,
    ]


def test_same_command_twice_gives_byte_identical_report(tmp_path, wikitext_text):
    text_file = tmp_path / "t.txt"
    text_file.write_text(wikitext_text[:6000], encoding="utf-8")
    for name in ("a", "b"):
        subprocess.run(
            _report_command(text_file, tmp_path / name, "--max-tokens", "384", "--layers"),
            check=True,
            capture_output=True,
            timeout=600,
        )
    first, second = ((tmp_path / name / "report.json").read_bytes() for name in ("a", "b"))
    assert first == second
    assert json.loads(first)["kl_mean"] > 0


def test_sigint_mid_run_leaves_no_output_file(tmp_path, wikitext_text):
    text_file = tmp_path / "t.txt"
    text_file.write_text(wikitext_text[:200_000], encoding="utf-8")
    output = tmp_path / "out"
    command = [argument for argument in _report_command(text_file, output) if argument != "--quiet"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A test run started in the background (`make test &`) inherits an ignored SIGINT, and a Python started with
        # SIGINT ignored never raises KeyboardInterrupt: give the command the terminal's default, as a user's has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Interrupt once the progress bar shows it is measuring: a fixed sleep was not enough on a busy machine.
    seen = ""
    while "measuring" not in seen:
        character = process.stderr.read(1)
        assert character, f"the report ended before measuring: {seen[-2000:]}"
        seen += character
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in stderr
    assert not output.exists() or not any(output.iterdir())


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temporary:
            temporary.write_text("half-writ")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
