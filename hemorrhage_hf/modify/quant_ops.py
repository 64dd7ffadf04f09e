"""Pure tensor functions of round-to-nearest (RTN) quantization; no modules, no state.

Example:
    >>> import torch
    >>> from hemorrhage_hf.modify.quant_ops import fake_quantize
    >>> fake_quantize(torch.tensor([[0.2, -0.7, 0.6, 1.0]]), bits=2, group_size=None, symmetric=True)
    tensor([[ 0., -1.,  1.,  1.]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """A b-bit integer grid per (row, input group) of a weight: w ≈ (clamp(round(w / scale) + zero_point, q_min,
    q_max) − zero_point) · scale. ``scale`` and ``zero_point`` are ``[rows, n_groups]`` (zero for symmetric grids)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    q_min: int
    q_max: int
    group_size: int

    def _round(self, values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(torch.round(values / scale) + zero_point, self.q_min, self.q_max) - zero_point) * scale

    def round(self, weight: torch.Tensor) -> torch.Tensor:
        """Every weight to its nearest grid point (RTN)."""
        columns = weight.shape[1]
        scale = self.scale.repeat_interleave(self.group_size, dim=1)[:, :columns]
        zero_point = self.zero_point.repeat_interleave(self.group_size, dim=1)[:, :columns]
        return self._round(weight, scale, zero_point)

    def round_column(self, column: torch.Tensor, index: int) -> torch.Tensor:
        """Input column ``index`` (``[rows]``) to its nearest grid point."""
        group = index // self.group_size
        return self._round(column, self.scale[:, group], self.zero_point[:, group])


def _group_ranges(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale and zero point ``[n, 1]`` of each row of ``groups`` ``[n, group]``, and the code range."""
    if symmetric:
        q_max = 2 ** (bits - 1) - 1
        scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / q_max
        return scale, torch.zeros_like(scale), -q_max - 1, q_max
    q_max = 2**bits - 1
    # Integer kernels store the zero point as a b-bit code, so it must lie in [0, q_max]: the range is widened to
    # include 0 (as GPTQ does), which puts -low / scale there for groups of one sign, and the clamp absorbs rounding.
    low = groups.amin(-1, keepdim=True).clamp_max(0)
    high = groups.amax(-1, keepdim=True).clamp_min(0)
    scale = (high - low).clamp_min(1e-12) / q_max
    return scale, torch.clamp(torch.round(-low / scale), 0, q_max), 0, q_max


def group_grid(weight: torch.Tensor, *, bits: int, group_size: int | None, symmetric: bool) -> Grid:
    """The RTN grid of a ``[out, in]`` weight in groups of ``group_size`` input columns (None: one per row), each
    group's range taken from its own weights.

    When ``group_size`` does not divide ``in`` (576 by 128, say), the last, shorter group of each row gets a scale
    of its own rather than being padded, so padding never widens its range.
    """
    rows, columns = weight.shape
    group_size = columns if group_size is None else group_size
    weight = weight.float()
    full = (columns // group_size) * group_size
    scales, zero_points = [], []
    if full:
        scale, zero_point, q_min, q_max = _group_ranges(
            weight[:, :full].reshape(rows * (full // group_size), group_size), bits, symmetric
        )
        scales.append(scale.reshape(rows, full // group_size))
        zero_points.append(zero_point.reshape(rows, full // group_size))
    if full < columns:
        scale, zero_point, q_min, q_max = _group_ranges(weight[:, full:], bits, symmetric)
        scales.append(scale)
        zero_points.append(zero_point)
    return Grid(torch.cat(scales, dim=1), torch.cat(zero_points, dim=1), q_min, q_max, group_size)


def fake_quantize(weight: torch.Tensor, *, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """RTN quantize-dequantize a ``[out, in]`` weight on its :func:`group_grid`."""
    grid = group_grid(weight, bits=bits, group_size=group_size, symmetric=symmetric)
    return grid.round(weight.float()).to(weight.dtype)


def fake_quantize_per_token(activations: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Symmetric RTN quantize-dequantize of ``[..., channels]`` activations with one dynamic scale per token.

    Example:
        >>> fake_quantize_per_token(torch.tensor([[0.3, -1.5, 0.9], [3.0, 2.0, -1.0]]), bits=3)
        tensor([[ 0.5000, -1.5000,  1.0000],
                [ 3.0000,  2.0000, -1.0000]])
    """
    shape = activations.shape
    return fake_quantize(activations.reshape(-1, shape[-1]), bits=bits, group_size=None, symmetric=True).reshape(shape)
