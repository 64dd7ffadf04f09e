"""Bits per weight: nominal for hemorrhage-hf's simulated formats, measured from the tensors real backends store."""

import importlib.util

import pytest
import torch
from conftest import tiny_llama

from hemorrhage_hf.modify import apply_modification, linear_footprint


def _tiny_checkpoint(tmp_path, hidden: int = 128):
    model = tiny_llama(n_layers=1, hidden=hidden)
    model.save_pretrained(tmp_path)
    return model


def test_float_model_is_measured_at_its_dtype():
    model = tiny_llama(n_layers=1, hidden=64)
    footprint = linear_footprint(model)
    # q, o: 64×64; k, v: 32×64 (2 of 4 heads); gate, up, down: 64×128. The head is not counted.
    assert footprint.n_weights == 2 * 4096 + 2 * 2048 + 3 * 8192
    assert (footprint.bits_per_weight, footprint.source) == (32.0, "measured")
    assert linear_footprint(model.to(torch.bfloat16)).weight_bytes == 2 * footprint.n_weights


def test_simulated_formats_are_nominal_and_survive_a_reload(tmp_path):
    model = tiny_llama(n_layers=1, hidden=64)
    modified = apply_modification(model, "int4-g64-asym")
    footprint = linear_footprint(modified)
    assert footprint.source == "nominal"
    assert footprint.bits_per_weight == pytest.approx(4 + (16 + 4) / 64)
    # awq migrates its scales into the previous ops: it stores what int4-g64 stores.
    assert linear_footprint(model, "awq-int4-g64").bits_per_weight == pytest.approx(4.25)
    # int8 per row: an fp16 scale per 64 inputs for all but down_proj (128 inputs, 2/9 of the weights).
    assert linear_footprint(model, "int8").bits_per_weight == pytest.approx(8 + 7 / 9 * 16 / 64 + 2 / 9 * 16 / 128)
    modified.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert linear_footprint(reloaded) == footprint


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize(
    ("config", "low", "high"),
    # nf4: 4 bits + an fp32 absmax per block of 64 (4.5) + a 16-entry code table per layer;
    # int8: 8 bits + an fp32 scale per row: of 128 inputs for 7/9 of the weights, 256 for down_proj (8 + 2/9).
    [({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, 4.5, 4.55), ({"load_in_8bit": True}, 8.222, 8.223)],
)
def test_bitsandbytes_storage_is_measured(tmp_path, config, low, high):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    _tiny_checkpoint(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**config))
    footprint = linear_footprint(model)
    assert footprint.source == "measured"
    assert low <= footprint.bits_per_weight <= high


@pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="hqq not installed")
def test_hqq_counts_its_scales_and_zero_points(tmp_path):
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    model = _tiny_checkpoint(tmp_path)
    AutoHQQHFModel.quantize_model(
        model, quant_config=BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu"
    )
    # 4 bits + an fp32 scale and an fp32 zero point per group of 64 (HQQ keeps them in the compute dtype).
    assert linear_footprint(model).bits_per_weight == pytest.approx(4 + 64 / 64)
