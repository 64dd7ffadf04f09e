"""Pure tensor math of hemorrhage: divergences between next-token distributions and between hidden states.

Every function takes tensors and returns tensors; nothing here knows about models or files. Log-probabilities are
always computed in fp32, whatever the models' dtype.

Example:
    >>> import torch
    >>> from hemorrhage_hf.measurement.divergence import kl_divergence
    >>> p = torch.log(torch.tensor([[0.5, 0.5]]))
    >>> q = torch.log(torch.tensor([[0.9, 0.1]]))
    >>> round(kl_divergence(p, q).item(), 4)  # 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)
    0.5108
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax over the last dimension."""
    return torch.log_softmax(logits.float(), dim=-1)


def kl_divergence(reference_logprobs: torch.Tensor, modified_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref ‖ Q_mod) in nats over the last dimension.

    Bins the reference gives zero probability contribute nothing (0·log 0 = 0), so vocabularies masked to -inf
    stay finite; a bin the reference uses and the modified model rules out gives +inf, as it should.
    """
    return _expected_difference(reference_logprobs, reference_logprobs - modified_logprobs)


def _expected_difference(logprobs: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    """Σ p·difference over the last dimension, p = exp(logprobs), counting nothing where p = 0 (where ``difference``
    may be ±inf or NaN from a -inf log-probability). Overwrites nothing it was given."""
    expected = logprobs.exp().mul_(difference).sum(-1)
    # Only a row holding 0·(±inf) or NaN sums to NaN: mask those rows alone, sparing every other row two passes.
    undefined = expected.isnan()
    if undefined.any():
        probs = logprobs[undefined].exp()
        expected[undefined] = torch.where(probs > 0, probs * difference[undefined], 0).sum(-1)
    return expected


def _argmax(logits: torch.Tensor, top: torch.return_types.topk) -> torch.Tensor:
    """``logits.argmax(-1)`` from the row's ``top`` (≥ 2 largest of a monotone function of ``logits``, most likely
    first): their first index wherever it is strictly largest; argmax itself (the first maximal index) on ties."""
    if top.values.shape[-1] < 2:
        return logits.argmax(-1)
    first = top.indices[:, 0]
    tied = top.values[:, 0] == top.values[:, 1]
    if tied.any():
        first = torch.where(tied, logits.argmax(-1), first)
    return first


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence (nats, at most ln 2) between probability vectors on the last dimension."""
    p, q = p.float(), q.float()
    mixture_log = (0.5 * (p + q)).clamp_min(torch.finfo(torch.float32).tiny).log()
    return 0.5 * (_kl_from_probs(p, mixture_log) + _kl_from_probs(q, mixture_log))


