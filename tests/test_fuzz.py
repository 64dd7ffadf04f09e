"""Fuzzing (hypothesis) of the two input surfaces users type into: the `hemorrhage` metric's arguments and the
CLI's. Every input either works or ends in the error documented for it: the metric's inputs are checked against
an oracle naming the error class and message each bad input must give; the CLI exits 0 with a report, or 2
(argparse's usage error, or a documented error) without one."""

import re

import pytest
from conftest import tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hemorrhage_hf.cli import main
from hemorrhage_hf.errors import CorpusError, ModificationError, SpecError
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
def test_metric_inputs(metric, tiny_checkpoint, smollm2, predictions, window, stride, modification):
    expected = expected_metric_error(smollm2[1], predictions, window, stride, modification)
    arguments = dict(
        predictions=predictions,
        reference_model=str(tiny_checkpoint),
        modification=modification,
        window=window,
        stride=stride,
    )
    if expected is None:
        result = metric.compute(**arguments)
        assert result["n_tokens"] >= 1 and result["kl_mean"] >= 0
    else:
        with pytest.raises(expected[0], match=expected[1]):
            metric.compute(**arguments)


def expected_metric_error(tokenizer, predictions, window, stride, modification) -> tuple[type, str] | None:
    """The documented error for these metric inputs, in the order the checks run: the spec is read, then applied
    to the loaded model, then each text is checked and windowed (window, then stride). None: they are valid."""
    if modification == "int12":
        return SpecError, "weight bits must be between 2 and 8, got 12"
    if modification == "nonsense":
        return SpecError, "unknown modification spec 'nonsense'"
    if modification == "int4-g4096":
        return ModificationError, "group size 4096 is larger than layer"
    if not predictions:
        return CorpusError, "no texts given"
    for index, text in enumerate(predictions):
        if not text.strip():
            return CorpusError, f"text {index} is empty or only whitespace"
        n_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
        if n_tokens < 2:
            return CorpusError, re.escape(f"text {index} has {n_tokens} token(s); at least 2 are needed")
        if window < 2:
            return CorpusError, f"window must be at least 2 tokens, got {window}"
        if stride is not None and not 1 <= stride <= window:
            return CorpusError, re.escape(f"stride must be between 1 and the window ({window}), got {stride}")
    return None


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
