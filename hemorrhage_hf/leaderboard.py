"""One reference, many candidates: rank quantizations (and any other modification) against one exact reference store.

The reference runs once, into an exact reference store (:mod:`hemorrhage_hf.measurement.refstore`); then each
candidate (a spec applied to the reference, or a checkpoint folder, ``.gguf`` file or Hub id) is loaded, measured
against the store and freed before the next, so one candidate is in memory at a time beside the reference. Candidates
are ranked by mean KL; each is compared with the next better one by a paired test on the per-token KL differences
(batch-means standard error, :func:`~hemorrhage_hf.measurement.statistics.paired_difference`), so "A beats B" comes
with its confidence.

With ``tasks`` (:mod:`hemorrhage_hf.tasks.scoring`), the reference and every candidate, while in memory, also answer
each task's items; each row carries the candidate's accuracy and its drop against the reference (paired error,
McNemar's exact p of its flips), and neighbours are compared by McNemar's exact test on their per-item correctness.

Example:
    >>> from hemorrhage_hf.comparison import TextSource
    >>> board = rank_candidates("default", ["int8", "int4-g64"], source=TextSource(max_tokens=1024))  # doctest: +SKIP
    >>> [entry.name for entry in board.entries]  # doctest: +SKIP
    ['int8', 'int4-g64']
"""

from __future__ import annotations

import csv
import gc
import io
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from .atomic import atomic_write_text, write_json
from .comparison import (
    LoadOptions,
    ModelLike,
    TextSource,
    _check_modified,
    _modification_details,
    _modify,
    _run_metadata,
    check_engine_tokenization,
)
from .errors import HemorrhageError, SpecError
from .measurement.engine import measure
from .measurement.refstore import build_reference_file
from .measurement.statistics import paired_difference
from .models import assert_same_tokenizer, load_tokenizer, model_label
from .modify import parse_spec
from .modify.calibration import CalibrationSettings
from .tasks.flips import accuracy_error, compare_answers
from .tasks.scoring import Task, TaskAnswers, answer_task, compare_task_answers

#: The figures each row of the leaderboard carries, from the candidate's report.
ROW_FIGURES = (
    "kl_mean",
    "kl_mean_error_block",
    "kl_p99",
    "top1_agreement",
    "ppl_ratio",
    "delta_p_mean",
    "n_tokens",
)
#: Per task, ``{task}_{column}`` of each row: the candidate's figure under the key of
#: :func:`~hemorrhage_hf.tasks.scoring.compare_task_answers`.
TASK_COLUMNS = {
    "accuracy": "accuracy_modified",
    "accuracy_error": "accuracy_modified_error",
    "accuracy_unnormalized": "accuracy_unnormalized_modified",
    "accuracy_drop": "accuracy_drop",
    "accuracy_drop_error": "accuracy_drop_error",
    "mcnemar_p_value": "mcnemar_p_value",
    "correct_to_incorrect": "correct_to_incorrect",
    "incorrect_to_correct": "incorrect_to_correct",
}


def is_model_candidate(candidate: str) -> bool:
    """A candidate names a model (folder, ``.gguf`` file, Hub id) unless it is a modification spec.

    Example:
        >>> is_model_candidate("int4-g64"), is_model_candidate("model-Q4_K_M.gguf")
        (False, True)
    """
    if os.path.exists(candidate) or candidate.endswith(".gguf"):
        return True
    try:
        parse_spec(candidate)
    except SpecError:
        return True
    return False


@dataclass
class LeaderboardEntry:
    """One candidate's figures, footprint and speed; ``kl`` holds its per-token KL for the paired tests.

    ``tasks`` maps a task name to :func:`~hemorrhage_hf.tasks.scoring.compare_task_answers` against the reference,
    ``correct`` to the candidate's per-item correctness, for McNemar's test between neighbours.
    """

    name: str
    figures: dict
    footprint: dict
    tokens_per_second: float
    kl: np.ndarray = field(repr=False)
    tasks: dict[str, dict] = field(default_factory=dict)
    correct: dict[str, list[bool]] = field(default_factory=dict, repr=False)
    #: wall-clock seconds of loading or modifying (``prepare``), measuring and answering tasks
    seconds: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        row = {
            "candidate": self.name,
            **{key: self.figures.get(key) for key in ROW_FIGURES},
            "bits_per_weight": self.footprint.get("bits_per_weight"),
            "footprint_source": self.footprint.get("source"),
            "weight_bytes": self.footprint.get("weight_bytes"),
            "tokens_per_second": self.tokens_per_second,
        }
        for task, figures in self.tasks.items():
            row.update({f"{task}_{column}": figures[key] for column, key in TASK_COLUMNS.items()})
        return row


