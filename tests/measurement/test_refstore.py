"""The exact reference store: figures equal the live two-model ones, a head it cannot reproduce is refused, and a
store is refused for another reference, tokenizer or text."""

import json

import pytest
import torch
from conftest import SCALE, StopAfter, tiny_llama

from hemorrhage_hf.comparison import MeasureOptions, TextSource, compare
from hemorrhage_hf.corpus import make_windows, tokenize_corpus
from hemorrhage_hf.errors import TokenizerMismatchError
from hemorrhage_hf.measurement import refstore
from hemorrhage_hf.measurement.engine import measure
from hemorrhage_hf.measurement.head import OutputHead, UnknownHeadError
from hemorrhage_hf.measurement.refstore import ReferenceStore, ReferenceStoreError, tokenizer_fingerprint
from hemorrhage_hf.models import load_tokenizer
from hemorrhage_hf.modify import apply_modification

#: figures compared between the store and the live reference (every summary number of the report)
FIGURES = ("kl_mean", "kl_median", "kl_p99", "kl_max", "ppl_reference", "ppl_modified", "ppl_ratio")
FIGURES += ("top1_agreement", "delta_p_mean", "delta_p_rms", "nll_correlation")


@pytest.fixture(scope="module")
def windows(smollm2, wikitext_text):
    _, tokenizer = smollm2
    return tokenize_corpus(tokenizer, wikitext_text, window=256, max_tokens=512 * SCALE)


@pytest.fixture(scope="module")
def stores(smollm2, windows, tmp_path_factory):
    model, tokenizer = smollm2
    root = tmp_path_factory.mktemp("stores")
    return {
        dtype: ReferenceStore.build(model, windows, dtype=dtype, tokenizer=tokenizer, root=root, progress=False)
        for dtype in ("fp32", "bf16")
    }


@pytest.fixture(scope="module")
def int4_reports(smollm2, windows, stores):
    model, _ = smollm2
    modified = apply_modification(model, "int4-g64")
    live = measure(model, modified, windows, progress=False)
    return live, {dtype: measure(store, modified, windows, progress=False) for dtype, store in stores.items()}


def test_fp32_store_gives_the_live_figures_and_bf16_within_its_stated_error(int4_reports):
    live, stored = int4_reports
    for figure in FIGURES:
        assert stored["fp32"].figures[figure] == pytest.approx(live.figures[figure], rel=1e-6, abs=1e-9), figure
    assert stored["fp32"].metadata["reference_store"]["kl_is_exact"] is True
    # bf16 keeps 8 mantissa bits of h: measured 0.012 % on KL mean and 0.02 % on PPL here (BENCHMARKS.md).
    assert stored["bf16"].figures["kl_mean"] == pytest.approx(live.figures["kl_mean"], rel=1e-2)
    assert stored["bf16"].figures["ppl_reference"] == pytest.approx(live.figures["ppl_reference"], rel=1e-3)
    assert stored["bf16"].figures["kl_mean"] != live.figures["kl_mean"]  # the bf16 rounding is really there


def test_store_size_per_token(stores, smollm2):
    model, _ = smollm2
    # 576 fp32 (or bf16) numbers and an int32 token per scored token, plus the safetensors header per shard.
    assert 2308 <= stores["fp32"].bytes_per_token < 2320
    assert 1156 <= stores["bf16"].bytes_per_token < 1170
    assert stores["fp32"].header["head"]["bytes"] > model.lm_head.weight.numel() * 4  # the 113 MB head, once


def test_unmodified_model_against_its_store_bleeds_nothing(smollm2, windows, stores):
    model, _ = smollm2
    figures = measure(stores["fp32"], model, windows, progress=False).figures
    assert figures["kl_max"] == pytest.approx(0.0, abs=1e-6) and figures["top1_agreement"] == 1.0
    assert figures["ppl_ratio"] == pytest.approx(1.0, abs=1e-7)


