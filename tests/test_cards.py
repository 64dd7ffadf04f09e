"""Model-card sections: a real SmolLM2 int4-g64 report goes into a card that huggingface_hub parses back, the
update is idempotent byte for byte, and nothing outside the section and the model-index changes."""

from __future__ import annotations

import json
import math

import pytest
from huggingface_hub import ModelCard

from hemorrhage_hf.cards import (
    SECTION_END,
    SECTION_START,
    CardOptions,
    render_section,
    update_card_text,
    write_card,
)
from hemorrhage_hf.cli import main
from hemorrhage_hf.corpus import tokenize_corpus
from hemorrhage_hf.errors import HemorrhageError
from hemorrhage_hf.measurement.engine import measure
from hemorrhage_hf.measurement.report import SHIPPING, HemorrhageReport
from hemorrhage_hf.modify import apply_modification
from hemorrhage_hf.render import comparison_rows

# A card as publishers write them: comments, key order and spacing that a YAML round trip would not keep, and
# another evaluation of their own in the model-index.
EXISTING_CARD = """---
# card metadata
license: apache-2.0
language: [en]
model-index:
- name: my-model-int4
  results:
  - task: {type: text-generation}
    dataset: {name: MMLU, type: cais/mmlu}
    metrics:
    - {type: accuracy, value: 0.31}
tags:
  - quantized   # by us
---

# my-model-int4

Our 4-bit   model.   Trailing spaces stay.   
"""  # noqa: W291 (the card's own trailing spaces must survive)


@pytest.fixture(scope="module")
def report_dir(smollm2, wikitext_text, tmp_path_factory):
    """A real report of SmolLM2 quantized to int4-g64 on 256 tokens of WikiText-2, saved as `report` saves it."""
    reference, tokenizer = smollm2
    windows = tokenize_corpus(tokenizer, wikitext_text[:5000], window=256, max_tokens=256)
    metadata = {
        "reference": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "modified": "SmolLM2 + int4-g64",
        "modification": "int4-g64",
        "corpus": "/data/wikitext-2-raw/wiki.valid.raw",
        "window": 256,
        "stride": 256,
    }
    report = measure(
        reference, apply_modification(reference, "int4-g64"), windows, layers=True, progress=False, metadata=metadata
    )
    directory = tmp_path_factory.mktemp("report")
    report.save(directory)
    return directory


@pytest.fixture(scope="module")
def report(report_dir):
    return HemorrhageReport.load(report_dir / "report.json")


def _without_model_index(card: str) -> str:
    lines = card.split("\n")
    start = lines.index("model-index:")
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith((" ", "-")))
    return "\n".join(lines[:start] + lines[end:])


def _without_generated_parts(card: str) -> str:
    """The card without the hemorrhage section (markers included) and without the YAML model-index block."""
    section_start = card.index(SECTION_START)
    section_end = card.index(SECTION_END) + len(SECTION_END)
    return _without_model_index(card[:section_start] + card[section_end:])


def test_card_parses_back_with_the_figures_and_keeps_everything_else(tmp_path, report, report_dir, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(EXISTING_CARD, encoding="utf-8")
    arguments = ["card", str(report_dir / "report.json"), "--readme", str(readme)]
    assert main(arguments) == 0
    first = readme.read_bytes()
    assert "updated" in capsys.readouterr().out

    card = ModelCard.load(readme)
    results = {result.metric_type: result for result in card.data.eval_results}
    assert results["kl_divergence"].metric_value == pytest.approx(report.figures["kl_mean"])
    assert results["perplexity_ratio"].metric_value == pytest.approx(report.figures["ppl_ratio"])
    assert results["top1_agreement"].metric_value == pytest.approx(report.figures["top1_agreement"])
    assert results["perplexity"].metric_value == pytest.approx(report.figures["ppl_modified"])
    assert results["kl_divergence"].metric_args == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "modification": "int4-g64",
    }
    assert results["kl_divergence"].dataset_name == "wikitext-2-raw/wiki.valid.raw"
    assert results["accuracy"].metric_value == 0.31  # the publisher's own result is kept
    assert card.data.eval_results[0].dataset_type == "cais/mmlu"
    assert card.data.license == "apache-2.0"
    # A SmolLM2 int4 on WikiText bleeds visibly (KL ≈ 0.5 nats on more text): the real figures, not defaults.
    assert 0.1 < report.figures["kl_mean"] < 2.0 and report.figures["ppl_ratio"] > 1.05

    text = first.decode("utf-8")
    assert f"**{report.severity}**" in text
    assert "| KL mean (nats) | — | " + f"{report.figures['kl_mean']:.5f}" in text
    assert "![Per-layer drift](hemorrhage/layer_drift.png)" in text
    assert (tmp_path / "hemorrhage" / "layer_drift.png").read_bytes()[:4] == b"\x89PNG"
    # The section is appended after one blank line; every other byte is the publisher's.
    assert _without_generated_parts(text) == _without_model_index(EXISTING_CARD) + "\n\n"

    assert main(arguments) == 0  # idempotent: the second run changes no byte
    assert readme.read_bytes() == first
    assert "unchanged" in capsys.readouterr().out


