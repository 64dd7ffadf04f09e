"""The transformers quantizer, the Optimum-style quantizer/pruner/expander, and the quantize/prune/expand CLI, on a
tiny Llama that carries SmolLM2's tokenizer (so calibration text tokenizes as it would for the real model)."""

import json

import pytest
import torch
from conftest import tiny_llama
from optimum.quantization_base import OptimumQuantizer
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

from hemorrhage_hf.cli import main
from hemorrhage_hf.errors import HemorrhageError, SpecError
from hemorrhage_hf.integrations import (
    HemorrhageExpander,
    HemorrhageHfQuantizer,
    HemorrhagePruner,
    HemorrhageQuantConfig,
    HemorrhageQuantizer,
    register_with_transformers,
)
from hemorrhage_hf.integrations.transformers import QUANT_METHOD
from hemorrhage_hf.models import load_tokenizer
from hemorrhage_hf.modify import apply_modification
from hemorrhage_hf.modify.act_quant import DynamicTokenQuantizer
from hemorrhage_hf.modify.calibration import CalibrationSettings

VOCAB = 49152
SMALL_CALIBRATION = CalibrationSettings(n_sequences=4, seq_len=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny Llama with SmolLM2's vocabulary and tokenizer."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(n_layers=2, vocab_size=VOCAB, hidden=64, heads=4, kv_heads=2).save_pretrained(folder)
    load_tokenizer("default").save_pretrained(folder)
    return folder


IDS = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _has_activation_quantizers(model) -> bool:
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, DynamicTokenQuantizer)]
    return len(hooks) == 2 * 7


def test_registration_is_guarded_and_repeatable():
    register_with_transformers()
    register_with_transformers()
    assert AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is HemorrhageHfQuantizer
    impostor = type("HemorrhageHfQuantizer", (HemorrhageHfQuantizer,), {"__module__": "someone.else"})
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = impostor
    try:
        with pytest.raises(HemorrhageError, match="already has a 'hemorrhage' quantization registered by someone.else"):
            register_with_transformers()
    finally:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = HemorrhageHfQuantizer


def test_quantization_config_takes_only_quantization_specs():
    assert HemorrhageQuantConfig(spec="AWQ-int4-g64").spec == "awq-int4-g64"
    with pytest.raises(SpecError, match="pruning spec"):
        HemorrhageQuantConfig(spec="wanda-50")
    with pytest.raises(SpecError, match="unknown modification spec"):
        HemorrhageQuantConfig(spec="int4-gg")


@pytest.mark.parametrize("spec", ["int4-g32", "w8a8", "awq-int4-g32"])
def test_from_pretrained_quantizes_saves_and_restores(checkpoint, tmp_path, spec):
    config = HemorrhageQuantConfig(spec=spec, calibration_sequences=4, calibration_length=128)
    quantized = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config)
    plain = AutoModelForCausalLM.from_pretrained(checkpoint)
    calibration = config.calibration_settings().windows(load_tokenizer(str(checkpoint)))
    expected = apply_modification(plain, spec, calibration=calibration)
    assert torch.equal(_logits(quantized), _logits(expected))
    assert quantized.is_quantized and quantized.config.hemorrhage_modification == spec

    quantized.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hemorrhage" and saved["spec"] == spec
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.hf_quantizer.pre_quantized
    assert torch.equal(_logits(reloaded), _logits(quantized))
    assert _has_activation_quantizers(reloaded) == (spec == "w8a8")


def test_w8a8_applied_directly_also_restores_after_reload(checkpoint, tmp_path):
    modified = apply_modification(AutoModelForCausalLM.from_pretrained(checkpoint), "w8a8")
    modified.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _has_activation_quantizers(reloaded)
    assert torch.equal(_logits(reloaded), _logits(modified))


def test_optimum_style_classes_save_checkpoints_plain_transformers_loads(checkpoint, tmp_path):
    assert issubclass(HemorrhageQuantizer, OptimumQuantizer)
    pruner = HemorrhagePruner.from_pretrained(checkpoint)
    saved = pruner.prune(tmp_path / "pruned", spec="2:4-wanda", calibration=SMALL_CALIBRATION, progress=False)
    pruned = AutoModelForCausalLM.from_pretrained(saved)
    assert pruned.config.hemorrhage_sparsity["overall"] == 0.5
    assert (saved / "tokenizer.json").is_file()
    expanded = AutoModelForCausalLM.from_pretrained(
        HemorrhageExpander(pruner.model, pruner.tokenizer).expand(tmp_path / "expanded", spec="expand-identity-1")
    )
    assert torch.equal(_logits(expanded), _logits(pruner.model))
    quantizer = HemorrhageQuantizer.from_pretrained(pruner.model)
    with pytest.raises(SpecError, match="is a pruning spec, not a quantization one"):
        quantizer.quantize(tmp_path / "q", spec="wanda-50")
    with pytest.raises(HemorrhageError, match="file_prefix is not supported"):
        quantizer.quantize(tmp_path / "q", file_prefix="model", spec="int8")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("command", "spec"), [("quantize", "smooth-w8a8"), ("prune", "heads-50"), ("expand", "expand-dup-1")]
)
def test_cli_writes_a_loadable_checkpoint(checkpoint, tmp_path, capsys, command, spec):
    calibration = [] if command == "expand" else ["--calibration-sequences", "4", "--calibration-length", "128"]
    arguments = [command, "--reference", str(checkpoint), "--modification", spec, "--output", str(tmp_path / "out")]
    code = main([*arguments, "--quiet", *calibration])
    assert code == 0 and f"wrote {spec}" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.hemorrhage_modification == spec


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["quantize", "--reference", "default", "--modification", "wanda-50"], "is a pruning spec, not a quantization"),
        (["prune", "--reference", "default", "--modification", "wanda-120"], "sparsity must lie in [0, 1)"),
        (["expand", "--reference", "default", "--modification", "expand-twice-2"], "unknown modification spec"),
    ],
)
def test_cli_refuses_bad_specs_before_loading_the_model(tmp_path, capsys, arguments, message):
    assert main([*arguments, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
