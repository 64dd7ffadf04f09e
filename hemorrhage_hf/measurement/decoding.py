"""Decoding changes as a source of hemorrhage: how far temperature, top-k, top-p, typical sampling and repetition
penalty move the next-token distribution, and how far they move generations.

A :class:`Decoding` is a spec string such as ``"temperature=0.7,top_p=0.9"``; it builds the transformers
``LogitsProcessorList`` that ``generate`` itself would build from those settings, in the same order (repetition
penalty, then temperature, top-k, top-p, typical). Two measurements, for the same model under two decodings or for a
reference and a modified model each under its own decoding:

- :func:`decoding_divergence`: over real contexts (token windows), per position, the processed distribution ``Q`` is
  compared with the reference decoding's ``P``: total variation ½Σ|p − q|, Jensen–Shannon divergence, KL(P ‖ Q) and
  top-1 agreement. Truncating samplers (top-k/top-p/typical) give tokens that ``P`` allows zero probability under
  ``Q``, so KL(P ‖ Q) is infinite there; the share of such positions is reported and KL is averaged over the rest.
  TV and JS stay finite and are the figures to compare across decodings.
- :func:`generation_divergence`: both sides generate from the same prompts (seeded per prompt when sampling), and
  the continuations are compared: per-position token agreement and the first position where they differ.

Example:
    >>> from hemorrhage_hf.measurement.decoding import Decoding
    >>> decoding = Decoding.parse("top_p=0.9, temperature=0.7")
    >>> str(decoding), [type(p).__name__ for p in decoding.processors()]
    ('temperature=0.7,top_p=0.9', ['TemperatureLogitsWarper', 'TopPLogitsWarper'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from ..corpus import Window
from ..errors import SpecError
from .divergence import js_divergence, kl_divergence, log_probs
from .engine import batch_windows, model_outputs
from .report import mean_and_error
from .statistics import block_standard_error, iid_standard_error


@dataclass(frozen=True)
class Decoding:
    """Sampling settings; the defaults change nothing (plain softmax of the model's logits)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for name in ("temperature", "top_p", "typical_p", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))  # transformers' warpers insist on floats
        if not self.temperature > 0:
            raise SpecError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 0 or int(self.top_k) != self.top_k:
            raise SpecError(f"top_k must be a whole number ≥ 0 (0 = off), got {self.top_k}")
        for name in ("top_p", "typical_p"):
            if not 0 < getattr(self, name) <= 1:
                raise SpecError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise SpecError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    @classmethod
    def parse(cls, spec: str) -> Decoding:
        """``"name=value,..."`` with names of this class's fields; ``""`` or ``"none"`` is the identity."""
        if not isinstance(spec, str):
            raise SpecError(f"a decoding spec must be a string, got {spec!r}")
        settings = {}
        known = {field.name: field.type for field in fields(cls)}
        for part in filter(None, (piece.strip() for piece in spec.split(","))):
            if part.lower() == "none":
                continue
            name, equals, value = (text.strip() for text in part.partition("="))
            if not equals or name not in known:
                raise SpecError(f"bad decoding setting {part!r}; use name=value with names {', '.join(known)}")
            try:
                settings[name] = int(value) if name == "top_k" else float(value)
            except ValueError as error:
                raise SpecError(f"decoding setting {name} needs a number, got {value!r}") from error
        return cls(**settings)

    def __str__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name):g}" for f in fields(self) if getattr(self, f.name) != f.default]
        return ",".join(changed) or "none"

    @property
    def position_independent(self) -> bool:
        """True when processing a position needs only its logits, not the tokens before it."""
        return self.repetition_penalty == 1.0

    def processors(self) -> LogitsProcessorList:
        """The processors ``generate`` would build from these settings, in its order."""
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            processors.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        if self.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(self.typical_p))
        return processors


