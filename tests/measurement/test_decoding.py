"""Decoding changes: the processors match generate's own, distribution divergence, generation divergence."""

import pytest
import torch
from conftest import SCALE, tiny_llama
from transformers import GenerationConfig

from hemorrhage_hf.corpus import make_windows, tokenize_corpus
from hemorrhage_hf.errors import SpecError
from hemorrhage_hf.measurement.decoding import (
    Decoding,
    corpus_prompts,
    decoding_divergence,
    first_divergence,
    generation_divergence,
    process_logits,
)
from hemorrhage_hf.modify import apply_modification


def test_spec_strings_round_trip_and_bad_ones_are_refused():
    decoding = Decoding.parse(" top_k=50, temperature=0.8 ")
    assert decoding == Decoding(temperature=0.8, top_k=50) and str(decoding) == "temperature=0.8,top_k=50"
    assert Decoding.parse("none") == Decoding.parse("") == Decoding() and str(Decoding()) == "none"
    for bad, message in (
        ("temperature=0", "positive"),
        ("top_p=1.5", r"\(0, 1\]"),
        ("top_k=2.5", "top_k"),
        ("beam=4", "bad decoding setting"),
        ("top_p", "bad decoding setting"),
        ("top_p=x", "number"),
    ):
        with pytest.raises(SpecError, match=message):
            Decoding.parse(bad)


def test_processors_sample_exactly_what_generate_samples_from_its_own_settings():
    model, prompt = tiny_llama(), torch.arange(10) % 64
    settings = dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(3)
    expected = model.generate(
        prompt[None],
        attention_mask=torch.ones(1, 10, dtype=torch.long),
        generation_config=GenerationConfig(do_sample=True, max_new_tokens=20, **settings),
    )
    result = generation_divergence(
        model,
        [prompt],
        Decoding(**settings),
        reference_decoding=Decoding(**settings),
        max_new_tokens=20,
        seed=3,
        progress=False,
    )
    assert result["continuations"][0]["other"] == expected[0, 10:].tolist()


def test_repetition_penalty_sees_only_the_tokens_before_each_position():
    input_ids = torch.tensor([[5, 6, 7, 5]])
    logits = torch.randn(1, 4, 10)
    rows, positions = torch.zeros(2, dtype=torch.long), torch.tensor([0, 2])
    processed = process_logits(Decoding(repetition_penalty=2.0), input_ids, logits, rows, positions)
    for index, position in enumerate((0, 2)):
        expected = logits[0, position].clone()
        for token in set(input_ids[0, : position + 1].tolist()):
            value = expected[token]
            expected[token] = value * 2 if value < 0 else value / 2
        assert torch.allclose(processed[index], expected)


def test_distribution_divergence_on_a_tiny_model():
    model = tiny_llama()
    windows = make_windows(torch.arange(200) * 7 % 64, window=40)
    decodings = [Decoding(), Decoding(temperature=1.5), Decoding(temperature=3), Decoding(top_k=1), Decoding(top_p=0.5)]
    identity, warm, hot, greedy, nucleus = decoding_divergence(model, windows, decodings, progress=False)
    assert (
        identity["tv_mean"] == identity["kl_mean"] == identity["js_mean"] == 0.0 and identity["top1_agreement"] == 1.0
    )
    assert 0 < warm["tv_mean"] < hot["tv_mean"] and warm["kl_mean"] < hot["kl_mean"]
    assert warm["kl_infinite_fraction"] == 0.0 and warm["top1_agreement"] == 1.0  # temperature never moves the argmax
    # Truncation leaves reference-supported tokens with no probability: KL(P ‖ Q) is infinite, TV stays finite.
    assert greedy["kl_infinite_fraction"] == 1.0 and greedy["top1_agreement"] == 1.0 and 0.5 < greedy["tv_mean"] < 1
    assert nucleus["tv_mean"] < greedy["tv_mean"]
    assert identity["n_tokens"] == sum(w.n_scored for w in windows)


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.mark.heavy
def test_decoding_hemorrhage_on_smollm2(smollm2, wikitext_text):
    model, tokenizer = smollm2
    windows = tokenize_corpus(tokenizer, wikitext_text, window=128, max_tokens=256 * SCALE)
    results = decoding_divergence(
        model,
        windows,
        [Decoding(temperature=0.7), Decoding(temperature=1.3), Decoding(top_p=0.9), Decoding(typical_p=0.5)],
        progress=False,
    )
    cold, warm, nucleus, typical = results
    assert cold["top1_agreement"] == warm["top1_agreement"] == nucleus["top1_agreement"] == 1.0
    assert 0.05 < cold["tv_mean"] < 0.5 and 0.05 < warm["tv_mean"] < 0.5
    assert nucleus["kl_infinite_fraction"] > 0.5 and nucleus["tv_mean"] < typical["tv_mean"]

    prompts = corpus_prompts(windows, n_prompts=2, prompt_tokens=16)
    same = generation_divergence(
        model,
        prompts,
        Decoding(temperature=0.7),
        reference_decoding=Decoding(temperature=0.7),
        max_new_tokens=12,
        progress=False,
    )
    assert same["token_agreement"] == 1.0 and same["first_divergence"] == [None, None]
    collapsed = generation_divergence(
        model,
        prompts,
        Decoding(),
        modified=apply_modification(model, "int2-g64"),
        sample=False,
        max_new_tokens=12,
        pad_token_id=tokenizer.pad_token_id,
        progress=False,
    )
    assert collapsed["token_agreement"] < 0.5 and collapsed["identical_fraction"] == 0.0
    assert all(position is not None and position < 12 for position in collapsed["first_divergence"])


@pytest.mark.heavy
def test_decode_command(tmp_path, capsys):
    import json

    from conftest import shared_data_path

    from hemorrhage_hf.cli import main

    code = main(
        [
            "decode",
            "--reference",
            "default",
            "--decoding",
            "temperature=0.7",
            "--decoding",
            "top_k=5",
            "--text-file",
            str(shared_data_path("wikitext-2-raw/wiki.valid.raw")),
            "--max-tokens",
            "256",
            "--window",
            "128",
            "--prompts",
            "2",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "4",
            "--quiet",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / "decoding.json").read_text())
    assert [d["decoding"] for d in saved["distributions"]] == ["temperature=0.7", "top_k=5"]
    assert saved["distributions"][1]["kl_mean"] is None  # infinite: top-k rules out tokens the reference allows
    assert [len(g["continuations"]) for g in saved["generations"]] == [2, 2]
    assert "top_k=5" in capsys.readouterr().out
