"""Calibration activations and gradients for modifications that look at data (Wanda, GBLM, AWQ, SmoothQuant...).

:func:`layerwise` feeds calibration tokens through the decoder one layer at a time, as Wanda, AWQ and GPTQ do:
each layer sees the outputs of the layers before it *as already modified*, so errors are judged where they
land, and only one layer's activations are ever held.

Example:
    >>> from hemorrhage_hf.modify.calibration import layerwise
    >>> for step in layerwise(model, calibration):  # doctest: +SKIP
    ...     statistics = step.input_statistics({"q": step.layer.self_attn.q_proj})
    ...     print(step.index, statistics["q"].input_norms()[:3])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..corpus import PYTHON_DOCS, calibration_windows, load_corpus
from ..errors import ModificationError
from .architecture import decoder_layers

#: Calibration sequences per forward pass: bounds the activations held at once.
BATCH_SIZE = 4


@dataclass
class CalibrationSettings:
    """Where calibration tokens come from for modifications that need them (Wanda, AWQ-style scaling...)."""

    text_source: str = PYTHON_DOCS
    n_sequences: int = 16
    seq_len: int = 512
    seed: int = 0
    #: Token span ``[start, stop)`` of ``text_source`` never drawn from (stop None: to its end): set by
    #: measurements that judge that same text (:meth:`~hemorrhage_hf.comparison.TextSource.calibration_apart`).
    held_out: tuple[int, int | None] | None = None

    def windows(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """The ``[n_sequences, seq_len]`` calibration token ids these settings name."""
        return calibration_windows(
            tokenizer,
            load_corpus(self.text_source),
            n_sequences=self.n_sequences,
            seq_len=self.seq_len,
            seed=self.seed,
            held_out=self.held_out,
        )


@dataclass
class InputStatistics:
    """Running per-input-channel statistics of what one Linear layer receives; optionally its Gram matrix XᵀX over
    all tokens (``with_gram``) and a seeded sample of its rows."""

    channels: int
    with_gram: bool = False
    n_tokens: int = 0
    sum_squares: torch.Tensor = field(init=False)
    sum_abs: torch.Tensor = field(init=False)
    max_abs: torch.Tensor = field(init=False)
    gram: torch.Tensor | None = field(init=False)
    sampled_rows: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        self.sum_squares = torch.zeros(self.channels, dtype=torch.float64)
        self.sum_abs = torch.zeros(self.channels, dtype=torch.float64)
        self.max_abs = torch.zeros(self.channels)
        self.gram = torch.zeros(self.channels, self.channels) if self.with_gram else None

    def add(self, rows: torch.Tensor, sample: torch.Tensor | None) -> None:
        rows = rows.detach().reshape(-1, self.channels).float()
        self.n_tokens += rows.shape[0]
        self.sum_squares += rows.double().square().sum(0)
        self.sum_abs += rows.double().abs().sum(0)
        self.max_abs = torch.maximum(self.max_abs, rows.abs().amax(0))
        if self.gram is not None:
            self.gram.addmm_(rows.T, rows)
        if sample is not None:
            self.sampled_rows.append(rows[sample].clone())

    def input_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens, per input channel (Wanda's activation term)."""
        return self.sum_squares.sqrt().float()

    def mean_squares(self) -> torch.Tensor:
        """E[x_j²] per input channel."""
        return (self.sum_squares / max(self.n_tokens, 1)).float()

    def mean_abs(self) -> torch.Tensor:
        """Mean |x_j| per input channel (AWQ's activation scale)."""
        return (self.sum_abs / max(self.n_tokens, 1)).float()

    def rows(self) -> torch.Tensor:
        """The sampled input rows ``[n_sampled, channels]``."""
        return torch.cat(self.sampled_rows)


@dataclass
class _LayerInputs:
    """What the decoder passes to each layer, per calibration batch: hidden states and keyword arguments
    (position embeddings, causal mask...), captured from the model's own forward so any architecture works."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


class _Captured(Exception):
    """Stops the model's forward once the first decoder layer's inputs are captured."""


@torch.no_grad()
def _capture_first_layer_inputs(model: PreTrainedModel, batches: list[torch.Tensor]) -> _LayerInputs:
    captured = _LayerInputs([], [])

    def catch(module, args, kwargs):
        captured.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.kwargs.append({key: value for key, value in kwargs.items() if key != "hidden_states"})
        raise _Captured

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(model.device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class LayerStep:
    """One decoder layer during a :func:`layerwise` pass: run it over the calibration inputs it receives."""

    def __init__(self, index: int, layer: nn.Module, inputs: _LayerInputs, sample_rows: int, seed: int):
        self.index, self.layer, self._inputs = index, layer, inputs
        self._sample_rows, self._seed = sample_rows, seed

    def _row_samples(self) -> list[torch.Tensor | None]:
        """Which token rows of each batch go into :attr:`InputStatistics.sampled_rows` (seeded, without replacement)."""
        sizes = [hidden.shape[0] * hidden.shape[1] for hidden in self._inputs.hidden]
        total = sum(sizes)
        if self._sample_rows <= 0:
            return [None] * len(sizes)
        generator = torch.Generator().manual_seed(self._seed + self.index)
        chosen = torch.randperm(total, generator=generator)[: self._sample_rows].sort().values
        samples, start = [], 0
        for size in sizes:
            in_batch = chosen[(chosen >= start) & (chosen < start + size)]
            samples.append(in_batch - start)
            start += size
        return samples

    @property
    def inputs(self) -> list[torch.Tensor]:
        """The hidden states the layer receives, one tensor per calibration batch."""
        return self._inputs.hidden

    @torch.no_grad()
    def input_statistics(self, linears: dict[str, nn.Linear], *, gram: bool = False) -> dict[str, InputStatistics]:
        """Run the layer over every calibration batch and gather what each of ``linears`` receives."""
        statistics = {name: InputStatistics(linear.in_features, gram) for name, linear in linears.items()}
        current_sample: list[torch.Tensor | None] = [None]

        def recorder(name):
            def hook(module, args):
                statistics[name].add(args[0], current_sample[0])

            return hook

        handles = [linear.register_forward_pre_hook(recorder(name)) for name, linear in linears.items()]
        try:
            for hidden, kwargs, sample in zip(self._inputs.hidden, self._inputs.kwargs, self._row_samples()):
                current_sample[0] = sample
                self.layer(hidden, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return statistics

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The layer's outputs for every calibration batch, as the layer is now."""
        return [_layer_output(self.layer(h, **k)) for h, k in zip(self._inputs.hidden, self._inputs.kwargs)]