def task_neighbour_test(better: Sequence[bool], worse: Sequence[bool]) -> dict:
    """Two candidates' per-item correctness on one task: accuracy difference (better − worse) with its paired
    error, and McNemar's exact p of the items only one of them got right.

    Example:
        >>> test = task_neighbour_test([1, 1, 1, 0, 1, 1], [1, 0, 0, 0, 1, 0])
        >>> [test[key] for key in ("accuracy_difference", "only_better_correct", "only_worse_correct")]
        [0.5, 3, 0]
        >>> test["mcnemar_p_value"]  # three flips, all one way: 2 · (1/2)³
        0.25
    """
    figures = compare_answers(list(better), list(worse))
    return {
        "accuracy_difference": figures["accuracy_drop"],
        "accuracy_difference_error": figures["accuracy_drop_error"],
        "only_better_correct": figures["correct_to_incorrect"],
        "only_worse_correct": figures["incorrect_to_correct"],
        "mcnemar_p_value": figures["mcnemar_p_value"],
    }


@dataclass
class Leaderboard:
    """Candidates ranked by mean KL (best first), with a paired test between each and the one ranked above it."""

    reference: str
    metadata: dict
    entries: list[LeaderboardEntry]
    #: the reference's own answers to each task, by task name
    reference_answers: dict[str, TaskAnswers] = field(default_factory=dict)
    #: wall-clock seconds of the reference's stages (``load``, ``store``, ``tasks``) and of the whole run (``total``)
    seconds: dict[str, float] = field(default_factory=dict)

    def comparisons(self) -> list[dict]:
        """For each neighbouring pair: how much more KL the lower-ranked candidate has, with its paired test, and
        per task the accuracy difference with McNemar's exact test (``tasks``)."""
        return [
            {
                "better": better.name,
                "worse": worse.name,
                **paired_difference(worse.kl, better.kl),
                "tasks": {
                    task: task_neighbour_test(better.correct[task], worse.correct[task]) for task in better.correct
                },
            }
            for better, worse in zip(self.entries, self.entries[1:])
        ]

    def reference_tasks(self) -> dict[str, dict]:
        """Per task: its rule, item count, source and the reference's accuracy (acc_norm or acc) with its error."""
        figures = {}
        for task, answers in self.reference_answers.items():
            correct = [a == g for a, g in zip(answers.answers, answers.gold)]
            plain = [a == g for a, g in zip(answers.answers_unnormalized, answers.gold)]
            figures[task] = {
                "metric": answers.metric,
                "n_items": len(correct),
                "source": self.metadata["tasks"][task]["source"],
                "accuracy": answers.accuracy,
                "accuracy_error": accuracy_error(correct),
                "accuracy_unnormalized": sum(plain) / len(plain),
            }
        return figures

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "metadata": self.metadata,
            "reference_tasks": self.reference_tasks(),
            "ranking": [entry.row() for entry in self.entries],
            "neighbour_tests": self.comparisons(),
            "seconds": {**self.seconds, "candidates": {entry.name: entry.seconds for entry in self.entries}},
        }

    def save(self, output_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """leaderboard.json, .csv, .md and (with ``plots``) pareto.png, written atomically."""
        from .render import leaderboard_markdown, plot_pareto

        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        paths = {name: output / f"leaderboard.{name}" for name in ("json", "csv", "md")}
        write_json(paths["json"], data)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(data["ranking"][0]))
        writer.writeheader()
        writer.writerows(data["ranking"])
        atomic_write_text(paths["csv"], buffer.getvalue())
        plot_rows = [
            {
                "spec": row["candidate"],
                "bits_per_weight": row["bits_per_weight"],
                "kl_mean": row["kl_mean"],
                "kl_mean_error": row["kl_mean_error_block"],
            }
            for row in data["ranking"]
            if row["bits_per_weight"] is not None
        ]
        if plots and plot_rows:
            paths["png"] = output / "pareto.png"
            plot_pareto(plot_rows, paths["png"], title=f"candidates against {self.reference}")
        atomic_write_text(paths["md"], leaderboard_markdown(data, "pareto.png" if "png" in paths else None))
        return paths


def _check_names(candidates: Sequence[str]) -> None:
    if not candidates:
        raise HemorrhageError("a leaderboard needs at least one candidate")
    if len(set(candidates)) != len(candidates):
        raise HemorrhageError(f"a candidate is named twice: {sorted(candidates)}")


def _check_tokenizers(candidates: Sequence[str], tokenizer: PreTrainedTokenizerBase, load: LoadOptions) -> None:
    """Candidate models must cut text into the reference's tokens: checked before the reference runs."""
    for candidate in candidates:
        if is_model_candidate(candidate):
            assert_same_tokenizer(tokenizer, load_tokenizer(candidate, trust_remote_code=load.trust_remote_code))


