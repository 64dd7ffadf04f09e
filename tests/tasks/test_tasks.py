"""Task-level hemorrhage on the real task files and the real SmolLM2."""

import json
import math
from pathlib import Path

import pytest
from conftest import SCALE, shared_data_path
from lm_eval.api.metrics import mean_stderr
from scipy import stats

from hemorrhage_hf.modify import apply_modification
from hemorrhage_hf.tasks.scoring import (
    TaskAnswers,
    TaskDataError,
    answer_task,
    compare_task_answers,
    continuation_tokens,
    load_task,
    parse_task_argument,
    task_hemorrhage,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name, relative, n_items, n_choices",
    [
        ("lambada", "lambada", 5153, 1),
        ("arc-easy", "arc/ARC-Easy", 2376, None),
        ("arc-challenge", "arc/ARC-Challenge", 1172, None),
        ("piqa", "piqa", 1838, 2),
        ("hellaswag", "hellaswag", 10042, 4),
    ],
)
def test_every_task_file_parses_completely(name, relative, n_items, n_choices):
    task = load_task(name, shared_data_path(relative))
    assert len(task) == n_items
    assert all(0 <= item.gold < len(item.choices) for item in task.items)
    if n_choices:
        assert {len(item.choices) for item in task.items} == {n_choices}
    assert all(choice.startswith(" ") for item in task.items for choice in item.choices)


def test_arc_answers_match_the_official_keys():
    for relative, name in (("arc/ARC-Easy", "arc-easy"), ("arc/ARC-Challenge", "arc-challenge")):
        task = load_task(name, shared_data_path(relative))
        keys = [json.loads(line)["answerKey"] for line in shared_data_path(f"{relative}/question-answers.jsonl").open()]
        # NYSED items are labelled 1-4 in the key; the Challenge copy relabels them A-D in the same order.
        expected = [int(key) - 1 if key.isdigit() else "ABCDE".index(key) for key in keys]
        assert [item.gold for item in task.items] == expected


def test_piqa_takes_its_labels_from_the_labels_file():
    task = load_task("piqa", shared_data_path("piqa/valid.jsonl"))
    labels = [int(line) for line in shared_data_path("piqa/valid-labels.lst").read_text().split()]
    assert [item.gold for item in task.items] == labels


def test_lambada_targets_the_last_word():
    task = load_task("lambada", shared_data_path("lambada"), limit=3)
    assert len(task) == 3 and task.greedy
    assert task.items[0].context.endswith("I don't care about") and task.items[0].choices[0] == " signs"


def test_harness_tokenization_moves_trailing_spaces_to_the_continuation(smollm2):
    _, tokenizer = smollm2
    spaced = continuation_tokens(tokenizer, "The cat sat on the ", "mat")
    plain = continuation_tokens(tokenizer, "The cat sat on the", " mat")
    assert spaced == plain and tokenizer.decode(plain[1]) == " mat"