def layerwise(
    model: PreTrainedModel,
    calibration: torch.Tensor,
    *,
    sample_rows: int = 0,
    seed: int = 0,
    progress: bool = False,
    description: str = "calibrating",
) -> Iterator[LayerStep]:
    """Yield a :class:`LayerStep` per decoder layer, in order; whatever the caller changes in that layer before
    asking for the next one shapes the inputs every later layer sees.

    ``sample_rows``: how many input rows (tokens) per Linear to keep for error searches, drawn with ``seed``.
    """
    batches = list(calibration.split(BATCH_SIZE))
    inputs = _capture_first_layer_inputs(model, batches)
    for index, layer in enumerate(tqdm(decoder_layers(model), desc=description, unit="layer", disable=not progress)):
        step = LayerStep(index, layer, inputs, sample_rows, seed)
        yield step
        inputs = _LayerInputs(step.outputs(), inputs.kwargs)


def gradient_norms(
    model: PreTrainedModel, calibration: torch.Tensor, linears: dict[str, nn.Linear], *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Per weight W_ij of each of ``linears``, ‖G_ij‖ = sqrt(Σ_t (∂loss/∂y_ti · x_tj)²) over calibration tokens t: the
    ℓ2 norm of the per-token gradient contributions (the root of the token-level empirical Fisher diagonal).

    GBLM-Pruner takes the ℓ2 norm of whole-sequence gradients instead; with the 8–128 sequences calibration affords
    here, that estimate rests on a handful of samples, and measured no better than Wanda (BENCHMARKS.md). Token-level
    contributions come out of the same backward passes: a hook multiplies each Linear's squared output gradient
    by its squared input. No weight gradients are formed (and no ``requires_grad`` flag is left changed).
    """
    sums = {name: torch.zeros_like(linear.weight, dtype=torch.float32) for name, linear in linears.items()}
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach().reshape(-1, module.in_features).float().square()

        return hook

    def accumulate(name):
        def hook(module, grad_input, grad_output):
            output_gradients = grad_output[0].reshape(-1, module.out_features).float().square()
            sums[name].addmm_(output_gradients.T, inputs.pop(name))

        return hook

    handles = [
        h
        for name, linear in linears.items()
        for h in (linear.register_forward_hook(keep_input(name)), linear.register_full_backward_hook(accumulate(name)))
    ]
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for batch in tqdm(calibration.split(1), desc="gradients", unit="sequence", disable=not progress):
            ids = batch.to(model.device)
            # Gradients flow from the embeddings on, so every Linear's output gradient exists without weight grads.
            embeddings = model.get_input_embeddings()(ids).detach().requires_grad_()
            model(inputs_embeds=embeddings, labels=ids, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
    return {name: total.sqrt() for name, total in sums.items()}


def split_held_out(calibration: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) calibration sequences: the last ``round(share · n)`` sequences (at least one) are held out.

    Calibration windows are drawn at random from their text, so the last ones are as good a sample as any.

    Example:
        >>> fit, held_out = split_held_out(torch.zeros(8, 16, dtype=torch.long), share=0.25)
        >>> fit.shape[0], held_out.shape[0]
        (6, 2)
    """
    n_held = max(1, round(share * calibration.shape[0]))
    if calibration.shape[0] - n_held < 1:
        raise ModificationError(
            f"holding out {share:.0%} of the calibration needs at least 2 sequences, got {calibration.shape[0]}"
        )
    return calibration[:-n_held], calibration[-n_held:]


@torch.no_grad()
def mean_token_loss(model: PreTrainedModel, calibration: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over every predicted position of the sequences.

    Example:
        >>> mean_token_loss(model, held_out)  # doctest: +SKIP
        2.97
    """
    total = 0.0
    for batch in calibration.split(BATCH_SIZE):
        ids = batch.to(model.device)
        # Equal-length sequences: every batch's mean is over batch rows × (length − 1) positions.
        total += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * batch.shape[0]
    return total / calibration.shape[0]
