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


def scaled_output_error(
    weight: torch.Tensor,
    rows: torch.Tensor,
    scales: torch.Tensor | None,
    quantize_weight: Quantizer,
    quantize_input: Quantizer,
) -> float:
    """Mean squared error of the quantized, scaled layer's outputs against the exact ones on input ``rows``.

    ``scales=None`` is plain quantization. ``weight`` may stack the weights of several Linear layers that read the
    same input (q, k and v): row-wise quantization treats each row alike either way.
    """
    weight = weight.float()
    exact = rows @ weight.T
    if scales is None:
        approximate = quantize_input(rows) @ quantize_weight(weight).T
    else:
        approximate = quantize_input(rows / scales) @ quantize_weight(weight * scales).T
    return float((approximate - exact).square().mean())
