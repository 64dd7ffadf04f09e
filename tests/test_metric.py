"""The `hemorrhage` evaluate metric: from the repo path, and by bare name offline in a fresh interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest

from hemorrhage_hf.metric import METRIC_SCRIPT

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day and everyone was outside.",
    "Python is a programming language that lets you work quickly and integrate systems more effectively.",
]


def test_repo_script_is_the_installed_script():
    assert (REPO / "metrics" / "hemorrhage" / "hemorrhage.py").read_text() == METRIC_SCRIPT


def test_metric_from_repo_path_with_model_objects(smollm2):
    model, tokenizer = smollm2
    metric = evaluate.load(str(REPO / "metrics" / "hemorrhage"))
    result = metric.compute(
        predictions=TEXTS, reference_model=model, tokenizer=tokenizer, modification="int4-g64", layers=True
    )
    assert result["kl_mean"] > 0.01 and 0 < result["top1_agreement"] < 1
    assert result["ppl_modified"] > result["ppl_reference"] > 1
    assert len(result["layer_cosine_distance"]) == 30 and result["severity"] in {"moderate", "severe"}
    same = metric.compute(predictions=TEXTS, reference_model=model, modified_model=model, tokenizer=tokenizer)
    assert same["kl_mean"] == 0.0 and same["top1_agreement"] == 1.0


def test_answers_config_flips():
    metric = evaluate.load(str(REPO / "metrics" / "hemorrhage"), "answers")
    result = metric.compute(predictions=[0, 2, 2, 1, 3], references=[0, 1, 2, 3, 3], gold=[0, 1, 3, 1, 3])
    assert result["accuracy_reference"] == 0.6 and result["accuracy_modified"] == 0.6
    assert result["correct_to_incorrect"] == 1 and result["incorrect_to_correct"] == 1
    assert result["flip_rate"] == 0.4 and result["accuracy_drop"] == 0.0


def test_bare_name_offline_in_a_fresh_interpreter(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_EVALUATE_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "hemorrhage_hf.cli", "install-metric"], env=env, check=True, timeout=120)
    code = (
        "import evaluate, json\n"
        "m = evaluate.load('hemorrhage')\n"
        f"r = m.compute(predictions={TEXTS!r}, reference_model='default', modification='int8')\n"
        "f = evaluate.load('hemorrhage', 'answers').compute(predictions=[1, 0], references=[1, 1])\n"
        "print(json.dumps({'kl_mean': r['kl_mean'], 'severity': r['severity'], 'flip_rate': f['flip_rate']}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < figures["kl_mean"] < 0.01 and figures["severity"] == "none" and figures["flip_rate"] == 0.5


def test_unknown_config_is_refused():
    with pytest.raises(ValueError, match="unknown config"):
        evaluate.load(str(REPO / "metrics" / "hemorrhage"), "bogus")
