"""The measurement engine on the real SmolLM2 and on tiny random models (where only shape matters)."""

import copy
import time

import numpy as np
import pytest
import torch
from conftest import SCALE, tiny_llama

from hemorrhage_hf.comparison import compare
from hemorrhage_hf.corpus import make_windows, tokenize_corpus
from hemorrhage_hf.errors import ModelLoadError, ModificationError, SpecError, TokenizerMismatchError
from hemorrhage_hf.measurement.engine import measure
from hemorrhage_hf.models import assert_same_tokenizer, load_model
from hemorrhage_hf.modify import apply_modification
from hemorrhage_hf.render import SUMMARY_ROWS, summary_rows

LABELS = {key: label for key, label, _ in SUMMARY_ROWS}


@pytest.fixture(scope="module")
def wiki_windows(smollm2, wikitext_text):
    _, tokenizer = smollm2
    return tokenize_corpus(tokenizer, wikitext_text, window=256, max_tokens=1024 * SCALE)


@pytest.fixture(scope="module")
def quantized_reports(smollm2, wiki_windows):
    model, _ = smollm2
    return {
        spec: measure(model, apply_modification(model, spec), wiki_windows, layers=True, progress=False)
        for spec in ("int8", "int4-g64", "int3-g64")
    }


def test_model_against_itself_bleeds_nothing(smollm2, wiki_windows):
    model, _ = smollm2
    report = measure(model, copy.deepcopy(model), wiki_windows[:2], layers=True, progress=False)
    figures = report.figures
    assert figures["kl_mean"] == 0.0 and figures["kl_max"] == 0.0
    assert figures["top1_agreement"] == 1.0
    assert figures["ppl_ratio"] == 1.0 and figures["ppl_reference"] == figures["ppl_modified"]
    assert figures["severity"] == "none"
    assert max(report.layers.cosine_distance) < 1e-6 and max(report.layers.relative_l2) == 0.0


