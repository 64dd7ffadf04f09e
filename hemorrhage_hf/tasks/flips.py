"""Answer flips between a reference and a modified model (Dutta et al., 2024, "Accuracy is Not All You Need").

Two models can have the same accuracy while disagreeing on many items. Flips count the items whose correctness
changed, in both directions; with the answers themselves (not just correctness) and the gold labels, a wrong
answer that became another wrong answer is counted too.

Errors follow lm-evaluation-harness: an accuracy's standard error is √(p(1−p)/(n−1)) (the sample standard deviation
over √n). The accuracy drop is paired (both models answered the same items), so its standard error is that of the
per-item difference of correctness, and ``mcnemar_p_value`` is McNemar's exact test of the flips: is
correct→incorrect more frequent than incorrect→correct beyond chance?

Example:
    >>> from hemorrhage_hf.tasks.flips import compare_answers
    >>> result = compare_answers(reference=[0, 1, 2, 3], modified=[0, 2, 2, 1], gold=[0, 1, 3, 1])
    >>> [result[key] for key in ("flip_rate", "correct_to_incorrect", "incorrect_to_correct", "wrong_to_other_wrong")]
    [0.5, 1, 1, 0]
    >>> result["accuracy_drop"], round(result["accuracy_drop_error"], 4), result["mcnemar_p_value"]
    (0.0, 0.4082, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import HemorrhageError
from ..measurement.statistics import iid_standard_error, mcnemar_exact


def compare_answers(reference: Sequence, modified: Sequence, gold: Sequence | None = None) -> dict[str, float | int]:
    """Accuracy of each model, accuracy drop, and flips.

    Without ``gold``, ``reference`` and ``modified`` are per-item correctness (booleans or 0/1).
    """
    if len(reference) != len(modified):
        raise HemorrhageError(f"{len(reference)} reference answers but {len(modified)} modified answers")
    if not reference:
        raise HemorrhageError("no answers to compare")
    if gold is None:
        for name, values in (("reference", reference), ("modified", modified)):
            if any(value not in (0, 1, True, False) for value in values):
                raise HemorrhageError(f"without gold labels, {name} answers must be correctness values 0/1")
        reference_correct = [bool(value) for value in reference]
        modified_correct = [bool(value) for value in modified]
        answers_changed = sum(r != m for r, m in zip(reference_correct, modified_correct))
        wrong_to_other_wrong = 0
    else:
        if len(gold) != len(reference):
            raise HemorrhageError(f"{len(gold)} gold labels for {len(reference)} answers")
        reference_correct = [r == g for r, g in zip(reference, gold)]
        modified_correct = [m == g for m, g in zip(modified, gold)]
        answers_changed = sum(r != m for r, m in zip(reference, modified))
        wrong_to_other_wrong = sum(
            (not rc) and (not mc) and r != m
            for r, m, rc, mc in zip(reference, modified, reference_correct, modified_correct)
        )
    n = len(reference)
    correct_to_incorrect = sum(r and not m for r, m in zip(reference_correct, modified_correct))
    incorrect_to_correct = sum(m and not r for r, m in zip(reference_correct, modified_correct))
    reference_accuracy = sum(reference_correct) / n
    modified_accuracy = sum(modified_correct) / n
    return {
        "n_items": n,
        "accuracy_reference": reference_accuracy,
        "accuracy_reference_error": accuracy_error(reference_correct),
        "accuracy_modified": modified_accuracy,
        "accuracy_modified_error": accuracy_error(modified_correct),
        "accuracy_drop": reference_accuracy - modified_accuracy,
        # Items are independent questions: the paired error is the i.i.d. one of the per-item differences.
        "accuracy_drop_error": iid_standard_error(np.subtract(reference_correct, modified_correct, dtype=np.float64)),
        "mcnemar_p_value": mcnemar_exact(correct_to_incorrect, incorrect_to_correct),
        "flip_rate": (correct_to_incorrect + incorrect_to_correct) / n,
        "correct_to_incorrect": correct_to_incorrect,
        "incorrect_to_correct": incorrect_to_correct,
        "wrong_to_other_wrong": wrong_to_other_wrong,
        "answer_change_rate": answers_changed / n,
    }


def accuracy_error(correct: Sequence) -> float:
    """Standard error of an accuracy as lm-evaluation-harness gives it: sample sd / √n = √(p(1−p)/(n−1)).

    Example:
        >>> round(accuracy_error([1, 1, 0, 1]), 4)  # √(0.75 · 0.25 / 3)
        0.25
    """
    return iid_standard_error(np.asarray(correct, dtype=np.float64))
