"""Dynamic (activation-aware) quantization scaling, the mitigation that acts on weights: ``awq-int4-g64``,
``awq-int3-g128``, ``smooth-w8a8``...

Per decoder layer and per group of Linear layers that read the same input, a per-input-channel scale s is
computed from calibration activations and migrated into the op before (RMSNorm weight, or the rows of the
previous Linear), so the model computes the same function before rounding; the Linear then quantizes W·diag(s)
and sees X·diag(1/s). The scale family's free parameter is searched per group, against the mean squared error
of the group's quantized outputs over the calibration tokens (all of them, through the inputs' Gram matrix XᵀX,
for weight-only formats; a seeded sample of them when the inputs are quantized too, as in W8A8):

==========  =====================================  ============================================
method      scales                                 searched
==========  =====================================  ============================================
``awq``     s = E|X_j|^r (Lin et al. 2023)         exponent r ∈ {0, 0.05, …, 0.95} (0: unscaled)
``smooth``  s = max|X_j|^α / max|W_j|^(1−α)        α ∈ {0.05, …, 0.95}, and "unscaled"
            (Xiao et al. 2022)
==========  =====================================  ============================================

Unscaled is always a candidate, so on the calibration tokens no group ends up worse than plain RTN. ``awq`` then
also searches, as AWQ does, a clipping ratio per output row and input group (1, 0.95, …, 0.55 of the group's
range) against the error of that group's share of the output (from XᵀX), for every Linear but q/k. The choices per group
(and both errors) are recorded in ``model.config.hemorrhage_scaling``. Groups whose previous op cannot
absorb a scale (``o_proj`` under grouped-query attention, whose inputs mix several heads per value channel) are
quantized unscaled and listed there too. Layers are calibrated in order with the scales of the layers before
already applied, as AWQ does; weights are quantized once all scales are in place, or, for a GPTQ format
(``awq-gptq-int4-g64-asym``), each layer is GPTQ-rounded once its own scales are in place.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("awq-int4-g64")
    ActivationAwareScaling('awq-int4-g64')
    >>> parse_spec("smooth-w8a8").quantization
    ActivationQuantization('w8a8')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..config_keys import SCALING_ATTRIBUTE
from ..errors import SpecError
from .architecture import DecoderBlock, decoder_blocks
from .base import Modification, parse_spec, register
from .calibration import InputStatistics, layerwise
from .footprint import WeightFootprint
from .gptq import BLOCK_GROUPS, GptqQuantization, block_groups, block_inputs
from .quantization import WeightQuantization
from .scaling_ops import (
    awq_scales,
    clip_weight,
    column_groups,
    quantized_weight_error,
    scaled_output_error,
    search_clip_ratios,
    smooth_scales,
)

#: Calibration tokens per group the error search runs on when inputs are quantized too (w8a8); weight-only
#: formats are searched on all tokens through the inputs' Gram matrix.
SAMPLE_ROWS = 1024
#: Fractions of each (row, group) range AWQ's clipping search tries: 1 (no clipping) down to 0.55.
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))


@dataclass(frozen=True)
class ScaleFamily:
    method: str
    parameter: str
    grid: tuple[float, ...]
    #: Also search a clipping ratio per output row and input group (AWQ's second half; SmoothQuant has none).
    clips: bool

    def scales(self, statistics: InputStatistics, weight: torch.Tensor, value: float) -> torch.Tensor:
        if self.method == "awq":
            return awq_scales(statistics.mean_abs(), value)
        return smooth_scales(statistics.max_abs, weight.abs().amax(0), value)


FAMILIES = {
    "awq": ScaleFamily("awq", "exponent", tuple(i / 20 for i in range(20)), clips=True),
    "smooth": ScaleFamily("smooth", "alpha", tuple(i / 20 for i in range(1, 20)), clips=False),
}


@dataclass
class Migration:
    """Linear layers reading one input, the op that produces it (None: no op can absorb a scale), and the
    statistics of that input. ``scales`` holds what :meth:`apply` migrated."""

    name: str
    previous: nn.Module | None
    linears: dict[str, nn.Linear]
    statistics: InputStatistics
    scales: torch.Tensor | None = None

    @torch.no_grad()
    def apply(self, scales: torch.Tensor) -> None:
        """Divide the previous op's output channels by ``scales`` and multiply the Linear layers' inputs back."""
        if isinstance(self.previous, nn.Linear):
            self.previous.weight.div_(scales[:, None].to(self.previous.weight.dtype))
        else:
            self.previous.weight.div_(scales.to(self.previous.weight.dtype))
        if getattr(self.previous, "bias", None) is not None:
            self.previous.bias.div_(scales.to(self.previous.bias.dtype))
        for linear in self.linears.values():
            linear.weight.mul_(scales[None, :].to(linear.weight.dtype))
        self.scales = scales

    def gram(self) -> torch.Tensor:
        """XᵀX of the input as the Linear layers now see it (X divided by the migrated scales)."""
        gram = self.statistics.gram
        return gram if self.scales is None else gram / (self.scales[:, None] * self.scales[None, :])


class ActivationAwareScaling(Modification):
    """Search and migrate per-channel scales (AWQ or SmoothQuant family), then quantize with ``quantization``."""

    needs_calibration = True

    def __init__(self, method: str, quantization: WeightQuantization, sample_rows: int = SAMPLE_ROWS):
        if method not in FAMILIES:
            raise SpecError(f"unknown scaling method {method!r}; choose one of {', '.join(FAMILIES)}")
        if not isinstance(quantization, WeightQuantization):
            raise SpecError(
                f"scaling needs a quantization spec to scale for (int4-g64, w8a8...), got {quantization.spec}"
            )
        self.family_rule, self.quantization, self.sample_rows = FAMILIES[method], quantization, sample_rows

    @property
    def spec(self) -> str:
        return f"{self.family_rule.method}-{self.quantization.spec}"

    @property
    def runtime_state(self) -> bool:
        return self.quantization.runtime_state

    def restore(self, model: PreTrainedModel) -> PreTrainedModel:
        return self.quantization.restore(model)

    def config(self) -> dict:
        config = self.quantization.config()
        return {
            **config,
            "scheme": f"{self.family_rule.method} scales searched on calibration, then {config['scheme']}",
        }

    def footprint(self, model: PreTrainedModel) -> WeightFootprint:
        """The quantization's: the scales live in the previous ops, which store nothing extra."""
        return self.quantization.footprint(model)

    @staticmethod
    def _migrations(block: DecoderBlock, statistics: dict[str, InputStatistics], names: dict) -> dict[str, Migration]:
        """The migrations of ``block``, keyed like :data:`~.gptq.BLOCK_GROUPS` (the input each group reads)."""
        output_previous = block.v_proj if block.v_proj.out_features == block.o_proj.in_features else None
        previous = {
            "attention": block.input_norm,
            "output": output_previous,
            "mlp": block.post_norm,
            "down": block.up_proj,
        }
        return {
            key: Migration(
                "+".join(BLOCK_GROUPS[key]),
                previous[key],
                {names[linear]: linear for linear in linears},
                statistics[key],
            )
            for key, linears in block_groups(block).items()
        }

    def _output_error(self, migration: Migration, weight: torch.Tensor, quantization: WeightQuantization):
        """error(scales): mean squared output error per calibration token of the quantized group. Weight-only
        formats use the Gram matrix of all calibration tokens; quantized inputs need the sampled rows."""
        statistics = migration.statistics
        if not quantization.runtime_state:
            return lambda scales: (
                quantized_weight_error(weight, statistics.gram, scales, quantization.quantize_weight)
                / statistics.n_tokens
            )
        rows = statistics.rows()
        exact = rows @ weight.T
        return lambda scales: (
            scaled_output_error(weight, rows, exact, scales, quantization.quantize_weight, quantization.quantize_input)
            / len(rows)
        )

    def _search_scales(self, migration: Migration, quantization: WeightQuantization) -> dict:
        """Error of every candidate; migrates the best one and returns the record."""
        weight = torch.cat([linear.weight for linear in migration.linears.values()]).float()
        error, rule = self._output_error(migration, weight, quantization), self.family_rule
        unscaled = error(None)
        errors = {value: error(rule.scales(migration.statistics, weight, value)) for value in rule.grid}
        best = min(errors, key=errors.get)
        if errors[best] >= unscaled:
            return {rule.parameter: None, "error_unscaled": unscaled, "error": unscaled}
        migration.apply(rule.scales(migration.statistics, weight, best))
        return {rule.parameter: best, "error_unscaled": unscaled, "error": errors[best]}

    def _clip(self, migration: Migration, quantization: WeightQuantization) -> dict[str, float]:
        """AWQ's clipping search for each Linear of ``migration`` but q/k, whose errors attention amplifies in ways
        their own outputs do not show (AWQ skips them too). Returns the mean ratio kept per Linear."""
        groups = column_groups(next(iter(migration.linears.values())).in_features, quantization.group_size)
        gram, chosen = migration.gram(), {}
        for name, linear in migration.linears.items():
            if name.endswith(("q_proj", "k_proj")):
                continue
            weight = linear.weight.float()
            ratios = search_clip_ratios(
                weight, gram, groups, quantization.symmetric, quantization.quantize_weight, CLIP_RATIOS
            )
            linear.weight.copy_(clip_weight(weight, ratios, groups, quantization.symmetric))
            chosen[name] = float(ratios.mean())
        return chosen

    @torch.no_grad()
    def apply(
        self,
        model: PreTrainedModel,
        calibration: torch.Tensor | None = None,
        *,
        progress: bool = False,
        formats: Mapping[str, WeightQuantization] | None = None,
    ) -> PreTrainedModel:
        """``formats`` (Linear name → weight-only format) overrides this spec's format for those layers: their
        scales and clipping are searched for their own format (mixed precision, :mod:`.mixed`)."""
        self.quantization.checked_linears(model)
        formats = formats or {}
        names = {module: name for name, module in model.named_modules()}
        groups, unscaled, clipping = {}, [], {}
        sample_rows = self.sample_rows if self.quantization.runtime_state else 0
        # GPTQ rounds each layer once its scales are in place, so that later layers calibrate on its rounded output.
        rounds_per_layer = isinstance(self.quantization, GptqQuantization)
        steps = layerwise(
            model, calibration, sample_rows=sample_rows, progress=progress, description=f"searching {self.spec}"
        )
        for step, block in zip(steps, decoder_blocks(model)):
            statistics = step.input_statistics(block_inputs(block), gram=True)
            migrations = self._migrations(block, statistics, names)
            for migration in migrations.values():
                # The Linear layers of one migration share a part of one layer, hence one format.
                quantization = formats.get(next(iter(migration.linears)), self.quantization)
                if migration.previous is None:
                    unscaled.extend(migration.linears)
                else:
                    groups[f"{names[block.layer]}.{migration.name}"] = self._search_scales(migration, quantization)
                if self.family_rule.clips:
                    clipping.update(self._clip(migration, quantization))
            if rounds_per_layer:
                self.quantization.round_block({k: m.gram() for k, m in migrations.items()}, block, names, formats)
        if not rounds_per_layer:
            self.quantization.apply(model, progress=progress, formats=formats)
        record = {
            "method": self.family_rule.method,
            "parameter": self.family_rule.parameter,
            "grid": list(self.family_rule.grid),
            "quantization": self.quantization.spec,
            "error": "mean squared output error per calibration token"
            + (f", on {sample_rows} sampled tokens" if sample_rows else ", on all of them (from XᵀX)"),
            "groups": groups,
            "unscaled": unscaled,
        }
        if self.family_rule.clips:
            record["clip_ratios"] = list(CLIP_RATIOS)
            record["mean_clip_ratio"] = clipping
        setattr(model.config, SCALING_ATTRIBUTE, record)
        return model


# No "+": "awq-int4-g64+int8@layers.0" is a mixed-precision spec with an awq base (modify/mixed.py).
@register(r"(?P<method>awq|smooth)-(?P<quantization>[^+]+)", example="awq-int4-g64")
def _scaling(match) -> ActivationAwareScaling:
    return ActivationAwareScaling(match["method"], parse_spec(match["quantization"]))
