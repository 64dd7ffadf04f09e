"""How many bits the Linear weights of a model take: the x-axis of every "quality per bit" comparison.

:func:`linear_footprint` returns one :class:`WeightFootprint` for the Linear-like layers a modification acts on
(every module with ``in_features``/``out_features`` except the output head, which is often tied to the embeddings):

- ``source="measured"``: the bytes of the tensors each layer actually stores (its weight, and for packed backends
  the scales, zero points, absmax and lookup tables beside it: bitsandbytes ``quant_state``, HQQ ``meta``, the inner
  tensors of torchao/quanto tensor subclasses). Biases are not weights and are not counted.
- ``source="nominal"``: hemorrhage-hf's own quantizations are simulated (weights rounded, then kept in the model's
  float dtype), so what is stored says nothing about the format. Their :meth:`~.base.Modification.footprint` gives
  the bits the format would take: ``bits`` per weight, plus a 16-bit (fp16) scale per group, plus a ``bits``-wide
  integer zero point per group when asymmetric (as GPTQ/AWQ checkpoints pack them). A checkpoint that records such
  a spec in its config gets the nominal figure too.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hemorrhage_hf.modify import apply_modification
    >>> config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(config)
    >>> linear_footprint(model)
    WeightFootprint(n_weights=36864, weight_bytes=147456, bits_per_weight=32.0, source='measured')
    >>> linear_footprint(apply_modification(model, "int4-g64")).bits_per_weight  # 4 + 16/64
    4.25
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..config_keys import MODIFICATION_ATTRIBUTE

#: Bits of the per-group scale hemorrhage-hf's nominal formats count (fp16, as llama.cpp, AWQ and GPTQ store them).
SCALE_BITS = 16


@dataclass(frozen=True)
class WeightFootprint:
    """The storage of a set of Linear weights: ``n_weights`` weights in ``weight_bytes`` bytes.

    ``bits_per_weight`` is the effective figure (8 · bytes / weights, scales and zero points included). Footprints
    of disjoint layer sets add up (``a + b``).

    Example:
        >>> a = WeightFootprint.from_bits(n_weights=1000, bits_per_weight=4.25)
        >>> a
        WeightFootprint(n_weights=1000, weight_bytes=531, bits_per_weight=4.25, source='nominal')
        >>> (a + WeightFootprint.from_bits(3000, 8.25)).bits_per_weight
        7.25
    """

    n_weights: int
    weight_bytes: int
    bits_per_weight: float
    source: Literal["measured", "nominal"]

    @classmethod
    def from_bytes(cls, n_weights: int, weight_bytes: int) -> WeightFootprint:
        """A measured footprint: the bytes the stored tensors occupy."""
        return cls(n_weights, weight_bytes, 8 * weight_bytes / max(n_weights, 1), "measured")

    @classmethod
    def from_bits(cls, n_weights: int, bits_per_weight: float) -> WeightFootprint:
        """A nominal footprint: what a format of ``bits_per_weight`` would store (bytes rounded)."""
        return cls(n_weights, round(n_weights * bits_per_weight / 8), bits_per_weight, "nominal")

    def __add__(self, other: WeightFootprint) -> WeightFootprint:
        n_weights = self.n_weights + other.n_weights
        # Weighted by weights, from the exact bits: rounding each part's bytes would drift.
        bits = (self.bits_per_weight * self.n_weights + other.bits_per_weight * other.n_weights) / max(n_weights, 1)
        source = "measured" if "measured" in (self.source, other.source) else "nominal"
        return WeightFootprint(n_weights, self.weight_bytes + other.weight_bytes, bits, source)

    def to_dict(self) -> dict:
        """JSON-ready fields (as written into report.json)."""
        return asdict(self)


def sum_footprints(footprints: Iterable[WeightFootprint]) -> WeightFootprint:
    """The footprint of disjoint layer sets together (at least one)."""
    return functools.reduce(operator.add, footprints)


def linear_like_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module with integer ``in_features``/``out_features`` (``nn.Linear`` and the Linear replacements of
    bitsandbytes, HQQ, quanto, compressed-tensors) except the output head, outermost first-seen only."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if module is head or any(name.startswith(outer + ".") for outer in found):
            continue
        if isinstance(getattr(module, "in_features", None), int) and isinstance(
            getattr(module, "out_features", None), int
        ):
            found[name] = module
    return found


def _tensors(value, seen: set[int]) -> list[torch.Tensor]:
    """The plain tensors that hold ``value``: tensor subclasses flattened to their inner tensors, containers and
    quantization-state objects (bitsandbytes ``QuantState``) walked; each storage counted once."""
    if isinstance(value, torch.Tensor):
        if is_traceable_wrapper_subclass(value):
            names, _ = value.__tensor_flatten__()
            return [t for name in names for t in _tensors(getattr(value, name), seen)]
        if value.device.type == "meta":
            return []
        # Tensors loaded from one safetensors file share a storage: a view's own address and size identify it.
        key = hash((value.data_ptr(), value.numel(), value.dtype)) if value.numel() else id(value)
        if key in seen:
            return []
        seen.add(key)
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item, seen)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item, seen)]
    if type(value).__name__ == "QuantState":  # bitsandbytes: absmax, code, offset, nested state2
        return [t for item in vars(value).values() for t in _tensors(item, seen)]
    return []


def _layer_bytes(module: torch.nn.Module, seen: set[int]) -> int:
    """Bytes of one layer's stored weight and its quantization metadata (not its bias)."""
    stored = [value for name, value in module.named_parameters(recurse=False) if name != "bias"]
    stored += [value for name, value in module.named_buffers(recurse=False) if name != "bias"]
    for parameter in stored[:]:
        stored.append(getattr(parameter, "quant_state", None))  # bitsandbytes Params4bit
        stored.append(getattr(parameter, "SCB", None))  # bitsandbytes Int8Params row scales
    stored.append(getattr(module, "meta", None))  # HQQ: scale, zero (and their own quantization meta)
    stored.append(getattr(module, "W_q", None))  # HQQ packed weight (a plain attribute in some versions)
    tensors = [t for value in stored for t in _tensors(value, seen)]
    return sum(t.numel() * t.element_size() for t in tensors)


