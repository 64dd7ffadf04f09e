"""Pure tensor functions of round-to-nearest (RTN) quantization; no modules, no state.

Example:
    >>> import torch
    >>> from hemorrhage_hf.modify.quant_ops import fake_quantize
    >>> fake_quantize(torch.tensor([[0.2, -0.7, 0.6, 1.0]]), bits=2, group_size=None, symmetric=True)
    tensor([[ 0., -1.,  1.,  1.]])
"""

from __future__ import annotations

import torch


def _fake_quantize_groups(groups: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize each row of ``groups`` ``[n, group]`` with its own scale (and zero point)."""
    if symmetric:
        q_max = 2 ** (bits - 1) - 1
        scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / q_max
        return torch.clamp(torch.round(groups / scale), -q_max - 1, q_max) * scale
    q_max = 2**bits - 1
    # Integer kernels store the zero point as a b-bit code, so it must lie in [0, q_max]: the range is widened to
    # include 0 (as GPTQ does), which puts -low / scale there for groups of one sign, and the clamp absorbs rounding.
    low = groups.amin(-1, keepdim=True).clamp_max(0)
    high = groups.amax(-1, keepdim=True).clamp_min(0)
    scale = (high - low).clamp_min(1e-12) / q_max
    zero_point = torch.clamp(torch.round(-low / scale), 0, q_max)
    quantized = torch.clamp(torch.round(groups / scale) + zero_point, 0, q_max)
    return (quantized - zero_point) * scale


def fake_quantize(weight: torch.Tensor, *, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """RTN quantize-dequantize a ``[out, in]`` weight in groups of ``group_size`` input columns (None: per row).

    When ``group_size`` does not divide ``in`` (576 by 128, say), the last, shorter group of each row gets a scale
    of its own rather than being padded, so padding never widens its range.
    """
    rows, columns = weight.shape
    group_size = columns if group_size is None else group_size
    original_dtype = weight.dtype
    weight = weight.float()
    full = (columns // group_size) * group_size
    parts = []
    if full:
        groups = weight[:, :full].reshape(rows * (full // group_size), group_size)
        parts.append(_fake_quantize_groups(groups, bits, symmetric).reshape(rows, full))
    if full < columns:
        parts.append(_fake_quantize_groups(weight[:, full:], bits, symmetric))
    return torch.cat(parts, dim=1).to(original_dtype)


def fake_quantize_per_token(activations: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Symmetric RTN quantize-dequantize of ``[..., channels]`` activations with one dynamic scale per token.

    Example:
        >>> fake_quantize_per_token(torch.tensor([[0.3, -1.5, 0.9], [3.0, 2.0, -1.0]]), bits=3)
        tensor([[ 0.5000, -1.5000,  1.0000],
                [ 3.0000,  2.0000, -1.0000]])
    """
    shape = activations.shape
    return _fake_quantize_groups(activations.reshape(-1, shape[-1]), bits, symmetric=True).reshape(shape)
