"""Task-level hemorrhage: accuracy of the reference and the modified model on standard zero-shot tasks, the accuracy
drop and the answers that flipped.

Perplexity hides damage that tasks show (the paper's IQ2_M example keeps PPL while MMLU falls 20 points), so sweeps
and reports carry task accuracy beside KL. Scoring follows lm-evaluation-harness 0.4 (checked against 0.4.13's
``arc_easy`` and ``piqa`` with its ``HFLM``: same token ids, log-likelihoods and answers):

==============  =============================================  ==============================================
task            prompt → continuation                          answer
==============  =============================================  ==============================================
lambada         passage without its last word → " word"        correct iff greedy decoding yields every token
arc-easy/-chal  "Question: {q}\\nAnswer:" → " {choice}"          choice with the highest log-likelihood per
piqa            "Question: {goal}\\nAnswer:" → " {solution}"     character of the continuation (``acc_norm``);
hellaswag       "{activity}: {context}" → " {ending}"          plain sums (``acc``) are reported too
==============  =============================================  ==============================================

Each choice is the harness's target delimiter (a space) followed by the choice text; ``acc_norm`` divides a choice's
log-likelihood by the length in characters of the choice text alone, without the delimiter, as the harness does.
Trailing spaces of a prompt move to the continuation, and the continuation's tokens are those of prompt +
continuation past the prompt's own tokens; both are encoded with the tokenizer's own special tokens, so a model
whose tokenizer adds BOS by default (Llama, Gemma) reads BOS before the prompt, as the harness's ``HFLM`` gives it.
Every item's *answer* is an int (the chosen index;
for LAMBADA 1 = correct, gold 1), so answers feed :func:`hemorrhage_hf.tasks.flips.compare_answers` and the ``answers``
config of the ``hemorrhage`` metric unchanged.

Data: a local path in the layout of each task's usual release (ARC ``*.jsonl`` in AI2's schema or the
``question``/``options``/``answer`` reformat, PIQA ``valid.jsonl`` + ``valid-labels.lst``, HellaSwag in llama.cpp's
six-line text format, optionally ``.bz2``, LAMBADA ``{"text"}`` jsonl), a folder holding such a file, or a
`datasets` id (needs the Hub).

Example:
    >>> from hemorrhage_hf.tasks.scoring import parse_hellaswag_text
    >>> lines = ["Roof shingle removal: A man is sitting on a roof. he", "3", "is wrapping skis.",
    ...          "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing on a roof."]
    >>> item = parse_hellaswag_text(lines)[0]
    >>> item.gold, item.choices[3]
    (3, ' starts pulling up roofing on a roof.')
"""

from __future__ import annotations

import bz2
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import HemorrhageError
from ..measurement.engine import model_outputs
from .flips import accuracy_error, compare_answers

#: (datasets id, config, split) used when a task is named without a local path.
HUB_SOURCES = {
    "lambada": ("EleutherAI/lambada_openai", "default", "test"),
    "arc-easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc-challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "piqa": ("ybisk/piqa", None, "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
}
TASK_NAMES = tuple(HUB_SOURCES)
#: What separates a prompt from each choice (lm-evaluation-harness's ``target_delimiter``); every parsed choice
#: starts with it, and ``acc_norm`` does not count it.
TARGET_DELIMITER = " "


class TaskDataError(HemorrhageError):
    """Task data is missing, unreadable, or not in a known layout."""


