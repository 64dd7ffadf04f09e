"""Pure tensor functions of pruning: importance scores and the masks that keep the most important weights.

Masks drop exactly the share of weights asked for: within each output row (Wanda's rule), or within every group
of M consecutive weights of a row (N:M).

Example:
    >>> import torch
    >>> from hemorrhage_hf.modify.prune_ops import row_mask, n_m_mask
    >>> scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.2, 0.1, 0.9]])
    >>> row_mask(scores, sparsity=0.5)
    tensor([[ True, False,  True, False],
            [ True, False, False,  True]])
    >>> n_m_mask(torch.tensor([[1.0, 5.0, 2.0, 4.0, 9.0, 8.0, 0.0, 7.0]]), n=2, m=4)
    tensor([[False,  True, False,  True,  True,  True, False, False]])
"""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|."""
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ (Wanda, Sun et al. 2023): a weight matters as much as the input it multiplies."""
    return weight.abs().float() * input_norms[None, :]


def gradient_scores(
    weight: torch.Tensor, input_norms: torch.Tensor, gradient_norms: torch.Tensor, alpha: float
) -> torch.Tensor:
    """|W_ij|·(‖X_j‖₂ + α·r·‖G_ij‖): GBLM-Pruner's sum of an activation and a gradient term, compared within a row.

    GBLM adds |W|·‖X‖₂ and 100·|W|·‖G‖ in raw units, whose balance then shifts with the number and length of
    calibration sequences and from layer to layer; ``r`` = mean ‖X‖₂ / mean ‖G‖ over the matrix brings the gradient
    term to the activation term's units, so ``alpha`` is a unit-free mixing weight. The activation term is left
    as Wanda computes it, so ``alpha = 0`` gives Wanda's scores bit for bit (``x + 0·g`` is ``x`` exactly).

    Example:
        >>> weight, norms, gradients = torch.randn(4, 8), torch.rand(8), torch.rand(4, 8)
        >>> torch.equal(gradient_scores(weight, norms, gradients, 0.0), wanda_scores(weight, norms))
        True
    """
    gradient = gradient_norms.float()
    ratio = alpha * input_norms.mean() / gradient.mean().clamp_min(1e-12)
    return weight.abs().float() * (input_norms[None, :] + ratio * gradient)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask with the ``round(sparsity · columns)`` lowest-scoring weights of every row dropped."""
    n_drop = round(sparsity * scores.shape[1])
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_drop:
        dropped = torch.topk(scores, n_drop, dim=1, largest=False).indices
        mask.scatter_(1, dropped, False)
    return mask


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive weights of a row kept (N:M sparsity).

    Columns past the last full group of ``m`` (when ``m`` does not divide the row) are kept.
    """
    rows, columns = scores.shape
    full = (columns // m) * m
    groups = scores[:, :full].reshape(rows, full // m, m)
    kept = torch.topk(groups, n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, kept, True).reshape(rows, full)
    return torch.cat([mask, torch.ones(rows, columns - full, dtype=torch.bool)], dim=1)


def channel_energy(weight: torch.Tensor, input_mean_squares: torch.Tensor) -> torch.Tensor:
    """Expected squared output contribution of each input channel j: E[x_j²]·‖W_:,j‖² (structured pruning score)."""
    return input_mean_squares * weight.float().square().sum(0)


def lowest_per_group(scores: torch.Tensor, n_groups: int, n_drop: int) -> list[int]:
    """Indices of the ``n_drop`` lowest scores within each of ``n_groups`` equal consecutive slices of ``scores``.

    Example:
        >>> lowest_per_group(torch.tensor([3.0, 1.0, 2.0, 0.5, 9.0, 4.0]), n_groups=2, n_drop=1)
        [1, 3]
    """
    grouped = scores.reshape(n_groups, -1)
    dropped = (
        torch.topk(grouped, n_drop, dim=1, largest=False).indices + torch.arange(n_groups)[:, None] * grouped.shape[1]
    )
    return sorted(dropped.flatten().tolist())
