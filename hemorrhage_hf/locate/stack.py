"""Run a decoder stack from a given layer on: the mechanics the hemorrhage map rests on.

Locating damage asks, for every decoder layer i, "what does the model output when only layer i (or only its
attention, or only its MLP, or only one of its Linear layers) comes from the other model?". The layers before i
are then identical to one of the two whole models, so their output is captured once per window
(:func:`layer_inputs`) and each hybrid runs only layers i … N−1 plus the head (:func:`resume`): about half a
forward pass per hybrid instead of a whole one.

Llama-style models take the embedding output unchanged as the first layer's input, so feeding a captured layer
input as ``inputs_embeds`` to a model whose layer list is temporarily cut to the rest reproduces the full pass
exactly (tested against the full forward pass).

Example:
    >>> from hemorrhage_hf.locate.stack import layer_inputs, resume, Unit
    >>> inputs, logits = layer_inputs(model, input_ids)  # doctest: +SKIP
    >>> torch.equal(resume(model, list(decoder_layers(model)), inputs[0]), logits)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import HemorrhageError
from ..modify.architecture import decoder_blocks, decoder_layers
from ..modify.mixed import LINEARS, PART_LINEARS

#: The submodules that make up each part of a Llama-style decoder layer. A part's norm travels with it, because
#: activation-aware scaling migrates its scales into that norm.
PART_MODULES = {"attn": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")}
PARTS = tuple(PART_MODULES)
#: Each Linear layer of a decoder layer, by name, and the submodule that holds it (``self_attn`` or ``mlp``).
LINEAR_OWNERS = {linear: PART_MODULES[part][1] for part, linears in PART_LINEARS.items() for linear in linears}


@dataclass(frozen=True, order=True)
class Unit:
    """A decoder layer (``part`` None), one part of it (``"attn"``, ``"mlp"``) or one of its Linear layers
    (``"v_proj"``...)."""

    layer: int
    part: str | None = None

    def __post_init__(self):
        if self.part is not None and self.part not in PART_MODULES and self.part not in LINEAR_OWNERS:
            raise HemorrhageError(
                f"unknown layer part {self.part!r}; choose one of {', '.join(PARTS)} or a Linear layer "
                f"({', '.join(LINEARS)})"
            )

    @property
    def name(self) -> str:
        """``layers.3``, ``layers.3.mlp`` or ``layers.3.v_proj``: the form mixed-precision specs use."""
        return f"layers.{self.layer}" + (f".{self.part}" if self.part else "")

    @property
    def is_linear(self) -> bool:
        return self.part in LINEAR_OWNERS


def check_same_structure(reference: PreTrainedModel, modified: PreTrainedModel) -> None:
    """Refuse pairs whose layers cannot be swapped one for one (different depth, or not Llama-style)."""
    decoder_blocks(reference), decoder_blocks(modified)
    n_reference, n_modified = len(decoder_layers(reference)), len(decoder_layers(modified))
    if n_reference != n_modified:
        raise HemorrhageError(
            f"locating damage swaps layers one for one, but the models have {n_reference} and {n_modified} decoder "
            "layers (layer removal or expansion): compare them with `report --layers --layer-map` instead"
        )


def hybrid_layer(base: nn.Module, donor: nn.Module, part: str | None) -> nn.Module:
    """``donor`` itself for a whole layer; else a shallow copy of ``base`` whose ``part`` modules (or whose one
    Linear layer ``part``) are ``donor``'s.

    Neither model is changed: the copies have their own tables of submodules and share every weight.
    """
    if part is None:
        return donor
    if part in LINEAR_OWNERS:
        owner = LINEAR_OWNERS[part]
        return _with_modules(
            base, {owner: _with_modules(base._modules[owner], {part: donor._modules[owner]._modules[part]})}
        )
    return _with_modules(base, {name: donor._modules[name] for name in PART_MODULES[part]})


def _with_modules(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` whose submodules ``replacements`` names are replaced."""
    hybrid = copy.copy(module)
    hybrid._modules = {**module._modules, **replacements}
    return hybrid


@contextlib.contextmanager
def _layers_installed(model: PreTrainedModel, layers: Sequence[nn.Module]) -> Iterator[None]:
    owner = getattr(model, model.base_model_prefix)
    original = owner.layers
    owner.layers = nn.ModuleList(layers)
    try:
        yield
    finally:
        owner.layers = original


@torch.no_grad()
def layer_inputs(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One full forward pass: the hidden state entering every decoder layer, and the logits."""
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        logits = model(input_ids=input_ids.to(model.device), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return captured, logits


@torch.no_grad()
def resume(model: PreTrainedModel, layers: Sequence[nn.Module], hidden: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` with ``layers`` as its decoder stack, fed ``hidden`` as the first layer's input."""
    with _layers_installed(model, layers):
        return model(inputs_embeds=hidden, use_cache=False).logits
