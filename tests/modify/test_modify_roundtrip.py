"""Every modification on a tiny Llama: what it records, exact sparsity, shapes, generation with a KV cache, and
save → reload (plain transformers) giving identical logits."""

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from hemorrhage_hf.measurement.engine import resolve_layer_map
from hemorrhage_hf.modify import apply_modification, measured_sparsity

CALIBRATION = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=4, hidden=64, heads=4, kv_heads=2)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "spec",
    [
        "int4-g32",
        "int3-g48-asym",
        "w8a8",
        "awq-int3-g32",
        "smooth-w8a8",
        "magnitude-50",
        "wanda-50",
        "gradient-50",
        "2:4-wanda",
        "4:8-gradient",
        "heads-50",
        "channels-25",
        "layers-2",
        "expand-dup-2",
        "expand-identity-2",
        "kv4",
        "kv3-g8",
    ],
)
def test_saved_and_reloaded_model_gives_identical_logits(model, spec, tmp_path):
    modified = apply_modification(model, spec, calibration=CALIBRATION)
    assert modified.config.hemorrhage_modification == spec
    modified.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded), _logits(modified))
    assert not torch.equal(_logits(modified), _logits(model)) or spec == "expand-identity-2"


@pytest.mark.parametrize("spec", ["wanda-50", "magnitude-37.5", "gradient-50", "2:4-wanda", "4:8-magnitude"])
def test_sparsity_is_exact_per_layer_and_recorded(model, spec):
    modified = apply_modification(model, spec, calibration=CALIBRATION)
    target = 0.5 if "50" in spec or ":" in spec else 0.375
    measured, recorded = measured_sparsity(modified), modified.config.hemorrhage_sparsity
    assert measured["per_layer"] == pytest.approx([target] * 4) and measured["overall"] == pytest.approx(target)
    assert recorded["per_linear"] == pytest.approx(measured["per_linear"])
    assert len(recorded["per_linear"]) == 4 * 7
    if ":" in spec:
        n, m = (int(x) for x in spec.split("-")[0].split(":"))
        weight = modified.model.layers[1].mlp.down_proj.weight
        assert ((weight != 0).reshape(weight.shape[0], -1, m).sum(2) <= n).all()


def test_structured_pruning_shrinks_shapes_and_config(model):
    heads = apply_modification(model, "heads-50", calibration=CALIBRATION)
    assert heads.config.num_attention_heads == 2 and heads.config.head_dim == 16
    assert heads.model.layers[0].self_attn.q_proj.out_features == 32
    assert heads.config.hemorrhage_structure["fraction_removed"] == 0.5
    assert all(len(removed) == 2 for removed in heads.config.hemorrhage_structure["heads_removed_per_layer"].values())
    channels = apply_modification(model, "channels-25", calibration=CALIBRATION)
    assert channels.config.intermediate_size == 96 and channels.model.layers[3].mlp.down_proj.in_features == 96


def test_layer_removal_records_a_map_the_engine_accepts(model):
    pruned = apply_modification(model, "layers-2", calibration=CALIBRATION)
    removed = pruned.config.hemorrhage_structure["layers_removed"]
    assert len(removed) == 2 and 0 not in removed and pruned.config.num_hidden_layers == 2
    layer_map = resolve_layer_map(model, pruned, None)
    assert layer_map[0] == 0 and layer_map == sorted(layer_map) and max(layer_map) == 1
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]


@pytest.mark.parametrize("kind", ["dup", "identity"])
def test_expanded_model_generates_the_same_with_and_without_kv_cache(model, kind):
    expanded = apply_modification(model, f"expand-{kind}-3")
    assert expanded.config.num_hidden_layers == 7 and len(expanded.model.layers) == 7
    assert [layer.self_attn.layer_idx for layer in expanded.model.layers] == list(range(7))
    assert all(layer.self_attn.config is expanded.config for layer in expanded.model.layers)
    assert expanded.config.hemorrhage_layer_map == [0, 2, 3, 5]
    assert expanded.config.hemorrhage_expansion["inserted_layers"] == [1, 4, 6]
    prompt = IDS[:1, :6]
    cached = expanded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = expanded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    if kind == "identity":
        assert torch.equal(cached, model.generate(prompt, max_new_tokens=8, do_sample=False))


def test_scaling_records_the_searched_choice_per_group(model):
    scaled = apply_modification(model, "awq-int3-g32", calibration=CALIBRATION)
    record = scaled.config.hemorrhage_scaling
    assert record["method"] == "awq" and record["parameter"] == "exponent" and len(record["grid"]) == 20
    assert len(record["groups"]) == 4 * 3  # grouped-query attention: o_proj has no op to absorb a scale
    assert record["unscaled"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    for group in record["groups"].values():
        assert group["error"] <= group["error_unscaled"]
        assert group["exponent"] is None or group["exponent"] in record["grid"]
    assert any(group["exponent"] for group in record["groups"].values())


def test_modifying_a_copy_leaves_the_original_alone(model):
    before = _logits(model)
    for spec in ("wanda-50", "heads-50", "expand-dup-2", "w8a8"):
        apply_modification(model, spec, calibration=CALIBRATION)
    assert torch.equal(_logits(model), before)
    assert not any(module._forward_pre_hooks for module in model.modules())
