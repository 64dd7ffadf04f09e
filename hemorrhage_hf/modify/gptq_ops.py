"""Pure tensor functions of GPTQ (Frantar et al. 2022): rounding one input column at a time onto a fixed grid, each
column's rounding error spread over the columns not yet rounded so that the layer's output on the calibration
tokens moves as little as it can.

Example:
    >>> import torch
    >>> from hemorrhage_hf.modify.gptq_ops import gptq_round
    >>> from hemorrhage_hf.modify.quant_ops import group_grid
    >>> weight = torch.tensor([[0.3, 0.3, 1.0]])
    >>> inputs = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.9, 0.1]])
    >>> grid = group_grid(weight, bits=2, group_size=None, symmetric=True)
    >>> rounded = gptq_round(weight, inputs.T @ inputs, grid)
    >>> rounded, grid.round(weight)  # the second column makes up for the first's rounding
    (tensor([[0., 1., 0.]]), tensor([[0., 0., 1.]]))
    >>> error = lambda w: round(float(((w - weight) @ inputs.T).square().sum()), 3)
    >>> error(rounded), error(grid.round(weight))
    (0.213, 0.685)
"""

from __future__ import annotations

import torch

from .quant_ops import Grid

#: Columns rounded between two updates of the rest of the weight (the error update is exact for any block size;
#: blocks only batch the products).
BLOCK_COLUMNS = 128
#: Added to the Gram matrix's diagonal, as a fraction of its mean, so that channels the calibration barely saw
#: (or tokens fewer than channels) leave it invertible.
DAMPING = 0.01


def _inverse_cholesky(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of (XᵀX + λI)⁻¹: its row j holds how column j's error moves the later columns."""
    gram = gram.double().clone()
    gram.diagonal().add_(damping * gram.diagonal().mean().clamp_min(1e-12))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    return torch.linalg.cholesky(inverse, upper=True)


def gptq_round(
    weight: torch.Tensor, gram: torch.Tensor, grid: Grid, *, damping: float = DAMPING, act_order: bool = True
) -> torch.Tensor:
    """``weight`` ``[out, in]`` rounded onto ``grid`` (one scale and zero point per row and input group, fixed
    before rounding starts), minimising ‖(Ŵ − W)·X‖² over the calibration inputs whose XᵀX is ``gram``.

    ``act_order``: round the columns with the largest input energy first, while the most columns remain to make up
    for them. Columns the calibration never saw (zero diagonal) are rounded to nearest and compensate nothing.
    """
    original_dtype = weight.dtype
    weight = weight.double().clone()
    gram = gram.double().clone()
    dead = gram.diagonal() == 0
    gram.diagonal()[dead] = 1.0
    order = torch.argsort(gram.diagonal(), descending=True) if act_order else torch.arange(weight.shape[1])
    weight, gram = weight[:, order], gram[order][:, order]
    factor = _inverse_cholesky(gram, damping)
    rounded = torch.empty_like(weight)
    columns = weight.shape[1]
    for start in range(0, columns, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, columns)
        errors = torch.empty(weight.shape[0], stop - start, dtype=weight.dtype)
        for j in range(start, stop):
            column = weight[:, j]
            rounded[:, j] = grid.round_column(column, int(order[j]))
            errors[:, j - start] = (column - rounded[:, j]) / factor[j, j]
            weight[:, j + 1 : stop] -= errors[:, j - start : j - start + 1] * factor[j, j + 1 : stop]
        weight[:, stop:] -= errors @ factor[start:stop, stop:]
    restored = torch.empty_like(rounded)
    restored[:, order] = rounded
    return restored.to(original_dtype)
