"""The divergence math on synthetic tensors with known answers."""

import math

import pytest
import torch

from hemorrhage_hf.measurement.divergence import (
    cosine_distance,
    js_divergence,
    kl_divergence,
    log_probs,
    relative_l2,
    token_statistics,
)


def test_kl_closed_form_two_bins():
    reference = torch.log(torch.tensor([[0.5, 0.5]]))
    modified = torch.log(torch.tensor([[0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(reference, modified).item() == pytest.approx(expected, rel=1e-6)


def test_kl_of_gaussian_logits_matches_direct_sum():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(16, 1000), torch.randn(16, 1000)
    p, q = torch.softmax(p_logits.double(), -1), torch.softmax(q_logits.double(), -1)
    direct = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(kl_divergence(log_probs(p_logits), log_probs(q_logits)).double(), direct, atol=1e-5)


def test_kl_is_zero_for_identical_and_nonnegative_otherwise():
    torch.manual_seed(1)
    logits = torch.randn(64, 500) * 5
    assert torch.equal(kl_divergence(log_probs(logits), log_probs(logits)), torch.zeros(64))
    assert (kl_divergence(log_probs(logits), log_probs(torch.randn(64, 500))) >= 0).all()


def test_kl_finite_with_masked_vocabulary_and_infinite_when_support_is_lost():
    masked = torch.tensor([[0.0, 1.0, -math.inf]])
    other = torch.tensor([[1.0, 0.0, 2.0]])
    assert math.isfinite(kl_divergence(log_probs(masked), log_probs(other)).item())
    assert kl_divergence(log_probs(other), log_probs(masked)).item() == math.inf


def test_js_divergence_bounds():
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    assert js_divergence(p, q).item() == pytest.approx(math.log(2), rel=1e-6)
    assert js_divergence(p, p).item() == 0.0


def test_hidden_state_distances():
    reference = torch.tensor([[3.0, 4.0]])
    assert cosine_distance(reference, 2 * reference).item() == pytest.approx(0.0, abs=1e-7)
    assert cosine_distance(reference, -reference).item() == pytest.approx(2.0)
    assert relative_l2(reference, torch.tensor([[3.0, 5.0]])).item() == pytest.approx(0.2)


def test_token_statistics_true_token_figures_and_nan_marking():
    reference = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]))
    modified = torch.log(torch.tensor([[0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]))
    modified[2, 0] = math.nan
    stats = token_statistics(reference, modified, torch.tensor([0, 2, 1]))
    assert stats.reference_nll[0].item() == pytest.approx(-math.log(0.7), rel=1e-6)
    assert stats.delta_p[0].item() == pytest.approx(0.4 - 0.7, abs=1e-6)
    assert stats.same_top1[:2].tolist() == [False, True]
    assert stats.finite.tolist() == [True, True, False]


def test_token_statistics_refuses_different_vocabularies():
    with pytest.raises(ValueError, match="share a vocabulary"):
        token_statistics(torch.zeros(2, 5), torch.zeros(2, 6), torch.tensor([0, 1]))


def test_richer_token_figures_on_known_distributions():
    """Reverse KL, top-5/10 agreement and the reference's confidence of 12-token distributions with no ties."""
    probabilities = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.006, 0.004])
    reference = probabilities.log().repeat(2, 1)
    modified = reference.clone()
    modified[0, [4, 5]] = modified[0, [5, 4]]  # ranks 5 and 6 trade places: the top 5 differ, the top 10 do not
    modified[1, [9, 10]] = modified[1, [10, 9]]  # ranks 10 and 11 trade places: only the top 10 differ
    statistics = token_statistics(reference, modified, torch.tensor([0, 0]))
    assert statistics.same_top5.tolist() == [False, True] and statistics.same_top10.tolist() == [True, False]
    assert statistics.same_top1.tolist() == [True, True]
    assert statistics.reference_confidence.tolist() == pytest.approx([0.3, 0.3])
    p, q = torch.softmax(reference.double(), -1), torch.softmax(modified.double(), -1)
    expected = (q * (q.log() - p.log())).sum(-1)
    assert statistics.reverse_kl.double().tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    skewed = modified.clone()
    skewed[:, 0] -= 1.0
    asymmetric = token_statistics(reference, skewed, torch.tensor([0, 0]))
    assert asymmetric.reverse_kl[0].item() != pytest.approx(asymmetric.kl[0].item(), rel=1e-2)  # not symmetric


def test_token_statistics_top1_is_the_first_maximal_token_and_masked_bins_count_nothing():
    """Ties at the maximum resolve as argmax does (the first maximal index), and a token one model rules out (-inf)
    adds nothing to a KL whose weighting distribution gives it zero mass, and +inf where that distribution uses it."""
    reference = torch.tensor([[2.0, 5.0, 5.0, 1.0], [1.0, 2.0, 3.0, -math.inf], [0.0, 1.0, 2.0, 3.0]])
    modified = torch.tensor([[2.0, 4.0, 5.0, 5.0], [1.0, 2.0, 3.0, 0.5], [0.0, 1.0, 2.0, -math.inf]])
    statistics = token_statistics(reference, modified, torch.tensor([0, 0, 0]))
    # row 0: reference ties tokens 1 and 2 (argmax 1), modified ties 2 and 3 (argmax 2)
    assert statistics.same_top1.tolist() == [False, True, False]
    p, q = torch.softmax(reference[1, :3], -1), torch.softmax(modified[1], -1)
    assert statistics.kl[1].item() == pytest.approx((p * (p.log() - q[:3].log())).sum().item(), rel=1e-5)
    assert statistics.reverse_kl[1].item() == math.inf  # the modified model uses a token the reference ruled out
    assert statistics.kl[2].item() == math.inf and math.isfinite(statistics.reverse_kl[2].item())
    assert statistics.finite.tolist() == [True, True, False]