def test_update_replaces_figures_in_place(report):
    card = update_card_text(EXISTING_CARD, report, CardOptions())
    worse = HemorrhageReport.from_dict({**report.to_dict(), "kl_mean": 3.25, "severity": "severe"})
    updated = update_card_text(card, worse, CardOptions())
    assert updated.count(SECTION_START) == 1 and updated.count("type: kl_divergence") == 1
    assert "value: 3.25" in updated and "**severe**" in updated
    assert updated.split(SECTION_START)[0].split("---\n", 2)[2] == card.split(SECTION_START)[0].split("---\n", 2)[2]


def test_new_card_from_template(tmp_path, report, report_dir):
    readme = tmp_path / "card" / "README.md"
    assert main(["card", str(report_dir), "--readme", str(readme), "--model-name", "smollm2-int4-g64"]) == 0
    card = ModelCard.load(readme)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.model_name == "smollm2-int4-g64"
    assert {r.metric_type for r in card.data.eval_results} >= {"kl_divergence", "perplexity_ratio", "top1_agreement"}
    before = readme.read_bytes()
    assert (
        write_card(
            readme,
            report,
            CardOptions(
                plots={
                    "KL distribution": "hemorrhage/kl_distribution.png",
                    "Per-layer drift": "hemorrhage/layer_drift.png",
                }
            ),
        )
        is False
    )
    assert readme.read_bytes() == before


def test_crlf_card_stays_crlf(tmp_path, report):
    readme = tmp_path / "README.md"
    original = EXISTING_CARD.replace("\n", "\r\n").encode("utf-8")
    readme.write_bytes(original)
    assert write_card(readme, report, CardOptions()) is True
    written = readme.read_bytes()
    assert b"\n" not in written.replace(b"\r\n", b"")
    assert written.startswith(original.split(b"model-index:")[0])
    assert ModelCard.load(readme).data.eval_results[-1].metric_type == "delta_p"
    assert write_card(readme, report, CardOptions()) is False


def test_threshold_and_tasks_reach_section_and_model_index(report):
    tasks = [
        {
            "task": "hellaswag",
            "n_items": 200,
            "accuracy_reference": 0.41,
            "accuracy_modified": 0.37,
            "accuracy_drop": 0.04,
            "correct_to_incorrect": 18,
            "incorrect_to_correct": 10,
            "flip_rate": 0.14,
        }
    ]
    threshold = {
        "text": "Collapse past 37.5 ± 4.0 % Wanda sparsity.",
        "value": 37.5,
        "name": "Wanda sparsity threshold (%)",
    }
    card = update_card_text("", report, CardOptions(model_name="m", tasks=tasks, threshold=threshold))
    assert "Collapse past 37.5 ± 4.0 % Wanda sparsity." in card
    assert "| hellaswag | 200 | 41.00% | 37.00% | +4.00% | 18 / 10 (14.00%) |" in card
    results = ModelCard(card).data.eval_results
    assert {(r.dataset_type, r.metric_type, r.metric_value) for r in results} >= {
        ("hellaswag", "accuracy", 0.37),
        ("hellaswag", "flip_rate", 0.14),
        ("wiki", "hemorrhage_threshold", 37.5),  # a dataset name, not a path fragment
    }


def _bits_sweep(kl_by_bits: dict[str, float]) -> dict:
    """A bits sweep's JSON, as hemorrhage_hf.sweep.runner writes it, with given KL means."""
    from hemorrhage_hf.sweep.runner import MODEL_CURVES, StrengthScale, SweepResult, resolve_family

    family = resolve_family("bits")
    scale = StrengthScale.infer(family, list(kl_by_bits))
    levels = [
        {
            "level": level,
            "spec": family.spec(level),
            "seconds": 1.0,
            "strength": None if family.spec(level) is None else scale.strength(level),
            "figures": {"kl_mean": kl, "ppl_ratio": 1 + kl, "top1_agreement": 1 - kl / 20},
        }
        for level, kl in kl_by_bits.items()
    ]
    return SweepResult(family, levels, {}, MODEL_CURVES).to_dict()


