"""`hemorrhage-hf report` end to end on the real SmolLM2 and real text."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import SCALE

from hemorrhage_hf.cli import build_parser, main
from hemorrhage_hf.commands.common import GATE_FAILED

REQUIRED_KEYS = {
    "ppl_reference",
    "ppl_modified",
    "ppl_ratio",
    "kl_mean",
    "kl_median",
    "kl_p99",
    "kl_max",
    "top1_agreement",
    "severity",
    "layer_cosine_distance",
    "layer_relative_l2",
}


def test_report_writes_json_markdown_and_plots(tmp_path, smollm2, wikitext_text, capsys):
    text_file = tmp_path / "wiki.txt"
    text_file.write_text(wikitext_text[:20_000], encoding="utf-8")
    output = tmp_path / "out"
    code = main(
        [
            "report",
            "--reference",
            "default",
            "--modification",
            "int4-g64",
            "--text-file",
            str(text_file),
            "--max-tokens",
            "512",
            "--window",
            "256",
            "--layers",
            "--quiet",
            "--fail-above",
            "kl_mean=0.01",
            "--fail-below",
            "top1_agreement=0.5",
            "--output",
            str(output),
        ]
    )
    assert code == GATE_FAILED  # int4 bleeds more than the gate allows; the report is still written
    report = json.loads((output / "report.json").read_text())
    assert REQUIRED_KEYS <= report.keys()
    assert report["n_tokens"] == 510 and len(report["layer_cosine_distance"]) == 30
    assert report["kl_mean"] > 0.05 and report["metadata"]["corpus"] == str(text_file)
    markdown = (output / "report.md").read_text()
    assert "| KL mean (nats) |" in markdown and "![KL distribution](kl_distribution.png)" in markdown
    for png in ("kl_distribution.png", "layer_drift.png"):
        assert (output / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    assert "severity" in printed.out
    assert f"gate failed: kl_mean = {report['kl_mean']:.4g} > 0.01" in printed.err and "top1" not in printed.err
    assert not [p for p in output.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize(
    ("gate", "message"),
    [("kl_mean", "expected FIGURE=LIMIT"), ("kl_meen=0.1", "unknown figure 'kl_meen'"), ("kl_mean=low", "a number")],
)
def test_a_malformed_gate_is_refused_before_anything_loads(tmp_path, capsys, gate, message):
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--reference", "default", "--modification", "int8", "--fail-above", gate, "--output", "o"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_help_explains_every_report_option():
    parser = build_parser()
    report_parser = parser._subparsers._group_actions[0].choices["report"]
    for action in report_parser._actions:
        assert action.help, f"option {action.option_strings} has no help"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--modification", "int99"], "bits must be between 2 and 8"),
        (["--modification", "int4", "--text-file", "/no/such/file.txt"], "text file not found"),
        (["--modified", "/no/such/model"], "model path not found"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, arguments, message):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hemorrhage_hf.cli",
            "report",
            "--reference",
            "default",
            *arguments,
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.heavy
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_a_backend_checkpoint_saved_by_quantize_reports_the_figures_of_the_live_spec(tmp_path, smollm2, wikitext_text):
    # bitsandbytes 4-bit: its CPU forward repacks the weights, so quantize must save before any forward pass.
    text_file = tmp_path / "wiki.txt"
    text_file.write_text(wikitext_text[:20_000], encoding="utf-8")
    checkpoint, live, saved = tmp_path / "nf4", tmp_path / "live", tmp_path / "saved"
    measured = ["--text-file", str(text_file), "--max-tokens", str(256 * SCALE), "--window", "128", "--no-plots"]
    assert (
        main(
            ["quantize", "--reference", "default", "--modification", "bnb-nf4", "--quiet", "--output", str(checkpoint)]
        )
        == 0
    )
    assert (
        main(
            [
                "report",
                "--reference",
                "default",
                "--modified",
                str(checkpoint),
                *measured,
                "--quiet",
                "--output",
                str(saved),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "report",
                "--reference",
                "default",
                "--modification",
                "bnb-nf4",
                *measured,
                "--quiet",
                "--output",
                str(live),
            ]
        )
        == 0
    )
    live_report, saved_report = (json.loads((folder / "report.json").read_text()) for folder in (live, saved))
    assert 0.1 < live_report["kl_mean"] < 1.0  # nf4 bleeds measurably on SmolLM2; a corrupt reload would collapse
    for figure in ("kl_mean", "kl_p99", "ppl_modified", "ppl_reference"):
        assert saved_report[figure] == pytest.approx(live_report[figure], rel=1e-5), figure
    assert saved_report["top1_agreement"] == live_report["top1_agreement"]
    details = saved_report["metadata"]["modification_details"]
    assert (details["backend"], details["spec"]) == ("bitsandbytes", "bnb-nf4")
    assert details["footprint"] == live_report["metadata"]["modification_details"]["footprint"]
