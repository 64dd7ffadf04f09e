"""Task scoring against lm-evaluation-harness itself: its `arc_easy` and `piqa` task files and its `HFLM` on the
real SmolLM2, on items of ../shared/data (the harness's documents are built from the local files; nothing is
downloaded). Prompts, choices, token ids, per-choice log-likelihoods, acc and acc_norm must agree item by item."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import lm_eval
import pytest
import yaml
from conftest import shared_data_path
from lm_eval.models.huggingface import HFLM

from hemorrhage_hf.tasks.scoring import answer_task, continuation_tokens, load_task, score_continuations

#: The first items of each file, plus the ARC-Easy items of the first 200 whose acc_norm answer changes when the
#: delimiter's space is counted in a choice's length (75, 104, 168 and 182: acc_norm 0.485 instead of 0.465).
ITEMS = {"arc-easy": [*range(8), 75, 104, 168, 182], "piqa": [*range(12)]}


def harness_task(yaml_name: str, split_docs: list[dict]):
    """The harness's own task from its YAML file, its documents given instead of downloaded."""
    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / yaml_name).read_text())
    splits = [config[key] for key in ("training_split", "validation_split", "test_split") if config.get(key)]
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {split: datasets.Dataset.from_list(split_docs) for split in splits}
    )
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=config)


def arc_documents(indices: list[int]) -> list[dict]:
    """ARC-Easy test items in the `allenai/ai2_arc` schema the harness reads."""
    lines = shared_data_path("arc/ARC-Easy/test.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(lines[index]) for index in indices]
    return [
        {
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": {
                "text": [choice["text"] for choice in row["question"]["choices"]],
                "label": [choice["label"] for choice in row["question"]["choices"]],
            },
            "answerKey": row["answerKey"],
        }
        for row in rows
    ]


def piqa_documents(indices: list[int]) -> list[dict]:
    lines = shared_data_path("piqa/valid.jsonl").read_text(encoding="utf-8").splitlines()
    labels = shared_data_path("piqa/valid-labels.lst").read_text().split()
    return [{**json.loads(lines[index]), "label": int(labels[index])} for index in indices]


@pytest.fixture(scope="module")
def harness_model(smollm2):
    model, tokenizer = smollm2
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)


@pytest.mark.parametrize(
    "name, relative, yaml_name, documents",
    [
        ("arc-easy", "arc/ARC-Easy", "arc/arc_easy.yaml", arc_documents),
        ("piqa", "piqa", "piqa/piqa.yaml", piqa_documents),
    ],
)
def test_scores_match_lm_evaluation_harness_item_by_item(smollm2, harness_model, name, relative, yaml_name, documents):
    model, tokenizer = smollm2
    indices = ITEMS[name]
    task = harness_task(yaml_name, documents(indices))
    task.build_all_requests(rank=0, world_size=1)
    requests = sorted(task.instances, key=lambda instance: (instance.doc_id, instance.idx))
    results = harness_model.loglikelihood(requests)

    everything = load_task(name, shared_data_path(relative))
    ours = type(everything)(name, [everything.items[index] for index in indices], everything.source)
    pairs = [(item.context, choice) for item in ours.items for choice in item.choices]
    assert [instance.args for instance in requests] == pairs  # same prompts, delimiters and choices
    scores = score_continuations(model, tokenizer, pairs)
    for (log_likelihood, _), score in zip(results, scores):
        assert score.log_likelihood == pytest.approx(log_likelihood, abs=1e-4)

    answers = answer_task(model, tokenizer, ours)
    position = 0
    for doc_id, doc in enumerate(task.eval_docs):
        n_choices = len(ours.items[doc_id].choices)
        expected = task.process_results(doc, results[position : position + n_choices])
        position += n_choices
        gold = answers.gold[doc_id]
        assert float(answers.answers_unnormalized[doc_id] == gold) == expected["acc"], doc_id
        assert float(answers.answers[doc_id] == gold) == expected["acc_norm"], doc_id


def test_bos_comes_first_where_the_tokenizer_adds_it_as_the_harness_does(smollm2):
    """Llama- and Gemma-style tokenizers add BOS by default; the harness's HFLM then reads it before the context."""
    model, tokenizer = smollm2
    with_bos = copy.deepcopy(tokenizer)
    with_bos.add_bos_token = True
    harness = HFLM(pretrained=model, tokenizer=with_bos, batch_size=1)
    for context, continuation in (
        ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
        ("A b ", "c"),
    ):
        ours = continuation_tokens(with_bos, context, continuation)
        assert ours[0][0] == with_bos.bos_token_id
        assert ours == tuple(harness._encode_pair(context, continuation))