def _kl_from_probs(probs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    terms = probs * (probs.clamp_min(torch.finfo(torch.float32).tiny).log() - other_logprobs)
    return torch.where(probs > 0, terms, torch.zeros_like(terms)).sum(-1)


def cosine_distance(reference: torch.Tensor, modified: torch.Tensor) -> torch.Tensor:
    """1 − cos(ref, mod) over the last dimension, clamped at 0 (rounding can push cos a hair above 1)."""
    similarity = torch.nn.functional.cosine_similarity(reference.float(), modified.float(), dim=-1, eps=1e-12)
    return (1.0 - similarity).clamp_min(0.0)


def relative_l2(reference: torch.Tensor, modified: torch.Tensor) -> torch.Tensor:
    """‖mod − ref‖ / ‖ref‖ over the last dimension."""
    reference, modified = reference.float(), modified.float()
    return (modified - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)


@dataclass(frozen=True)
class TokenStatistics:
    """Per-token figures for a batch of scored positions (all 1-D, same length)."""

    kl: torch.Tensor
    reference_nll: torch.Tensor
    modified_nll: torch.Tensor
    same_top1: torch.Tensor
    delta_p: torch.Tensor
    finite: torch.Tensor
    #: KL(P_mod ‖ P_ref): large where the modified model puts mass the reference ruled out
    reverse_kl: torch.Tensor
    #: the two models' 5 (10) most likely tokens are the same set
    same_top5: torch.Tensor
    same_top10: torch.Tensor
    #: the reference's top-1 probability: where it was sure, and where unsure
    reference_confidence: torch.Tensor


#: k of the top-k agreements :class:`TokenStatistics` carries besides top-1.
AGREEMENT_KS = (5, 10)


def same_top_k(reference_top: torch.Tensor, modified_top: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose first ``k`` columns of two index tensors ``[n, ≥k]`` (most likely first) hold the same set.

    Example:
        >>> same_top_k(torch.tensor([[3, 1, 2]]), torch.tensor([[1, 3, 0]]), 2).tolist()
        [True]
    """
    return (reference_top[:, :k].sort(-1).values == modified_top[:, :k].sort(-1).values).all(-1)


#: Rows per chunk in :func:`token_statistics`: fp32 temporaries of a 49k vocabulary stay ~3 MB each. Chunks of
#: 128 rows (25 MB) measured the same speed but raised peak RSS by ~0.5 GB: glibc keeps freed blocks under its
#: 32 MB mmap threshold on the heap instead of returning them.
STATISTICS_CHUNK_ROWS = 16


def token_statistics(
    reference_logits: torch.Tensor, modified_logits: torch.Tensor, targets: torch.Tensor
) -> TokenStatistics:
    """Compare two models' next-token logits ``[n, vocab]`` at positions whose true next tokens are ``targets``.

    ``finite`` marks positions where the modified logits hold no NaN/inf; their other figures are meaningless and
    callers must count, not average, them. Rows are processed in chunks so memory stays flat in ``n``.
    """
    if reference_logits.shape != modified_logits.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(reference_logits.shape)} vs {tuple(modified_logits.shape)} "
            "(do the models share a vocabulary?)"
        )
    return TokenStatistics(
        **concatenate_row_chunks(
            lambda *chunk: vars(_chunk_statistics(*chunk)), reference_logits, modified_logits, targets
        )
    )


def concatenate_row_chunks(
    function: Callable[..., dict[str, torch.Tensor]], *tensors: torch.Tensor, rows: int = STATISTICS_CHUNK_ROWS
) -> dict[str, torch.Tensor]:
    """``function`` of the same ``rows``-row slices of every tensor, its dicts concatenated.

    Every path that computes per-token figures (live, cached, building the cache) slices alike, in
    :data:`STATISTICS_CHUNK_ROWS` rows: reductions such as ``logsumexp`` split their work differently for different
    row counts, and a cached identity level must match its reference bit for bit. A larger ``rows`` that is a
    multiple of it (for work done once per block, such as a matrix product) keeps the figures' slices the same.
    """
    parts = []
    for start in range(0, max(len(tensors[0]), 1), rows):
        rows_slice = slice(start, start + rows)
        parts.append(function(*(tensor[rows_slice] for tensor in tensors)))
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _chunk_statistics(
    reference_logits: torch.Tensor, modified_logits: torch.Tensor, targets: torch.Tensor
) -> TokenStatistics:
    # A NaN or ±inf logit makes the row's fp32 sum non-finite: one read of the row instead of an elementwise test.
    finite = torch.isfinite(modified_logits.sum(-1, dtype=torch.float32))
    reference_logprobs = log_probs(reference_logits)
    modified_logprobs = log_probs(modified_logits)
    reference_true = reference_logprobs.gather(-1, targets[:, None]).squeeze(-1)
    modified_true = modified_logprobs.gather(-1, targets[:, None]).squeeze(-1)
    k = min(max(AGREEMENT_KS), reference_logits.shape[-1])
    reference_top = reference_logprobs.topk(k, dim=-1)
    modified_top = modified_logprobs.topk(k, dim=-1)
    # Both directions share one difference: KL(P‖Q) = Σ p·(log p − log q), KL(Q‖P) = Σ q·(log q − log p).
    difference = reference_logprobs - modified_logprobs
    kl = _expected_difference(reference_logprobs, difference)
    reverse_kl = _expected_difference(modified_logprobs, difference.neg_())
    return TokenStatistics(
        kl=kl,
        reference_nll=-reference_true,
        modified_nll=-modified_true,
        same_top1=_argmax(reference_logits, reference_top) == _argmax(modified_logits, modified_top),
        delta_p=modified_true.exp() - reference_true.exp(),
        finite=finite,
        reverse_kl=reverse_kl,
        same_top5=same_top_k(reference_top.indices, modified_top.indices, 5),
        same_top10=same_top_k(reference_top.indices, modified_top.indices, 10),
        reference_confidence=reference_top.values[:, 0].exp(),
    )
