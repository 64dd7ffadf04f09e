"""Mixed precision from the hemorrhage map: which layers (or their parts, or their Linear layers) get more bits,
under a bit budget.

Each unit u carries a share of the damage, its *contribution* c_u (see :mod:`.hmap`), measured with u in the base
format. KL is locally quadratic in the weight perturbation, so giving u a format f scales its contribution by the
ratio of the two formats' rounding-noise power on u's own weights:

    KL_u(f) ≈ c_u · ‖Q_f(W_u) − W_u‖² / ‖Q_base(W_u) − W_u‖²

(computed from the weights, no forward pass). The greedy step upgrades the (unit, format) with the largest
estimated KL saved per extra bit of storage, until no upgrade fits the budget (effective bits per weight of all
Linear layers, scales included, see :mod:`hemorrhage_hf.modify.footprint`).

Example:
    >>> from hemorrhage_hf.locate.allocate import greedy_allocation, Option
    >>> options = {"a": [Option("int8", kl=0.01, bits=800)], "b": [Option("int8", kl=0.09, bits=800)]}
    >>> greedy_allocation({"a": 0.3, "b": 0.1}, {"a": 425, "b": 425}, options, budget_bits=1300)
    {'a': 'int8'}
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..corpus import Window
from ..errors import HemorrhageError, SpecError
from ..measurement.engine import measure
from ..measurement.refstore import ReferenceStore
from ..measurement.statistics import paired_difference
from ..modify import WeightQuantization, apply_modification, linear_footprint, parse_spec
from ..modify.architecture import decoder_blocks
from ..modify.calibration import CalibrationSettings
from ..modify.mixed import PART_LINEARS, MixedPrecision, Override
from ..modify.quantization import is_weight_only
from ..modify.scaling import ActivationAwareScaling
from .hmap import HemorrhageMap
from .stack import Unit

#: Formats the ``bits`` family may give a unit, above the base's: the base's bits in groups of half and a quarter
#: (at least 16), wider integers (up to 6 bits) in the base's groups, and int8 per output channel (8 bits plus one
#: fp16 scale per row: the cheapest near-lossless format).
FAMILIES = ("bits",)


@dataclass(frozen=True)
class Option:
    """A format a unit may take: its spec, the unit's estimated KL contribution in it, its storage in bits."""

    spec: str
    kl: float
    bits: float


def greedy_allocation(
    base_kl: Mapping[Hashable, float],
    base_bits: Mapping[Hashable, float],
    options: Mapping[Hashable, Sequence[Option]],
    *,
    budget_bits: float,
) -> dict[Hashable, str]:
    """unit → chosen format spec, in the order units were first upgraded (units left in the base format are
    absent). ``budget_bits``: total bits allowed."""
    chosen: dict[Hashable, Option] = {}
    spent = sum(base_bits.values())
    while True:
        best, best_rate = None, 0.0
        for unit, unit_options in options.items():
            current = chosen.get(unit, Option("", base_kl[unit], base_bits[unit]))
            for option in unit_options:
                extra, saved = option.bits - current.bits, current.kl - option.kl
                if extra <= 0 or saved <= 0 or spent + extra > budget_bits:
                    continue
                if saved / extra > best_rate:
                    best, best_rate = (unit, option, extra), saved / extra
        if best is None:
            return {unit: option.spec for unit, option in chosen.items()}
        unit, option, extra = best
        chosen[unit] = option
        spent += extra


