"""Fuzzing (hypothesis) of the two input surfaces users type into: the `hemorrhage` metric's arguments and the
CLI's. Every input either works or ends in a documented error (HemorrhageError, or argparse's usage exit 2)."""

import pytest
from conftest import tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hemorrhage_hf.cli import main
from hemorrhage_hf.errors import HemorrhageError
from hemorrhage_hf.metric import Hemorrhage

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved as safetensors: fast to load and run."""
    _, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(n_layers=1, vocab_size=len(tokenizer), hidden=16, heads=2, kv_heads=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def metric():
    return Hemorrhage()


texts = st.lists(st.text(max_size=80), min_size=0, max_size=4)


@FUZZ
@given(
    texts,
    st.integers(-3, 300),
    st.one_of(st.none(), st.integers(-3, 300)),
    st.sampled_from(["int8", "int4-g8", "int3-asym", "int12", "nonsense", "int4-g4096"]),
)
def test_metric_inputs(metric, tiny_checkpoint, predictions, window, stride, modification):
    try:
        result = metric.compute(
            predictions=predictions,
            reference_model=str(tiny_checkpoint),
            modification=modification,
            window=window,
            stride=stride,
        )
    except HemorrhageError as error:
        assert str(error)
    else:
        assert result["n_tokens"] >= 1 and result["kl_mean"] >= 0


option_values = st.one_of(st.integers(-5, 5000).map(str), st.sampled_from(["", "0", "-1", "nan", "1e9", "abc", "256"]))


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["--window", "--stride", "--max-tokens", "--batch-size", "--modification", "--dtype", "--layer-map"]
        ),
        option_values,
        max_size=4,
    ),
    st.booleans(),
    st.booleans(),
)
def test_cli_report_arguments(tmp_path_factory, tiny_checkpoint, options, layers, attention):
    text_file = tmp_path_factory.mktemp("text") / "t.txt"
    text_file.write_text("The report command is fuzzed with odd values of its options. " * 40, encoding="utf-8")
    argv = [
        "report",
        "--reference",
        str(tiny_checkpoint),
        "--text-file",
        str(text_file),
        "--quiet",
        "--no-plots",
        "--output",
        str(text_file.parent / "out"),
    ]
    options.setdefault("--modification", "int8")
    for flag, value in options.items():
        argv += [flag, value]
    argv += ["--layers"] * layers + ["--attention"] * attention
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejected a value: usage error, exit 2
        assert exit_.code == 2
    else:
        assert code in (0, 2)
        assert (text_file.parent / "out" / "report.json").exists() == (code == 0)
