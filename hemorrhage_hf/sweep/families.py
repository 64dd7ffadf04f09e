"""What a sweep varies and what it reads: families (a level → a modification spec) and curves (a figure → damage).

Pure data and arithmetic, without torch, so that ``hemorrhage-hf sweep --help`` can list every family and default.

Example:
    >>> resolve_family("bits").spec("4"), resolve_family("kv").spec("4")
    ('int4-g64', 'kv4')
    >>> describe_families().splitlines()[0].split()
    ['bits', 'int{}-g64', 'levels', '32,8,6,5,4,3,2', '(identity:', '32,', '16)']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import SpecError
from ..llamacpp.types import GGUF_TYPES

#: a gguf level's strength: its type's nominal bits per weight (the identity level f32: 32)
GGUF_LEVEL_BITS = {"f32": 32.0, **GGUF_TYPES}


@dataclass(frozen=True)
class SweepFamily:
    """How a level becomes a modification spec (``template.format(level)``), and which levels change nothing."""

    name: str
    template: str
    identity_levels: tuple[str, ...] = ()
    default_levels: tuple[str, ...] = ()
    #: "model": a modified model; "decoding": a Decoding spec on the reference's logits; "gguf": the reference's
    #: GGUF file quantized by llama.cpp to the level's type (:class:`hemorrhage_hf.llamacpp.export.GgufLevels`)
    kind: str = "model"
    log_strength: bool = False

    def spec(self, level: str) -> str | None:
        """The spec of ``level``; None for an identity level (the unmodified model)."""
        return None if level in self.identity_levels else self.template.format(level)


def _percent_family(name: str, template: str, levels: Sequence[int]) -> SweepFamily:
    return SweepFamily(name, template, ("0",), tuple(str(level) for level in levels))


_SPARSITY = range(0, 100, 10)
FAMILIES: dict[str, SweepFamily] = {
    family.name: family
    for family in (
        SweepFamily("bits", "int{}-g64", ("32", "16"), ("32", "8", "6", "5", "4", "3", "2")),
        SweepFamily("kv", "kv{}", ("32", "16"), ("32", "8", "6", "5", "4", "3", "2")),
        # Real backends (optional installs); group sizes divide SmolLM2's widths (576, 1536).
        SweepFamily("bits:hqq", "hqq-int{}-g64", ("32",), ("32", "8", "4", "3", "2")),
        SweepFamily("group:hqq", "hqq-int4-g{}", (), ("32", "64", "96", "192")),
        SweepFamily("bits:quanto", "quanto-int{}", ("32",), ("32", "8", "4", "2")),
        SweepFamily("bits:ct", "ct-w{}a16-g64", ("32",), ("32", "8", "4")),
        SweepFamily("group:ct", "ct-w4a16-g{}", (), ("32", "64", "96", "192")),
        SweepFamily("bits:gptq", "gptq-w{}a16-g64", ("32",), ("32", "8", "4")),
        _percent_family("sparsity:wanda", "wanda-{}", _SPARSITY),
        _percent_family("sparsity:magnitude", "magnitude-{}", _SPARSITY),
        _percent_family("sparsity:gradient", "gradient-{}", _SPARSITY),
        SweepFamily("nm:wanda", "{}-wanda", (), ("3:4", "2:4", "1:4")),
        _percent_family("heads", "heads-{}", (0, 33, 67)),  # SmolLM2 drops 1 or 2 of 3 query heads per KV group
        _percent_family("channels", "channels-{}", (0, 10, 25, 40, 50, 75)),
        _percent_family("layers", "layers-{}", (0, 1, 2, 4, 6, 8, 12)),
        _percent_family("expand:dup", "expand-dup-{}", (0, 1, 2, 4, 8)),
        _percent_family("expand:identity", "expand-identity-{}", (0, 1, 2, 4, 8)),
        SweepFamily(
            "gguf", "{}", ("f32",), ("f32", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"), "gguf"
        ),
        SweepFamily("temperature", "temperature={}", ("1",), ("1", "1.2", "1.5", "2", "3"), "decoding"),
        SweepFamily("top_p", "top_p={}", ("1",), ("1", "0.95", "0.9", "0.8", "0.6", "0.4"), "decoding"),
        SweepFamily("top_k", "top_k={}", ("0",), ("0", "1000", "200", "50", "10", "2"), "decoding", log_strength=True),
        SweepFamily("typical_p", "typical_p={}", ("1",), ("1", "0.95", "0.9", "0.8", "0.5", "0.2"), "decoding"),
        SweepFamily("repetition_penalty", "repetition_penalty={}", ("1",), ("1", "1.1", "1.2", "1.5", "2"), "decoding"),
    )
}


def resolve_family(name: str, *, identity_levels: Sequence[str] = ()) -> SweepFamily:
    """A named family, or a custom template with ``{}`` (a ``name={}`` template is a decoding family)."""
    if name in FAMILIES:
        return FAMILIES[name]
    if "{}" in name:
        return SweepFamily(name, name, tuple(identity_levels), kind="decoding" if "={}" in name else "model")
    raise SpecError(f"unknown sweep family {name!r}: use one of {', '.join(FAMILIES)} or a spec template with {{}}")


def level_value(level: str) -> float:
    """The number a level stands for (``"n:m"`` → the sparsity 100·(1 − n/m); a GGUF type → its nominal bits per
    weight, ``f32`` → 32)."""
    if level in GGUF_LEVEL_BITS:
        return GGUF_LEVEL_BITS[level]
    n, colon, m = level.partition(":")
    try:
        return 100 * (1 - int(n) / int(m)) if colon else float(level)
    except (ValueError, ZeroDivisionError) as error:
        raise SpecError(f"sweep level {level!r} is not a number or an n:m pattern") from error


@dataclass(frozen=True)
class Curve:
    """One figure drawn against the level, and how to read damage (≥ 0, growing with hemorrhage) from it."""

    key: str
    label: str
    damage: Callable[[dict], float]
    tolerance: float
    log_scale: bool
    #: the figure value a damage of ``d`` corresponds to, for drawing the tolerance line
    value_at_damage: Callable[[dict, float], float] = lambda figures, damage: damage
    #: the figure whose standard error is the damage's, when it is not ``key`` (an accuracy drop's paired error)
    error_key: str | None = None


MODEL_CURVES = (
    Curve("ppl_ratio", "PPL ratio", lambda f: f["ppl_ratio"] - 1, 0.1, True, lambda f, d: 1 + d),
    Curve("kl_mean", "KL mean (nats)", lambda f: f["kl_mean"], 0.1, True),
    Curve("top1_agreement", "top-1 agreement", lambda f: 1 - f["top1_agreement"], 0.1, False, lambda f, d: 1 - d),
)
DECODING_CURVES = (
    Curve("tv_mean", "total variation", lambda f: f["tv_mean"], 0.1, True),
    Curve("js_mean", "Jensen–Shannon divergence (nats)", lambda f: f["js_mean"], 0.02, True),
    Curve("top1_agreement", "top-1 agreement", lambda f: 1 - f["top1_agreement"], 0.1, False, lambda f, d: 1 - d),
)


def task_curve(task: str) -> Curve:
    """Task accuracy of the modified model; damage is the drop from the reference's accuracy."""
    return Curve(
        f"{task}_accuracy_modified",
        f"{task} accuracy",
        lambda f: f[f"{task}_accuracy_drop"],
        0.02,
        False,
        lambda f, d: f[f"{task}_accuracy_reference"] - d,
        f"{task}_accuracy_drop",
    )


def describe_families() -> str:
    """One line per family: its name, its spec template, its default levels and its identity levels."""
    width = max(len(name) for name in FAMILIES)
    template_width = max(len(family.template) for family in FAMILIES.values())
    return "\n".join(
        f"{name:<{width}}  {family.template:<{template_width}}  levels {','.join(family.default_levels)}"
        + (f" (identity: {', '.join(family.identity_levels)})" if family.identity_levels else "")
        for name, family in FAMILIES.items()
    )