def family_formats(family: str, base: WeightQuantization) -> list[WeightQuantization]:
    """The formats a ``family`` offers above ``base``."""
    if family not in FAMILIES:
        raise HemorrhageError(f"unknown allocation family {family!r}; choose one of {', '.join(FAMILIES)}")
    finer = [
        WeightQuantization(base.bits, base.group_size // divisor, base.symmetric)
        for divisor in (2, 4)
        if base.group_size and base.group_size % divisor == 0 and base.group_size // divisor >= 16
    ]
    wider = [WeightQuantization(bits, base.group_size, base.symmetric) for bits in range(base.bits + 1, 7)]
    return finer + wider + [WeightQuantization(8)]


def _unit_linears(model: PreTrainedModel, unit: Unit) -> list[torch.nn.Linear]:
    block = decoder_blocks(model)[unit.layer]
    if unit.is_linear:
        return [getattr(block, unit.part)]
    parts = (unit.part,) if unit.part else tuple(PART_LINEARS)
    return [getattr(block, name) for part in parts for name in PART_LINEARS[part]]


def allocation_units(hmap: HemorrhageMap, base: str) -> list[Unit]:
    """The map's finest units a ``base`` can format one by one: single Linear layers, unless the base searches
    activation-aware scales (one search, hence one format, for q, k, v and for gate, up); then parts, else layers."""
    if isinstance(parse_spec(base), ActivationAwareScaling):
        if not hmap.part_units() and hmap.linear_units():
            raise HemorrhageError(
                f"{base} searches one scale for q, k, v (and gate, up), so it allocates by parts: the map was measured "
                "by Linear layer only; run `hemorrhage-hf locate --parts`"
            )
        return hmap.part_units() or hmap.layer_units()
    return hmap.linear_units() or hmap.part_units() or hmap.layer_units()


@torch.no_grad()
def noise_power(linears: Sequence[torch.nn.Linear], quantization: WeightQuantization) -> float:
    """Σ ‖Q(W) − W‖² over ``linears``: the rounding noise ``quantization`` adds to them."""
    weights = [linear.weight.float() for linear in linears]
    return sum(float((quantization.quantize_weight(weight) - weight).pow(2).sum()) for weight in weights)


def storage_bits(linears: Sequence[torch.nn.Linear], quantization: WeightQuantization) -> float:
    """Bits ``linears`` take in ``quantization``, scales included."""
    return sum(quantization.layer_footprint(linear).bits_per_weight * linear.weight.numel() for linear in linears)


@dataclass
class Allocation:
    """The mixed spec chosen for a budget, with the figures that chose it."""

    spec: str
    budget_bits: float
    bits_per_weight: float
    base_bits_per_weight: float
    #: the map's KL with every unit in the base format, and the estimate for the allocation (same text as the map)
    base_kl: float
    estimated_kl: float
    #: unit name → its format, in the order the greedy steps first upgraded them
    upgrades: dict[str, str]


def base_quantization(base: str) -> WeightQuantization:
    """The weight format of an allocation base (``int4-g64``, or the format ``awq-int4-g64`` scales for)."""
    modification = parse_spec(base)
    if isinstance(modification, ActivationAwareScaling):
        modification = modification.quantization
    if not is_weight_only(modification):
        raise SpecError(f"allocation needs a weight-only base format (int4-g64, awq-int4-g64...), got {base!r}")
    return modification


def allocate(
    model: PreTrainedModel, hmap: HemorrhageMap, *, base: str, budget_bits: float, family: str = "bits"
) -> Allocation:
    """Pick formats per unit of ``hmap`` (its finest units, see :func:`allocation_units`) for ``budget_bits`` bits
    per weight on ``model`` (the unmodified reference); :class:`HemorrhageError` for a budget below the base format."""
    quantization = base_quantization(base)
    formats = family_formats(family, quantization)
    base_footprint = quantization.footprint(model)
    if budget_bits < base_footprint.bits_per_weight:
        raise HemorrhageError(
            f"a budget of {budget_bits} bits per weight is below the lowest format, {quantization.spec} "
            f"({base_footprint.bits_per_weight:.4g} bits per weight with its scales)"
        )
    n_layers = len(decoder_blocks(model))
    if hmap.n_layers != n_layers:
        raise HemorrhageError(
            f"the map has {hmap.n_layers} layers but the model has {n_layers}: made for another model"
        )
    units = allocation_units(hmap, base)
    base_kl, base_bits, options = {}, {}, {}
    for unit in units:
        linears = _unit_linears(model, unit)
        base_noise = noise_power(linears, quantization)
        base_kl[unit] = hmap.contribution(unit)
        base_bits[unit] = storage_bits(linears, quantization)
        options[unit] = [
            Option(
                f.spec,
                base_kl[unit] * noise_power(linears, f) / base_noise if base_noise > 0 else 0.0,
                storage_bits(linears, f),
            )
            for f in formats
        ]
    chosen = greedy_allocation(base_kl, base_bits, options, budget_bits=budget_bits * base_footprint.n_weights)
    spec = mixed_spec(base, chosen)
    footprint = parse_spec(spec).footprint(model) if chosen else base_footprint
    saved = sum(base_kl[u] - next(o.kl for o in options[u] if o.spec == f) for u, f in chosen.items())
    total = sum(base_kl.values())
    return Allocation(
        spec=spec,
        budget_bits=budget_bits,
        bits_per_weight=footprint.bits_per_weight,
        base_bits_per_weight=base_footprint.bits_per_weight,
        estimated_kl=hmap.full_kl * (1 - saved / total) if total > 0 else hmap.full_kl,
        base_kl=hmap.full_kl,
        upgrades={unit.name: f for unit, f in chosen.items()},
    )


def mixed_spec(base: str, chosen: Mapping[Unit, str]) -> str:
    """``base`` plus one ``+FORMAT@layers.…`` per (format, part or Linear layer) among the ``chosen`` units (just
    ``base`` if none)."""
    groups: dict[tuple[str, str | None], list[int]] = {}
    for unit, spec in sorted(chosen.items()):
        groups.setdefault((spec, unit.part), []).append(unit.layer)
    overrides = tuple(
        Override(parse_spec(spec), tuple(layers), part) for (spec, part), layers in sorted(groups.items(), key=str)
    )
    return MixedPrecision(parse_spec(base), overrides).spec if overrides else parse_spec(base).spec


def measure_specs(
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    windows: Sequence[Window],
    specs: Sequence[str],
    *,
    calibration: CalibrationSettings | None = None,
    store_root: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Measure each spec on ``windows`` (held-out text) against one exact reference store (the reference runs
    once): KL mean with its batch-means SE, top-1 agreement, PPL ratio, effective bits per weight; every spec after
    the first also gets its paired KL difference to the first (``vs_first``) and its relative KL cut, and every spec
    its paired KL difference to each other spec (``vs``, by spec)."""
    store = ReferenceStore.build(reference, windows, tokenizer=tokenizer, root=store_root, progress=progress)
    results, kl = [], {}
    for spec in specs:
        modification = parse_spec(spec)
        ids = (calibration or CalibrationSettings()).windows(tokenizer) if modification.needs_calibration else None
        modified = apply_modification(reference, modification, calibration=ids, tokenizer=tokenizer, progress=progress)
        report = measure(store, modified, windows, progress=progress, metadata={"modification": spec})
        kl[spec] = report.tokens.kl
        results.append(
            {
                "spec": spec,
                "bits_per_weight": linear_footprint(modified, modification).bits_per_weight,
                "kl_mean": report.figures["kl_mean"],
                "kl_mean_error": report.figures["kl_mean_error_block"],
                "top1_agreement": report.figures["top1_agreement"],
                "ppl_ratio": report.figures["ppl_ratio"],
                "n_tokens": report.figures["n_tokens"],
            }
        )
        del modified
    first = results[0]
    for result in results:
        result["vs"] = {
            other: paired_difference(kl[result["spec"]], kl[other]) for other in kl if other != result["spec"]
        }
    for result in results[1:]:
        result["vs_first"] = result["vs"][first["spec"]]
        result["kl_cut"] = 1 - result["kl_mean"] / first["kl_mean"]
    return results