def test_reference_perplexity_and_its_errors_match_the_transformers_loss(smollm2, wiki_windows):
    """HF's perplexity recipe (transformers' guide; evaluate's `perplexity` module computes the same masked
    cross-entropy, but is a Hub script unreachable offline): the model's own loss with labels masked to -100
    outside the scored tokens, weighted by the number of scored tokens. Its per-token losses give the standard
    errors by their definitions: llama.cpp's sd/√(n−1), and batch means over blocks of ⌊√n⌋ tokens."""
    model, _ = smollm2
    windows = wiki_windows[:3]
    token_losses = []
    with torch.no_grad():
        for window in windows:
            labels = window.input_ids.clone()
            labels[: window.first_scored] = -100
            logits = model(window.input_ids[None]).logits[0, :-1].float()
            token_losses.append(
                torch.nn.functional.cross_entropy(logits, labels[1:], reduction="none")[labels[1:] >= 0]
            )
            loss = model(window.input_ids[None], labels=labels[None]).loss
            assert loss.item() == pytest.approx(token_losses[-1].double().mean().item(), rel=1e-6)
    nll = torch.cat(token_losses).double().numpy()
    n = len(nll)
    report = measure(model, model, windows, progress=False)
    figures = report.figures
    assert figures["n_tokens"] == n
    # Same fp32 logits, same log-softmax: equal up to float summation order, not 0.5 %.
    assert figures["ppl_reference"] == pytest.approx(np.exp(nll.mean()), rel=1e-6)
    population_sd = np.sqrt(np.mean((nll - nll.mean()) ** 2))
    assert figures["ppl_reference_error"] == pytest.approx(
        np.exp(nll.mean()) * population_sd / np.sqrt(n - 1), rel=1e-5
    )
    size = int(np.sqrt(n))
    block_means = [nll[start : start + size].mean() for start in range(0, size * (n // size), size)]
    long_run_variance = size * np.var(block_means, ddof=1)
    assert figures["error_block_tokens"] == size
    assert figures["ppl_reference_error_block"] == pytest.approx(
        np.exp(nll.mean()) * np.sqrt(long_run_variance / n), rel=1e-5
    )


def test_fewer_bits_bleed_more(quantized_reports):
    kl = {spec: report.figures["kl_mean"] for spec, report in quantized_reports.items()}
    assert 0 < kl["int8"] < kl["int4-g64"] < kl["int3-g64"]
    assert kl["int8"] < 0.01 and quantized_reports["int8"].severity == "none"
    ppl_ratio = {spec: report.figures["ppl_ratio"] for spec, report in quantized_reports.items()}
    assert ppl_ratio["int8"] < ppl_ratio["int4-g64"] < ppl_ratio["int3-g64"]
    agreement = {spec: report.figures["top1_agreement"] for spec, report in quantized_reports.items()}
    assert agreement["int8"] > agreement["int4-g64"] > agreement["int3-g64"]
    # The standard error is small next to the gaps it separates, the block one included.
    assert quantized_reports["int4-g64"].figures["kl_mean_error_block"] < 0.1 * kl["int4-g64"]


def test_block_errors_see_the_correlation_of_neighbouring_tokens(quantized_reports):
    """Per-token KL and NLL differences of a quantized model are positively autocorrelated (lag-1 ≈ 0.1-0.2 on
    WikiText-2), so the batch-means errors exceed the i.i.d. ones; top-1 agreement's i.i.d. error is binomial."""
    report = quantized_reports["int4-g64"]
    figures, tokens = report.figures, report.tokens
    kl = tokens.kl.astype(np.float64)
    centred = kl - kl.mean()
    lag1 = float(np.dot(centred[1:], centred[:-1]) / np.dot(centred, centred))
    assert lag1 > 0.05
    for key in ("kl_mean", "ln_ppl_ratio", "ppl_ratio"):
        assert figures[f"{key}_error_block"] > 1.05 * figures[f"{key}_error"], key
    agreement = figures["top1_agreement"]
    assert figures["top1_agreement_error"] == pytest.approx(np.sqrt(agreement * (1 - agreement) / (len(kl) - 1)))
    for key in ("kl_mean", "delta_p_mean", "top1_agreement", "ppl_ratio"):
        assert "block ±" in dict(summary_rows(report))[LABELS[key]], key


def test_int4_drift_grows_with_depth(quantized_reports):
    drift = quantized_reports["int4-g64"].layers.cosine_distance
    assert np.mean(drift[-5:]) > 3 * np.mean(drift[:5])
    assert np.corrcoef(np.arange(len(drift)), drift)[0, 1] > 0.8


def test_percentiles_are_ordered(quantized_reports):
    f = quantized_reports["int4-g64"].figures
    assert 0 <= f["kl_median"] <= f["kl_p90"] <= f["kl_p95"] <= f["kl_p99"] <= f["kl_max"]
    assert f["delta_p_p1"] <= f["delta_p_median"] <= f["delta_p_p99"]
    assert f["delta_p_mean"] < 0  # quantization loses probability mass on the true token


def test_nan_logits_are_reported_as_collapse_not_a_crash():
    reference = tiny_llama()
    broken = copy.deepcopy(reference)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    report = measure(reference, broken, make_windows(torch.arange(40) % 64, window=20), progress=False)
    assert report.figures["non_finite_tokens"] == report.figures["n_tokens"] > 0
    assert report.severity == "collapse"
    assert '"ppl_modified": null' in report.to_json()
    assert "NaN/inf" in report.to_markdown()


def test_layer_map_for_models_of_different_depth():
    reference, deeper = tiny_llama(n_layers=2), tiny_llama(n_layers=3)
    windows = make_windows(torch.arange(30) % 64, window=15)
    with pytest.raises(ModificationError, match="layer map"):
        measure(reference, deeper, windows, layers=True, progress=False)
    with pytest.raises(ModificationError, match="one modified layer"):
        measure(reference, deeper, windows, layers=True, layer_map=[0, 3], progress=False)
    report = measure(reference, deeper, windows, layers=True, attention=True, layer_map=[0, 2], progress=False)
    assert report.layers.layer_map == [0, 2] and len(report.layers.attention_js) == 2
    # The final hidden state is normalised in both; the first layers are different random weights.
    assert all(value > 0 for value in report.layers.attention_js)


def test_attention_divergence_is_zero_against_itself_and_restores_implementation():
    model = tiny_llama()
    before = model.config._attn_implementation
    report = measure(model, model, make_windows(torch.arange(30) % 64, window=15), attention=True, progress=False)
    assert report.layers.attention_js == [0.0, 0.0]
    assert model.config._attn_implementation == before


def test_mismatched_tokenizers_are_refused(smollm2):
    _, tokenizer = smollm2
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<hemorrhage-test-token>"])
    assert_same_tokenizer(tokenizer, copy.deepcopy(tokenizer))
    with pytest.raises(TokenizerMismatchError, match="differ"):
        assert_same_tokenizer(tokenizer, other)


def test_bad_model_names_fail_fast(tmp_path):
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_model("no-such-org/no-such-model")
    assert time.monotonic() - started < 10
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "missing-model"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"))


def test_bad_specs_are_rejected_before_loading_anything():
    for spec in ("int9", "int1-g64", "int4-g0", "bogus-spec", ""):
        with pytest.raises(SpecError):
            compare("no-such-org/never-loaded", modification=spec)


def test_group_size_larger_than_a_layer_is_refused():
    with pytest.raises(ModificationError, match="larger than layer"):
        apply_modification(tiny_llama(hidden=32), "int4-g128")


def test_odd_group_sizes_quantize_every_column(smollm2):
    model, _ = smollm2
    layer = model.model.layers[0].self_attn.q_proj  # 576 input features: 128 does not divide it
    quantized = apply_modification(model, "int4-g128").model.layers[0].self_attn.q_proj
    tail = quantized.weight[:, 512:]
    # The 64-column tail got its own scale: at most 16 distinct levels per row, and it changed.
    assert all(len(torch.unique(row)) <= 16 for row in tail[:8])
    assert not torch.equal(tail, layer.weight[:, 512:])
