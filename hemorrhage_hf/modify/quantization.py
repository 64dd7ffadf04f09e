"""Weight-only round-to-nearest quantization (``int8`` … ``int2``, per channel or in groups, sym/asym).

Weights are quantized and dequantized in place (fake quantization): the model computes exactly what an
integer kernel with these scales would, in its original dtype.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("int3-g128-asym")
    WeightQuantization('int3-g128-asym')
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import ModificationError, SpecError
from .base import Modification, register, target_linears
from .footprint import WeightFootprint, nominal_bits, sum_footprints
from .quant_ops import Grid, fake_quantize, group_grid


def check_bits(bits: int, what: str) -> None:
    if not 2 <= bits <= 8:
        raise SpecError(f"{what} bits must be between 2 and 8, got {bits}")


class WeightQuantization(Modification):
    """RTN weight quantization; also the weight format that :class:`~.scaling.ActivationAwareScaling` searches for."""

    def __init__(self, bits: int, group_size: int | None = None, symmetric: bool = True):
        check_bits(bits, "weight")
        if group_size is not None and group_size < 1:
            raise SpecError(f"group size must be a positive integer, got {group_size}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    @property
    def spec(self) -> str:
        group = f"-g{self.group_size}" if self.group_size else ""
        return f"int{self.bits}{group}{'' if self.symmetric else '-asym'}"

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` rounded to nearest on its grid (what searches and estimates judge a format by)."""
        return fake_quantize(weight, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def grid(self, weight: torch.Tensor) -> Grid:
        """This format's grid for ``weight``: its scales (and zero points) per row and group."""
        return group_grid(weight, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def quantize_input(self, activations: torch.Tensor) -> torch.Tensor:
        """What a Linear sees of its input at run time: weight-only formats keep it exact."""
        return activations

    def checked_linears(self, model: PreTrainedModel) -> dict[str, torch.nn.Linear]:
        """The Linear layers to quantize, after refusing a group size wider than any of them."""
        linears = target_linears(model)
        if self.group_size is not None:
            too_narrow = {
                name: linear.in_features for name, linear in linears.items() if linear.in_features < self.group_size
            }
            if too_narrow:
                name, width = next(iter(too_narrow.items()))
                raise ModificationError(
                    f"group size {self.group_size} is larger than layer {name} ({width} input features)"
                )
        return linears

    def config(self) -> dict:
        kind = "symmetric" if self.symmetric else "asymmetric (integer zero point)"
        per = f"group of {self.group_size}" if self.group_size else "output row"
        return {"bits": self.bits, "group_size": self.group_size, "scheme": f"{kind} RTN, fp16 scale per {per}"}

    def footprint(self, model: PreTrainedModel) -> WeightFootprint:
        """``bits`` per weight plus an fp16 scale (and a ``bits``-wide zero point when asymmetric) per group.

        Example:
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
            ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
            >>> WeightQuantization(4, 64, symmetric=False).footprint(model).bits_per_weight  # 4 + (16 + 4) / 64
            4.3125
        """
        return sum_footprints(self.layer_footprint(linear) for linear in self.checked_linears(model).values())

    def layer_footprint(self, linear: torch.nn.Linear) -> WeightFootprint:
        """The nominal footprint of one Linear layer's weight in this format."""
        bits = nominal_bits(self.bits, linear.in_features, self.group_size, self.symmetric)
        return WeightFootprint.from_bits(linear.in_features * linear.out_features, bits)

    @torch.no_grad()
    def apply(
        self,
        model: PreTrainedModel,
        calibration: torch.Tensor | None = None,
        *,
        progress: bool = False,
        formats: Mapping[str, WeightQuantization] | None = None,
    ) -> PreTrainedModel:
        """``formats`` (Linear name → weight-only format) overrides this format for those layers (:mod:`.mixed`)."""
        formats = formats or {}
        linears = self.checked_linears(model)
        for name, linear in tqdm(linears.items(), desc=f"quantizing {self.spec}", unit="layer", disable=not progress):
            linear.weight.copy_(formats.get(name, self).quantize_weight(linear.weight))
        return model


def is_weight_only(modification: Modification) -> bool:
    """Whether ``modification`` only changes weights, onto a grid of :class:`WeightQuantization` (whatever rounds
    onto it), so that it may be mixed with other formats layer by layer."""
    return isinstance(modification, WeightQuantization) and not modification.runtime_state


@register(r"int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<asym>-asym|-sym)?", example="int4-g64")
def _weight_quantization(match) -> WeightQuantization:
    group = match["group"]
    return WeightQuantization(int(match["bits"]), int(group) if group else None, match["asym"] != "-asym")
