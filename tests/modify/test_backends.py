"""Real quantization backends as specs: each through its own library, measured, saved, reloaded; bad input refused.

Tiny random Llamas with SmolLM2's tokenizer (only shapes matter here); a test whose backend is not installed skips
(``make install`` installs them all).
"""

import importlib.metadata
import importlib.util
import shutil

import pytest
import torch
from conftest import tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from hemorrhage_hf.comparison import MeasureOptions, TextSource, compare
from hemorrhage_hf.corpus import make_windows
from hemorrhage_hf.correction.processor import DecodingCorrection
from hemorrhage_hf.errors import BackendError, ModificationError, SpecError
from hemorrhage_hf.integrations import HemorrhageQuantizer
from hemorrhage_hf.integrations.transformers import HemorrhageQuantConfig
from hemorrhage_hf.measurement.engine import measure
from hemorrhage_hf.measurement.refcache import ReferenceCache
from hemorrhage_hf.metric import _text_hemorrhage
from hemorrhage_hf.models import default_model_dir, load_model
from hemorrhage_hf.modify import apply_modification, describe_model, parse_spec, quantized_backend
from hemorrhage_hf.modify.calibration import CalibrationSettings
from hemorrhage_hf.render import report_markdown

TEXT = (
    "The committee met on Tuesday to discuss the budget for the coming year. Several members argued that the "
    "library should receive more funding, while others preferred to repair the roads first. "
) * 3


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (optimum) is missing
        return False


def needs(module: str):
    return pytest.mark.skipif(not installed(module), reason=f"{module} is not installed (make install adds it)")


#: spec → (import name, the package quantized_backend names, pip distribution)
BACKENDS = {
    "bnb-nf4": ("bitsandbytes", "bitsandbytes", "bitsandbytes"),
    "bnb-int8": ("bitsandbytes", "bitsandbytes", "bitsandbytes"),
    "torchao-int8wo": ("torchao", "torchao", "torchao"),
    "hqq-int4-g64": ("hqq", "hqq", "hqq"),
    "quanto-int4": ("optimum.quanto", "optimum", "optimum-quanto"),
    "ct-w4a16-g64": ("llmcompressor", "compressed-tensors", "llmcompressor"),
    "gptq-w4a16-g64": ("llmcompressor", "compressed-tensors", "llmcompressor"),
}


def backend_params(*specs):
    return [pytest.param(spec, marks=needs(BACKENDS[spec][0])) for spec in specs]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 1-layer Llama of width 128 over SmolLM2's vocabulary, saved with SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.1,  # large layer outputs and peaked predictions: quantization moves them measurably
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    for tokenizer_file in default_model_dir().glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


def windows(tokenizer):
    return make_windows(tokenizer(TEXT, return_tensors="pt").input_ids[0], window=32)


def calibration(tokenizer):
    ids = tokenizer(TEXT * 4, return_tensors="pt").input_ids[0]
    return ids[: 4 * 64].reshape(4, 64)


@pytest.mark.parametrize("spec", backend_params(*BACKENDS))
def test_backend_quantizes_a_copy_measures_and_names_itself(tiny, spec):
    reference, tokenizer = tiny
    before = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    modified = apply_modification(reference, spec, calibration=calibration(tokenizer))
    module, package, distribution = BACKENDS[spec]
    assert quantized_backend(modified) == package
    assert quantized_backend(reference) is None
    assert all(torch.equal(before[name], tensor) for name, tensor in reference.state_dict().items())
    details = describe_model(modified, parse_spec(spec))
    assert (details["backend"], details["version"]) == (distribution, importlib.metadata.version(distribution))
    bits = details["footprint"]["bits_per_weight"]
    assert details["footprint"]["source"] == "measured"
    assert (4.0 < bits < 5.1) if "4" in spec else (8.0 <= bits < 8.5)
    report = measure(reference, modified, windows(tokenizer), progress=False)
    assert 0 < report.figures["kl_mean"] < 0.5