def process_logits(
    decoding: Decoding, input_ids: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Processed fp32 logits ``[n, vocab]`` of ``logits[rows, positions]``, each seeing the tokens up to its
    position."""
    selected = logits[rows, positions].float()
    processors = decoding.processors()
    if decoding.position_independent:
        return processors(input_ids[rows, :1], selected)
    return torch.cat(
        [
            processors(input_ids[row : row + 1, : position + 1], selected[index : index + 1])
            for index, (row, position) in enumerate(zip(rows.tolist(), positions.tolist()))
        ]
    )


def distribution_statistics(reference_logits: torch.Tensor, processed_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position TV, JS, KL(P ‖ Q) and top-1 agreement of two processed logit tensors ``[n, vocab]``."""
    reference_logprobs, processed_logprobs = log_probs(reference_logits), log_probs(processed_logits)
    p, q = reference_logprobs.exp(), processed_logprobs.exp()
    return {
        "tv": 0.5 * (p - q).abs().sum(-1),
        "js": js_divergence(p, q),
        "kl": kl_divergence(reference_logprobs, processed_logprobs),
        "same_top1": reference_logits.argmax(-1) == processed_logits.argmax(-1),
    }


def summarize_distribution_statistics(parts: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    arrays = {name: torch.cat(values).double().numpy() for name, values in parts.items()}
    finite_kl = np.isfinite(arrays["kl"])
    figures: dict[str, float] = {"n_tokens": int(len(arrays["tv"]))}
    for name in ("tv", "js"):
        figures[f"{name}_mean"], figures[f"{name}_mean_error"] = mean_and_error(arrays[name])
        figures[f"{name}_mean_error_block"] = block_standard_error(arrays[name])
    figures["kl_infinite_fraction"] = float(1 - finite_kl.mean())
    figures["kl_mean"], figures["kl_mean_error"] = (
        mean_and_error(arrays["kl"][finite_kl]) if finite_kl.any() else (float("inf"), float("nan"))
    )
    figures["kl_mean_error_block"] = block_standard_error(arrays["kl"][finite_kl])
    figures["top1_agreement"] = float(arrays["same_top1"].mean())
    figures["top1_agreement_error"] = iid_standard_error(arrays["same_top1"])
    figures["top1_agreement_error_block"] = block_standard_error(arrays["same_top1"])
    return figures


@torch.no_grad()  # not inference_mode: quanto and torchao tensors fail under it
def decoding_divergence(
    model: PreTrainedModel,
    windows: Sequence[Window],
    decodings: Sequence[Decoding],
    *,
    reference_decoding: Decoding = Decoding(),
    modified: PreTrainedModel | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> list[dict[str, float]]:
    """For each of ``decodings``: how its distribution (on ``modified``, else on ``model``) departs from
    ``reference_decoding`` on ``model``, over every scored position of ``windows``. One pass serves all decodings."""
    if not decodings:
        raise SpecError("no decodings to compare")
    parts: list[dict[str, list[torch.Tensor]]] = [{} for _ in decodings]
    with tqdm(total=len(windows), desc="decoding divergence", unit="window", disable=not progress) as bar:
        for batch in batch_windows(windows, batch_size):
            input_ids = batch.input_ids
            logits = model_outputs(model, input_ids).logits.cpu()
            other_logits = model_outputs(modified, input_ids).logits.cpu() if modified is not None else logits
            rows, positions = batch.prediction_positions()
            reference = process_logits(reference_decoding, input_ids, logits, rows, positions)
            for decoding, accumulated in zip(decodings, parts):
                statistics = distribution_statistics(
                    reference, process_logits(decoding, input_ids, other_logits, rows, positions)
                )
                for name, values in statistics.items():
                    accumulated.setdefault(name, []).append(values)
            bar.update(len(batch.first_scored))
    return [
        {
            "decoding": str(decoding),
            "reference_decoding": str(reference_decoding),
            **summarize_distribution_statistics(p),
        }
        for decoding, p in zip(decodings, parts)
    ]


def corpus_prompts(windows: Sequence[Window], *, n_prompts: int, prompt_tokens: int) -> list[torch.Tensor]:
    """The first ``prompt_tokens`` tokens of ``n_prompts`` windows spread evenly over the corpus."""
    if n_prompts < 1 or prompt_tokens < 1:
        raise SpecError(f"need at least one prompt of at least one token, got {n_prompts} × {prompt_tokens}")
    usable = [w for w in windows if len(w.input_ids) >= prompt_tokens]
    if len(usable) < n_prompts:
        raise SpecError(f"{len(usable)} windows hold {prompt_tokens} tokens; {n_prompts} prompts were asked for")
    picks = np.linspace(0, len(usable) - 1, n_prompts).round().astype(int)
    return [usable[i].input_ids[:prompt_tokens] for i in picks]


def _generate(
    model: PreTrainedModel,
    prompt: torch.Tensor,
    decoding: Decoding,
    *,
    sample: bool,
    max_new_tokens: int,
    seed: int,
    pad_token_id: int | None,
) -> list[int]:
    # A neutral config: settings the model ships (a chat model's temperature 0.6, say) must not add processors.
    config = GenerationConfig(
        do_sample=sample,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        typical_p=1.0,
        repetition_penalty=1.0,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    output = model.generate(
        prompt[None].to(model.device),
        attention_mask=torch.ones_like(prompt[None]).to(model.device),
        generation_config=config,
        logits_processor=decoding.processors(),
    )
    return output[0, len(prompt) :].tolist()


def first_divergence(first: Sequence[int], second: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts at the shorter end); None if identical."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return None if len(first) == len(second) else min(len(first), len(second))


@torch.no_grad()  # not inference_mode: quanto and torchao tensors fail under it
def generation_divergence(
    model: PreTrainedModel,
    prompts: Sequence[torch.Tensor],
    decoding: Decoding,
    *,
    reference_decoding: Decoding = Decoding(),
    modified: PreTrainedModel | None = None,
    sample: bool = True,
    max_new_tokens: int = 32,
    seed: int = 0,
    pad_token_id: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate from each prompt with ``reference_decoding`` on ``model`` and with ``decoding`` on ``modified`` (else
    ``model``), prompt ``i`` seeded with ``seed + i`` on both sides, and compare the continuations.

    Returns token agreement (matching tokens / positions, over the shorter continuation of each pair, averaged),
    the first divergence position per prompt (its mean over the prompts that diverged), the share of identical
    continuations, and the continuations themselves.
    """
    if max_new_tokens < 1:
        raise SpecError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    other = modified if modified is not None else model
    pairs = []
    for index, prompt in enumerate(tqdm(prompts, desc="generating", unit="prompt", disable=not progress)):
        settings = dict(sample=sample, max_new_tokens=max_new_tokens, seed=seed + index, pad_token_id=pad_token_id)
        pairs.append(
            (_generate(model, prompt, reference_decoding, **settings), _generate(other, prompt, decoding, **settings))
        )
    agreement = [
        np.mean([a == b for a, b in zip(first, second)]) if min(len(first), len(second)) else 0.0
        for first, second in pairs
    ]
    divergences = [first_divergence(first, second) for first, second in pairs]
    diverged = [position for position in divergences if position is not None]
    return {
        "decoding": str(decoding),
        "reference_decoding": str(reference_decoding),
        "sampled": sample,
        "n_prompts": len(pairs),
        "max_new_tokens": max_new_tokens,
        "token_agreement": float(np.mean(agreement)),
        "identical_fraction": 1 - len(diverged) / len(pairs),
        "first_divergence_mean": float(np.mean(diverged)) if diverged else None,
        "first_divergence": divergences,
        "continuations": [{"reference": first, "other": second} for first, second in pairs],
    }
