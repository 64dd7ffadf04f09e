"""Weight-only round-to-nearest quantization (``int8`` … ``int2``, per channel or in groups, sym/asym).

Weights are quantized and dequantized in place (fake quantization): the model computes exactly what an
integer kernel with these scales would, in its original dtype.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("int3-g128-asym")
    WeightQuantization(bits=3, group_size=128, symmetric=False)
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..errors import ModificationError, SpecError
from .base import Modification, register, target_linears
from .quant_ops import fake_quantize


class WeightQuantization(Modification):
    def __init__(self, bits: int, group_size: int | None = None, symmetric: bool = True):
        if not 2 <= bits <= 8:
            raise SpecError(f"weight bits must be between 2 and 8, got {bits}")
        if group_size is not None and group_size < 1:
            raise SpecError(f"group size must be a positive integer, got {group_size}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    def __repr__(self) -> str:
        return f"WeightQuantization(bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric})"

    @torch.no_grad()
    def apply(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> PreTrainedModel:
        linears = target_linears(model)
        if self.group_size is not None:
            too_narrow = {name: l.in_features for name, l in linears.items() if l.in_features < self.group_size}
            if too_narrow:
                name, width = next(iter(too_narrow.items()))
                raise ModificationError(
                    f"group size {self.group_size} is larger than layer {name} ({width} input features)"
                )
        for linear in linears.values():
            linear.weight.copy_(
                fake_quantize(linear.weight, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)
            )
        return model


@register(r"int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<asym>-asym|-sym)?", example="int4-g64")
def _weight_quantization(match) -> WeightQuantization:
    group = match["group"]
    return WeightQuantization(int(match["bits"]), int(group) if group else None, match["asym"] != "-asym")