@dataclass(frozen=True)
class TaskItem:
    """One question: a prompt, its candidate continuations, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    """A named list of items; ``greedy`` tasks (LAMBADA) score their single continuation by greedy match."""

    name: str
    items: list[TaskItem]
    source: str
    greedy: bool = False

    def __len__(self) -> int:
        return len(self.items)


# --- parsing: one function per layout, each taking rows and returning items ------------------------------------


def parse_lambada(rows: Iterable[dict]) -> list[TaskItem]:
    """LAMBADA ``{"text"}`` rows: the target is the last whitespace-separated word."""
    items = []
    for row in rows:
        context, _, word = row["text"].strip().rpartition(" ")
        if not context or not word:
            raise TaskDataError(f"a LAMBADA passage needs a context and a last word: {row['text'][:80]!r}")
        items.append(TaskItem(context, (TARGET_DELIMITER + word,), 0))
    return items


def parse_arc(rows: Iterable[dict]) -> list[TaskItem]:
    """ARC rows in AI2's schema, the ``question``/``options``/``answer`` reformat, or the `datasets` schema."""
    items = []
    for row in rows:
        question = row["question"]
        if isinstance(question, dict):  # AI2: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
            stem, options = question["stem"], question["choices"]
        elif isinstance(row.get("choices"), dict):  # datasets: {"question", "choices": {"text": [], "label": []}}
            stem, options = (
                question,
                [{"text": t, "label": lab} for t, lab in zip(row["choices"]["text"], row["choices"]["label"])],
            )
        else:  # reformat: {"question", "options": [{"label", "text"}], "answer"}
            stem, options = question, row["options"]
        answer = row.get("answerKey", row.get("answer"))
        labels = [str(option["label"]) for option in options]
        if str(answer) not in labels:
            raise TaskDataError(f"ARC item {row.get('id', '?')}: answer {answer!r} is not one of the labels {labels}")
        items.append(
            TaskItem(
                f"Question: {stem}\nAnswer:",
                tuple(TARGET_DELIMITER + o["text"] for o in options),
                labels.index(str(answer)),
            )
        )
    return items


def parse_piqa(rows: Iterable[dict], labels: Sequence[int] | None = None) -> list[TaskItem]:
    """PIQA ``{"goal", "sol1", "sol2"}`` rows with labels from the rows (``label``) or a separate list."""
    rows = list(rows)
    if labels is None:
        labels = [row["label"] for row in rows]
    if len(labels) != len(rows):
        raise TaskDataError(f"PIQA: {len(rows)} questions but {len(labels)} labels")
    return [
        TaskItem(
            f"Question: {row['goal']}\nAnswer:",
            (TARGET_DELIMITER + row["sol1"], TARGET_DELIMITER + row["sol2"]),
            int(label),
        )
        for row, label in zip(rows, labels)
    ]


def parse_hellaswag_text(lines: Sequence[str]) -> list[TaskItem]:
    """llama.cpp's HellaSwag text: per item a context line, the gold label (0–3), and four endings."""
    if len(lines) % 6:
        raise TaskDataError(f"HellaSwag text must have 6 lines per item, got {len(lines)} lines")
    return [
        TaskItem(lines[i], tuple(TARGET_DELIMITER + ending for ending in lines[i + 2 : i + 6]), int(lines[i + 1]))
        for i in range(0, len(lines), 6)
    ]


def parse_hellaswag_rows(rows: Iterable[dict]) -> list[TaskItem]:
    """HellaSwag `datasets` rows, with the harness's preprocessing (bracketed markers dropped, ctx_b capitalised)."""
    import re

    def clean(text: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"\[.*?\]", "", text.replace(" [title]", ". "))).strip()

    return [
        TaskItem(
            clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"),
            tuple(TARGET_DELIMITER + clean(ending) for ending in row["endings"]),
            int(row["label"]),
        )
        for row in rows
    ]


# --- loading ------------------------------------------------------------------------------------------------------

_LOCAL_FILES = {
    "lambada": ("lambada_test.jsonl", "*.jsonl"),
    "arc-easy": ("test.jsonl", "*.jsonl"),
    "arc-challenge": ("arc_challenge_test.jsonl", "test.jsonl", "*.jsonl"),
    "piqa": ("valid.jsonl", "*.jsonl"),
    "hellaswag": ("hellaswag_val_full.txt.bz2", "*.txt.bz2", "*.txt"),
}


def _read_lines(path: Path) -> list[str]:
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise TaskDataError(f"cannot read {path}: {error}") from error


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_lines(path), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise TaskDataError(f"{path}:{number} is not JSON: {error}") from error
    return rows


