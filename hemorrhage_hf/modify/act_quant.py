"""Weight + activation quantization (``w8a8``): RTN weights, and every Linear's input quantized per token at
run time with a dynamic scale (the W8A8 scheme of SmoothQuant and LLM.int8()-style kernels).

The activation quantizer is a forward pre-hook, which weights cannot carry: :func:`apply_modification` records
the spec as the model's ``quantization_config``, and transformers re-installs the hooks through
:class:`~hemorrhage_hf.integrations.transformers.HemorrhageHfQuantizer` when the saved model is loaded again.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("w8a8")
    ActivationQuantization('w8a8')
    >>> parse_spec("w4a8-g64").group_size
    64
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from .base import register
from .quant_ops import fake_quantize_per_token
from .quantization import WeightQuantization, check_bits


class DynamicTokenQuantizer:
    """Forward pre-hook that quantizes a Linear's input with one symmetric scale per token."""

    def __init__(self, bits: int):
        self.bits = bits

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        return (fake_quantize_per_token(args[0], bits=self.bits), *args[1:])

    def __repr__(self) -> str:
        return f"DynamicTokenQuantizer(bits={self.bits})"


class ActivationQuantization(WeightQuantization):
    runtime_state = True

    def __init__(self, weight_bits: int, activation_bits: int, group_size: int | None = None):
        super().__init__(weight_bits, group_size, symmetric=True)
        check_bits(activation_bits, "activation")
        self.activation_bits = activation_bits

    @property
    def spec(self) -> str:
        return f"w{self.bits}a{self.activation_bits}{f'-g{self.group_size}' if self.group_size else ''}"

    def quantize_input(self, activations: torch.Tensor) -> torch.Tensor:
        return fake_quantize_per_token(activations, bits=self.activation_bits)

    def apply(
        self,
        model: PreTrainedModel,
        calibration: torch.Tensor | None = None,
        *,
        progress: bool = False,
        formats: Mapping[str, WeightQuantization] | None = None,
    ) -> PreTrainedModel:
        super().apply(model, calibration, progress=progress, formats=formats)
        return self.restore(model)

    def restore(self, model: PreTrainedModel) -> PreTrainedModel:
        """Install the per-token input quantizers (once: calling it again changes nothing)."""
        for linear in self.checked_linears(model).values():
            if not any(isinstance(hook, DynamicTokenQuantizer) for hook in linear._forward_pre_hooks.values()):
                linear.register_forward_pre_hook(DynamicTokenQuantizer(self.activation_bits))
        return model


@register(r"w(?P<weight>\d+)a(?P<activation>\d+)(?:-g(?P<group>\d+))?", example="w8a8")
def _activation_quantization(match) -> ActivationQuantization:
    group = match["group"]
    return ActivationQuantization(int(match["weight"]), int(match["activation"]), int(group) if group else None)
