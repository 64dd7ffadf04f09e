"""Fuzzing (hypothesis) of the two input surfaces users type into: the `hemorrhage` metric's arguments and the
CLI's. Every input either works or ends in the error documented for it: each side is checked against an oracle
naming the error each bad input must give (the metric: its class and message; the CLI: exit status 2, the error
line naming the bad option or value, no traceback, no output written)."""

import json
import re

import pytest
from conftest import tiny_llama
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hemorrhage_hf.cli import main
from hemorrhage_hf.errors import CorpusError, ModificationError, SpecError
from hemorrhage_hf.metric import Hemorrhage

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
#: The CLI cases run a whole command each; its explicit examples already cover every refusal.
CLI_FUZZ = settings(FUZZ, max_examples=10)


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


#: What each fuzzed report option may be given: odd numbers and strings for all, and some valid values for those
#: whose every odd value is refused.
option_values = st.one_of(st.integers(-5, 5000).map(str), st.sampled_from(["", "0", "-1", "nan", "1e9", "abc", "256"]))
OPTION_VALUES = {
    "--window": st.one_of(option_values, st.sampled_from(["16", "64", "128"])),
    "--stride": st.one_of(option_values, st.sampled_from(["8", "32", "64"])),
    "--max-tokens": st.one_of(option_values, st.just("all")),
    "--batch-size": option_values,
    "--modification": st.one_of(option_values, st.sampled_from(["int8", "int4-g8", "int3-asym", "int4-g4096"])),
    "--dtype": st.one_of(option_values, st.sampled_from(["fp32", "bf16"])),
    "--layer-map": st.one_of(option_values, st.sampled_from(["0,0", "0,x"])),
}
#: Valid modification specs the oracle knows (the tiny checkpoint's layers are 16 wide: every group divides them).
VALID_SPECS = ("int8", "int4-g8", "int3-asym")
REPORT_TEXT = "The report command is fuzzed with odd values of its options. " * 40
report_options = st.lists(st.sampled_from(sorted(OPTION_VALUES)), unique=True, max_size=4).flatmap(
    lambda flags: st.tuples(*(OPTION_VALUES[flag] for flag in flags)).map(lambda values: dict(zip(flags, values)))
)


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def expected_cli_error(options: dict[str, str], layers: bool, attention: bool, n_text_tokens: int) -> str | None:
    """The error line `report` must print for these options, in the order its checks run: argparse reads the
    options in the order given, then the spec is read and applied (to a 1-layer model 16 wide), the text is cut into
    windows (the text's length, then the window, then the stride), and the layer map is checked where layers are
    measured. None: they are valid."""
    for flag, value in options.items():
        number = _int(value)
        if flag in ("--window", "--stride") and number is None:
            return f"argument {flag}: invalid int value: {value!r}"
        if flag == "--batch-size" and (number is None or number < 1):
            return f"argument --batch-size: expected a whole number of at least 1, got {value!r}"
        if flag == "--max-tokens" and value != "all":
            if number is None:
                return f"argument --max-tokens: expected a number of tokens or 'all', got {value!r}"
            if number < 2:
                return f"argument --max-tokens: at least 2 tokens are needed, got {number}"
        if flag == "--dtype" and value not in ("fp32", "bf16", "fp16"):
            return f"argument --dtype: invalid choice: {value!r}"
        if flag == "--layer-map" and any(_int(item) is None for item in value.split(",")):
            return f"argument --layer-map: expected comma-separated layer numbers, got {value!r}"
    spec = options["--modification"]
    if spec == "":
        return "a modification spec must be a non-empty string, got ''"
    if spec == "int4-g4096":
        return "group size 4096 is larger than layer"
    if spec not in VALID_SPECS:
        return f"unknown modification spec {spec!r}"
    window = int(options.get("--window", 512))
    max_tokens = options.get("--max-tokens", "8192")
    n_tokens = n_text_tokens if max_tokens == "all" else min(n_text_tokens, int(max_tokens))
    if n_tokens < window:
        cut = "" if max_tokens == "all" else " (after skipped tokens and --max-tokens)"
        return f"the text has {n_tokens} tokens{cut}, shorter than one window of {window}"
    if window < 2:
        return f"window must be at least 2 tokens, got {window}"
    stride = int(options.get("--stride", window))
    if not 1 <= stride <= window:
        return f"stride must be between 1 and the window ({window}), got {stride}"
    if (layers or attention) and "--layer-map" in options:
        layer_map = [int(item) for item in options["--layer-map"].split(",")]
        if layer_map != [0]:
            return f"layer map {layer_map} must give one modified layer in [0, 1) for each of the 1 reference layers"
    return None


@CLI_FUZZ
@given(report_options, st.booleans(), st.booleans())
# Each documented refusal at least once, whatever the draw: a check that stops refusing fails here every run.
@example({"--window": "abc"}, False, False)
@example({"--batch-size": "0"}, False, False)
@example({"--max-tokens": "1"}, False, False)
@example({"--max-tokens": "nan"}, False, False)
@example({"--dtype": "256"}, False, False)
@example({"--layer-map": ""}, True, False)
@example({"--modification": "abc"}, False, False)
@example({"--modification": "int4-g4096"}, False, False)
@example({"--window": "5000"}, False, False)
@example({"--window": "1"}, False, False)
@example({"--window": "64", "--stride": "0"}, False, False)
@example({"--window": "64", "--stride": "65"}, False, False)
@example({"--window": "64", "--layer-map": "0,0"}, True, False)
@example({"--window": "64", "--max-tokens": "128", "--batch-size": "3", "--layer-map": "0"}, True, True)
def test_cli_report_arguments(tmp_path_factory, tiny_checkpoint, smollm2, capsys, options, layers, attention):
    text_file = tmp_path_factory.mktemp("text") / "t.txt"
    text_file.write_text(REPORT_TEXT, encoding="utf-8")
    output = text_file.parent / "out"
    argv = ["report", "--reference", str(tiny_checkpoint), "--text-file", str(text_file), "--quiet", "--no-plots"]
    options = {**options, "--modification": options.get("--modification", "int8")}
    for flag, value in options.items():
        argv += [flag, value]
    argv += ["--layers"] * layers + ["--attention"] * attention + ["--output", str(output)]
    n_text_tokens = len(smollm2[1](REPORT_TEXT, add_special_tokens=False).input_ids)
    expected = expected_cli_error(options, layers, attention, n_text_tokens)
    capsys.readouterr()
    try:  # any exception but argparse's exit propagates: a crash fails the test with its traceback
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    if expected is None:
        assert code == 0, stderr
        report = json.loads((output / "report.json").read_text())
        max_tokens = options.get("--max-tokens", "8192")
        measured = n_text_tokens if max_tokens == "all" else min(n_text_tokens, int(max_tokens))
        window = int(options.get("--window", 512))
        # Each token is scored at most once; only the first token of each window can go unscored.
        assert measured - -(-measured // int(options.get("--stride", window))) <= report["n_tokens"] < measured
        assert report["metadata"]["window"] == window
        assert ("layer_map" in report) == (layers or attention)
    else:
        assert code == 2
        assert f"hemorrhage-hf report: error: {expected}" in stderr, stderr
        assert not output.exists()
