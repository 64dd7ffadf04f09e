"""Property-based tests (hypothesis) of the divergence math, windows, flips and spec parsing."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hemorrhage_hf.corpus import make_windows
from hemorrhage_hf.errors import CorpusError, HemorrhageError, SpecError
from hemorrhage_hf.measurement.divergence import js_divergence, kl_divergence, log_probs
from hemorrhage_hf.modify import Modification, parse_spec
from hemorrhage_hf.tasks.flips import compare_answers

finite_floats = st.floats(min_value=-50, max_value=50, allow_nan=False, width=32)
logit_rows = st.integers(2, 40).flatmap(
    lambda vocab: st.tuples(
        arrays(np.float32, (3, vocab), elements=finite_floats), arrays(np.float32, (3, vocab), elements=finite_floats)
    )
)


@given(logit_rows)
def test_kl_nonnegative_and_zero_on_itself(pair):
    p, q = (torch.from_numpy(a) for a in pair)
    assert (kl_divergence(log_probs(p), log_probs(q)) >= -1e-5).all()
    assert torch.equal(kl_divergence(log_probs(p), log_probs(p)), torch.zeros(3))


@given(logit_rows, st.floats(-1e3, 1e3, allow_nan=False))
def test_kl_invariant_to_a_constant_added_to_logits(pair, constant):
    p, q = (torch.from_numpy(a).double() for a in pair)
    base = kl_divergence(log_probs(p).double(), log_probs(q).double())
    shifted = kl_divergence(log_probs(p + constant).double(), log_probs(q - constant).double())
    assert torch.allclose(base, shifted, atol=1e-3, rtol=1e-3)


@given(logit_rows, st.data())
def test_kl_finite_when_reference_masks_part_of_the_vocabulary(pair, data):
    p, q = (torch.from_numpy(a) for a in pair)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=p.shape[1], max_size=p.shape[1])))
    assume(not mask.all())
    p[:, mask] = -math.inf
    kl = kl_divergence(log_probs(p), log_probs(q))
    assert torch.isfinite(kl).all() and (kl >= -1e-5).all()


@given(logit_rows)
def test_js_bounded_by_ln2_and_symmetric(pair):
    p, q = (torch.softmax(torch.from_numpy(a), -1) for a in pair)
    js = js_divergence(p, q)
    assert (js >= -1e-6).all() and (js <= math.log(2) + 1e-5).all()
    assert torch.allclose(js, js_divergence(q, p), atol=1e-6)


@given(st.integers(2, 400), st.integers(2, 64), st.data())
def test_windows_never_score_a_token_twice(n_tokens, window, data):
    stride = data.draw(st.integers(1, window))
    scored = [
        t
        for w in make_windows(torch.arange(n_tokens), window=window, stride=stride)
        for t in w.input_ids[w.first_scored :].tolist()
    ]
    assert len(scored) == len(set(scored)) and 0 not in scored
    if stride < window:
        assert scored == list(range(1, n_tokens))


@given(st.integers(-5, 1), st.integers(-5, 5))
def test_bad_window_sizes_rejected(window, stride):
    with pytest.raises(CorpusError):
        make_windows(torch.arange(50), window=window, stride=stride)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60))
def test_flip_bookkeeping(items):
    reference, modified, gold = (list(column) for column in zip(*items))
    result = compare_answers(reference, modified, gold)
    n = len(items)
    flips = result["correct_to_incorrect"] + result["incorrect_to_correct"]
    assert result["flip_rate"] == pytest.approx(flips / n)
    assert result["accuracy_drop"] == pytest.approx(
        (result["correct_to_incorrect"] - result["incorrect_to_correct"]) / n
    )
    assert result["flip_rate"] <= result["answer_change_rate"] + 1e-12


def test_flip_inputs_validated():
    with pytest.raises(HemorrhageError, match="reference answers"):
        compare_answers([1, 0], [1])
    with pytest.raises(HemorrhageError, match="correctness values"):
        compare_answers([1, 2], [1, 0])
    with pytest.raises(HemorrhageError, match="no answers"):
        compare_answers([], [])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=30))
def test_any_spec_string_parses_or_is_rejected_with_a_message(spec):
    try:
        modification = parse_spec(spec)
    except SpecError as error:
        assert str(error)
    else:
        assert isinstance(modification, Modification)


@pytest.mark.parametrize(
    "spec",
    [
        "int1",
        "int9",
        "int4-g0",
        "int4-g-1",
        "int4g64",
        "int",
        "4bit",
        "int4-g64-foo",
        " ",
        "int4--g64",
        "wanda-100",
        "wanda-150",
        "wanda--5",
        "2:1-wanda",
        "0:4-wanda",
    ],
)
def test_malformed_specs_rejected(spec):
    with pytest.raises(SpecError):
        parse_spec(spec)
