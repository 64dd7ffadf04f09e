"""The reference's own samples as extra state_network text: where their prompts come from, what is scored, plain
sampling whatever the model's generation settings, seeded, and how ``fit`` uses them."""

import pytest
import torch
from conftest import tiny_llama

from hemorrhage_hf.corpus import Window, make_windows
from hemorrhage_hf.correction.fit import NetworkOptions
from hemorrhage_hf.correction.processor import DecodingCorrection
from hemorrhage_hf.correction.reference_samples import sample_windows
from hemorrhage_hf.errors import CorpusError, CorrectionError


def _source_windows(count: int = 2, length: int = 40, seed: int = 0) -> list[Window]:
    ids = torch.randint(0, 64, (count * length,), generator=torch.Generator().manual_seed(seed))
    return make_windows(ids, window=length)


def _spans(windows: list[Window], length: int) -> set[tuple[int, ...]]:
    return {
        tuple(w.input_ids[start : start + length].tolist())
        for w in windows
        for start in range(len(w.input_ids) - length + 1)
    }


def test_samples_continue_prompts_cut_from_the_fit_text_and_score_only_what_was_sampled():
    model, sources = tiny_llama(), _source_windows()
    samples = sample_windows(model, sources, tokens=100, window=48, prompt_tokens=8, batch_size=2, progress=False)
    assert [len(w.input_ids) for w in samples] == [48, 48, 48]  # ceil(100 / 40) windows
    assert [w.n_scored for w in samples] == [40, 40, 40]
    assert all(tuple(w.input_ids[:8].tolist()) in _spans(sources, 8) for w in samples)


def test_sampling_ignores_the_models_generation_settings_and_never_stops_early():
    model, sources = tiny_llama(), _source_windows()
    end = 5
    model.generation_config.do_sample, model.generation_config.top_k = False, 1
    model.generation_config.eos_token_id = end
    samples = sample_windows(model, sources, tokens=400, window=48, prompt_tokens=8, progress=False)
    sampled = torch.stack([w.input_ids[8:] for w in samples])
    assert not (sampled == end).any()  # the end token is never drawn, so every sample runs its full length
    greedy = model.generate(
        torch.stack([w.input_ids[:8] for w in samples]), do_sample=False, max_new_tokens=40, min_new_tokens=40
    )[:, 8:]
    assert (sampled != greedy).float().mean() > 0.5
    assert len(set(sampled.flatten().tolist())) > 32  # drawn from the whole vocabulary, not a top-k of it


def test_samples_are_seeded_and_leave_the_global_random_state_alone():
    model, sources = tiny_llama(), _source_windows()
    state = torch.get_rng_state()
    first, again, other = (
        torch.stack(
            [
                w.input_ids
                for w in sample_windows(
                    model, sources, tokens=80, window=48, prompt_tokens=8, seed=seed, progress=False
                )
            ]
        )
        for seed in (0, 0, 1)
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_bad_sampling_requests_are_refused():
    model, sources = tiny_llama(), _source_windows()
    with pytest.raises(CorpusError, match="leave nothing to sample"):
        sample_windows(model, sources, tokens=10, window=8, prompt_tokens=8)
    with pytest.raises(CorpusError, match="no fit window has the 64 tokens"):
        sample_windows(model, sources, tokens=10, window=96, prompt_tokens=64)
    ids = torch.randint(0, 64, (8, 96), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CorrectionError, match="add state_network"):
        DecodingCorrection.fit(
            model,
            tiny_llama(seed=1),
            ids,
            families=("temperature",),
            network=NetworkOptions(sampled_tokens=64),
            progress=False,
        )
    with pytest.raises(CorrectionError, match="0 or more"):
        DecodingCorrection.fit(
            model,
            tiny_llama(seed=1),
            ids,
            families=("state_network",),
            network=NetworkOptions(sampled_tokens=-1),
            progress=False,
        )


def test_fit_adds_the_samples_to_the_networks_fit_and_holds_out_only_fit_text():
    reference, modified = tiny_llama(), tiny_llama(seed=1)
    ids = torch.randint(0, 64, (10, 96), generator=torch.Generator().manual_seed(0))
    shape = {"rank": 8, "width": 16, "epochs": 1}
    options = {"families": ("state_network",), "window": 96, "progress": False}
    plain = DecodingCorrection.fit(reference, modified, ids, network=NetworkOptions(**shape), **options).summary
    with_samples = DecodingCorrection.fit(
        reference, modified, ids, network=NetworkOptions(**shape, sampled_tokens=200), **options
    ).summary
    assert plain.sampled_tokens == 0 and with_samples.sampled_tokens == 4 * (96 - 32)  # ceil(200 / 64) windows
    assert with_samples.fit_tokens == plain.fit_tokens + with_samples.sampled_tokens
    assert (with_samples.report_tokens, with_samples.kl_before) == (plain.report_tokens, plain.kl_before)
    assert with_samples.network["validation_tokens"] == plain.network["validation_tokens"] == plain.select_tokens
