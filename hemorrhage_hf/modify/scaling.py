"""Dynamic (activation-aware) quantization scaling, the mitigation that acts on weights: ``awq-int4-g64``,
``awq-int3-g128``, ``smooth-w8a8``...

Per decoder layer and per group of Linear layers that read the same input, a per-input-channel scale s is
computed from calibration activations and migrated into the op before (RMSNorm weight, or the rows of the
previous Linear), so the model computes the same function before rounding; the Linear then quantizes W·diag(s)
and sees X·diag(1/s). The scale family's free parameter is searched per group, against the mean squared error
of the group's quantized outputs on sampled calibration tokens:

==========  =====================================  ============================================
method      scales                                 searched
==========  =====================================  ============================================
``awq``     s = E|X_j|^r (Lin et al. 2023)         exponent r ∈ {0, 0.05, …, 0.95} (0: unscaled)
``smooth``  s = max|X_j|^α / max|W_j|^(1−α)        α ∈ {0.05, …, 0.95}, and "unscaled"
            (Xiao et al. 2022)
==========  =====================================  ============================================

Unscaled is always a candidate, so on the calibration tokens no group ends up worse than plain RTN. The choice
per group (and both errors) is recorded in ``model.config.hemorrhage_scaling``. Groups whose previous op cannot
absorb a scale (``o_proj`` under grouped-query attention, whose inputs mix several heads per value channel) are
quantized unscaled and listed there too. Layers are calibrated in order with the scales of the layers before
already applied, as AWQ does; weights are quantized once all scales are in place.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("awq-int4-g64")
    ActivationAwareScaling('awq-int4-g64')
    >>> parse_spec("smooth-w8a8").quantization
    ActivationQuantization('w8a8')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import SpecError
from .architecture import DecoderBlock, decoder_blocks
from .base import Modification, parse_spec, register
from .calibration import InputStatistics, layerwise
from .quantization import WeightQuantization
from .scaling_ops import awq_scales, scaled_output_error, smooth_scales

SCALING_ATTRIBUTE = "hemorrhage_scaling"
#: Calibration tokens per group the error search runs on (the statistics that build the scales use all tokens).
SAMPLE_ROWS = 2048


@dataclass(frozen=True)
class ScaleFamily:
    method: str
    parameter: str
    grid: tuple[float, ...]

    def scales(self, statistics: InputStatistics, weight: torch.Tensor, value: float) -> torch.Tensor:
        if self.method == "awq":
            return awq_scales(statistics.mean_abs(), value)
        return smooth_scales(statistics.max_abs, weight.abs().amax(0), value)


FAMILIES = {
    "awq": ScaleFamily("awq", "exponent", tuple(i / 20 for i in range(20))),
    "smooth": ScaleFamily("smooth", "alpha", tuple(i / 20 for i in range(1, 20))),
}


@dataclass
class Migration:
    """Linear layers reading one input, the op that produces it, and the statistics of that input."""

    name: str
    previous: nn.Module
    linears: list[nn.Linear]
    statistics: InputStatistics

    @torch.no_grad()
    def apply(self, scales: torch.Tensor) -> None:
        """Divide the previous op's output channels by ``scales`` and multiply the Linear layers' inputs back."""
        if isinstance(self.previous, nn.Linear):
            self.previous.weight.div_(scales[:, None].to(self.previous.weight.dtype))
        else:
            self.previous.weight.div_(scales.to(self.previous.weight.dtype))
        if getattr(self.previous, "bias", None) is not None:
            self.previous.bias.div_(scales.to(self.previous.bias.dtype))
        for linear in self.linears:
            linear.weight.mul_(scales[None, :].to(linear.weight.dtype))


class ActivationAwareScaling(Modification):
    """Search and migrate per-channel scales (AWQ or SmoothQuant family), then quantize with ``quantization``."""

    needs_calibration = True

    def __init__(self, method: str, quantization: WeightQuantization, sample_rows: int = SAMPLE_ROWS):
        if method not in FAMILIES:
            raise SpecError(f"unknown scaling method {method!r}; choose one of {', '.join(FAMILIES)}")
        if not isinstance(quantization, WeightQuantization):
            raise SpecError(f"scaling needs a quantization spec to scale for (int4-g64, w8a8...), got {quantization.spec}")
        self.family_rule, self.quantization, self.sample_rows = FAMILIES[method], quantization, sample_rows

    @property
    def spec(self) -> str:
        return f"{self.family_rule.method}-{self.quantization.spec}"

    @property
    def runtime_state(self) -> bool:
        return self.quantization.runtime_state

    def restore(self, model: PreTrainedModel) -> PreTrainedModel:
        return self.quantization.restore(model)

    @staticmethod
    def _migrations(block: DecoderBlock, statistics: dict[str, InputStatistics], prefix: str) -> list[Migration]:
        migrations = [
            Migration(f"{prefix}.self_attn.q_proj+k_proj+v_proj", block.input_norm,
                      [block.q_proj, block.k_proj, block.v_proj], statistics["attention"]),
            Migration(f"{prefix}.mlp.gate_proj+up_proj", block.post_norm,
                      [block.gate_proj, block.up_proj], statistics["mlp"]),
            Migration(f"{prefix}.mlp.down_proj", block.up_proj, [block.down_proj], statistics["down"]),
        ]
        if block.v_proj.out_features == block.o_proj.in_features:
            migrations.insert(1, Migration(f"{prefix}.self_attn.o_proj", block.v_proj, [block.o_proj], statistics["output"]))
        return migrations

    def _search(self, migration: Migration) -> dict:
        """Error of every candidate on the sampled rows; migrates the best one and returns the record."""
        weight = torch.cat([linear.weight for linear in migration.linears]).float()
        rows = migration.statistics.rows()
        quantization = self.quantization

        def error(scales):
            return scaled_output_error(weight, rows, scales, quantization.quantize_weight, quantization.quantize_input)

        unscaled = error(None)
        errors = {value: error(self.family_rule.scales(migration.statistics, weight, value)) for value in self.family_rule.grid}
        best = min(errors, key=errors.get)
        if errors[best] >= unscaled:
            return {self.family_rule.parameter: None, "error_unscaled": unscaled, "error": unscaled}
        migration.apply(self.family_rule.scales(migration.statistics, weight, best))
        return {self.family_rule.parameter: best, "error_unscaled": unscaled, "error": errors[best]}

    @torch.no_grad()
    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        self.quantization.checked_linears(model)
        blocks = decoder_blocks(model)
        names = {module: name for name, module in model.named_modules()}
        groups, unscaled = {}, []
        steps = layerwise(model, calibration, sample_rows=self.sample_rows, progress=progress, description=f"searching {self.spec}")
        for step, block in zip(steps, blocks):
            statistics = step.input_statistics(
                {"attention": block.q_proj, "output": block.o_proj, "mlp": block.gate_proj, "down": block.down_proj}
            )
            prefix = names[block.layer]
            migrations = self._migrations(block, statistics, prefix)
            if len(migrations) == 3:
                unscaled.append(f"{prefix}.self_attn.o_proj")
            for migration in migrations:
                groups[migration.name] = self._search(migration)
        self.quantization.apply(model, progress=progress)
        setattr(model.config, SCALING_ATTRIBUTE, {
            "method": self.family_rule.method,
            "parameter": self.family_rule.parameter,
            "grid": list(self.family_rule.grid),
            "quantization": self.quantization.spec,
            "sample_rows": self.sample_rows,
            "groups": groups,
            "unscaled": unscaled,
        })
        return model


@register(r"(?P<method>awq|smooth)-(?P<quantization>.+)", example="awq-int4-g64")
def _scaling(match) -> ActivationAwareScaling:
    return ActivationAwareScaling(match["method"], parse_spec(match["quantization"]))