def test_cli_threshold_from_a_sweep(tmp_path, report_dir):
    sweep = tmp_path / "sweep.json"
    # ln KL grows slowly down to 5 bits and fast below (strength = −bits): the breakpoint fit finds 5 bits.
    kl = {str(bits): math.exp(-5 + (0.4 if bits >= 5 else 2.5) * (5 - bits)) for bits in range(8, 1, -1)}
    sweep.write_text(json.dumps(_bits_sweep({"32": 0.0, **kl})))
    readme = tmp_path / "README.md"
    assert (
        main(
            [
                "card",
                str(report_dir),
                "--readme",
                str(readme),
                "--model-name",
                "m",
                "--threshold",
                str(sweep),
                "--no-plots",
            ]
        )
        == 0
    )
    card = readme.read_text()
    assert "Swept over bits levels 32, 8, 7, 6, 5, 4, 3, 2" in card and "at level **5**" in card
    assert "![" not in card and not (tmp_path / "hemorrhage").exists()
    threshold = [r for r in ModelCard.load(readme).data.eval_results if r.metric_type == "hemorrhage_threshold"]
    assert threshold[0].metric_value == pytest.approx(5.0, abs=0.01)
    assert threshold[0].metric_name == "Robustness threshold (bits level, breakpoint rule)"
    assert main(["card", str(report_dir), "--threshold", str(report_dir / "report.json")]) == 2


def test_the_card_reads_the_tasks_json_that_the_tasks_command_writes(tmp_path, report_dir, capsys):
    figures = {"n_items": 40, "metric": "acc_norm", "accuracy_reference": 0.6, "accuracy_modified": 0.5}
    figures |= {"accuracy_drop": 0.1, "correct_to_incorrect": 6, "incorrect_to_correct": 2, "flip_rate": 0.2}
    tasks_json = tmp_path / "tasks.json"
    tasks_json.write_text(json.dumps({"reference": "r", "modified": "m", "tasks": {"piqa": figures}}))
    assert main(["card", str(report_dir), "--tasks", str(tasks_json)]) == 0
    assert "| piqa | 40 | 60.00% | 50.00% | +10.00% | 6 / 2 (20.00%) |" in capsys.readouterr().out
    tasks_json.write_text(json.dumps({"tasks": [1, 2]}))
    assert main(["card", str(report_dir), "--tasks", str(tasks_json)]) == 2
    assert "neither the tasks.json that `hemorrhage-hf tasks` writes" in capsys.readouterr().err


def test_the_section_says_what_the_grade_means_for_shipping(report):
    section = render_section(report)
    assert f"**{report.severity}**: {SHIPPING[report.severity]}" in section


def test_comparison_rows_put_both_perplexities_on_one_row(report):
    rows = comparison_rows(report)
    assert rows[0][0] == "perplexity" and rows[0][1].startswith(f"{report.figures['ppl_reference']:.3f}")
    assert rows[-1] == ("severity", "—", report.severity)
    with pytest.raises(HemorrhageError, match="unknown report figures"):
        comparison_rows(report, ["kl_mean", "no_such_figure"])


def test_section_without_layers_or_plots(report):
    bare = HemorrhageReport(figures=report.figures, metadata=report.metadata)
    section = render_section(bare)
    assert "Where it bleeds" not in section and "![" not in section and section.startswith("## Hemorrhage report")


@pytest.mark.parametrize(
    ("card", "message"),
    [
        (f"# x\n{SECTION_START}\nhalf a section\n", "only one of the hemorrhage-hf section markers"),
        ("---\n- a list\n---\n# x\n", "YAML header is not a mapping"),
    ],
)
def test_malformed_cards_are_refused(report, card, message):
    with pytest.raises(HemorrhageError, match=message):
        update_card_text(card, report, CardOptions(model_name="m"))


def test_card_needs_a_model_name_when_it_has_no_model_index(report):
    with pytest.raises(HemorrhageError, match="--model-name"):
        update_card_text("# A card without metadata\n", report, CardOptions())


def test_cli_errors_and_print_mode(tmp_path, report_dir, capsys):
    assert main(["card", str(tmp_path / "missing.json")]) == 2
    assert "report file not found" in capsys.readouterr().err
    not_a_report = tmp_path / "other.json"
    not_a_report.write_text('{"a": 1}')
    assert main(["card", str(not_a_report)]) == 2
    assert "not a hemorrhage report" in capsys.readouterr().err
    assert main(["card", str(report_dir / "report.json")]) == 0
    assert capsys.readouterr().out.startswith("## Hemorrhage report")