def _local_file(name: str, folder: Path) -> Path:
    for pattern in _LOCAL_FILES[name]:
        matches = sorted(path for path in folder.glob(pattern) if "question-answers" not in path.name)
        if matches:
            return matches[0]
    raise TaskDataError(f"no {name} data file in {folder} (looked for {', '.join(_LOCAL_FILES[name])})")


def _parse_local(name: str, path: Path) -> list[TaskItem]:
    if name == "hellaswag":
        return parse_hellaswag_text(_read_lines(path))
    rows = _read_jsonl(path)
    if name == "lambada":
        return parse_lambada(rows)
    if name == "piqa":
        labels_file = path.with_name(path.stem + "-labels.lst")
        labels = [int(line) for line in _read_lines(labels_file)] if labels_file.is_file() else None
        if labels is None and rows and "label" not in rows[0]:
            raise TaskDataError(f"PIQA {path} has no labels: expected {labels_file} beside it")
        return parse_piqa(rows, labels)
    return parse_arc(rows)


def _parse_hub(name: str, source: str) -> list[TaskItem]:
    import datasets

    hub_id, config, split = HUB_SOURCES[name]
    rows = datasets.load_dataset(source, config if source == hub_id else None, split=split)
    parser = {
        "lambada": parse_lambada,
        "arc-easy": parse_arc,
        "arc-challenge": parse_arc,
        "piqa": parse_piqa,
        "hellaswag": parse_hellaswag_rows,
    }[name]
    return parser(rows)


def load_task(name: str, source: str | Path | None = None, *, limit: int | None = None) -> Task:
    """Load task ``name`` from a file, a folder, or a `datasets` id (default: the usual Hub dataset).

    ``limit`` keeps the first N items (the files' own order), for quick sweeps.
    """
    if name not in HUB_SOURCES:
        raise TaskDataError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    if limit is not None and limit < 1:
        raise TaskDataError(f"limit must be at least 1, got {limit}")
    source = str(source) if source is not None else HUB_SOURCES[name][0]
    path = Path(source).expanduser()
    if path.exists():
        items = _parse_local(name, _local_file(name, path) if path.is_dir() else path)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise TaskDataError(f"{name} data not found: {source}")
    else:
        items = _parse_hub(name, source)
    if not items:
        raise TaskDataError(f"{source} holds no {name} items")
    return Task(name, items[:limit] if limit else items, source, greedy=name == "lambada")


def parse_task_argument(argument: str, *, limit: int | None = None) -> Task:
    """``NAME`` or ``NAME=PATH_OR_DATASET_ID``, as the CLI takes it."""
    name, _, source = argument.partition("=")
    return load_task(name.strip(), source.strip() or None, limit=limit)


# --- scoring ------------------------------------------------------------------------------------------------------


def continuation_tokens(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the harness's way: trailing spaces join the continuation, the continuation's
    ids are those of the whole text past the context's own, and the tokenizer adds its special tokens (BOS where it
    adds one by default)."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer(stripped + continuation).input_ids
    context_ids = tokenizer(stripped).input_ids
    return whole[: len(context_ids)], whole[len(context_ids) :]


@dataclass(frozen=True)
class ContinuationScore:
    log_likelihood: float
    greedy: bool  # every continuation token is the model's top-1 prediction


@torch.no_grad()  # not inference_mode: quanto and torchao tensors fail under it
def score_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    progress: bool = False,
    description: str = "scoring",
) -> list[ContinuationScore]:
    """Log-likelihood (fp32 log-softmax) and greedy match of each (context, continuation), batched by length."""
    encoded = []
    for context, continuation in pairs:
        context_ids, continuation_ids = continuation_tokens(tokenizer, context, continuation)
        if not context_ids or not continuation_ids:
            raise TaskDataError(f"empty context or continuation after tokenizing {context[:60]!r} / {continuation!r}")
        encoded.append((context_ids + continuation_ids, len(continuation_ids)))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    scores: list[ContinuationScore | None] = [None] * len(encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(order), batch_size), desc=description, unit="batch", disable=not progress):
        chunk = order[start : start + batch_size]
        length = max(len(encoded[i][0]) for i in chunk)
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, index in enumerate(chunk):
            ids = encoded[index][0]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        logits = model_outputs(model, input_ids, attention_mask=attention_mask).logits.float().cpu()
        for row, index in enumerate(chunk):
            ids, n_continuation = encoded[index]
            positions = torch.arange(len(ids) - n_continuation - 1, len(ids) - 1)
            targets = torch.tensor(ids[-n_continuation:])
            logprobs = torch.log_softmax(logits[row, positions], dim=-1)
            scores[index] = ContinuationScore(
                float(logprobs.gather(-1, targets[:, None]).sum()),
                bool((logits[row, positions].argmax(-1) == targets).all()),
            )
    return scores


