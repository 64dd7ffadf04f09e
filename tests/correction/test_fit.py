"""The fit's plan: documents (WikiText articles, texts, rows, contiguous parts) split whole into fit / select / report
shares; the report share's figures, the PPL ratio among them, and the flag on a correction that raises it; the
families' saved tensors grouped back into families."""

import warnings

import pytest
import torch
from conftest import SCALE, pair_that_does_not_carry, tiny_llama

from hemorrhage_hf.corpus import make_windows
from hemorrhage_hf.correction.corrections import (
    CorrectionParameters,
    EntropyTemperature,
    StateBias,
    Temperature,
    TokenBias,
)
from hemorrhage_hf.correction.fit import (
    SHARE_WEIGHTS,
    as_documents,
    plan_shares,
    share_of_documents,
    split_documents,
)
from hemorrhage_hf.correction.processor import CorrectionWarning, DecodingCorrection, FitSummary


def test_wikitext_is_split_into_its_articles(wikitext_text):
    articles = split_documents(wikitext_text)
    assert len(articles) == 60  # WikiText-2 valid's article titles, " = Title = " on their own lines
    assert all(article.startswith(" = ") and not article.startswith(" = = ") for article in articles[1:])
    assert "".join(articles).strip() == wikitext_text.strip()
    assert split_documents("no titles here\n\n = = a section = = \n") == ["no titles here\n\n = = a section = = \n"]


def test_shares_take_whole_documents_in_proportion():
    token_counts = [int(count) for count in torch.randint(50, 400, (60,), generator=torch.Generator().manual_seed(0))]
    shares = share_of_documents(token_counts, seed=0)
    totals = [sum(count for count, share in zip(token_counts, shares) if share == s) for s in range(3)]
    for total, weight in zip(totals, SHARE_WEIGHTS, strict=True):
        assert abs(total / sum(token_counts) - weight / sum(SHARE_WEIGHTS)) < 0.02, totals
    assert share_of_documents(token_counts, seed=1) != shares  # seeded


def test_no_document_reaches_two_shares(smollm2, wikitext_text):
    tokenizer = smollm2[1]
    documents = as_documents(wikitext_text[: 200_000 * SCALE], tokenizer, window=256, stride=None)
    owner = {id(window): index for index, document in enumerate(documents) for window in document}
    shares = plan_shares(documents, max_tokens=8192, seed=0)
    drawn_from = [{owner[id(window)] for window in share} for share in (shares.fit, shares.select, shares.report)]
    assert not (drawn_from[0] & drawn_from[1] or drawn_from[0] & drawn_from[2] or drawn_from[1] & drawn_from[2])
    fit, select, report = shares.tokens
    assert select == pytest.approx(8192 / 5, abs=255) and report == pytest.approx(8192 / 5, abs=255)
    assert fit == pytest.approx(8192 * 3 / 5, abs=255)


def test_a_text_without_documents_is_cut_into_contiguous_parts():
    windows = make_windows(torch.arange(4000) % 64, window=100)
    parts = as_documents(windows, None, window=100, stride=None)
    assert [len(part) for part in parts] == [4] * 10
    assert [window for part in parts for window in part] == windows  # contiguous, in text order


def test_the_fit_reports_on_documents_it_never_used():
    """Rows of a token tensor are documents: the select and report shares hold whole rows, and the figures come
    from the report share (before the split they came from every fifth window, between the fit's own)."""
    reference, modified = tiny_llama(), tiny_llama(seed=1)
    ids = torch.randint(0, 64, (10, 48), generator=torch.Generator().manual_seed(0))
    summary = DecodingCorrection.fit(reference, modified, ids, progress=False).summary
    assert summary.documents == [6, 2, 2]
    assert (summary.fit_tokens, summary.select_tokens, summary.report_tokens) == (6 * 47, 2 * 47, 2 * 47)
    assert summary.ppl_ratio_before > 0 and summary.kl_before > summary.kl_after


def test_a_correction_that_does_not_carry_to_the_report_share_is_flagged():
    reference, modified, ids = pair_that_does_not_carry()
    with pytest.warns(CorrectionWarning, match="does NOT help"):
        summary = DecodingCorrection.fit(reference, modified, ids, progress=False).summary
    assert summary.kl_after > summary.kl_before and not summary.helps and not summary.to_dict()["helps"]


def test_a_lower_kl_with_a_higher_ppl_ratio_is_never_called_helpful():
    figures = {"families": ["token_bias"], "fit_tokens": 3000, "select_tokens": 1000, "report_tokens": 1000}
    raised = FitSummary(
        **figures, kl_before=0.5, kl_after=0.4, kl_difference_error=0.01, ppl_ratio_before=1.421, ppl_ratio_after=1.458
    )
    assert raised.kl_reduction == pytest.approx(0.2) and raised.raises_ppl_ratio and not raised.helps
    assert "RAISES the PPL ratio" in raised.verdict()
    towards_reference = FitSummary(
        **figures, kl_before=0.5, kl_after=0.4, kl_difference_error=0.01, ppl_ratio_before=0.95, ppl_ratio_after=0.99
    )
    assert not towards_reference.raises_ppl_ratio and towards_reference.helps


def test_saved_tensors_group_back_into_their_families():
    vocab = 8
    parameters = CorrectionParameters.identity(("entropy_temperature", "token_bias", "state_bias"), vocab_size=vocab)
    regrouped = CorrectionParameters.from_tensors(vocab, parameters.tensors())
    assert regrouped.families == parameters.families
    assert [type(family) for family in regrouped] == [EntropyTemperature, TokenBias, StateBias]
    alone = CorrectionParameters.from_tensors(vocab, {"log_inverse_temperature": torch.zeros(())})
    assert [type(family) for family in alone] == [Temperature]
    with pytest.raises(ValueError, match="come together"):
        CorrectionParameters.from_tensors(vocab, {"state_bias_in": torch.zeros(vocab, 2)})
    with pytest.raises(ValueError, match="belong to no correction family"):
        CorrectionParameters.from_tensors(vocab, {"mystery": torch.zeros(1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="token_bias has shape"):
            CorrectionParameters(vocab, [TokenBias(torch.zeros(vocab + 1))]).validate()