def test_bad_task_arguments_are_refused(tmp_path):
    with pytest.raises(TaskDataError, match="unknown task"):
        parse_task_argument("mmlu=somewhere")
    with pytest.raises(TaskDataError, match="not found"):
        load_task("piqa", tmp_path / "missing" / "valid.jsonl")
    with pytest.raises(TaskDataError, match="no arc-easy data file"):
        load_task("arc-easy", tmp_path)
    (tmp_path / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(TaskDataError, match="no labels"):
        load_task("piqa", tmp_path)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(TaskDataError, match="not JSON"):
        load_task("lambada", tmp_path / "broken.jsonl")
    with pytest.raises(TaskDataError, match="limit"):
        load_task("piqa", tmp_path, limit=0)


@pytest.fixture(scope="module")
def piqa():
    return load_task("piqa", shared_data_path("piqa"), limit=40 * SCALE)


@pytest.fixture(scope="module")
def piqa_reference_answers(smollm2, piqa):
    model, tokenizer = smollm2
    return answer_task(model, tokenizer, piqa)


@pytest.mark.heavy
def test_smollm2_beats_chance_on_piqa(piqa, piqa_reference_answers):
    # SmolLM2-135M scores ~0.68 acc_norm on PIQA (0.68 on the first 100 items here); chance is 0.5.
    assert piqa_reference_answers.accuracy > 0.5 + 2 * (0.25 / len(piqa)) ** 0.5
    assert piqa_reference_answers.metric == "acc_norm" and piqa_reference_answers.gold == [
        item.gold for item in piqa.items
    ]


@pytest.mark.heavy
def test_two_bit_weights_flip_answers(smollm2, piqa, piqa_reference_answers):
    model, tokenizer = smollm2
    figures = task_hemorrhage(piqa_reference_answers, apply_modification(model, "int2-g64"), tokenizer, piqa)
    assert figures["flip_rate"] > 0.15 and figures["correct_to_incorrect"] > 0
    assert figures["accuracy_modified"] < figures["accuracy_reference"]
    # Errors as lm-evaluation-harness computes them (its own mean_stderr), and the paired ones from scipy.
    answers = figures["answers"]
    correct = {side: [a == g for a, g in zip(answers[side], answers["gold"])] for side in ("reference", "modified")}
    for side in ("reference", "modified"):
        assert figures[f"accuracy_{side}_error"] == pytest.approx(mean_stderr(correct[side]), rel=1e-12)
    difference = [int(r) - int(m) for r, m in zip(correct["reference"], correct["modified"])]
    assert figures["accuracy_drop_error"] == pytest.approx(stats.sem(difference), rel=1e-12)
    down, up = figures["correct_to_incorrect"], figures["incorrect_to_correct"]
    tail = sum(math.comb(down + up, k) for k in range(min(down, up) + 1)) / 2 ** (down + up)
    assert figures["mcnemar_p_value"] == pytest.approx(min(1.0, 2 * tail), rel=1e-9)
    assert figures["answers"]["reference"] == piqa_reference_answers.answers and len(
        figures["answers"]["modified"]
    ) == len(piqa)


#: Answers of the fp32 SmolLM2 measured on 2026-12-06 (AMD EPYC, torch 2.13 CPU). A test allows one item to differ:
#: a near-tie between two choices may resolve otherwise under another BLAS build.
MEASURED = {
    "lambada": [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1],  # 11/30
    "hellaswag": [3, 2, 0, 0, 2, 2, 1, 3],  # acc_norm 1/8 (gold 3, 3, 2, 2, 1, 1, 2, 0)
    "arc-challenge": [3, 3, 1, 3, 1, 2, 1, 2],  # acc_norm 2/8 (gold 2, 1, 2, 3, 3, 1, 2, 2)
}


@pytest.mark.parametrize(
    "name, relative", [("lambada", "lambada"), ("hellaswag", "hellaswag"), ("arc-challenge", "arc/ARC-Challenge")]
)
def test_smollm2_answers_match_the_measured_ones(smollm2, name, relative):
    model, tokenizer = smollm2
    task = load_task(name, shared_data_path(relative), limit=len(MEASURED[name]))
    answers = answer_task(model, tokenizer, task)
    assert answers.metric == ("acc" if name == "lambada" else "acc_norm")
    assert sum(a != m for a, m in zip(answers.answers, MEASURED[name])) <= 1
    if name == "lambada":
        assert answers.gold == [1] * len(task)
        assert abs(sum(answers.answers) - 11) <= 1


def test_task_answers_feed_the_metric_answers_config():
    import evaluate

    reference = TaskAnswers("piqa", "acc_norm", [0, 1, 1, 0, 1], [0, 1, 1, 0, 1], [0, 1, 0, 0, 1])
    modified = TaskAnswers("piqa", "acc_norm", [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 1, 0, 0, 1])
    figures = compare_task_answers(reference, modified)
    assert (figures["correct_to_incorrect"], figures["incorrect_to_correct"], figures["flip_rate"]) == (2, 1, 0.6)
    metric = evaluate.load(str(REPO / "metrics" / "hemorrhage"), "answers")
    flips = metric.compute(predictions=modified.answers, references=reference.answers, gold=reference.gold)
    assert flips == {key: figures[key] for key in flips}


@pytest.mark.heavy
def test_tasks_command(tmp_path, capsys):
    from hemorrhage_hf.cli import main

    code = main(
        [
            "tasks",
            "--reference",
            "default",
            "--modification",
            "int8",
            "--task",
            f"piqa={shared_data_path('piqa')}",
            "--limit",
            "8",
            "--quiet",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    piqa = json.loads((tmp_path / "tasks.json").read_text())["tasks"]["piqa"]
    assert piqa["n_items"] == 8 and len(piqa["answers"]["modified"]) == 8 and piqa["metric"] == "acc_norm"
    assert "piqa" in capsys.readouterr().out
