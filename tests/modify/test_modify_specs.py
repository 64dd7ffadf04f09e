"""Spec strings, the pure tensor functions of pruning and scaling, and bad input refused before any weight changes."""

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from hemorrhage_hf.corpus import calibration_windows
from hemorrhage_hf.errors import CorpusError, ModificationError, SpecError
from hemorrhage_hf.modify import apply_modification, parse_spec
from hemorrhage_hf.modify.architecture import decoder_blocks
from hemorrhage_hf.modify.calibration import mean_token_loss, split_held_out
from hemorrhage_hf.modify.prune_ops import n_m_mask, row_mask
from hemorrhage_hf.modify.pruning import ALPHA_CANDIDATES, HELD_OUT_SHARE, WeightPruning
from hemorrhage_hf.modify.scaling import Migration
from hemorrhage_hf.modify.scaling_ops import awq_scales, quantized_weight_error, scaled_output_error

SPECS = [
    "int4-g64",
    "int8",
    "int3-g128-asym",
    "w8a8",
    "w4a8-g64",
    "awq-int4-g64",
    "awq-int3-g128",
    "smooth-w8a8",
    "magnitude-50",
    "wanda-50",
    "gradient-50",
    "gradient-50-a0.5",
    "wanda-12.5",
    "2:4-wanda",
    "4:8-wanda",
    "2:4-magnitude",
    "2:4-gradient",
    "2:4-gradient-a0",
    "heads-25",
    "channels-25",
    "layers-4",
    "expand-dup-4",
    "expand-identity-4",
    "kv4",
    "kv2-g32",
]


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_round_trips_through_its_canonical_form(spec):
    modification = parse_spec(spec)
    assert modification.spec == spec
    assert parse_spec(modification.spec) == modification


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int4-g64-foo", "unknown modification spec"),
        ("prune-50", "unknown modification spec"),
        ("wanda-100", "sparsity must lie in [0, 1)"),
        ("magnitude-150", "sparsity must lie in [0, 1)"),
        ("heads-100", "sparsity must lie in [0, 1)"),
        ("int9", "bits must be between 2 and 8"),
        ("int1-g64", "bits must be between 2 and 8"),
        ("w8a16", "activation bits must be between 2 and 8"),
        ("awq-int12", "bits must be between 2 and 8"),
        ("awq-wanda-50", "needs a quantization spec"),
        ("4:4-wanda", "1 ≤ N < M"),
        ("0:4-magnitude", "1 ≤ N < M"),
        ("wanda-50-a1", "only gradient-aware pruning takes a gradient weight"),
        ("int4-g0", "group size must be a positive integer"),
        ("kv9", "KV-cache bits must be between 2 and 8"),
        ("kv4-g0", "group size must be a positive integer"),
        ("layers-0", "remove at least one layer"),
        ("expand-dup-0", "insert at least one layer"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_spec(spec)


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize(
    ("spec", "calibration_shape", "message"),
    [
        ("int4-g128", None, "group size 128 is larger than layer"),
        ("awq-int4-g128", (4, 64), "group size 128 is larger than layer"),
        ("wanda-50", None, "needs calibration data"),
        ("wanda-50", (1, 16), "calibration too short"),
        ("awq-int4-g32", (2, 64), "calibration too short"),
        ("2:128-wanda", (4, 64), "N:M group of 128 is wider than layer"),
        ("gradient-50", (1, 256), "needs at least 2 sequences"),
        ("heads-10", (4, 64), "would remove 0 of the 2 query heads"),
        ("layers-4", (4, 64), "would leave no layer"),
        ("expand-dup-9", None, "inserts more layers than the model's 4"),
    ],
)
def test_bad_model_or_calibration_leaves_every_weight_untouched(spec, calibration_shape, message):
    model = tiny_llama(n_layers=4)
    calibration = torch.randint(0, 64, calibration_shape) if calibration_shape else None
    before = _state(model)
    with pytest.raises(ModificationError, match=message):
        apply_modification(model, spec, calibration=calibration, in_place=True)
    _assert_unchanged(model, before)


def test_calibration_must_be_token_ids_of_this_model():
    model = tiny_llama()
    with pytest.raises(ModificationError, match="2-D integer tensor"):
        apply_modification(model, "wanda-50", calibration=torch.rand(8, 64))
    with pytest.raises(ModificationError, match=r"must lie in \[0, 64\)"):
        apply_modification(model, "wanda-50", calibration=torch.full((8, 64), 64))


def test_calibration_text_too_short_is_a_corpus_error(smollm2):
    _, tokenizer = smollm2
    with pytest.raises(CorpusError, match="calibration text too short"):
        calibration_windows(tokenizer, "Only a few words here.", n_sequences=8, seq_len=256)


@pytest.mark.parametrize("spec", ["int4-g64", "w8a8", "magnitude-50", "awq-int4-g64", "heads-25", "expand-dup-2"])
def test_a_model_without_linear_layers_is_refused(spec):
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2 computes its projections with Conv1D, not Linear: nothing here knows how to modify it.
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=128)).eval()
    before = _state(model)
    with pytest.raises(ModificationError, match="no Linear layers|lacks|no list of decoder layers"):
        apply_modification(model, spec, calibration=torch.randint(0, 64, (4, 64)), in_place=True)
    _assert_unchanged(model, before)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), columns=st.integers(1, 40), sparsity=st.floats(0, 0.99), seed=st.integers(0, 9))
