"""Mixed-precision specs on a tiny Llama: each layer carries exactly its own format, awq composes, the footprint
counts each format's bits, and bad specs fail before any weight changes."""

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from hemorrhage_hf.errors import ModificationError, SpecError
from hemorrhage_hf.modify import apply_modification, linear_footprint, parse_spec

CALIBRATION = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=3, hidden=64, heads=4, kv_heads=2)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.dim() == 2 and ".layers." in name}


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("int4-g64+int8@layers.0,1,29", "int4-g64+int8@layers.0,1,29"),
        ("AWQ-int4-g64+int8@layers.3.mlp+int6-g64@layers.0", "awq-int4-g64+int8@layers.3.mlp+int6-g64@layers.0"),
        ("int4-g32-sym+int5-g32@layers.2.attn", "int4-g32+int5-g32@layers.2.attn"),
        (
            "int4-g64+int6-g64@layers.2,5.v_proj+int8@layers.5.o_proj",
            "int4-g64+int6-g64@layers.2,5.v_proj+int8@layers.5.o_proj",
        ),
    ],
)
def test_specs_round_trip_to_their_canonical_form(spec, canonical):
    assert parse_spec(spec).spec == canonical
    assert parse_spec(canonical).spec == canonical


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int4-g64+int8@layers.0+int6@layers.0.mlp", "gets two formats"),
        ("int4-g64+int6@layers.2.v_proj+int8@layers.2.attn", "layer 2's v_proj gets two formats"),
        ("int4+int8@layers.0.x_proj", "must read FORMAT@layers"),
        ("awq-int4-g64+int6-g64@layers.2.v_proj", "one scale for layer 2's q_proj, k_proj, v_proj"),
        ("awq-int4-g64+int6-g64@layers.1.up_proj", "one scale for layer 1's gate_proj, up_proj"),
        ("w8a8+int8@layers.0", "weight-only base"),
        ("wanda-50+int8@layers.0", "weight-only base"),
        ("int4+w8a8@layers.0", "must be a weight-only grid"),
        ("int4+gptq-int8@layers.0", "rounded as the base rounds"),
        ("int4+int8@layer.0", "must read FORMAT@layers"),
        ("int4+int8@layers.0.ffn", "must read FORMAT@layers"),
        ("int4+int99@layers.0", "bits must be between 2 and 8"),
    ],
)
def test_malformed_specs_are_refused(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_each_layer_and_part_carries_exactly_its_own_format(model):
    mixed = _weights(apply_modification(model, "int3-g32+int8@layers.1.mlp+int5-g32@layers.2"))
    uniform = {spec: _weights(apply_modification(model, spec)) for spec in ("int3-g32", "int8", "int5-g32")}
    for name, weight in mixed.items():
        spec = "int8" if "layers.1.mlp" in name else "int5-g32" if "layers.2." in name else "int3-g32"
        assert torch.equal(weight, uniform[spec][name]), name


def test_each_linear_layer_carries_exactly_its_own_format(model):
    mixed = _weights(apply_modification(model, "int3-g32+int8@layers.1.v_proj+int5-g32@layers.0,2.down_proj"))
    uniform = {spec: _weights(apply_modification(model, spec)) for spec in ("int3-g32", "int8", "int5-g32")}
    for name, weight in mixed.items():
        spec = "int8" if "layers.1.self_attn.v_proj" in name else "int5-g32" if "down_proj" in name else "int3-g32"
        if "down_proj" in name and "layers.1." in name:
            spec = "int3-g32"
        assert torch.equal(weight, uniform[spec][name]), name


def test_awq_base_takes_one_format_per_scale_search(model):
    """o_proj and down_proj each have a search of their own; q, k, v given one format together are accepted."""
    spec = "awq-int2-g32+int8@layers.0.o_proj+int8@layers.1.q_proj,k_proj"
    with pytest.raises(SpecError, match="must read FORMAT@layers"):
        parse_spec(spec)
    spec = "awq-int2-g32+int8@layers.0.o_proj+int8@layers.1.q_proj+int8@layers.1.k_proj+int8@layers.1.v_proj"
    mixed = apply_modification(model, spec, calibration=CALIBRATION)
    for name, weight in _weights(mixed).items():
        wide = "layers.0.self_attn.o_proj" in name or ("layers.1.self_attn" in name and "o_proj" not in name)
        groups = weight.reshape(weight.shape[0], -1, weight.shape[1] if wide else 32)
        levels = max(len(torch.unique(group)) for row in groups for group in row)
        assert levels > 4 if wide else levels <= 4, name


def test_an_unknown_layer_is_refused_before_any_weight_changes(model):
    before = {name: w.clone() for name, w in _weights(model).items()}
    with pytest.raises(ModificationError, match=r"names layer\(s\) 3, 7, but the model has 3 decoder layers"):
        apply_modification(model, "int4-g32+int8@layers.1,3,7", in_place=True)
    assert all(torch.equal(before[name], w) for name, w in _weights(model).items())


def test_awq_base_searches_the_overridden_layers_for_their_own_format(model):
    mixed = apply_modification(model, "awq-int2-g32+int8@layers.0", calibration=CALIBRATION)
    for name, weight in _weights(mixed).items():
        groups = weight.reshape(weight.shape[0], -1, weight.shape[1] if "layers.0." in name else 32)
        levels = max(len(torch.unique(group)) for row in groups for group in row)
        # int8 per row: up to 256 levels; int2 in groups of 32: at most 4
        assert levels > 4 if "layers.0." in name else levels <= 4, name
    record = mixed.config.hemorrhage_scaling
    assert "model.layers.0.mlp.down_proj" in record["mean_clip_ratio"]
    assert mixed.config.hemorrhage_modification == "awq-int2-g32+int8@layers.0"


def test_footprint_counts_each_layers_format(model):
    # Per layer: q, o, gate, up read 64 inputs; k, v (2 KV heads of 16) too; down reads 128.
    # int8 per row: 8 + 16/64 = 8.25 bits on 28672 weights, 8 + 16/128 = 8.125 on 8192; int4-g64: 4.25 everywhere.
    expected = (28672 * 8.25 + 8192 * 8.125 + 2 * 36864 * 4.25) / (3 * 36864)
    footprint = linear_footprint(model, "int4-g64+int8@layers.0")
    assert footprint.n_weights == 3 * 36864
    assert footprint.bits_per_weight == pytest.approx(expected, rel=1e-12)


def test_saved_mixed_checkpoint_reloads_with_identical_logits(model, tmp_path):
    modified = apply_modification(model, "int3-g32+int8@layers.0,2.attn")
    modified.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, modified(ids).logits)
