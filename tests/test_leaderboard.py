"""`hemorrhage-hf leaderboard` end to end on the real SmolLM2: one reference pass, candidates ranked with tests."""

import csv
import json

import pytest
from conftest import shared_data_path

from hemorrhage_hf.cli import main
from hemorrhage_hf.commands.common import GATE_FAILED
from hemorrhage_hf.errors import HemorrhageError
from hemorrhage_hf.leaderboard import is_model_candidate, rank_candidates
from hemorrhage_hf.tasks.scoring import answer_task, load_task


def test_leaderboard_ranks_specs_with_paired_tests_and_a_pareto_plot(tmp_path, smollm2, wikitext_text):
    text_file = tmp_path / "wiki.txt"
    text_file.write_text(wikitext_text[:20_000], encoding="utf-8")
    output = tmp_path / "board"
    arguments = ["leaderboard", "--reference", "default", "int4-g64", "int8", "--text-file", str(text_file)]
    arguments += ["--max-tokens", "512", "--window", "256", "--quiet", "--fail-above", "kl_mean=0.1"]
    code = main(arguments + ["--output", str(output)])
    assert code == GATE_FAILED  # int4-g64 bleeds past the gate (KL ≈ 0.5 on this text); int8 passes it
    board = json.loads((output / "leaderboard.json").read_text())
    int8, int4 = board["ranking"]
    assert [int8["candidate"], int4["candidate"]] == ["int8", "int4-g64"]  # ranked by KL, not by the order given
    # Measured on this text: int8 ≈ 0.003 nats, int4-g64 ≈ 0.45 (BENCHMARKS.md has the larger run).
    assert int8["kl_mean"] < 0.01 < 0.2 < int4["kl_mean"] < 1.0 and int8["n_tokens"] == int4["n_tokens"] == 510
    assert int4["bits_per_weight"] == pytest.approx(4.25) and int8["bits_per_weight"] > 8
    (test,) = board["neighbour_tests"]
    assert test["better"] == "int8" and test["worse"] == "int4-g64" and test["p_value"] < 1e-6
    assert test["ci_low"] > 0 and test["mean_difference"] == pytest.approx(int4["kl_mean"] - int8["kl_mean"])
    rows = list(csv.DictReader((output / "leaderboard.csv").open()))
    assert [row["candidate"] for row in rows] == ["int8", "int4-g64"]
    markdown = (output / "leaderboard.md").read_text()
    assert "| 1 | `int8` |" in markdown and "![KL against bits per weight](pareto.png)" in markdown
    assert (output / "pareto.png").stat().st_size > 10_000


def test_candidates_are_checked_before_any_model_runs():
    assert not is_model_candidate("int4-g64") and is_model_candidate("model-Q4_K_M.gguf")
    with pytest.raises(HemorrhageError, match="named twice"):
        rank_candidates("default", ["int8", "int8"])
    with pytest.raises(HemorrhageError, match="at least one candidate"):
        rank_candidates("default", [])


def test_task_accuracy_drop_and_mcnemar_between_neighbours(tmp_path, smollm2, wikitext_text, capsys):
    """The reference itself as a candidate flips nothing; int2-g64 (KL ≈ 12) loses ARC-Easy answers."""
    text_file = tmp_path / "wiki.txt"
    text_file.write_text(wikitext_text[:5_000], encoding="utf-8")
    arc = shared_data_path("arc/ARC-Easy")
    output = tmp_path / "board"
    arguments = ["leaderboard", "--reference", "default", "int2-g64", "default", "--text-file", str(text_file)]
    arguments += ["--max-tokens", "64", "--window", "64", "--quiet", "--no-plots", "--output", str(output)]
    assert main(arguments + ["--task", f"arc-easy={arc}", "--task-limit", "5"]) == 0
    board = json.loads((output / "leaderboard.json").read_text())
    model, tokenizer = smollm2
    expected = answer_task(model, tokenizer, load_task("arc-easy", arc, limit=5))  # what `tasks` gives alone
    reference = board["reference_tasks"]["arc-easy"]
    assert reference["metric"] == "acc_norm" and reference["n_items"] == 5
    assert reference["accuracy"] == expected.accuracy == 0.8  # 4 of the first 5 ARC-Easy items, measured
    same, int2 = board["ranking"]
    assert same["candidate"] == "default" and same["kl_mean"] < 1e-6
    assert same["arc-easy_accuracy"] == 0.8 and same["arc-easy_accuracy_drop"] == 0
    assert same["arc-easy_correct_to_incorrect"] == same["arc-easy_incorrect_to_correct"] == 0
    assert same["arc-easy_mcnemar_p_value"] == 1.0
    # Measured: int2-g64 keeps 1 of the 4 right answers and gains none (McNemar 3 vs 0: p = 2 · ½³).
    assert int2["arc-easy_accuracy"] == 0.2 and int2["arc-easy_accuracy_drop"] == pytest.approx(0.6)
    assert (int2["arc-easy_correct_to_incorrect"], int2["arc-easy_incorrect_to_correct"]) == (3, 0)
    assert int2["arc-easy_mcnemar_p_value"] == pytest.approx(0.25) and int2["arc-easy_accuracy_drop_error"] > 0
    (test,) = board["neighbour_tests"]
    neighbours = test["tasks"]["arc-easy"]
    assert (neighbours["only_better_correct"], neighbours["only_worse_correct"]) == (3, 0)
    assert neighbours["mcnemar_p_value"] == pytest.approx(0.25)
    assert neighbours["accuracy_difference"] == pytest.approx(0.6)
    rows = list(csv.DictReader((output / "leaderboard.csv").open()))
    assert float(rows[1]["arc-easy_accuracy"]) == 0.2
    markdown = (output / "leaderboard.md").read_text()
    assert "## arc-easy" in markdown
    assert "| 2 | `int2-g64` | 20.0% ± 20.0% | +60.0% ± 24.5% | 3 | 0 | 0.25 |" in markdown


@pytest.mark.parametrize(
    "task, message",
    [("mmlu", "unknown task 'mmlu'"), ("piqa=/no/such/piqa/valid.jsonl", "piqa data not found")],
)
def test_bad_tasks_stop_the_leaderboard_before_any_model_loads(tmp_path, task, message, capsys):
    # The reference does not exist: had a model been loaded first, its error would be the one reported.
    arguments = ["leaderboard", "--reference", str(tmp_path / "no-model"), "int8", "--task", task]
    assert main(arguments + ["--output", str(tmp_path / "board")]) == 2
    error = capsys.readouterr().err
    assert message in error and "no-model" not in error
    assert not (tmp_path / "board").exists()
