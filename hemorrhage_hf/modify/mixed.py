"""Mixed precision: one weight format for most of the model, others for chosen decoder layers or layer parts.

Spec: ``BASE+FORMAT@layers.I[,J...][.attn|.mlp|.LINEAR]...``: ``BASE`` is a weight-only quantization
(``int4-g64``) or activation-aware scaling of one (``awq-int4-g64``), RTN or GPTQ-rounded (``gptq-int4-g64``); each
``+FORMAT@...`` gives the listed layers (or only their attention — q, k, v, o — or only their MLP — gate, up, down —
or only one Linear layer of each, ``v_proj``...) the weight-only grid ``FORMAT``, rounded as the base rounds. With an
``awq`` base, scales and clipping of the overridden layers are searched for their own format, so the Linear layers
that share one scale search (q, k, v; gate, up) must share one format.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("int4-g64+int8@layers.0,1,29")
    MixedPrecision('int4-g64+int8@layers.0,1,29')
    >>> parse_spec("awq-int4-g64+int8@layers.3.mlp+int6-g64@layers.0").base
    ActivationAwareScaling('awq-int4-g64')
    >>> parse_spec("int4-g64+int6-g64@layers.2,5.v_proj").overrides[0].units()
    [(2, 'v_proj'), (5, 'v_proj')]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..errors import ModificationError, SpecError
from .architecture import decoder_blocks
from .base import Modification, parse_spec, register
from .footprint import WeightFootprint, sum_footprints
from .gptq import BLOCK_GROUPS
from .quantization import WeightQuantization, is_weight_only
from .scaling import ActivationAwareScaling

#: Which Linear layers of a decoder block each part names.
PART_LINEARS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
#: Every Linear layer of a decoder block, by name.
LINEARS = tuple(linear for linears in PART_LINEARS.values() for linear in linears)
_OVERRIDE = re.compile(
    r"(?P<format>[^@]+)@layers\.(?P<layers>\d+(?:,\d+)*)(?:\.(?P<part>" + "|".join((*PART_LINEARS, *LINEARS)) + "))?"
)


@dataclass(frozen=True)
class Override:
    """``quantization`` for ``layers`` (only their ``part`` — attn, mlp or one Linear layer's name — when given)."""

    quantization: WeightQuantization
    layers: tuple[int, ...]
    part: str | None = None

    @classmethod
    def parse(cls, text: str) -> Override:
        match = _OVERRIDE.fullmatch(text)
        if match is None:
            raise SpecError(
                f"mixed-precision part {text!r} must read FORMAT@layers.I[,J...][.attn|.mlp|.LINEAR] (LINEAR one of "
                f"{', '.join(LINEARS)}), e.g. int8@layers.0,29 or int6-g64@layers.3.v_proj"
            )
        quantization = parse_spec(match["format"])
        if type(quantization) is not WeightQuantization:
            raise SpecError(
                f"a layer's format must be a weight-only grid (int8, int6-g64...), rounded as the base rounds; "
                f"got {quantization.spec!r}"
            )
        return cls(quantization, tuple(int(layer) for layer in match["layers"].split(",")), match["part"])

    @property
    def spec(self) -> str:
        layers = ",".join(str(layer) for layer in self.layers)
        return f"{self.quantization.spec}@layers.{layers}" + (f".{self.part}" if self.part else "")

    def units(self) -> list[tuple[int, str]]:
        """(layer, Linear layer name) of every Linear layer this override formats."""
        linears = PART_LINEARS.get(self.part, (self.part,)) if self.part else LINEARS
        return [(layer, linear) for layer in self.layers for linear in linears]


class MixedPrecision(Modification):
    """``base`` everywhere except the layers (or layer parts) its overrides give another weight format."""

    def __init__(self, base: Modification, overrides: tuple[Override, ...]):
        if not is_weight_only(base.quantization if isinstance(base, ActivationAwareScaling) else base):
            raise SpecError(f"mixed precision needs a weight-only base (int4-g64, awq-int4-g64...), got {base.spec!r}")
        if not overrides:
            raise SpecError("a mixed-precision spec needs at least one FORMAT@layers.… part")
        owner: dict[tuple[int, str], Override] = {}
        for override in overrides:
            for unit in override.units():
                if unit in owner:
                    raise SpecError(
                        f"layer {unit[0]}'s {unit[1]} gets two formats in one spec ({owner[unit].spec} and "
                        f"{override.spec})"
                    )
                owner[unit] = override
        if isinstance(base, ActivationAwareScaling):
            _check_shared_searches(base, owner)
        self.base, self.overrides = base, tuple(overrides)
        self.needs_calibration = base.needs_calibration

    @property
    def spec(self) -> str:
        return self.base.spec + "".join(f"+{override.spec}" for override in self.overrides)

    @property
    def base_quantization(self) -> WeightQuantization:
        return self.base if isinstance(self.base, WeightQuantization) else self.base.quantization

    def formats(self, model: PreTrainedModel) -> dict[str, WeightQuantization]:
        """The format of every Linear layer the overrides name, by module name; :class:`ModificationError` for a
        layer the model does not have (checked before any weight changes)."""
        blocks = decoder_blocks(model)
        unknown = sorted({layer for o in self.overrides for layer in o.layers if layer >= len(blocks)})
        if unknown:
            raise ModificationError(
                f"{self.spec} names layer(s) {', '.join(map(str, unknown))}, but the model has {len(blocks)} decoder "
                f"layers (0 to {len(blocks) - 1})"
            )
        for override in self.overrides:
            override.quantization.checked_linears(model)
        names = {module: name for name, module in model.named_modules()}
        return {
            names[getattr(blocks[layer], linear)]: override.quantization
            for override in self.overrides
            for layer, linear in override.units()
        }

    def config(self) -> dict:
        config = self.base.config()
        overrides = "; ".join(override.spec for override in self.overrides)
        return {**config, "scheme": f"{config['scheme']}, except {overrides}"}

    def footprint(self, model: PreTrainedModel) -> WeightFootprint:
        """Nominal bits of every Linear layer in its own format (see :mod:`.footprint`)."""
        formats = self.formats(model)
        base = self.base_quantization
        return sum_footprints(
            formats.get(name, base).layer_footprint(linear) for name, linear in base.checked_linears(model).items()
        )

    @torch.no_grad()
    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        return self.base.apply(model, calibration, progress=progress, formats=self.formats(model))


def _check_shared_searches(base: ActivationAwareScaling, owner: dict[tuple[int, str], Override]) -> None:
    """Refuse formats that differ inside one scale search: its Linear layers read one input, scaled once."""
    for layer in sorted({layer for layer, _ in owner}):
        for linears in BLOCK_GROUPS.values():
            formats = {
                linear: (owner[(layer, linear)].quantization if (layer, linear) in owner else base.quantization).spec
                for linear in linears
            }
            if len(set(formats.values())) > 1:
                named = ", ".join(f"{linear} {spec}" for linear, spec in formats.items())
                raise SpecError(
                    f"{base.spec} searches one scale for layer {layer}'s {', '.join(linears)} (they read one input), "
                    f"so they need one format; this spec gives {named}"
                )


@register(r"(?P<base>[^+@]+)(?P<overrides>(?:\+[^+@]+@[^+@]+)+)", example="int4-g64+int8@layers.0,1,29")
def _mixed(match) -> MixedPrecision:
    overrides = tuple(Override.parse(text) for text in match["overrides"].split("+")[1:])
    return MixedPrecision(parse_spec(match["base"]), overrides)
