"""Which library quantized a model, so that nothing copies or moves a quantized model behind the user's back.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    >>> quantized_backend(model) is None
    True
"""

from __future__ import annotations

import torch

from ..errors import ModificationError
from .footprint import linear_like_modules

#: Quantization methods whose models hold plain float weights: GGUF loads dequantized; hemorrhage-hf's own
#: ``quantization_config`` only re-installs runtime hooks.
FLOAT_METHODS = ("gguf", "hemorrhage")


def quantized_backend(model: torch.nn.Module) -> str | None:
    """The library that quantized ``model``: its ``quantization_config``'s method, else the package of the first
    Linear-like layer that is not a plain float ``nn.Linear`` (bitsandbytes, hqq, optimum, torchao,
    compressed-tensors); None for a float model."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    if method and method not in FLOAT_METHODS:
        return str(method)
    for module in linear_like_modules(model).values():
        if type(module) is not torch.nn.Linear:
            return type(module).__module__.split(".")[0]
        if getattr(module, "quantization_scheme", None) is not None:
            return "compressed-tensors"
        weight = module.weight
        if type(weight) not in (torch.Tensor, torch.nn.Parameter) or not weight.is_floating_point():
            return type(weight).__module__.split(".")[0]
    return None


def refuse_quantized(model: torch.nn.Module, spec: str) -> None:
    """Copying a quantized model corrupts some backends' packed state (and doubles memory): refuse instead."""
    backend = quantized_backend(model)
    if backend is not None:
        raise ModificationError(
            f"cannot apply {spec} to a model already quantized by {backend}: hemorrhage-hf never copies a quantized "
            "model; start from the float checkpoint"
        )
