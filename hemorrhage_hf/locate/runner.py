"""Measure a :class:`~hemorrhage_hf.locate.hmap.HemorrhageMap`: per window, one pass of each whole model, then
each hybrid from its unit's layer on (see :mod:`hemorrhage_hf.locate.stack`).

Passes: 2 whole ones per window, plus 2 hybrids per layer, 4 more with ``parts`` and 14 more with ``linears``, each
running the layers from its own on, so a 30-layer model costs about 2 + 30 full-pass equivalents per window (2 + 90
with parts, 2 + 240 with linears).

Example:
    >>> from hemorrhage_hf.locate import locate
    >>> hmap = locate(reference, modified, windows)  # doctest: +SKIP
    >>> hmap.concentration(3)  # doctest: +SKIP
    0.41
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..corpus import Window
from ..errors import HemorrhageError
from ..measurement.divergence import kl_divergence, log_probs
from ..measurement.engine import batch_windows
from ..measurement.statistics import block_standard_error
from ..modify.architecture import decoder_blocks, decoder_layers
from .hmap import HemorrhageMap, UnitFigures
from .stack import LINEARS, PARTS, Unit, check_same_structure, hybrid_layer, layer_inputs, resume


def units_of(n_layers: int, *, parts: bool, linears: bool = False) -> list[Unit]:
    """Every layer, with ``parts`` also its attention and its MLP, with ``linears`` also each of its Linear layers."""
    pieces = (None, *(PARTS if parts else ()), *(LINEARS if linears else ()))
    return [Unit(layer, piece) for layer in range(n_layers) for piece in pieces]


def check_norms_unchanged(reference: PreTrainedModel, modified: PreTrainedModel) -> None:
    """Refuse to swap single Linear layers between models whose norms differ: a modification that migrated scales
    into a norm (AWQ, SmoothQuant) scaled the Linear layers after it to match, so one of them alone, moved into the
    other model, would see inputs scaled for the other."""
    for index, (ours, theirs) in enumerate(zip(decoder_blocks(reference), decoder_blocks(modified))):
        for norm in ("input_norm", "post_norm"):
            if not torch.equal(getattr(ours, norm).weight, getattr(theirs, norm).weight):
                raise HemorrhageError(
                    f"layer {index}'s {norm.replace('_', ' ')} differs between the models (scales migrated into it, "
                    "as activation-aware scaling does): its Linear layers cannot be swapped one at a time; map by "
                    "parts (--parts) instead"
                )


class _Hybrids:
    """The two hybrid stacks of a unit: only it modified (in the reference), only it restored (in the modified)."""

    def __init__(self, reference: PreTrainedModel, modified: PreTrainedModel):
        self.reference_layers, self.modified_layers = list(decoder_layers(reference)), list(decoder_layers(modified))

    def isolated(self, unit: Unit) -> list:
        i = unit.layer
        return [
            hybrid_layer(self.reference_layers[i], self.modified_layers[i], unit.part),
            *self.reference_layers[i + 1 :],
        ]

    def restored(self, unit: Unit) -> list:
        i = unit.layer
        return [
            hybrid_layer(self.modified_layers[i], self.reference_layers[i], unit.part),
            *self.modified_layers[i + 1 :],
        ]


# no_grad, not inference_mode: quantized tensor subclasses (quanto, torchao) break under inference_mode.
@torch.no_grad()
def locate(
    reference: PreTrainedModel,
    modified: PreTrainedModel,
    windows: Sequence[Window],
    *,
    parts: bool = False,
    linears: bool = False,
    batch_size: int = 1,
    progress: bool = True,
    metadata: dict | None = None,
) -> HemorrhageMap:
    """The hemorrhage map of ``modified`` against ``reference`` on ``windows`` (exact full-vocabulary KL), by layer,
    with ``parts`` also by attention and MLP, with ``linears`` also by Linear layer."""
    if not windows:
        raise ValueError("no windows to locate damage on")
    check_same_structure(reference, modified)
    if linears:
        check_norms_unchanged(reference, modified)
    hybrids = _Hybrids(reference, modified)
    units = units_of(len(hybrids.reference_layers), parts=parts, linears=linears)
    kl: dict[tuple[Unit, str] | str, list[torch.Tensor]] = {}

    def add(key, reference_logprobs, logits, batch) -> None:
        kl.setdefault(key, []).append(kl_divergence(reference_logprobs, log_probs(batch.scored(logits))))

    batches = list(batch_windows(windows, batch_size))
    with tqdm(total=len(batches) * len(units), desc="locating", unit="unit", disable=not progress) as bar:
        for batch in batches:
            reference_inputs, reference_logits = layer_inputs(reference, batch.input_ids)
            reference_logprobs = log_probs(batch.scored(reference_logits))
            del reference_logits
            modified_inputs, modified_logits = layer_inputs(modified, batch.input_ids)
            add("full", reference_logprobs, modified_logits, batch)
            del modified_logits
            for unit in units:
                isolated = resume(reference, hybrids.isolated(unit), reference_inputs[unit.layer])
                add((unit, "isolated"), reference_logprobs, isolated, batch)
                restored = resume(modified, hybrids.restored(unit), modified_inputs[unit.layer])
                add((unit, "restored"), reference_logprobs, restored, batch)
                bar.update(1)

    def mean_and_error(key) -> tuple[float, float]:
        values = torch.cat(kl[key]).double().numpy()
        return float(values.mean()), block_standard_error(values)

    full, full_error = mean_and_error("full")
    figures = [
        UnitFigures(unit, *mean_and_error((unit, "isolated")), *mean_and_error((unit, "restored"))) for unit in units
    ]
    n_tokens = int(sum(len(values) for values in kl["full"]))
    return HemorrhageMap(full, full_error, n_tokens, figures, dict(metadata or {}, parts=parts, linears=linears))
