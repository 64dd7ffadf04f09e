"""The reference cache: exact figures except KL, KL a tight lower bound, resumable, keyed, checksummed."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import SCALE, StopAfter, tiny_llama

from hemorrhage_hf.corpus import make_windows, tokenize_corpus
from hemorrhage_hf.measurement.divergence import kl_divergence, log_probs
from hemorrhage_hf.measurement.engine import measure
from hemorrhage_hf.measurement.refcache import (
    FIELDS,
    ReferenceCache,
    ReferenceCacheError,
    cached_token_statistics,
    coarse_grain,
    coarse_kl,
    model_fingerprint,
    reference_entries,
    windows_fingerprint,
)
from hemorrhage_hf.modify import apply_modification


@pytest.fixture(scope="module")
def wiki_windows(smollm2, wikitext_text):
    _, tokenizer = smollm2
    return tokenize_corpus(tokenizer, wikitext_text, window=256, max_tokens=768 * SCALE)


@pytest.fixture(scope="module")
def smollm2_cache(smollm2, wiki_windows, tmp_path_factory):
    model, _ = smollm2
    return ReferenceCache.build(model, wiki_windows, k=64, root=tmp_path_factory.mktemp("refcache"), progress=False)


@pytest.fixture(scope="module")
def int4_full_and_cached(smollm2, wiki_windows, smollm2_cache):
    model, _ = smollm2
    modified = apply_modification(model, "int4-g64")
    return measure(model, modified, wiki_windows, progress=False), measure(
        smollm2_cache, modified, wiki_windows, progress=False
    )


def test_coarse_kl_is_a_lower_bound_that_tightens_with_k():
    torch.manual_seed(0)
    reference, modified = log_probs(3 * torch.randn(64, 500)), log_probs(3 * torch.randn(64, 500))
    full = kl_divergence(reference, modified)
    previous = torch.zeros_like(full)
    for k in (1, 8, 64, 499):
        indices = torch.topk(reference, k).indices
        bound = coarse_kl(*coarse_grain(reference, indices), *coarse_grain(modified, indices))
        assert torch.all(bound <= full + 1e-5) and torch.all(bound >= previous - 1e-5)
        previous = bound
    assert torch.allclose(previous, full, atol=1e-5)  # k = V − 1: the tail bin is one token, nothing is merged


def test_logits_against_their_own_entries_give_exactly_zero_kl():
    """A few confident rows among many: their tails are summed exactly (logsumexp over the rows that need it), and
    a reduction over 9 rows of 255 can round differently from one over a chunk's few rows. Building the cache and
    reading it slice rows alike (a KL of ±3e-10 at two WikiText-2 tokens of 4,080 before they did)."""
    generator = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(255, 49152, generator=generator)
    logits[torch.randperm(255, generator=generator)[:9], 7] += 25
    targets = torch.zeros(255, dtype=torch.long)
    statistics = cached_token_statistics(reference_entries(logits, targets, 64), logits)
    assert torch.count_nonzero(statistics.kl) == 0


@pytest.mark.heavy
def test_cached_figures_equal_the_full_ones_except_kl(int4_full_and_cached):
    full, cached = int4_full_and_cached
    a, b = full.tokens, cached.tokens
    for name in ("reference_nll", "modified_nll", "delta_p"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.same_top1, b.same_top1) and np.array_equal(a.target_ids, b.target_ids)
    for figure in ("ppl_reference", "ppl_modified", "ppl_ratio", "top1_agreement", "delta_p_mean", "n_tokens"):
        assert full.figures[figure] == cached.figures[figure], figure


@pytest.mark.heavy
def test_cached_kl_is_a_close_lower_bound_on_real_text(int4_full_and_cached, smollm2_cache):
    full, cached = int4_full_and_cached
    assert np.all(cached.tokens.kl <= full.tokens.kl + 1e-4)
    ratio = cached.figures["kl_mean"] / full.figures["kl_mean"]
    assert 0.75 < ratio <= 1.0  # measured 0.84 for int4-g64 with k = 64 on 2048 WikiText-2 tokens
    meta = cached.metadata["reference_cache"]
    assert meta["k"] == 64 and meta["kl_is_lower_bound"] is True
    assert 0 < meta["tail_mass_mean"] < 0.5 and meta["tail_mass_mean"] == smollm2_cache.tail_mass_mean
    markdown = cached.to_markdown()
    assert "top-64" in markdown and "lower bounds" in markdown


@pytest.mark.heavy
def test_unmodified_model_against_its_cache_bleeds_exactly_nothing(smollm2, wiki_windows, smollm2_cache):
    model, _ = smollm2
    figures = measure(smollm2_cache, model, wiki_windows, progress=False).figures
    assert figures["kl_max"] == 0.0 and figures["ppl_ratio"] == 1.0 and figures["top1_agreement"] == 1.0
    assert figures["delta_p_rms"] == 0.0


@pytest.mark.heavy
def test_cache_size_and_reopen(smollm2_cache, wiki_windows):
    # 64 × (4-byte log-prob + 4-byte index) + 4 × 4 bytes of per-token scalars, plus the safetensors header.
    assert 528 <= smollm2_cache.bytes_per_token < 540
    reopened = ReferenceCache.open(smollm2_cache.directory)
    assert reopened.n_tokens == sum(w.n_scored for w in wiki_windows)
    middle = reopened.tokens(100, 300)
    assert set(middle) == set(FIELDS) and len(middle["targets"]) == 200 and middle["topk_indices"].shape == (200, 64)


@pytest.mark.heavy
def test_cache_refuses_what_it_cannot_serve(smollm2, wiki_windows, smollm2_cache):
    model, _ = smollm2
    with pytest.raises(ReferenceCacheError, match="other windows"):
        measure(smollm2_cache, model, wiki_windows[:1], progress=False)
    with pytest.raises(ReferenceCacheError, match="batch size"):
        measure(smollm2_cache, model, wiki_windows, batch_size=2, progress=False)
    with pytest.raises(ReferenceCacheError, match="hidden states"):
        measure(smollm2_cache, model, wiki_windows, layers=True, progress=False)


def tiny_setup(n_tokens=240, window=20):
    return tiny_llama(), make_windows(torch.arange(n_tokens) * 7 % 64, window=window)


def test_an_interrupted_build_resumes_after_its_last_whole_shard(tmp_path):
    model, windows = tiny_setup()
    stopper = StopAfter(5)
    handle = model.register_forward_hook(stopper)
    with pytest.raises(KeyboardInterrupt):
        ReferenceCache.build(model, windows, k=8, root=tmp_path, shard_tokens=38, progress=False)
    handle.remove()
    (directory,) = tmp_path.iterdir()
    header = json.loads((directory / "header.json").read_text())
    assert not header["complete"] and [s["windows"] for s in header["shards"]] == [[0, 2], [2, 4]]
    with pytest.raises(ReferenceCacheError, match="incomplete"):
        ReferenceCache.open(directory)
    counter = StopAfter(10**9)
    model.register_forward_hook(counter)
    resumed = ReferenceCache.build(model, windows, k=8, root=tmp_path, shard_tokens=38, progress=False)
    assert counter.calls == len(windows) - 4  # only the windows past the last whole shard ran again
    fresh = ReferenceCache.build(tiny_llama(), windows, k=8, root=tmp_path / "fresh", shard_tokens=38, progress=False)
    for name in FIELDS:
        assert torch.equal(resumed.tokens(0, resumed.n_tokens)[name], fresh.tokens(0, fresh.n_tokens)[name])


def test_a_corrupt_shard_is_detected_and_rebuilt(tmp_path):
    model, windows = tiny_setup()
    cache = ReferenceCache.build(model, windows, k=8, root=tmp_path, shard_tokens=60, progress=False)
    shard = cache.directory / cache.header["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ReferenceCacheError, match="checksum"):
        measure(ReferenceCache.open(cache.directory), model, windows, progress=False)
    counter = StopAfter(10**9)
    model.register_forward_hook(counter)
    rebuilt = ReferenceCache.build(model, windows, k=8, root=tmp_path, shard_tokens=60, progress=False)
    assert counter.calls == len(windows) - cache.header["shards"][1]["windows"][0]
    assert measure(rebuilt, model, windows, progress=False).figures["kl_max"] == 0.0


def test_the_key_follows_the_weights_the_windows_k_and_the_batch_size(tmp_path):
    model, windows = tiny_setup()
    assert model_fingerprint(model) == model_fingerprint(tiny_llama())
    assert model_fingerprint(model) != model_fingerprint(apply_modification(model, "int8"))
    assert windows_fingerprint(windows) != windows_fingerprint(make_windows(torch.arange(240) * 7 % 64, window=24))
    keys = {
        ReferenceCache.build(model, windows, k=k, batch_size=batch_size, root=tmp_path, progress=False).header["key"]
        for k, batch_size in ((8, 1), (8, 1), (4, 1), (8, 2))
    }
    assert len(keys) == 3 and len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_against_itself_bleeds_nothing_live_or_cached(smollm2, dtype, tmp_path):
    """SmolLM2's logit rows sum to ~1e6, beyond fp16's 65504: finiteness must be judged per logit, not per row sum."""
    model, tokenizer = smollm2
    half = copy.deepcopy(model).to(dtype)
    windows = make_windows(
        torch.tensor(tokenizer("The tower is 324 metres tall, about the same height as an")["input_ids"] * 4), window=64
    )
    cache = ReferenceCache.build(half, windows, k=64, root=tmp_path, progress=False)
    for reference in (half, cache):
        figures = measure(reference, half, windows, progress=False).figures
        assert figures["non_finite_tokens"] == 0
        assert figures["kl_max"] == 0.0 and figures["ppl_ratio"] == 1.0 and figures["severity"] == "none"