def test_store_refuses_another_reference_tokenizer_or_text(smollm2, windows, stores):
    model, tokenizer = smollm2
    store = ReferenceStore.open(stores["fp32"].directory)
    store.check_reference(model)
    store.check_tokenizer(tokenizer)
    with pytest.raises(ReferenceStoreError, match="another reference model"):
        store.check_reference(apply_modification(model, "int8"))
    other_tokenizer = load_tokenizer("default")
    other_tokenizer.add_tokens(["<an-added-token>"])
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        store.check_tokenizer(other_tokenizer)
    with pytest.raises(ReferenceStoreError, match="other windows"):
        measure(store, model, windows[1:], progress=False)
    with pytest.raises(TokenizerMismatchError, match="predicts 64 tokens but the reference predicts 49152"):
        store.check_vocabulary(64, "tiny")


def test_sequential_report_is_exact_with_the_store(tmp_path, smollm2, wikitext_text, monkeypatch):
    monkeypatch.setenv("HEMORRHAGE_HF_CACHE", str(tmp_path))
    model, tokenizer = smollm2
    source = TextSource(text=wikitext_text, window=128, max_tokens=384)
    options = dict(modification="int4-g64", source=source, tokenizer=tokenizer)
    live = compare(model, options=MeasureOptions(progress=False), **options).figures
    sequential = compare(model, options=MeasureOptions(sequential=True, progress=False), **options)
    for figure in FIGURES:
        assert sequential.figures[figure] == pytest.approx(live[figure], rel=1e-6, abs=1e-9), figure
    assert sequential.metadata["reference_store"]["kl_is_exact"] is True
    assert (tmp_path / "reference-store").is_dir()


def tiny_windows():
    return make_windows(torch.arange(120) * 7 % 64, window=20)


def test_a_head_with_an_unknown_transform_is_refused(tmp_path):
    model = tiny_llama()
    model.lm_head.register_forward_hook(lambda module, inputs, output: output * 2)  # a transform the store can't know
    with pytest.raises(UnknownHeadError, match="post-head transform is unknown"):
        ReferenceStore.build(model, tiny_windows(), root=tmp_path, progress=False)


def test_the_store_pass_computes_the_last_position_logits_alone(tmp_path):
    model = tiny_llama()
    rows = _head_rows_per_call(model)
    store = ReferenceStore.build(model, tiny_windows(), root=tmp_path, progress=False)
    assert rows == [1] * len(tiny_windows()), rows
    assert store.n_tokens == sum(window.n_scored for window in tiny_windows())


def _head_rows_per_call(model) -> list[int]:
    """Logit rows per call of ``model``'s output head, recorded from now on."""
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, logits: rows.append(logits.shape[-2]))
    return rows


@pytest.mark.parametrize(
    ("wrap_head", "rows_per_window"),
    [
        (False, 1),  # the last position, to check its head against; every other row in blocks from its head input
        (True, 20),  # a head module that is not a plain Linear (as a quantization backend's): whole logits
    ],
)
def test_a_modified_model_is_compared_exactly_and_from_blocks_of_logits_where_its_head_allows(
    tmp_path, wrap_head, rows_per_window
):
    reference, windows = tiny_llama(), tiny_windows()
    store = ReferenceStore.build(reference, windows, root=tmp_path, progress=False)
    modified = apply_modification(reference, "int4-g16")
    if wrap_head:
        modified.lm_head = torch.nn.Sequential(modified.lm_head)
    live = measure(reference, modified, windows, progress=False).figures
    rows = _head_rows_per_call(modified)
    stored = measure(store, modified, windows, progress=False).figures
    assert rows == [rows_per_window] * len(windows), rows
    for figure in FIGURES:
        assert stored[figure] == pytest.approx(live[figure], rel=1e-6, abs=1e-9), figure


def test_a_modified_model_whose_logits_its_head_does_not_give_is_refused(tmp_path):
    reference, windows = tiny_llama(), tiny_windows()
    store = ReferenceStore.build(reference, windows, root=tmp_path, progress=False)
    modified = apply_modification(reference, "int4-g16")
    modified.config.final_logit_softcapping = 0.5  # a transform its forward does not apply
    with pytest.raises(UnknownHeadError, match="post-head transform is unknown"):
        measure(store, modified, windows, progress=False)


