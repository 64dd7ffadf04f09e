"""One streaming pass of the reference and the modified model over identical token windows.

Per batch of windows the two models run once each; their logits are reduced at once to per-token scalars
(KL, NLLs, top-1 agreement, Δp) and, when asked, to per-layer sums of hidden-state drift and attention
divergence. Logits are never kept, so memory is the models plus one batch, plus 4 bytes × 6 per scored token.

Example:
    >>> from hemorrhage_hf import load_model, tokenize_corpus, python_docs_text, measure
    >>> from hemorrhage_hf.modify import apply_modification
    >>> reference, tokenizer = load_model("default")  # doctest: +SKIP
    >>> modified = apply_modification(reference, "int4-g64")  # doctest: +SKIP
    >>> windows = tokenize_corpus(tokenizer, python_docs_text(), window=512, max_tokens=4096)  # doctest: +SKIP
    >>> report = measure(reference, modified, windows)  # doctest: +SKIP
    >>> report.figures["kl_mean"] > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..config_keys import LAYER_MAP_ATTRIBUTE
from ..corpus import Window
from ..errors import HemorrhageError, ModificationError
from . import distributed
from .divergence import TokenStatistics, cosine_distance, js_divergence, relative_l2, token_statistics
from .head import HeadInputs, HeadRows, OutputHead
from .memory import return_free_pages
from .report import HemorrhageReport, LayerFigures, TokenArrays

#: ``transform(input_ids [B, T], logits [B, T, V]) -> logits [B, T, V]``, applied to the modified model's logits
#: (e.g. :meth:`hemorrhage_hf.correction.processor.DecodingCorrection.correct_sequence`).
LogitTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Batch:
    """Windows of equal length stacked into one model input, with the positions each row scores."""

    input_ids: torch.Tensor
    first_scored: list[int]

    def prediction_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) of every logit that predicts a scored token, in window order."""
        length = self.input_ids.shape[1]
        rows = [torch.full((length - first,), row) for row, first in enumerate(self.first_scored)]
        positions = [torch.arange(first - 1, length - 1) for first in self.first_scored]
        return torch.cat(rows), torch.cat(positions)

    def targets(self) -> torch.Tensor:
        rows, positions = self.prediction_positions()
        return self.input_ids[rows, positions + 1]

    def scored(self, values: torch.Tensor) -> torch.Tensor:
        """``values[B, T, ...]`` at the prediction positions, ``[n, ...]`` in window order, on the CPU.

        One window gives a view: a window's logits are ~100 MB (512 × 49k fp32), and a copy of them would be most
        of what measuring holds beyond the two models.
        """
        length = values.shape[1]
        parts = [values[row, first - 1 : length - 1] for row, first in enumerate(self.first_scored)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu()


def batch_windows(windows: Sequence[Window], batch_size: int) -> Iterator[Batch]:
    """Consecutive windows of equal length, ``batch_size`` at a time (a shorter last window runs alone)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pending: list[Window] = []
    for window in windows:
        if pending and (len(pending) == batch_size or len(window.input_ids) != len(pending[0].input_ids)):
            yield _stack(pending)
            pending = []
        pending.append(window)
    if pending:
        yield _stack(pending)


def _stack(windows: list[Window]) -> Batch:
    return Batch(torch.stack([w.input_ids for w in windows]), [w.first_scored for w in windows])


def resolve_layer_map(
    reference: PreTrainedModel, modified: PreTrainedModel, layer_map: Sequence[int] | None
) -> list[int]:
    """Reference decoder layer i is compared with modified layer ``layer_map[i]``.

    The map comes from the argument, else from the modified model's config (layer expansion records one there),
    else is the identity when both models have the same depth.
    """
    n_reference = reference.config.num_hidden_layers
    n_modified = modified.config.num_hidden_layers
    layer_map = layer_map or getattr(modified.config, LAYER_MAP_ATTRIBUTE, None)
    if layer_map is None:
        if n_reference != n_modified:
            raise ModificationError(
                f"the models have {n_reference} and {n_modified} layers; pass a layer map (reference layer i -> "
                "modified layer) to compare them layer by layer"
            )
        return list(range(n_reference))
    layer_map = [int(j) for j in layer_map]
    if len(layer_map) != n_reference or not all(0 <= j < n_modified for j in layer_map):
        raise ModificationError(
            f"layer map {layer_map} must give one modified layer in [0, {n_modified}) for each of the "
            f"{n_reference} reference layers"
        )
    return layer_map


@contextlib.contextmanager
def eager_attention(*models: PreTrainedModel) -> Iterator[None]:
    """Attention probabilities exist only in the eager implementation; switch to it for the pass, then back."""
    previous = [model.config._attn_implementation for model in models]
    for model in models:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for model, implementation in zip(models, previous):
            model.set_attn_implementation(implementation)


class LayerAccumulator:
    """Per-batch sums of per-layer drift over scored positions.

    Sums are kept per batch and added with ``math.fsum`` (exactly rounded, so independent of order): a run split
    across processes gives bit-identical averages to a single process.
    """

    def __init__(self, layer_map: list[int]):
        self.layer_map = layer_map
        #: one ``[3, n_layers]`` float64 tensor (cosine, relative L2, attention JS) per batch
        self.batch_sums: list[torch.Tensor] = []
        self.n_positions = 0
        self.has_attention = False

    def add(self, reference_outputs, modified_outputs, rows: torch.Tensor, positions: torch.Tensor) -> None:
        self.n_positions += len(rows)
        sums = torch.zeros(3, len(self.layer_map), dtype=torch.float64)
        for layer, mapped in enumerate(self.layer_map):
            # hidden_states[0] is the embedding output; hidden_states[i + 1] is decoder layer i's output.
            reference_hidden = reference_outputs.hidden_states[layer + 1][rows, positions]
            modified_hidden = modified_outputs.hidden_states[mapped + 1][rows, positions]
            sums[0, layer] = cosine_distance(reference_hidden, modified_hidden).double().sum()
            sums[1, layer] = relative_l2(reference_hidden, modified_hidden).double().sum()
            if reference_outputs.attentions is not None:
                self.has_attention = True
                sums[2, layer] = _attention_js(
                    reference_outputs.attentions[layer], modified_outputs.attentions[mapped], rows, positions
                )
        self.batch_sums.append(sums)

    def merge(self, others: Sequence[LayerAccumulator]) -> LayerAccumulator:
        """This accumulator followed by ``others`` (shards of one pass, in order)."""
        for other in others:
            self.batch_sums += other.batch_sums
            self.n_positions += other.n_positions
            self.has_attention |= other.has_attention
        return self

    def finish(self) -> LayerFigures:
        n = max(self.n_positions, 1)

        def averages(row: int) -> list[float]:
            return [
                math.fsum(sums[row, layer].item() for sums in self.batch_sums) / n
                for layer in range(len(self.layer_map))
            ]

        return LayerFigures(
            layer_map=self.layer_map,
            cosine_distance=averages(0),
            relative_l2=averages(1),
            attention_js=averages(2) if self.has_attention else None,
        )


def _attention_js(
    reference: torch.Tensor, modified: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> float:
    """Sum over positions of the head-averaged JS divergence of attention rows ``[batch, heads, query, key]``.

    Models whose head counts differ (pruned heads) are compared on their head-averaged attention.
    """
    reference_rows = reference[rows, :, positions]
    modified_rows = modified[rows, :, positions]
    if reference_rows.shape[1] != modified_rows.shape[1]:
        reference_rows = reference_rows.mean(1, keepdim=True)
        modified_rows = modified_rows.mean(1, keepdim=True)
    return js_divergence(reference_rows, modified_rows).mean(1).double().sum().item()


@dataclass
class TokenAccumulator:
    """Per-token scalars of every scored position, kept on CPU in fp32 for exact percentiles."""

    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, statistics: TokenStatistics, target_ids: torch.Tensor) -> None:
        for name, values in vars(statistics).items():
            self.parts.setdefault(name, []).append(values.detach().cpu())
        self.parts.setdefault("target_ids", []).append(target_ids.cpu())

    def merge(self, others: Sequence[TokenAccumulator]) -> TokenAccumulator:
        """This accumulator followed by ``others`` (shards of one pass, in order)."""
        for other in others:
            for name, values in other.parts.items():
                self.parts.setdefault(name, []).extend(values)
        return self

    def finish(self) -> TokenArrays:
        arrays = {name: torch.cat(values).numpy() for name, values in self.parts.items()}
        return TokenArrays(
            kl=arrays["kl"].astype(np.float32),
            reference_nll=arrays["reference_nll"].astype(np.float32),
            modified_nll=arrays["modified_nll"].astype(np.float32),
            same_top1=arrays["same_top1"].astype(bool),
            delta_p=arrays["delta_p"].astype(np.float32),
            finite=arrays["finite"].astype(bool),
            target_ids=arrays["target_ids"].astype(np.int64),
            reverse_kl=arrays["reverse_kl"].astype(np.float32),
            same_top5=arrays["same_top5"].astype(bool),
            same_top10=arrays["same_top10"].astype(bool),
            reference_confidence=arrays["reference_confidence"].astype(np.float32),
        )


class LogitsModel(Protocol):
    """A model run outside torch (e.g. :class:`hemorrhage_hf.llamacpp.engine.LlamaCppModel`): it yields only
    logits, which measurement reduces exactly as it reduces a torch model's."""

    engine: str
    name_or_path: str

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits ``[B, T, V]`` of every position."""

    def fingerprint(self) -> str:
        """A digest that changes whenever the model's outputs could (keys reference caches)."""


@dataclass
class LogitsOutput:
    """What a :class:`LogitsModel` gives for a batch: logits, and no hidden states or attentions."""

    logits: torch.Tensor
    hidden_states: None = None
    attentions: None = None


def is_logits_model(model: object) -> bool:
    return not isinstance(model, torch.nn.Module) and callable(getattr(model, "logits", None))


def refuse_layers(model: object) -> None:
    """Per-layer figures need hidden states, which a :class:`LogitsModel` does not expose: say so plainly."""
    if is_logits_model(model):
        raise HemorrhageError(
            f"per-layer drift and attention divergence need hidden states; the {model.engine} engine yields only "
            "logits (measure without --layers/--attention, or with the torch engine)"
        )


def model_outputs(
    model: PreTrainedModel | LogitsModel,
    input_ids: torch.Tensor,
    *,
    layers: bool = False,
    attention: bool = False,
    attention_mask: torch.Tensor | None = None,
):
    """One forward pass over a batch, exactly as measurement runs it (a reference cache is built with this too)."""
    if is_logits_model(model):
        if layers or attention:
            refuse_layers(model)
        return LogitsOutput(model.logits(input_ids, attention_mask))
    return model(
        input_ids=input_ids.to(model.device),
        attention_mask=None if attention_mask is None else attention_mask.to(model.device),
        output_hidden_states=layers,
        output_attentions=attention,
        use_cache=False,
    )


class ReferenceSource(Protocol):
    """Supplies the reference side of each batch: the live model (:class:`LiveReference`), an exact store of its
    outputs (:class:`hemorrhage_hf.measurement.refstore.ReferenceStore`) or a top-k cache of them
    (:class:`hemorrhage_hf.measurement.refcache.ReferenceCache`), so K modified models cost K + 1 passes, not 2K."""

    def begin(
        self,
        windows: Sequence[Window],
        *,
        batch_size: int,
        layers: bool,
        attention: bool,
        modified: PreTrainedModel | LogitsModel | None = None,
    ) -> None:
        """Start a pass over ``windows`` comparing ``modified``; raise where this source cannot serve it."""

    def modified_head(self) -> OutputHead | None:
        """After :meth:`begin`: the modified model's head, where :meth:`compare` takes the modified logits as
        :class:`~hemorrhage_hf.measurement.head.HeadRows` (computed a block of rows at a time, never a whole
        window's at once); None where it takes them whole."""

    def compare(
        self, batch: Batch, modified_logits: torch.Tensor | HeadRows, targets: torch.Tensor
    ) -> tuple[TokenStatistics, Any]:
        """Per-token statistics of the batch's scored positions, and the reference model outputs (None if absent)."""

    def metadata(self) -> dict:
        """What the report must say about where the reference figures came from."""


class LiveReference:
    """The reference model itself, run on every batch."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.layers = self.attention = False

    def begin(
        self,
        windows: Sequence[Window],
        *,
        batch_size: int,
        layers: bool,
        attention: bool,
        modified: PreTrainedModel | LogitsModel | None = None,
    ) -> None:
        self.layers, self.attention = layers or attention, attention

    def modified_head(self) -> None:
        return None

    def compare(self, batch: Batch, modified_logits: torch.Tensor, targets: torch.Tensor):
        outputs = model_outputs(self.model, batch.input_ids, layers=self.layers, attention=self.attention)
        return token_statistics(batch.scored(outputs.logits), modified_logits, targets), outputs

    def metadata(self) -> dict:
        return {}


def run_environment() -> dict:
    """What ran the measurement: tool, torch and transformers versions, and torch's CPU thread count.

    Example:
        >>> sorted(run_environment())
        ['threads', 'tool', 'torch', 'transformers']
    """
    import transformers

    from .. import __version__

    return {
        "tool": f"hemorrhage-hf {__version__}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


@torch.no_grad()  # not inference_mode: quanto and torchao tensors fail under it
def measure(
    reference: PreTrainedModel | LogitsModel | ReferenceSource,
    modified: PreTrainedModel | LogitsModel,
    windows: Sequence[Window],
    *,
    batch_size: int = 1,
    layers: bool = False,
    attention: bool = False,
    layer_map: Sequence[int] | None = None,
    progress: bool = True,
    metadata: dict | None = None,
    modified_variants: Mapping[str, LogitTransform] | None = None,
    description: str = "measuring",
) -> HemorrhageReport:
    """Measure how much ``modified`` bled relative to ``reference`` on ``windows``.

    Args:
        reference: the reference model, an exact :class:`~hemorrhage_hf.measurement.refstore.ReferenceStore` of its
            outputs on these windows, or a top-k :class:`~hemorrhage_hf.measurement.refcache.ReferenceCache` of them
            (KL is then a lower bound over its top-k bins plus a tail bin; the other figures are exact).
            Either model may be a :class:`LogitsModel` (llama.cpp), which yields logits only (no ``layers``).
        windows: token windows from :func:`hemorrhage_hf.corpus.tokenize_corpus` (both models see exactly these).
        layers: also compute per-layer hidden-state drift (the information loss cascade).
        attention: also compute per-layer attention JS divergence (switches both models to eager attention).
        layer_map: reference layer i → modified layer ``layer_map[i]``; see :func:`resolve_layer_map`.
        metadata: what was compared (names, corpus, window...), carried into the report verbatim.
        modified_variants: name → transform of the modified model's logits. Each transformed copy is measured against
            the same reference outputs, from the same forward passes, into ``report.variants[name]`` (token figures
            only; needs the live reference model).
    """
    if not windows:
        raise ValueError("no windows to measure")
    source = (
        LiveReference(reference) if isinstance(reference, torch.nn.Module) or is_logits_model(reference) else reference
    )
    if layers or attention:
        refuse_layers(reference)
        refuse_layers(modified)
    variants = dict(modified_variants or {})
    if variants and not isinstance(source, LiveReference):
        raise HemorrhageError("measuring modified variants needs the reference model itself, not a reference cache")
    variant_tokens = {name: TokenAccumulator() for name in variants}
    # A cache refuses layers/attention here, so below `reference` is a model wherever they are asked for.
    source.begin(windows, batch_size=batch_size, layers=layers, attention=attention, modified=modified)
    layer_accumulator = (
        LayerAccumulator(resolve_layer_map(reference, modified, layer_map)) if layers or attention else None
    )
    tokens = TokenAccumulator()
    attention_context = eager_attention(reference, modified) if attention else contextlib.nullcontext()
    modified_head = source.modified_head()
    head_inputs = HeadInputs(modified) if modified_head is not None else contextlib.nullcontext()
    # Under `accelerate launch` each process measures its own contiguous shard; the shards are merged below.
    shard = distributed.local_windows(windows, batch_size)
    show_progress = progress and distributed.is_main_process()
    with (
        attention_context,
        head_inputs,
        tqdm(total=len(shard), desc=description, unit="window", disable=not show_progress) as bar,
    ):
        for batch in batch_windows(shard, batch_size):
            want_hidden = layer_accumulator is not None
            modified_outputs = model_outputs(modified, batch.input_ids, layers=want_hidden, attention=attention)
            targets = batch.targets()
            if modified_head is not None:  # the model computed its last position's logits only
                modified_head.check(head_inputs.last(), modified_outputs.logits, modified)
                modified_logits = HeadRows(modified_head, batch.scored(head_inputs.value))
            else:
                modified_logits = batch.scored(modified_outputs.logits)
            statistics, reference_outputs = source.compare(batch, modified_logits, targets)
            tokens.add(statistics, targets)
            for name, transform in variants.items():
                variant_logits = batch.scored(transform(batch.input_ids, modified_outputs.logits))
                variant_statistics = token_statistics(batch.scored(reference_outputs.logits), variant_logits, targets)
                variant_tokens[name].add(variant_statistics, targets)
            if layer_accumulator is not None:
                layer_accumulator.add(reference_outputs, modified_outputs, *batch.prediction_positions())
            # Drop this batch's outputs before the next forward pass, not after it: they are most of the peak.
            del modified_outputs, modified_logits, reference_outputs
            return_free_pages()
            bar.update(len(batch.first_scored))
    tokens = TokenAccumulator().merge(distributed.gather(tokens))
    if layer_accumulator is not None:
        layer_accumulator = LayerAccumulator(layer_accumulator.layer_map).merge(distributed.gather(layer_accumulator))
    report = HemorrhageReport.build(
        tokens.finish(),
        layers=layer_accumulator.finish() if layer_accumulator is not None else None,
        metadata={**run_environment(), **(metadata or {}), **source.metadata()},
    )
    for name, accumulator in variant_tokens.items():
        variant_metadata = {**report.metadata, "modified": f"{report.metadata.get('modified', 'modified')} + {name}"}
        merged = TokenAccumulator().merge(distributed.gather(accumulator))
        report.variants[name] = HemorrhageReport.build(merged.finish(), layers=None, metadata=variant_metadata)
    return report