@pytest.mark.parametrize("spec", backend_params("quanto-int4", "torchao-int8wo"))
def test_tensor_subclass_backends_run_in_the_reference_cache(tiny, spec):
    # Both failed under torch.inference_mode: "Cannot set version_counter for inference tensor".
    reference, tokenizer = tiny
    modified = apply_modification(reference, spec)
    cache = ReferenceCache.build(modified, windows(tokenizer), k=16, progress=False)
    report = measure(cache, modified, windows(tokenizer), progress=False)
    assert report.figures["kl_mean"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("spec", backend_params("bnb-nf4", "torchao-int8wo", "ct-w4a16-g64"))
def test_quantize_saves_the_backend_format_and_it_reloads_to_the_same_figures(tiny_checkpoint, tmp_path, spec):
    HemorrhageQuantizer.from_pretrained(str(tiny_checkpoint)).quantize(tmp_path, spec=spec, progress=False)
    source, options = TextSource(text=TEXT, window=32), MeasureOptions(progress=False)
    live = compare(str(tiny_checkpoint), modification=spec, source=source, options=options)
    saved = compare(str(tiny_checkpoint), str(tmp_path), source=source, options=options)
    assert saved.figures["kl_mean"] > 0
    assert saved.figures["kl_mean"] == pytest.approx(live.figures["kl_mean"], rel=1e-5)
    assert saved.figures["top1_agreement"] == live.figures["top1_agreement"]
    # The reloaded checkpoint still names what made it, and is stored as it was quantized.
    details = saved.metadata["modification_details"]
    assert details["spec"] == spec and details["backend"] == BACKENDS[spec][2]
    assert details["footprint"]["weight_bytes"] == live.metadata["modification_details"]["footprint"]["weight_bytes"]


@needs("bitsandbytes")
def test_a_bitsandbytes_4bit_model_that_ran_on_cpu_refuses_to_save(tiny, tmp_path):
    reference, tokenizer = tiny
    modification = parse_spec("bnb-nf4")
    modified = apply_modification(reference, modification)
    with torch.no_grad():
        modified(tokenizer("Hello there", return_tensors="pt").input_ids)
    with pytest.raises(BackendError, match="run on the CPU.*reload with corrupted weights"):
        modification.save(modified, tmp_path)


@pytest.mark.parametrize("spec", backend_params("hqq-int4-g64", "quanto-int4"))
def test_quantize_refuses_backends_that_cannot_save_before_loading(spec):
    with pytest.raises(BackendError, match=f"{spec} cannot be saved.*report --reference REF --modification"):
        HemorrhageQuantizer.check_spec(spec)


@needs("bitsandbytes")
def test_a_quantized_model_is_refused_not_copied(tiny):
    reference, _ = tiny
    quantized = apply_modification(reference, "bnb-nf4")
    with pytest.raises(ModificationError, match="already quantized by bitsandbytes.*never copies"):
        apply_modification(quantized, "int4-g64")


@pytest.mark.parametrize("spec", backend_params("bnb-nf4", "quanto-int4", "hqq-int4-g64"))
def test_quantized_model_objects_work_in_the_metric_and_report(tiny, spec):
    reference, tokenizer = tiny
    modified = apply_modification(reference, spec)
    figures = _text_hemorrhage(
        [TEXT], reference_model=reference, modified_model=modified, tokenizer=tokenizer, window=32
    )
    assert 0 < figures["kl_mean"] < 0.5
    report = compare(
        reference, modified, tokenizer=tokenizer, source=TextSource(texts=[TEXT], window=32), options=MeasureOptions()
    )
    assert report.figures["kl_mean"] == pytest.approx(figures["kl_mean"], rel=1e-5)
    markdown = report_markdown(report, {})
    distribution = BACKENDS[spec][2]
    assert f"{importlib.metadata.version(distribution)}" in markdown
    assert "bits per weight (measured)" in markdown
    ids = tokenizer(TEXT * 6, return_tensors="pt").input_ids[0][:480].reshape(10, 48)
    correction = DecodingCorrection.fit(reference, modified, ids, families=("temperature",), progress=False)
    assert 0 < correction.summary.kl_before < 0.5


def test_bad_backend_specs_are_refused(tiny, monkeypatch):
    with pytest.raises(SpecError, match="unknown modification spec 'bnb-int3'"):
        parse_spec("bnb-int3")
    with pytest.raises(BackendError, match="torchao 0.18 has no CPU path for int4"):
        parse_spec("torchao-int4wo-g64")
    if installed("bitsandbytes"):  # transformers quantizes with the backend's own config, not through ours
        with pytest.raises(SpecError, match="made by bitsandbytes: load with that library's own config"):
            HemorrhageQuantConfig("bnb-nf4")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real_find_spec(name))
    with pytest.raises(BackendError, match=r"hqq-int4-g64 needs hqq, which is not installed: pip install"):
        parse_spec("hqq-int4-g64")


@needs("hqq")
def test_a_group_size_that_does_not_divide_a_layer_is_refused_before_any_weight_changes(tiny):
    reference, _ = tiny
    before = reference.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ModificationError, match="group size 96 does not divide layer .*'s 128 input features"):
        apply_modification(reference, "hqq-int4-g96", in_place=True)
    assert type(reference.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(reference.model.layers[0].self_attn.q_proj.weight, before)


@needs("llmcompressor")
def test_gptq_on_a_model_built_in_memory_takes_its_tokenizer_or_says_to_pass_it(tiny):
    _, tokenizer = tiny
    model = tiny_llama(n_layers=1, vocab_size=len(tokenizer), hidden=64)  # built here: no folder holds its tokenizer
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(BackendError, match=r"gptq-w4a16-g64 .* needs the model's tokenizer.*tokenizer=tokenizer"):
        apply_modification(model, "gptq-w4a16-g64", calibration=calibration(tokenizer), in_place=True)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert quantized_backend(model) is None
    # Given the tokenizer (compare passes its own on), GPTQ runs: every weight of a group is a whole multiple,
    # within 4 signed bits, of that group's scale.
    report = compare(
        model,
        modification="gptq-w4a16-g64",
        tokenizer=tokenizer,
        source=TextSource(text=TEXT, window=32),
        options=MeasureOptions(progress=False),
        calibration=CalibrationSettings(n_sequences=4, seq_len=64),
    )
    assert report.metadata["modification_details"]["backend"] == "llmcompressor"
    assert 0 < report.figures["kl_mean"] < 0.5
    quantized = apply_modification(model, "gptq-w4a16-g64", calibration=calibration(tokenizer), tokenizer=tokenizer)
    projection = quantized.model.layers[0].mlp.down_proj
    steps = projection.weight / projection.weight_scale.repeat_interleave(64, dim=1)
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert steps.round().min() >= -8 and steps.round().max() <= 7
    assert not torch.equal(projection.weight, before["model.layers.0.mlp.down_proj.weight"])