def test_known_soft_capping_is_stored_and_reproduced(tmp_path):
    """Gemma 2 caps its logits after the head (30 · tanh(z / 30)); the store reproduces them exactly."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # small, so the cap bends every logit
    )
    model = Gemma2ForCausalLM(config).eval()
    store = ReferenceStore.build(model, tiny_windows(), root=tmp_path, progress=False)
    assert store.header["head"]["transform"] == {"scale": 1.0, "softcap": 0.5}
    hidden = store.tokens(0, 5)["hidden"]
    assert store.head(hidden).abs().max() < 0.5  # the cap is applied on read
    assert measure(store, model, tiny_windows(), progress=False).figures["kl_max"] == pytest.approx(0, abs=1e-6)


def test_shards_hold_about_shard_bytes_of_hidden_states_by_default(tmp_path, monkeypatch):
    """One shard is in memory while measuring: its size follows the hidden size and dtype, not a token count."""
    monkeypatch.setattr(refstore, "SHARD_BYTES", 40 * 32 * 2)  # 40 tokens of d = 32 in bf16, 20 in fp32
    for dtype, tokens_per_shard in (("fp32", 20), ("bf16", 40)):
        store = ReferenceStore.build(tiny_llama(), tiny_windows(), dtype=dtype, root=tmp_path, progress=False)
        first, last = zip(*(shard["tokens"] for shard in store.header["shards"]))
        # A shard closes at the first window that fills it: 19 scored tokens per window here.
        assert [b - a for a, b in zip(first, last)][:-1] == [38 if tokens_per_shard == 20 else 57] * (len(first) - 1)


def test_an_interrupted_store_resumes_and_a_corrupt_head_is_refused(tmp_path):
    model = tiny_llama()
    windows = tiny_windows()
    handle = model.register_forward_hook(StopAfter(3))
    with pytest.raises(KeyboardInterrupt):
        ReferenceStore.build(model, windows, root=tmp_path, shard_tokens=38, progress=False)
    handle.remove()
    (directory,) = tmp_path.iterdir()
    assert [shard["windows"] for shard in json.loads((directory / "header.json").read_text())["shards"]] == [[0, 2]]
    store = ReferenceStore.build(model, windows, root=tmp_path, shard_tokens=38, progress=False)
    assert store.n_tokens == sum(window.n_scored for window in windows)
    head_file = directory / "head.safetensors"
    data = bytearray(head_file.read_bytes())
    data[-3] ^= 0xFF
    head_file.write_bytes(bytes(data))
    with pytest.raises(ReferenceStoreError, match="checksum"):
        ReferenceStore.open(directory).head.fingerprint()


def test_output_head_and_tokenizer_fingerprints():
    weight = torch.randn(5, 3)
    assert OutputHead(weight).fingerprint() == OutputHead(weight.clone()).fingerprint()
    assert OutputHead(weight).fingerprint() != OutputHead(weight, softcap=30.0).fingerprint()
    tokenizer = load_tokenizer("default")
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(load_tokenizer("default"))


def test_richer_figures_come_alike_from_the_live_reference_the_store_and_the_cache(tmp_path):
    from hemorrhage_hf.measurement.refcache import ReferenceCache

    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions, so the confidence buckets are all used
    modified = apply_modification(model, "int8")
    windows = tiny_windows()
    live = measure(model, modified, windows, progress=False)
    store = ReferenceStore.build(model, windows, root=tmp_path / "store", progress=False)
    stored = measure(store, modified, windows, progress=False)
    cache = ReferenceCache.build(model, windows, k=16, root=tmp_path / "cache", progress=False)
    cached = measure(cache, modified, windows, progress=False)
    buckets = [f"kl_mean_confidence_{low:g}_{high:g}" for low, high in ((0, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1))]
    for figure in ("reverse_kl_mean", "top5_agreement", "top10_agreement", *buckets):
        # rel 1e-3: on 32-wide rows the head product in row chunks rounds apart from the model's (SmolLM2: 1e-6)
        assert stored.figures[figure] == pytest.approx(live.figures[figure], rel=1e-3, nan_ok=True), figure
    assert cached.figures["top10_agreement"] == live.figures["top10_agreement"]
    assert cached.figures["reverse_kl_mean"] <= live.figures["reverse_kl_mean"] * (1 + 1e-5)  # a lower bound too
    assert 0 < live.figures["top10_agreement"] <= live.figures["top1_agreement"]
    counts = [
        live.figures[f"tokens_confidence_{low:g}_{high:g}"]
        for low, high in ((0, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1))
    ]
    assert sum(counts) == live.figures["n_tokens"]
    assert "KL by the reference's confidence" in live.to_markdown()
