"""Layer expansion: ``expand-dup-4`` (depth up-scaling: copies of existing layers) and ``expand-identity-4``
(LLaMA-Pro: copies whose attention and MLP output projections are zero, so each new block adds nothing to the
residual stream and the expanded model computes exactly the original function until it is trained).

The decoder's N layers are split into K consecutive groups of near-equal size and a copy of each group's last
layer is inserted after it. ``model.config.hemorrhage_layer_map`` maps reference layer i to the index of the same
layer in the expanded model, which is what the measurement engine compares layer by layer.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("expand-identity-4")
    LayerExpansion('expand-identity-4')
    >>> from hemorrhage_hf.modify.expansion import insertion_points
    >>> insertion_points(n_layers=30, count=4)
    [7, 14, 21, 29]
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from ..config_keys import EXPANSION_ATTRIBUTE, LAYER_MAP_ATTRIBUTE
from ..errors import ModificationError, SpecError
from .architecture import decoder_blocks, decoder_layers, restack_layers
from .base import Modification, register

KINDS = ("dup", "identity")


def insertion_points(n_layers: int, count: int) -> list[int]:
    """The last layer of each of ``count`` consecutive, near-equal groups of ``n_layers`` (copied and inserted
    after)."""
    return [round((group + 1) * n_layers / count) - 1 for group in range(count)]


class LayerExpansion(Modification):
    family = "expansion"

    def __init__(self, kind: str, count: int):
        if kind not in KINDS:
            raise SpecError(f"unknown expansion kind {kind!r}; choose one of {', '.join(KINDS)}")
        if count < 1:
            raise SpecError(f"insert at least one layer, got {count}")
        self.kind, self.count = kind, count

    @property
    def spec(self) -> str:
        return f"expand-{self.kind}-{self.count}"

    @torch.no_grad()
    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        layers = list(decoder_layers(model))
        if self.count > len(layers):
            raise ModificationError(f"{self.spec} inserts more layers than the model's {len(layers)} (one per group)")
        if self.kind == "identity":
            decoder_blocks(model)  # the zeroed projections must exist before anything is copied
        points = set(insertion_points(len(layers), self.count))
        expanded, sources, layer_map, inserted = [], [], [], []
        for index, layer in enumerate(layers):
            layer_map.append(len(expanded))
            expanded.append(layer)
            sources.append(index)
            if index in points:
                inserted.append(len(expanded))
                expanded.append(self._new_layer(layer, model.config))
                sources.append(index)
        restack_layers(model, expanded, sources)
        setattr(model.config, LAYER_MAP_ATTRIBUTE, layer_map)
        setattr(
            model.config,
            EXPANSION_ATTRIBUTE,
            {"spec": self.spec, "inserted_layers": inserted, "copied_from": sorted(points)},
        )
        return model

    def _new_layer(self, layer: torch.nn.Module, config) -> torch.nn.Module:
        # The copy must share the model's config (attention implementation, cache layout), not carry a private copy.
        shared = {id(config): config, id(config.get_text_config()): config.get_text_config()}
        new = copy.deepcopy(layer, memo=shared)
        if self.kind == "identity":
            for projection in (new.self_attn.o_proj, new.mlp.down_proj):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()
        return new


@register(r"expand-(?P<kind>dup|identity)-(?P<count>\d+)", example="expand-dup-4")
def _expansion(match) -> LayerExpansion:
    return LayerExpansion(match["kind"], int(match["count"]))
