"""Structured pruning: whole attention heads (``heads-25``), MLP channels (``channels-25``), whole decoder layers
(``layers-4``). Shapes shrink and the config says so, so the saved model loads with plain transformers.

Heads and channels are ranked per layer by the energy they send into the residual stream, E[x_j²]·‖W_:,j‖² summed
over the head's (or the channel's) inputs of ``o_proj`` (``down_proj``), with activations from calibration text
flowing through the layers before as already pruned. Every layer keeps the same number of heads (channels),
because a Llama config has one head count and one intermediate size for all layers; under grouped-query attention
every key/value group keeps the same number of query heads, so the fraction removed is rounded to what that
allows and the fraction reached is recorded. Layers are ranked by block influence (ShortGPT, Men et al. 2024):
1 − mean cosine similarity of a layer's input and output; the first layer is always kept.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("heads-25"), parse_spec("channels-25"), parse_spec("layers-4")
    (HeadPruning('heads-25'), ChannelPruning('channels-25'), LayerRemoval('layers-4'))
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from ..config_keys import LAYER_MAP_ATTRIBUTE, STRUCTURE_ATTRIBUTE
from ..errors import ModificationError, SpecError
from .architecture import decoder_blocks, decoder_layers, restack_layers
from .base import Modification, register
from .calibration import layerwise
from .prune_ops import channel_energy, lowest_per_group
from .pruning import check_sparsity


def _sliced_linear(linear: nn.Linear, *, rows: list[int] | None = None, columns: list[int] | None = None) -> nn.Linear:
    """A new Linear holding the chosen output rows / input columns of ``linear``."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    sliced = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if bias is not None:
            sliced.bias.copy_(bias)
    return sliced


class _FractionPruning(Modification):
    """Removes a fraction of some unit (heads, channels) from every decoder layer."""

    family = "pruning"
    needs_calibration = True
    unit: str

    def __init__(self, fraction: float):
        check_sparsity(fraction)
        self.fraction = fraction

    @property
    def spec(self) -> str:
        return f"{self.unit}-{self.fraction * 100:g}"


class HeadPruning(_FractionPruning):
    unit = "heads"

    def heads_to_drop_per_group(self, n_heads: int, n_kv_heads: int) -> int:
        per_group = n_heads // n_kv_heads
        n_drop = round(self.fraction * per_group)
        if not 0 < n_drop < per_group:
            raise ModificationError(
                f"{self.spec} would remove {n_drop} of the {per_group} query heads of each of the {n_kv_heads} "
                f"key/value groups; heads go in steps of {100 / per_group:.1f} % and every group keeps at least one"
            )
        return n_drop

    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        blocks = decoder_blocks(model)
        config = model.config
        n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        n_drop = self.heads_to_drop_per_group(n_heads, n_kv_heads)
        removed = {}
        for step, block in zip(
            layerwise(model, calibration, progress=progress, description=f"pruning {self.spec}"), blocks
        ):
            statistics = step.input_statistics({"o": block.o_proj})["o"]
            energy = channel_energy(block.o_proj.weight, statistics.mean_squares())
            dropped = lowest_per_group(energy.reshape(n_heads, head_dim).sum(1), n_kv_heads, n_drop)
            kept = [head for head in range(n_heads) if head not in dropped]
            channels = [head * head_dim + d for head in kept for d in range(head_dim)]
            attention = block.attention
            attention.q_proj = _sliced_linear(block.q_proj, rows=channels)
            attention.o_proj = _sliced_linear(block.o_proj, columns=channels)
            attention.num_key_value_groups = len(kept) // n_kv_heads
            removed[step.index] = dropped
        config.head_dim = head_dim
        config.num_attention_heads = n_heads - n_drop * n_kv_heads
        setattr(
            model.config,
            STRUCTURE_ATTRIBUTE,
            {
                "spec": self.spec,
                "fraction_removed": n_drop * n_kv_heads / n_heads,
                "heads_removed_per_layer": {str(layer): heads for layer, heads in removed.items()},
            },
        )
        return model


class ChannelPruning(_FractionPruning):
    unit = "channels"

    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        blocks = decoder_blocks(model)
        width = blocks[0].down_proj.in_features
        n_keep = width - round(self.fraction * width)
        for step, block in zip(
            layerwise(model, calibration, progress=progress, description=f"pruning {self.spec}"), blocks
        ):
            statistics = step.input_statistics({"down": block.down_proj})["down"]
            energy = channel_energy(block.down_proj.weight, statistics.mean_squares())
            kept = sorted(torch.topk(energy, n_keep).indices.tolist())
            mlp = block.mlp
            mlp.gate_proj = _sliced_linear(block.gate_proj, rows=kept)
            mlp.up_proj = _sliced_linear(block.up_proj, rows=kept)
            mlp.down_proj = _sliced_linear(block.down_proj, columns=kept)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = n_keep
        model.config.intermediate_size = n_keep
        setattr(model.config, STRUCTURE_ATTRIBUTE, {"spec": self.spec, "fraction_removed": 1 - n_keep / width})
        return model


class LayerRemoval(Modification):
    family = "pruning"
    needs_calibration = True

    def __init__(self, count: int):
        if count < 1:
            raise SpecError(f"remove at least one layer, got {count}")
        self.count = count

    @property
    def spec(self) -> str:
        return f"layers-{self.count}"

    @torch.no_grad()
    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        layers = list(decoder_layers(model))
        if self.count >= len(layers):
            raise ModificationError(f"{self.spec} would leave no layer besides the first of {len(layers)}")
        influence = []
        for step in layerwise(model, calibration, progress=progress, description="ranking layers"):
            outputs = step.outputs()
            similarity = [
                torch.nn.functional.cosine_similarity(h.float(), o.float(), dim=-1).mean()
                for h, o in zip(step.inputs, outputs)
            ]
            influence.append(1 - float(torch.stack(similarity).mean()))
        removed = sorted(sorted(range(1, len(layers)), key=influence.__getitem__)[: self.count])
        kept = [index for index in range(len(layers)) if index not in removed]
        # A removed layer is compared with the last layer kept before it: the hidden state at that depth.
        layer_map = [max(j for j, source in enumerate(kept) if source <= i) for i in range(len(layers))]
        restack_layers(model, [layers[index] for index in kept], kept)
        setattr(model.config, LAYER_MAP_ATTRIBUTE, layer_map)
        setattr(
            model.config,
            STRUCTURE_ATTRIBUTE,
            {
                "spec": self.spec,
                "layers_removed": removed,
                "block_influence": influence,
            },
        )
        return model


@register(r"heads-(?P<percent>\d+(?:\.\d+)?)", example="heads-25")
def _heads(match) -> HeadPruning:
    return HeadPruning(float(match["percent"]) / 100)


@register(r"channels-(?P<percent>\d+(?:\.\d+)?)", example="channels-25")
def _channels(match) -> ChannelPruning:
    return ChannelPruning(float(match["percent"]) / 100)


@register(r"layers-(?P<count>\d+)", example="layers-4")
def _layers(match) -> LayerRemoval:
    return LayerRemoval(int(match["count"]))