def rank_candidates(
    reference: ModelLike,
    candidates: Sequence[str],
    *,
    source: TextSource | None = None,
    load: LoadOptions | None = None,
    calibration: CalibrationSettings | None = None,
    batch_size: int = 1,
    store_root: str | Path | None = None,
    tasks: Sequence[Task] = (),
    task_batch_size: int = 16,
    progress: bool = True,
) -> Leaderboard:
    """Measure every candidate against one exact store of ``reference`` on ``source``, and rank them by mean KL.

    ``tokens_per_second`` is the candidate's measuring speed on this machine: its forward pass plus the store's head
    products and the per-token figures, the same work for every candidate, so the column ranks speed fairly (task
    scoring is not counted in it). ``tasks`` (loaded beforehand, so that missing data stops the run before any model
    loads) are answered by the reference once and by each candidate while it is in memory.
    """
    source, load = source or TextSource(), load or LoadOptions()
    calibration = source.calibration_apart(calibration)
    started = time.perf_counter()
    _check_names(candidates)
    if len({task.name for task in tasks}) != len(tasks):
        raise HemorrhageError(f"a task is named twice: {sorted(task.name for task in tasks)}")
    load.check_engine(reference, *candidates)
    reference_model, tokenizer = load.model(reference)
    seconds = {"load": time.perf_counter() - started}
    if tokenizer is None:
        raise HemorrhageError("the reference model object has no name to load its tokenizer from")
    _check_tokenizers(candidates, tokenizer, load)
    windows = source.windows(tokenizer)
    check_engine_tokenization(tokenizer, source, reference_model)
    metadata = {"window": source.window, "max_tokens": source.max_tokens, "dtype": str(load.dtype)}
    metadata.update(_run_metadata(source, windows, tokenizer, reference=reference_model))
    if tasks:
        metadata["tasks"] = {task.name: {"source": task.source, "n_items": len(task)} for task in tasks}
    stage = time.perf_counter()
    store = build_reference_file(
        reference_model,
        windows,
        tokenizer=tokenizer,
        root=store_root,
        batch_size=batch_size,
        progress=progress,
        description={"reference": _reference_name(reference)},
    )
    seconds["store"], stage = time.perf_counter() - stage, time.perf_counter()
    scorer = TaskScorer(tokenizer, tasks, batch_size=task_batch_size, progress=progress)
    reference_answers = scorer.answers(reference_model, role="reference")
    seconds["tasks"] = time.perf_counter() - stage
    entries = []
    for candidate in candidates:
        entries.append(
            _measure_candidate(
                candidate,
                reference_model,
                tokenizer,
                store,
                windows,
                source,
                load,
                calibration,
                scorer=scorer,
                reference_answers=reference_answers,
                batch_size=batch_size,
                progress=progress,
            )
        )
    entries.sort(key=lambda entry: entry.figures["kl_mean"])
    seconds["total"] = time.perf_counter() - started
    return Leaderboard(_reference_name(reference), metadata, entries, reference_answers, seconds)


@dataclass
class TaskScorer:
    """Answers ``tasks`` with one model at a time, the way ``hemorrhage-hf tasks`` scores them."""

    tokenizer: PreTrainedTokenizerBase
    tasks: Sequence[Task]
    batch_size: int = 16
    progress: bool = True

    def answers(self, model, *, role: str) -> dict[str, TaskAnswers]:
        return {
            task.name: answer_task(
                model, self.tokenizer, task, batch_size=self.batch_size, progress=self.progress, role=role
            )
            for task in self.tasks
        }


def _reference_name(reference: ModelLike) -> str:
    return model_label(reference) if isinstance(reference, str) else getattr(reference, "name_or_path", "reference")


def _measure_candidate(
    candidate: str,
    reference_model,
    tokenizer: PreTrainedTokenizerBase,
    store,
    windows,
    source: TextSource,
    load: LoadOptions,
    calibration: CalibrationSettings | None,
    *,
    scorer: TaskScorer,
    reference_answers: dict[str, TaskAnswers],
    batch_size: int,
    progress: bool,
) -> LeaderboardEntry:
    started = time.perf_counter()
    if is_model_candidate(candidate):
        modified, modified_tokenizer = load.model(candidate)
        _check_modified(None, modified, tokenizer, modified_tokenizer)
        check_engine_tokenization(tokenizer, source, modified)
        spec = None
    else:
        modified, spec = _modify(reference_model, candidate, tokenizer, calibration, progress=progress), candidate
    details = _modification_details(modified, spec) or {}
    seconds = {"prepare": time.perf_counter() - started}
    started = time.perf_counter()
    report = measure(
        store,
        modified,
        windows,
        batch_size=batch_size,
        progress=progress,
        description=f"measuring {candidate}",
        metadata={"modification": candidate},
    )
    seconds["measure"], started = time.perf_counter() - started, time.perf_counter()
    answers = scorer.answers(modified, role=candidate)
    seconds["tasks"] = time.perf_counter() - started
    alive = weakref.ref(modified)
    del modified
    if alive() is not None:  # held in a reference cycle: free it before the next candidate loads, not at some later
        gc.collect()  # collection (a full collection costs ~0.25 s, so only then)
    return LeaderboardEntry(
        name=candidate,
        figures=report.figures,
        footprint=details.get("footprint", {}),
        tokens_per_second=report.figures["n_tokens"] / seconds["measure"],
        kl=np.asarray(report.tokens.kl, dtype=np.float64),
        tasks={task: compare_task_answers(reference_answers[task], mine) for task, mine in answers.items()},
        correct={task: [a == g for a, g in zip(mine.answers, mine.gold)] for task, mine in answers.items()},
        seconds=seconds,
    )