@dataclass(frozen=True)
class TaskAnswers:
    """One model's answers on a task: ``answers`` by the task's main rule, ``answers_unnormalized`` by plain sums."""

    task: str
    metric: str  # "acc" (LAMBADA's greedy match) or "acc_norm"
    answers: list[int]
    answers_unnormalized: list[int]
    gold: list[int]

    @property
    def accuracy(self) -> float:
        return sum(a == g for a, g in zip(self.answers, self.gold)) / len(self.gold)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "metric": self.metric,
            "answers": self.answers,
            "answers_unnormalized": self.answers_unnormalized,
            "gold": self.gold,
        }


def answer_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    batch_size: int = 16,
    progress: bool = False,
    role: str = "model",
) -> TaskAnswers:
    """The model's answer to every item of ``task`` (see the module docstring for the rules); ``role`` names the
    model on the progress bar."""
    pairs = [(item.context, choice) for item in task.items for choice in item.choices]
    scores = iter(
        score_continuations(
            model, tokenizer, pairs, batch_size=batch_size, progress=progress, description=f"{task.name}: {role}"
        )
    )
    answers, plain = [], []
    for item in task.items:
        item_scores = [next(scores) for _ in item.choices]
        if task.greedy:
            answers.append(int(item_scores[0].greedy))
            plain.append(answers[-1])
            continue
        sums = [score.log_likelihood for score in item_scores]
        per_character = [
            total / len(choice.removeprefix(TARGET_DELIMITER)) for total, choice in zip(sums, item.choices)
        ]
        answers.append(max(range(len(sums)), key=per_character.__getitem__))
        plain.append(max(range(len(sums)), key=sums.__getitem__))
    gold = [1] * len(task.items) if task.greedy else [item.gold for item in task.items]
    return TaskAnswers(task.name, "acc" if task.greedy else "acc_norm", answers, plain, gold)


def compare_task_answers(reference: TaskAnswers, modified: TaskAnswers) -> dict:
    """Accuracy of both (with standard errors), drop (with its paired error and McNemar's p) and flips, by the task's
    main rule; plain-sum accuracy (``acc``) with its error too."""
    if reference.gold != modified.gold:
        raise HemorrhageError(f"the two answer sets of {reference.task} are for different items")
    figures = {"task": reference.task, "metric": reference.metric}
    figures.update(compare_answers(reference.answers, modified.answers, reference.gold))
    for side, answers in (("reference", reference), ("modified", modified)):
        correct = [a == g for a, g in zip(answers.answers_unnormalized, answers.gold)]
        figures[f"accuracy_unnormalized_{side}"] = sum(correct) / len(correct)
        figures[f"accuracy_unnormalized_{side}_error"] = accuracy_error(correct)
    return figures


def task_hemorrhage(
    reference: PreTrainedModel | TaskAnswers,
    modified: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """:func:`compare_task_answers` of two models on ``task`` (``reference`` may be answers computed earlier)."""
    if not isinstance(reference, TaskAnswers):
        reference = answer_task(reference, tokenizer, task, batch_size=batch_size, progress=progress, role="reference")
    modified_answers = answer_task(modified, tokenizer, task, batch_size=batch_size, progress=progress, role="modified")
    figures = compare_task_answers(reference, modified_answers)
    figures["answers"] = {"reference": reference.answers, "modified": modified_answers.answers, "gold": reference.gold}
    return figures
