"""The hemorrhage report: summary figures with uncertainties, a severity grade, and its JSON/Markdown forms.

Figures follow the definitions of llama.cpp's ``perplexity --kl-divergence`` so numbers compare with it: every
mean carries a standard error sd/√(n−1) (``<figure>_error``); the PPL ratio's error comes from the per-token
difference of the two NLLs (error propagation with their covariance); top-1 agreement's is binomial. Those assume
independent tokens, which neighbouring tokens are not, so every mean also carries a batch-means standard error
(``<figure>_error_block``, over blocks of ``error_block_tokens`` consecutive tokens; see
:mod:`~hemorrhage_hf.measurement.statistics`). Comparisons and decisions use the block error.

Severity grades, from mean KL(P_ref ‖ P_mod) in nats, calibrated on llama.cpp's published KLD of LLaMA-3-8B
quantizations (q8_0 0.0014, q4_K_M 0.031, q2_K 0.445) and on SmolLM2-135M's own (Q8_0 0.0043, Q4_K_M 0.058,
Q4_0 0.31, Q2_K 0.44):

==========  ===================  ==================================================================
grade       mean KL (nats)       reading
==========  ===================  ==================================================================
none        < 0.01               8-bit class: differences are rounding noise
mild        0.01 – 0.1           good 4-bit class (q4_K_M): small, mostly harmless shifts
moderate    0.1 – 0.5            crude 4-bit / 2-bit K-quant class: noticeably different predictions
severe      ≥ 0.5                the model still works, but often disagrees with the reference
collapse    any of: PPL ratio ≥ 10, top-1 agreement < 25 %, or any NaN/inf logits
==========  ===================  ==================================================================

Example:
    >>> import numpy as np
    >>> from hemorrhage_hf.measurement.report import severity_grade
    >>> severity_grade(kl_mean=0.03, ppl_ratio=1.04, top1_agreement=0.9, non_finite_tokens=0)
    'mild'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import json_safe, read_json
from ..errors import HemorrhageError
from .statistics import block_standard_error, default_block_size, iid_standard_error

SEVERITY_KL_BANDS = (("none", 0.01), ("mild", 0.1), ("moderate", 0.5))
COLLAPSE_PPL_RATIO = 10.0
COLLAPSE_TOP1_AGREEMENT = 0.25
KL_PERCENTILES = (0.1, 1, 5, 10, 50, 90, 95, 99, 99.9)
#: Buckets of the reference's top-1 probability for ``kl_mean_confidence_<lo>_<hi>`` (where the reference was unsure
#: → sure): damage where the reference was sure is the damage users see first.
CONFIDENCE_BUCKETS = ((0.0, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1.0))


#: What each grade means for shipping the modified model in place of its reference.
SHIPPING = {
    "none": "safe to ship: its predictions differ from the reference's by rounding noise",
    "mild": "fit to ship for most uses; run the tasks you care about (`hemorrhage-hf tasks`) to confirm",
    "moderate": "not safe to ship unchecked: predictions noticeably differ; ship only if your own tasks hold up",
    "severe": "do not ship: it often disagrees with the reference",
    "collapse": "broken: do not ship",
}
#: A KL mean closer than this fraction to a grade boundary is flagged: another sample of text could change the grade.
BOUNDARY_MARGIN = 0.1


def grade_boundary_note(figures: dict) -> str | None:
    """A warning when the KL mean lies near a grade boundary (within its 95 % interval or 10 % of the boundary).

    Example:
        >>> grade_boundary_note({"kl_mean": 0.095, "kl_mean_error": 0.002, "severity": "mild"})
        'KL mean 0.095 ± 0.002 lies near the mild/moderate boundary (0.1): the grade could change with more text'
        >>> grade_boundary_note({"kl_mean": 0.05, "kl_mean_error": 0.002, "severity": "mild"}) is None
        True
    """
    kl, error = figures.get("kl_mean"), figures.get("kl_mean_error") or 0.0
    if figures.get("severity") == "collapse" or not isinstance(kl, (int, float)) or not math.isfinite(kl):
        return None
    grades = [grade for grade, _ in SEVERITY_KL_BANDS] + ["severe"]
    for index, (_, boundary) in enumerate(SEVERITY_KL_BANDS):
        if abs(kl - boundary) <= max(1.96 * error, BOUNDARY_MARGIN * boundary):
            return (
                f"KL mean {kl:.3g} ± {error:.1g} lies near the {grades[index]}/{grades[index + 1]} boundary "
                f"({boundary:g}): the grade could change with more text"
            )
    return None


def severity_grade(*, kl_mean: float, ppl_ratio: float, top1_agreement: float, non_finite_tokens: int) -> str:
    """The grade of the table in this module's docstring."""
    if non_finite_tokens > 0 or not ppl_ratio < COLLAPSE_PPL_RATIO or top1_agreement < COLLAPSE_TOP1_AGREEMENT:
        return "collapse"
    for grade, upper in SEVERITY_KL_BANDS:
        if kl_mean < upper:
            return grade
    return "severe"


