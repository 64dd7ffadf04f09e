"""Where the parts of a decoder-only transformer live, named as Llama, Mistral, Qwen2 and SmolLM2 name them.

Modifications that need more than "every Linear layer" (the op before a Linear, whole heads, whole blocks) find
the parts here, so a new architecture family is one place to teach.

Example:
    >>> from hemorrhage_hf.modify.architecture import decoder_blocks
    >>> blocks = decoder_blocks(model)  # doctest: +SKIP
    >>> blocks[0].q_proj.out_features  # doctest: +SKIP
    576
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from ..errors import ModificationError


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's list of decoder layers (``model.model.layers`` for Llama-style models)."""
    layers = getattr(getattr(model, model.base_model_prefix, model), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModificationError(
            f"{type(model).__name__} has no list of decoder layers at model.{model.base_model_prefix}.layers; "
            "layer-wise modifications support Llama-style decoder models"
        )
    return layers


@dataclass(frozen=True)
class DecoderBlock:
    """One Llama-style decoder layer: norm → attention (q, k, v, o) → norm → gated MLP (gate, up, down)."""

    layer: nn.Module
    input_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    post_norm: nn.Module
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear

    @classmethod
    def of(cls, layer: nn.Module, index: int) -> DecoderBlock:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = {
            "input_norm": getattr(layer, "input_layernorm", None),
            "post_norm": getattr(layer, "post_attention_layernorm", None),
            **{name: getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
            **{name: getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")},
        }
        missing = [name for name, part in parts.items() if part is None]
        if missing:
            raise ModificationError(
                f"decoder layer {index} ({type(layer).__name__}) lacks {', '.join(missing)}; this modification "
                "supports Llama-style layers (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, two RMSNorms)"
            )
        return cls(layer=layer, **parts)

    @property
    def attention(self) -> nn.Module:
        return self.layer.self_attn

    @property
    def mlp(self) -> nn.Module:
        return self.layer.mlp


def decoder_blocks(model: PreTrainedModel) -> list[DecoderBlock]:
    """Every decoder layer as a :class:`DecoderBlock`; :class:`ModificationError` if any is not Llama-style."""
    return [DecoderBlock.of(layer, index) for index, layer in enumerate(decoder_layers(model))]


def restack_layers(model: PreTrainedModel, layers: list[nn.Module], sources: list[int]) -> None:
    """Install ``layers`` as the decoder stack (``sources[j]``: the original index layer j was made from), keeping
    the config and each attention's cache index consistent.

    The KV cache files keys and values under ``self_attn.layer_idx``, and per-layer config lists (``layer_types``)
    need one entry per layer, or generation mixes layers up.
    """
    config = model.config
    getattr(model, model.base_model_prefix).layers = nn.ModuleList(layers)
    for index, layer in enumerate(layers):
        if hasattr(layer, "self_attn"):
            layer.self_attn.layer_idx = index
    config.num_hidden_layers = len(layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = [layer_types[source] for source in sources]


def linears_by_layer(model: PreTrainedModel) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, its Linear layers by full module name (``model.layers.3.mlp.up_proj``...)."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    found = [
        {f"{prefix}.{index}.{name}": module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        for index, layer in enumerate(layers)
    ]
    if not any(found):
        raise ModificationError(f"{type(model).__name__}'s decoder layers hold no Linear layers to modify")
    return found