def measured_footprint(model: torch.nn.Module) -> WeightFootprint:
    """The footprint of the Linear-like layers' tensors as stored in memory."""
    seen: set[int] = set()
    total = WeightFootprint(0, 0, 0.0, "measured")
    for module in linear_like_modules(model).values():
        n_weights = module.in_features * module.out_features
        total = total + WeightFootprint.from_bytes(n_weights, _layer_bytes(module, seen))
    return total


def linear_footprint(model: torch.nn.Module, modification=None) -> WeightFootprint:
    """The footprint of ``model``'s Linear weights: nominal for a hemorrhage-hf simulated format (given as
    ``modification``, a spec or :class:`~.base.Modification`, or recorded in the model's config), measured otherwise.
    """
    from .base import parse_spec  # base imports this module for Modification.footprint

    if modification is None:
        modification = getattr(getattr(model, "config", None), MODIFICATION_ATTRIBUTE, None)
        if not isinstance(modification, str):
            modification = None
    if isinstance(modification, str):
        modification = parse_spec(modification)
    if modification is not None:
        nominal = modification.footprint(model)
        if nominal is not None:
            return nominal
    return measured_footprint(model)


def nominal_bits(bits: int, in_features: int, group_size: int | None, symmetric: bool) -> float:
    """Bits per weight of a ``bits``-wide grouped format with an fp16 scale (and a ``bits``-wide zero point when
    asymmetric) per group of ``group_size`` input columns (None: one per row); a last, shorter group has its own.

    Example:
        >>> nominal_bits(4, 576, 64, symmetric=True), nominal_bits(4, 576, 64, symmetric=False)
        (4.25, 4.3125)
        >>> round(nominal_bits(4, 576, 128, symmetric=True), 4)  # 5 groups per row: 4 of 128 and one of 64
        4.1389
    """
    groups_per_row = -(-in_features // (group_size or in_features))
    per_group = SCALE_BITS + (0 if symmetric else bits)
    return bits + groups_per_row * per_group / in_features
