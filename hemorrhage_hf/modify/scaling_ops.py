"""Pure tensor functions of activation-aware scaling: per-input-channel scales s that move difficulty between a
Linear's weights (W·diag(s)) and its inputs (X·diag(1/s)) without changing W·X before rounding.

Example:
    >>> import torch
    >>> from hemorrhage_hf.modify.scaling_ops import awq_scales, smooth_scales
    >>> awq_scales(torch.tensor([1.0, 4.0, 16.0]), exponent=0.5)
    tensor([0.5000, 1.0000, 2.0000])
    >>> smooth_scales(torch.tensor([8.0, 1.0]), torch.tensor([2.0, 2.0]), alpha=0.5)
    tensor([2.0000, 0.7071])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def awq_scales(mean_abs_input: torch.Tensor, exponent: float) -> torch.Tensor:
    """AWQ's s = E|x|^r, normalised so that max(s)·min(s) = 1 (the geometric middle of the scales stays 1)."""
    scales = mean_abs_input.float().clamp_min(1e-4).pow(exponent)
    return scales / (scales.max() * scales.min()).sqrt()


def smooth_scales(max_abs_input: torch.Tensor, max_abs_weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s = max|X_j|^α / max|W_j|^(1−α): α of the input's range moves into the weights."""
    return max_abs_input.float().clamp_min(1e-5).pow(alpha) / max_abs_weight.float().clamp_min(1e-5).pow(1 - alpha)


def quantized_weight_error(
    weight: torch.Tensor, gram: torch.Tensor, scales: torch.Tensor | None, quantize_weight: Quantizer
) -> float:
    """Σ over calibration tokens of ‖(Ŵ − W)·x‖², from the inputs' Gram matrix XᵀX: the output error of weight-only
    quantization on *every* calibration token, at the cost of one ``[out, in] × [in, in]`` product.

    Ŵ = Q(W·diag(s))·diag(1/s) is what the layer computes with scales ``s`` migrated (``None``: plain Q(W)).
    """
    quantized = quantize_weight(weight) if scales is None else quantize_weight(weight * scales) / scales
    difference = quantized - weight
    return float(((difference @ gram) * difference).sum())


def scaled_output_error(
    weight: torch.Tensor,
    rows: torch.Tensor,
    exact: torch.Tensor,
    scales: torch.Tensor | None,
    quantize_weight: Quantizer,
    quantize_input: Quantizer,
) -> float:
    """Σ of squared output errors on sampled input ``rows`` when the input is quantized too (a Gram matrix cannot
    say what rounding the inputs does); ``exact`` is rows @ Wᵀ, computed once per search by the caller.
    """
    if scales is None:
        approximate = quantize_input(rows) @ quantize_weight(weight).T
    else:
        approximate = quantize_input(rows / scales) @ quantize_weight(weight * scales).T
    return float((approximate - exact).square().sum())


def column_groups(columns: int, group_size: int | None) -> list[slice]:
    """The input-column groups :func:`~.quant_ops.fake_quantize` gives scales of their own (a shorter last group
    where ``group_size`` does not divide ``columns``; one group without ``group_size``)."""
    group_size = group_size or columns
    return [slice(start, min(start + group_size, columns)) for start in range(0, columns, group_size)]


def clip_weight(weight: torch.Tensor, ratios: torch.Tensor, groups: list[slice], symmetric: bool) -> torch.Tensor:
    """``weight`` with each (row, group) clamped to ``ratio`` × its range (``ratios``: ``[rows, n_groups]``)."""
    clipped = weight.clone()
    for index, columns in enumerate(groups):
        part, ratio = weight[:, columns], ratios[:, index : index + 1]
        if symmetric:
            bound = part.abs().amax(1, keepdim=True) * ratio
            clipped[:, columns] = part.clamp(-bound, bound)
        else:
            clipped[:, columns] = part.clamp(part.amin(1, keepdim=True) * ratio, part.amax(1, keepdim=True) * ratio)
    return clipped


def search_clip_ratios(
    weight: torch.Tensor,
    gram: torch.Tensor,
    groups: list[slice],
    symmetric: bool,
    quantize_weight: Quantizer,
    candidates: tuple[float, ...],
) -> torch.Tensor:
    """Per (output row, input group), the clipping ratio whose quantized weights best reproduce that group's share
    of the row's output over the calibration tokens (AWQ's weight clipping search; ``gram`` is their XᵀX).
    Ratio 1 is no clipping.

    Example:
        >>> from hemorrhage_hf.modify.quant_ops import fake_quantize
        >>> w = torch.tensor([[0.1, 0.2, -0.15, 4.0]])
        >>> inputs = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
        >>> q = lambda m: fake_quantize(m, bits=2, group_size=None, symmetric=True)
        >>> search_clip_ratios(w, inputs.T @ inputs, [slice(0, 4)], True, q, (1.0, 0.05))
        tensor([[0.0500]])
    """
    errors = []
    for ratio in candidates:
        ratios = torch.full((weight.shape[0], len(groups)), ratio)
        difference = quantize_weight(clip_weight(weight, ratios, groups, symmetric)) - weight
        errors.append(torch.stack([((difference[:, c] @ gram[c, c]) * difference[:, c]).sum(1) for c in groups], dim=1))
    best = torch.stack(errors).argmin(0)
    return torch.tensor(candidates, dtype=weight.dtype)[best]
