"""Weight pruning: unstructured (``wanda-50``) and N:M semi-structured (``2:4-wanda``), by one of three scores.

=============  ==============================================  ======================
score          importance of weight W_ij, compared within      calibration
               its output row (N:M: its group of M)
=============  ==============================================  ======================
``magnitude``  |W_ij|                                          none
``wanda``      |W_ij|·‖X_j‖₂ (Sun et al. 2023)                 activations
``gradient``   |W_ij|·(‖X_j‖₂ + α·r·‖G_ij‖) (GBLM-Pruner,      activations, gradients
               Das et al. 2023)
=============  ==============================================  ======================

‖G_ij‖ is the gradient norm of :func:`~hemorrhage_hf.modify.calibration.gradient_norms` and ``r`` brings it to the
activation term's units (see :func:`~hemorrhage_hf.modify.prune_ops.gradient_scores`); α = 0 is Wanda bit for bit.
``gradient-50`` chooses α from its calibration data: it holds out the last quarter of the calibration sequences,
prunes with each of :data:`ALPHA_CANDIDATES` (0 among them) on the rest, keeps the α whose pruned model has the
lowest next-token loss on the held-out quarter, and records all of it in ``model.config.hemorrhage_pruning_alpha``.
On that held-out quarter it is thus never worse than Wanda calibrated on the same sequences. ``gradient-50-a0.5``
fixes α (and uses every calibration sequence).

Each Linear, decoder layer and the model are pruned exactly as asked: P % of every row, or exactly N of every M.
Data-aware scores prune layer by layer: each layer's activations come from the layers before it as already pruned,
as in Wanda's reference code; gradients are taken once, on the unpruned model, as GBLM does. The sparsity reached,
per Linear and per decoder layer, is recorded in ``model.config.hemorrhage_sparsity``.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("2:4-gradient")
    WeightPruning('2:4-gradient')
    >>> parse_spec("gradient-50-a0.5").alpha
    0.5
    >>> parse_spec("wanda-50").sparsity
    0.5
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..config_keys import PRUNING_ALPHA_ATTRIBUTE, SPARSITY_ATTRIBUTE
from ..errors import ModificationError, SpecError
from .architecture import linears_by_layer
from .base import Modification, register
from .calibration import gradient_norms, layerwise, mean_token_loss, split_held_out
from .prune_ops import gradient_scores, magnitude_scores, n_m_mask, row_mask, wanda_scores

SCORES = ("magnitude", "wanda", "gradient")
#: Gradient weights α tried when the spec fixes none; 0 (Wanda's ranking) is always among them.
ALPHA_CANDIDATES = (0.0, 0.5, 1.0, 2.0)
#: Share of the calibration sequences held out to choose α on.
HELD_OUT_SHARE = 0.25


def check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise SpecError(f"sparsity must lie in [0, 1) (0 to <100 %), got {sparsity:g}")


class WeightPruning(Modification):
    """Zero the least important weights of every Linear in the decoder layers.

    Give ``sparsity`` (unstructured, fraction of each row) or ``n_m=(n, m)`` (keep n of every m consecutive
    weights of a row), not both. ``alpha`` (gradient score only) fixes the gradient weight; None chooses it on a
    held-out share of the calibration sequences.
    """

    family = "pruning"

    def __init__(
        self,
        score: str,
        sparsity: float | None = None,
        n_m: tuple[int, int] | None = None,
        alpha: float | None = None,
    ):
        if score not in SCORES:
            raise SpecError(f"unknown pruning score {score!r}; choose one of {', '.join(SCORES)}")
        if (sparsity is None) == (n_m is None):
            raise SpecError("give exactly one of an unstructured sparsity or an N:M pattern")
        if sparsity is not None:
            check_sparsity(sparsity)
        if n_m is not None and not 1 <= n_m[0] < n_m[1]:
            raise SpecError(f"an N:M pattern keeps 1 ≤ N < M weights of every M, got {n_m[0]}:{n_m[1]}")
        if alpha is not None and score != "gradient":
            raise SpecError(f"only gradient-aware pruning takes a gradient weight alpha, not {score}")
        if alpha is not None and not alpha >= 0:
            raise SpecError(f"the gradient weight alpha must be ≥ 0, got {alpha}")
        self.score, self.sparsity, self.n_m, self.alpha = score, sparsity, n_m, alpha

    @property
    def needs_calibration(self) -> bool:
        return self.score != "magnitude"

    @property
    def spec(self) -> str:
        suffix = "" if self.alpha is None else f"-a{self.alpha:g}"
        if self.n_m is not None:
            return f"{self.n_m[0]}:{self.n_m[1]}-{self.score}{suffix}"
        return f"{self.score}-{self.sparsity * 100:g}{suffix}"

    def _mask(self, scores: torch.Tensor) -> torch.Tensor:
        return n_m_mask(scores, *self.n_m) if self.n_m is not None else row_mask(scores, self.sparsity)

    @torch.no_grad()
    def _prune(self, linears: dict[str, torch.nn.Linear], scores: dict[str, torch.Tensor], record: dict) -> None:
        for name, linear in linears.items():
            mask = self._mask(scores[name])
            linear.weight.mul_(mask.to(linear.weight.dtype))
            record[name] = (mask.numel() - int(mask.sum()), mask.numel())

    def _check_pattern(self, layers: list[dict[str, torch.nn.Linear]]) -> None:
        if self.n_m is None:
            return
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

    def prune_layerwise(
        self,
        model: PreTrainedModel,
        layers: list[dict[str, torch.nn.Linear]],
        calibration: torch.Tensor,
        gradients: dict[str, torch.Tensor],
        alpha: float,
        progress: bool,
    ) -> dict[str, tuple[int, int]]:
        """Prune every decoder layer in turn on the activations of the layers before it as pruned."""
        pruned: dict[str, tuple[int, int]] = {}
        description = f"pruning {self.spec}" + ("" if self.alpha is not None or not gradients else f" α={alpha:g}")
        for step, linears in zip(layerwise(model, calibration, progress=progress, description=description), layers):
            statistics = step.input_statistics(linears)
            scores = {
                name: gradient_scores(linear.weight, statistics[name].input_norms(), gradients[name], alpha)
                if self.score == "gradient"
                else wanda_scores(linear.weight, statistics[name].input_norms())
                for name, linear in linears.items()
            }
            self._prune(linears, scores, pruned)
        return pruned

    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        layers = linears_by_layer(model)
        self._check_pattern(layers)
        if self.score == "magnitude":
            pruned: dict[str, tuple[int, int]] = {}
            for linears in layers:
                scores = {name: magnitude_scores(linear.weight) for name, linear in linears.items()}
                self._prune(linears, scores, pruned)
        elif self.score == "wanda":
            pruned = self.prune_layerwise(model, layers, calibration, {}, 0.0, progress)
        elif self.alpha is not None:
            gradients = gradient_norms(model, calibration, _flat(layers), progress=progress)
            pruned = self.prune_layerwise(model, layers, calibration, gradients, self.alpha, progress)
            setattr(model.config, PRUNING_ALPHA_ATTRIBUTE, {"alpha": self.alpha, "candidates": None})
        else:
            pruned = AlphaSearch(self, model, layers).run(calibration, progress)
        setattr(model.config, SPARSITY_ATTRIBUTE, sparsity_record(pruned, layers, self.spec))
        return model


def _flat(layers: list[dict[str, torch.nn.Linear]]) -> dict[str, torch.nn.Linear]:
    return {name: linear for linears in layers for name, linear in linears.items()}


class AlphaSearch:
    """Chooses a gradient pruning's α on held-out calibration sequences and leaves the model pruned with it.

    Every candidate prunes the same unpruned weights with the same fit sequences and gradients; the one whose model
    has the lowest mean next-token loss on the held-out sequences is kept (ties go to the earlier candidate, so
    α = 0, Wanda, is displaced only by a strictly better α).
    """

    def __init__(self, pruning: WeightPruning, model: PreTrainedModel, layers: list[dict[str, torch.nn.Linear]]):
        self.pruning, self.model, self.layers = pruning, model, layers
        self.linears = _flat(layers)

    @torch.no_grad()
    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for name, linear in self.linears.items():
            linear.weight.copy_(weights[name])

    def run(self, calibration: torch.Tensor, progress: bool) -> dict[str, tuple[int, int]]:
        fit, held_out = split_held_out(calibration, HELD_OUT_SHARE)
        gradients = gradient_norms(self.model, fit, self.linears, progress=progress)
        unpruned = {name: linear.weight.detach().clone() for name, linear in self.linears.items()}
        losses: list[float] = []
        best: tuple[int, dict[str, torch.Tensor], dict[str, tuple[int, int]]] | None = None
        for index, alpha in enumerate(ALPHA_CANDIDATES):
            if index:
                self._set_weights(unpruned)
            pruned = self.pruning.prune_layerwise(self.model, self.layers, fit, gradients, alpha, progress)
            losses.append(mean_token_loss(self.model, held_out))
            if best is None or losses[-1] < losses[best[0]]:
                weights = {name: linear.weight.detach().clone() for name, linear in self.linears.items()}
                best = (index, weights, pruned)
        index, weights, pruned = best
        self._set_weights(weights)
        record = {
            "alpha": ALPHA_CANDIDATES[index],
            "candidates": list(ALPHA_CANDIDATES),
            "held_out_loss": losses,
            "fit_sequences": fit.shape[0],
            "held_out_sequences": held_out.shape[0],
        }
        setattr(self.model.config, PRUNING_ALPHA_ATTRIBUTE, record)
        return pruned


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
_ALPHA = r"(?:-a(?P<alpha>\d+(?:\.\d+)?))?"


def _alpha(match) -> float | None:
    return None if match["alpha"] is None else float(match["alpha"])


@register(_SCORE + r"-(?P<percent>\d+(?:\.\d+)?)" + _ALPHA, example="wanda-50")
def _unstructured(match) -> WeightPruning:
    return WeightPruning(match["score"], sparsity=float(match["percent"]) / 100, alpha=_alpha(match))


@register(r"(?P<n>\d+):(?P<m>\d+)-" + _SCORE + _ALPHA, example="2:4-wanda")
def _semi_structured(match) -> WeightPruning:
    return WeightPruning(match["score"], n_m=(int(match["n"]), int(match["m"])), alpha=_alpha(match))
