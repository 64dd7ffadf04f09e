"""Weight pruning: unstructured (``wanda-50``) and N:M semi-structured (``2:4-wanda``), by one of three scores.

=============  ===========================================  ======================  ====================
score          importance of weight W_ij                    competes within         calibration
=============  ===========================================  ======================  ====================
``magnitude``  |W_ij|                                       its output row          none
``wanda``      |W_ij|·‖X_j‖₂ (Sun et al. 2023)              its output row          activations
``gradient``   |W_ij|·(x̂_j + α·ĝ_ij) (GBLM-Pruner,          the whole matrix        activations, gradients
               Das et al. 2023)
=============  ===========================================  ======================  ====================

x̂ and ĝ are the activation norm ‖X_j‖₂ and the gradient norm ‖G_ij‖ (see
:func:`~hemorrhage_hf.modify.calibration.gradient_norms`), each divided by its mean over the matrix. Wanda's score
has no notion of how much an output row matters, so it must compare weights within a row; the gradient term
carries each row's effect on the loss, so gradient-aware scores compete across the whole matrix and rows that
matter less give up more weights. Each Linear, decoder layer and the model are pruned exactly as asked (N:M:
exactly N of every M). Data-aware scores prune layer by layer: each layer's activations come from the layers
before it as already pruned, as in Wanda's reference code; gradients are taken once, on the unpruned model,
as GBLM does. The sparsity reached, per Linear and per decoder layer, is recorded in
``model.config.hemorrhage_sparsity``.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("2:4-gradient")
    WeightPruning('2:4-gradient')
    >>> parse_spec("wanda-50").sparsity
    0.5
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..config_keys import SPARSITY_ATTRIBUTE
from ..errors import ModificationError, SpecError
from .architecture import linears_by_layer
from .base import Modification, register
from .calibration import gradient_norms, layerwise
from .prune_ops import gradient_scores, layer_mask, magnitude_scores, n_m_mask, row_mask, wanda_scores

SCORES = ("magnitude", "wanda", "gradient")
#: Weight of the normalised gradient term against the normalised activation term (see ``gradient_scores``): equal
#: weights, not tuned; with it gradient-aware pruning beats Wanda on WikiText-2 (BENCHMARKS.md, "Modifications").
GRADIENT_ALPHA = 1.0


def check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise SpecError(f"sparsity must lie in [0, 1) (0 to <100 %), got {sparsity:g}")


class WeightPruning(Modification):
    """Zero the least important weights of every Linear in the decoder layers.

    Give ``sparsity`` (unstructured, fraction of each row) or ``n_m=(n, m)`` (keep n of every m consecutive
    weights of a row), not both.
    """

    family = "pruning"

    def __init__(
        self,
        score: str,
        sparsity: float | None = None,
        n_m: tuple[int, int] | None = None,
        alpha: float = GRADIENT_ALPHA,
    ):
        if score not in SCORES:
            raise SpecError(f"unknown pruning score {score!r}; choose one of {', '.join(SCORES)}")
        if (sparsity is None) == (n_m is None):
            raise SpecError("give exactly one of an unstructured sparsity or an N:M pattern")
        if sparsity is not None:
            check_sparsity(sparsity)
        if n_m is not None and not 1 <= n_m[0] < n_m[1]:
            raise SpecError(f"an N:M pattern keeps 1 ≤ N < M weights of every M, got {n_m[0]}:{n_m[1]}")
        if alpha < 0:
            raise SpecError(f"the gradient weight alpha must be ≥ 0, got {alpha}")
        self.score, self.sparsity, self.n_m, self.alpha = score, sparsity, n_m, alpha

    @property
    def needs_calibration(self) -> bool:
        return self.score != "magnitude"

    @property
    def spec(self) -> str:
        if self.n_m is not None:
            return f"{self.n_m[0]}:{self.n_m[1]}-{self.score}"
        return f"{self.score}-{self.sparsity * 100:g}"

    def _mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self.n_m is not None:
            return n_m_mask(scores, *self.n_m)
        # Gradients carry each output row's effect on the loss, so gradient-aware scores compare across rows too.
        return layer_mask(scores, self.sparsity) if self.score == "gradient" else row_mask(scores, self.sparsity)

    @torch.no_grad()
    def _prune(self, linears: dict[str, torch.nn.Linear], scores: dict[str, torch.Tensor], record: dict) -> None:
        for name, linear in linears.items():
            mask = self._mask(scores[name])
            linear.weight.mul_(mask.to(linear.weight.dtype))
            record[name] = (mask.numel() - int(mask.sum()), mask.numel())

    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        layers = linears_by_layer(model)
        if self.n_m is not None:
            narrow = [
                (name, linear.in_features)
                for linears in layers
                for name, linear in linears.items()
                if linear.in_features < self.n_m[1]
            ]
            if narrow:
                raise ModificationError(
                    f"N:M group of {self.n_m[1]} is wider than layer {narrow[0][0]} ({narrow[0][1]} inputs)"
                )
        pruned: dict[str, tuple[int, int]] = {}
        if self.score == "magnitude":
            for linears in layers:
                self._prune(linears, {name: magnitude_scores(l.weight) for name, l in linears.items()}, pruned)
        else:
            gradients = (
                gradient_norms(model, calibration, {n: l for ls in layers for n, l in ls.items()}, progress=progress)
                if self.score == "gradient"
                else {}
            )
            for step, linears in zip(
                layerwise(model, calibration, progress=progress, description=f"pruning {self.spec}"), layers
            ):
                statistics = step.input_statistics(linears)
                scores = {
                    name: gradient_scores(l.weight, statistics[name].input_norms(), gradients[name], self.alpha)
                    if self.score == "gradient"
                    else wanda_scores(l.weight, statistics[name].input_norms())
                    for name, l in linears.items()
                }
                self._prune(linears, scores, pruned)
        setattr(model.config, SPARSITY_ATTRIBUTE, sparsity_record(pruned, layers, self.spec))
        return model


def sparsity_record(pruned: dict[str, tuple[int, int]], layers: list[dict], spec: str) -> dict:
    """Sparsity reached per Linear, per decoder layer and overall, from (zeroed, total) weight counts."""

    def fraction(names) -> float:
        zeroed = sum(pruned[name][0] for name in names)
        return zeroed / max(sum(pruned[name][1] for name in names), 1)

    return {
        "spec": spec,
        "overall": fraction(pruned),
        "per_layer": [fraction(linears) for linears in layers],
        "per_linear": {name: fraction([name]) for name in pruned},
    }


def measured_sparsity(model: PreTrainedModel) -> dict:
    """The fraction of exactly-zero weights per Linear, per decoder layer and overall, counted from the weights."""
    layers = linears_by_layer(model)
    counts = {
        name: (int((linear.weight == 0).sum()), linear.weight.numel())
        for linears in layers
        for name, linear in linears.items()
    }
    return sparsity_record(counts, layers, getattr(model.config, "hemorrhage_modification", None))


_SCORE = "(?P<score>magnitude|wanda|gradient)"


@register(_SCORE + r"-(?P<percent>\d+(?:\.\d+)?)", example="wanda-50")
def _unstructured(match) -> WeightPruning:
    return WeightPruning(match["score"], sparsity=float(match["percent"]) / 100)


@register(r"(?P<n>\d+):(?P<m>\d+)-" + _SCORE, example="2:4-wanda")
def _semi_structured(match) -> WeightPruning:
    return WeightPruning(match["score"], n_m=(int(match["n"]), int(match["m"])))
