"""Asymmetric RTN as an unsigned integer kernel stores it: codes and zero point both in [0, 2^b − 1]."""

from __future__ import annotations

import pytest
import torch

from hemorrhage_hf.modify.quant_ops import fake_quantize


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_groups_of_one_sign_stay_on_a_uint_grid(bits, sign):
    q_max = 2**bits - 1
    row = sign * torch.linspace(1.0, 2.0, 1024)[None, :]  # a group far from 0: its zero point would fall outside
    dequantized = fake_quantize(row, bits=bits, group_size=None, symmetric=False)[0].double()
    levels = dequantized.unique()
    span = levels[-1] - levels[0]
    step = span / torch.round(span / (levels[1:] - levels[:-1]).min())  # the grid step, free of fp32 rounding
    codes_from_zero = dequantized / step  # (q − z): integers with q, z in [0, q_max]
    assert torch.allclose(codes_from_zero, codes_from_zero.round(), atol=1e-3)
    # z ∈ [0, q_max] and q ∈ [0, q_max] put every q − z in [−q_max, q_max]; one sign puts them on one side of 0.
    assert codes_from_zero.abs().max().item() <= q_max + 1e-3
    # Widening the range to include 0 costs at most half a step per weight: nothing is clipped.
    assert (dequantized - row[0].double()).abs().max().item() <= step.item() / 2 + 1e-6


def test_asymmetric_mixed_sign_group_keeps_its_full_resolution():
    row = torch.linspace(-1.0, 3.0, 256)[None, :]
    dequantized = fake_quantize(row, bits=4, group_size=None, symmetric=False)
    assert dequantized.unique().numel() == 16
    assert (dequantized - row).abs().max().item() <= 4.0 / 15 / 2 + 1e-6