def test_row_mask_drops_exactly_the_lowest_scores_of_every_row(rows, columns, sparsity, seed):
    scores = torch.rand(rows, columns, generator=torch.Generator().manual_seed(seed))
    mask = row_mask(scores, sparsity)
    n_drop = round(sparsity * columns)
    assert (mask.sum(1) == columns - n_drop).all()
    if 0 < n_drop < columns:
        assert scores[~mask].reshape(rows, -1).amax(1).lt(scores[mask].reshape(rows, -1).amin(1)).all()


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 8),
    n_fraction=st.floats(0.01, 0.99),
    groups=st.integers(1, 5),
    tail=st.integers(0, 7),
    seed=st.integers(0, 9),
)
def test_n_m_mask_keeps_the_top_n_of_every_group_of_m(m, n_fraction, groups, tail, seed):
    n = max(1, min(m - 1, round(n_fraction * m)))
    tail = tail % m
    scores = torch.rand(3, groups * m + tail, generator=torch.Generator().manual_seed(seed))
    mask = n_m_mask(scores, n, m)
    assert (mask[:, : groups * m].reshape(3, groups, m).sum(2) == n).all()
    assert mask[:, groups * m :].all()


PRUNING_CALIBRATION = torch.randint(0, 64, (8, 48), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(("pattern", "sparsity", "n_m"), [("50", 0.5, None), ("2:4", None, (2, 4))])
def test_gradient_pruning_with_alpha_zero_is_wanda_bit_for_bit(pattern, sparsity, n_m):
    model = tiny_llama(n_layers=2, hidden=64)
    wanda = apply_modification(model, WeightPruning("wanda", sparsity, n_m), calibration=PRUNING_CALIBRATION)

    def gradient(alpha):
        return apply_modification(
            model, WeightPruning("gradient", sparsity, n_m, alpha), calibration=PRUNING_CALIBRATION
        )

    assert all(torch.equal(a, b) for a, b in zip(gradient(0.0).parameters(), wanda.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(gradient(2.0).parameters(), wanda.parameters(), strict=True))


def test_gradient_pruning_drops_exactly_half_of_every_row():
    model = tiny_llama(n_layers=2, hidden=64)
    pruned = apply_modification(model, "gradient-50", calibration=PRUNING_CALIBRATION)
    for layer in pruned.model.layers:
        for linear in (module for module in layer.modules() if isinstance(module, torch.nn.Linear)):
            assert ((linear.weight == 0).sum(1) == linear.in_features // 2).all()


def test_alpha_is_chosen_on_held_out_sequences_where_alpha_zero_is_wanda():
    model = tiny_llama(n_layers=2, hidden=64)
    pruned = apply_modification(model, "gradient-50", calibration=PRUNING_CALIBRATION)
    record = pruned.config.hemorrhage_pruning_alpha
    fit, held_out = split_held_out(PRUNING_CALIBRATION, HELD_OUT_SHARE)
    assert (record["fit_sequences"], record["held_out_sequences"]) == (6, 2) and record["candidates"][0] == 0
    assert record["candidates"] == list(ALPHA_CANDIDATES) and record["alpha"] in ALPHA_CANDIDATES
    # Candidate 0 is Wanda calibrated on the fit sequences alone, measured on the held-out ones.
    wanda = apply_modification(model, "wanda-50", calibration=fit)
    assert record["held_out_loss"][0] == mean_token_loss(wanda, held_out)
    # The model returned is the chosen candidate, and no candidate did better on the held-out sequences.
    assert mean_token_loss(pruned, held_out) == record["held_out_loss"][ALPHA_CANDIDATES.index(record["alpha"])]
    assert mean_token_loss(pruned, held_out) == min(record["held_out_loss"])


def test_scale_migration_keeps_the_function_before_rounding():
    model = tiny_llama(n_layers=2)
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
    generator = torch.Generator().manual_seed(1)
    for block in decoder_blocks(model):
        for previous, linears in (
            (block.input_norm, [block.q_proj, block.k_proj, block.v_proj]),
            (block.post_norm, [block.gate_proj, block.up_proj]),
            (block.up_proj, [block.down_proj]),
        ):
            scales = torch.rand(linears[0].in_features, generator=generator) * 4 + 0.25
            Migration("test", previous, dict(enumerate(linears)), statistics=None).apply(scales)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_awq_scales_with_exponent_zero_are_plain_quantization():
    weight, rows = torch.randn(8, 16), torch.randn(32, 16)
    quantize = parse_spec("int4-g8")
    unscaled = quantized_weight_error(weight, rows.T @ rows, None, quantize.quantize_weight)
    assert quantized_weight_error(
        weight, rows.T @ rows, awq_scales(rows.abs().mean(0), 0.0), quantize.quantize_weight
    ) == pytest.approx(unscaled)


def test_gram_error_equals_the_output_error_on_every_row():
    generator = torch.Generator().manual_seed(0)
    weight, rows, scales = (
        torch.randn(8, 16, generator=generator),
        torch.randn(64, 16, generator=generator),
        torch.rand(16, generator=generator) + 0.5,
    )
    quantize = parse_spec("int3-g8")
    on_rows = scaled_output_error(
        weight, rows, rows @ weight.T, scales, quantize.quantize_weight, quantize.quantize_input
    )
    assert quantized_weight_error(weight, rows.T @ rows, scales, quantize.quantize_weight) == pytest.approx(
        on_rows, rel=1e-4
    )