@dataclass
class TokenArrays:
    """Per-token figures of every scored position, in corpus order."""

    kl: np.ndarray
    reference_nll: np.ndarray
    modified_nll: np.ndarray
    same_top1: np.ndarray
    delta_p: np.ndarray
    finite: np.ndarray
    target_ids: np.ndarray
    #: the richer figures (reverse KL, top-5/10 agreement, the reference's confidence); None where not measured
    reverse_kl: np.ndarray | None = None
    same_top5: np.ndarray | None = None
    same_top10: np.ndarray | None = None
    reference_confidence: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.kl)


@dataclass
class LayerFigures:
    """Per reference decoder layer: mean drift of hidden states and (optionally) attention JS divergence."""

    layer_map: list[int]
    cosine_distance: list[float]
    relative_l2: list[float]
    attention_js: list[float] | None = None

    @classmethod
    def from_dict(cls, data: dict) -> LayerFigures | None:
        """The layer arrays of a :meth:`HemorrhageReport.to_dict`, or None when it has none."""
        if data.get("layer_map") is None:
            return None
        return cls(
            data["layer_map"], data["layer_cosine_distance"], data["layer_relative_l2"], data.get("layer_attention_js")
        )

    def to_dict(self) -> dict:
        return {
            "layer_map": self.layer_map,
            "layer_cosine_distance": self.cosine_distance,
            "layer_relative_l2": self.relative_l2,
            "layer_attention_js": self.attention_js,
        }


def mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error sd/√(n−1), as llama.cpp's perplexity tool gives them (NaN error for n < 2).

    Example:
        >>> mean_and_error(np.array([1.0, 2.0, 3.0]))
        (2.0, 0.5773502691896257)
    """
    values = values.astype(np.float64)
    return float(values.mean()), iid_standard_error(values)


def summarize(tokens: TokenArrays) -> dict[str, float | int]:
    """Flat summary figures of per-token arrays; NaN/inf positions are counted and left out of the averages."""
    finite = tokens.finite
    n = int(finite.sum())
    non_finite = len(tokens) - n
    if n == 0:
        return {
            "n_tokens": len(tokens),
            "non_finite_tokens": non_finite,
            "ppl_reference": math.exp(float(tokens.reference_nll.astype(np.float64).mean())),
            "ppl_modified": math.inf,
            "ppl_ratio": math.inf,
            "severity": "collapse",
        }
    kl = tokens.kl[finite].astype(np.float64)
    reference_nll = tokens.reference_nll[finite].astype(np.float64)
    modified_nll = tokens.modified_nll[finite].astype(np.float64)
    delta_p = tokens.delta_p[finite].astype(np.float64)
    agreement = float(tokens.same_top1[finite].mean())

    reference_mean, reference_error = mean_and_error(reference_nll)
    modified_mean, modified_error = mean_and_error(modified_nll)
    log_ratio, log_ratio_error = mean_and_error(modified_nll - reference_nll)
    kl_mean, kl_error = mean_and_error(kl)
    delta_p_mean, delta_p_error = mean_and_error(delta_p)
    ppl_ratio = math.exp(log_ratio) if non_finite == 0 else math.inf
    figures: dict[str, float | int] = {
        "n_tokens": len(tokens),
        "non_finite_tokens": non_finite,
        "ppl_reference": math.exp(reference_mean),
        "ppl_reference_error": math.exp(reference_mean) * reference_error,
        "ppl_modified": math.exp(modified_mean) if non_finite == 0 else math.inf,
        "ppl_modified_error": math.exp(modified_mean) * modified_error,
        "ppl_ratio": ppl_ratio,
        "ppl_ratio_error": ppl_ratio * log_ratio_error,
        "ln_ppl_ratio": log_ratio,
        "ln_ppl_ratio_error": log_ratio_error,
        "nll_correlation": float(np.corrcoef(reference_nll, modified_nll)[0, 1]) if n > 1 else float("nan"),
        "kl_mean": kl_mean,
        "kl_mean_error": kl_error,
        "kl_median": float(np.median(kl)),
        "kl_p90": float(np.percentile(kl, 90)),
        "kl_p95": float(np.percentile(kl, 95)),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": agreement,
        "top1_agreement_error": math.sqrt(agreement * (1 - agreement) / max(n - 1, 1)),
        "delta_p_mean": delta_p_mean,
        "delta_p_mean_error": delta_p_error,
        "delta_p_rms": float(np.sqrt(np.mean(delta_p**2))),
        "delta_p_p1": float(np.percentile(delta_p, 1)),
        "delta_p_median": float(np.median(delta_p)),
        "delta_p_p99": float(np.percentile(delta_p, 99)),
    }
    figures.update(
        {
            "error_block_tokens": default_block_size(n),
            "ppl_reference_error_block": math.exp(reference_mean) * block_standard_error(reference_nll),
            "ppl_modified_error_block": math.exp(modified_mean) * block_standard_error(modified_nll),
            "ppl_ratio_error_block": ppl_ratio * block_standard_error(modified_nll - reference_nll),
            "ln_ppl_ratio_error_block": block_standard_error(modified_nll - reference_nll),
            "kl_mean_error_block": block_standard_error(kl),
            "top1_agreement_error_block": block_standard_error(tokens.same_top1[finite]),
            "delta_p_mean_error_block": block_standard_error(delta_p),
        }
    )
    for percent in KL_PERCENTILES:
        figures[f"kl_percentile_{percent:g}"] = float(np.percentile(kl, percent))
    figures.update(richer_figures(tokens, kl))
    figures["severity"] = severity_grade(
        kl_mean=kl_mean, ppl_ratio=ppl_ratio, top1_agreement=agreement, non_finite_tokens=non_finite
    )
    return figures


def richer_figures(tokens: TokenArrays, kl: np.ndarray) -> dict[str, float | int]:
    """Reverse KL, top-5/10 agreement and KL by reference-confidence bucket over finite tokens (empty when the
    arrays do not carry them).

    Example:
        >>> import numpy as np
        >>> ones = np.ones(4, dtype=bool)
        >>> arrays = TokenArrays(np.zeros(4), np.zeros(4), np.zeros(4), ones, np.zeros(4), ones, np.zeros(4, int),
        ...     np.zeros(4), ones, ones, np.array([0.1, 0.6, 0.9, 0.99]))
        >>> richer_figures(arrays, np.array([4.0, 3.0, 2.0, 1.0]))["kl_mean_confidence_0.95_1"]
        1.0
    """
    if tokens.reverse_kl is None:
        return {}
    finite = tokens.finite
    reverse_kl = tokens.reverse_kl[finite].astype(np.float64)
    reverse_mean, reverse_error = mean_and_error(reverse_kl)
    figures: dict[str, float | int] = {"reverse_kl_mean": reverse_mean, "reverse_kl_mean_error": reverse_error}
    for name in ("same_top5", "same_top10"):
        agreement = getattr(tokens, name)[finite]
        figures[name.replace("same_", "") + "_agreement"] = float(agreement.mean())
        figures[name.replace("same_", "") + "_agreement_error_block"] = block_standard_error(agreement)
    confidence = tokens.reference_confidence[finite]
    for low, high in CONFIDENCE_BUCKETS:
        inside = (confidence >= low) & ((confidence < high) if high < 1 else (confidence <= high))
        key = f"confidence_{low:g}_{high:g}"
        figures[f"tokens_{key}"] = int(inside.sum())
        figures[f"kl_mean_{key}"] = float(kl[inside].mean()) if inside.any() else float("nan")
    return figures


@dataclass
class HemorrhageReport:
    """Everything measured in one comparison. ``figures`` is flat; ``layers`` is None unless asked for.

    ``variants`` holds reports of transformed copies of the modified model's logits measured in the same pass
    (e.g. ``"corrected"``: :func:`~hemorrhage_hf.measurement.engine.measure`'s ``modified_variants``); they are not
    serialised.
    """

    figures: dict
    layers: LayerFigures | None = None
    metadata: dict = field(default_factory=dict)
    tokens: TokenArrays | None = None
    variants: dict[str, HemorrhageReport] = field(default_factory=dict)

    @classmethod
    def build(cls, tokens: TokenArrays, *, layers: LayerFigures | None, metadata: dict) -> HemorrhageReport:
        return cls(figures=summarize(tokens), layers=layers, metadata=dict(metadata), tokens=tokens)

    @property
    def severity(self) -> str:
        return self.figures["severity"]

    def to_dict(self) -> dict:
        """Flat figures, per-layer arrays and metadata, JSON-ready (non-finite numbers become null)."""
        data = dict(self.figures)
        if self.layers is not None:
            data.update(self.layers.to_dict())
        data["metadata"] = self.metadata
        return json_safe(data)

    @classmethod
    def from_dict(cls, data: dict) -> HemorrhageReport:
        """Inverse of :meth:`to_dict`; per-token arrays are not saved, so ``tokens`` is None (non-finite figures stay
        null)."""
        if not isinstance(data, dict) or "severity" not in data:
            raise HemorrhageError("not a hemorrhage report: it has no 'severity' figure")
        layer_keys = LayerFigures(layer_map=[], cosine_distance=[], relative_l2=[]).to_dict().keys()
        figures = {key: value for key, value in data.items() if key != "metadata" and key not in layer_keys}
        return cls(figures=figures, layers=LayerFigures.from_dict(data), metadata=dict(data.get("metadata") or {}))

    @classmethod
    def load(cls, path: str | Path) -> HemorrhageReport:
        """Read a ``report.json`` written by :meth:`save`."""
        return cls.from_dict(read_json(path, missing=f"report file not found: {path}", kind="a hemorrhage report JSON"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    def to_markdown(self, plot_files: dict[str, str] | None = None) -> str:
        from ..render import report_markdown

        return report_markdown(self, plot_files or {})

    def save(self, output_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and PNG plots into ``output_dir``, each file atomically."""
        from ..render import save_report

        return save_report(self, Path(output_dir), plots=plots)
