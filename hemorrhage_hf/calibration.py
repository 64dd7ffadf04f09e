"""Decoding calibration: a ``LogitsProcessor`` that pulls a modified model's next-token scores back towards the
reference model's distribution, learnt once on calibration text. At inference it needs no second model.

``DecodingCalibration.fit(reference, modified, text)`` runs both models over the text, stores their next-token
predictions and fits a correction (see :mod:`hemorrhage_hf.calibration_ops`) that minimises
KL(P_ref ‖ P_mod-corrected). A fifth of the windows is held out: ``fit`` reports the KL on them with and without
the correction and warns (:class:`CalibrationWarning`) when the correction does not help beyond noise.

Which corrections earn their cost is measured, not assumed: ``bench/bench_calibration.py --families-table`` fits
each family on the same predictions and reports its KL reduction in sample and on held-out text (BENCHMARKS.md,
"Decoding calibration"). The ``state_bias``, a rank-32 affine correction of the modified model's final hidden state
read from its scores and fitted in closed form, does most of the work (int4-g64: 27 % of the KL removed on held-out
text alone, against 3 % for a temperature and 14.5 % for a per-token bias); an entropy-dependent temperature and a
per-token bias, fitted around it, add about a point. Fitted on 16,384 tokens of WikiText-2, the three remove 29 %
of int4-g64's KL on articles the fit never saw, for about 1 % of a generation step.

Example:
    >>> from transformers import LogitsProcessorList
    >>> from hemorrhage_hf import apply_modification, load_model, python_docs_text
    >>> from hemorrhage_hf.calibration import DecodingCalibration
    >>> reference, tokenizer = load_model("default")  # doctest: +SKIP
    >>> modified = apply_modification(reference, "int4-g64")  # doctest: +SKIP
    >>> calibration = DecodingCalibration.fit(reference, modified, python_docs_text(), tokenizer=tokenizer)  # doctest: +SKIP
    >>> calibration.summary.helps  # doctest: +SKIP
    True
    >>> calibration.save_pretrained("int4-calibration")  # doctest: +SKIP
    >>> inputs = tokenizer("The capital of France is", return_tensors="pt")  # doctest: +SKIP
    >>> modified.generate(**inputs, logits_processor=LogitsProcessorList([calibration]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from .atomic import atomic_path, atomic_write_text
from .calibration_ops import (
    DEFAULT_RANK,
    CalibrationData,
    CorrectionParameters,
    apply_correction,
    fit_correction,
    kl_before_after,
)
from .corpus import Window, make_windows, tokenize_corpus, tokenize_documents
from .errors import CorpusError, HemorrhageError, TokenizerMismatchError
from .measure import batch_windows

FORMAT = "hemorrhage-hf-decoding-calibration"
FORMAT_VERSION = 2  # 2: the state bias gained its offset
CONFIG_NAME = "calibration_config.json"
WEIGHTS_NAME = "calibration.safetensors"

DEFAULT_FAMILIES = ("entropy_temperature", "token_bias", "state_bias")
#: Tokens a fit uses by default: more text of more kinds carries better to new text (BENCHMARKS.md: 16k beat 8k).
DEFAULT_MAX_TOKENS = 16384
#: Fewer scored tokens than this cannot fit a per-token correction or tell its effect from noise.
MIN_FIT_TOKENS = 256
MIN_VALIDATION_TOKENS = 64
#: One in this many windows is held out to check the fit.
VALIDATION_EVERY = 5

CalibrationInput = str | Sequence[str] | torch.Tensor | Sequence[Window]


class CalibrationError(HemorrhageError):
    """A calibration cannot be fitted, loaded or applied as asked."""


class CalibrationWarning(UserWarning):
    """A fitted calibration does not reduce the KL on held-out windows beyond noise."""


@dataclass
class FitSummary:
    """What the fit saw and what it achieved on the windows it held out."""

    families: list[str]
    fit_tokens: int
    validation_tokens: int
    kl_before: float
    kl_after: float
    kl_difference_error: float  # standard error of the mean per-token (after − before)
    metadata: dict = field(default_factory=dict)

    @property
    def kl_reduction(self) -> float:
        """Fraction of the held-out KL removed (negative: the correction made it worse)."""
        return 1.0 - self.kl_after / self.kl_before if self.kl_before > 0 else 0.0

    @property
    def helps(self) -> bool:
        """The held-out KL fell by more than two standard errors of the paired difference."""
        return self.kl_before - self.kl_after > 2 * self.kl_difference_error

    def verdict(self) -> str:
        figures = (
            f"held-out KL {self.kl_before:.4f} → {self.kl_after:.4f} nats ({self.kl_reduction:+.1%}, "
            f"± {self.kl_difference_error:.4f}) on {self.validation_tokens} tokens"
        )
        if self.kl_before == 0:
            return "the two models agree exactly on the held-out text: the calibration is the identity"
        if self.helps:
            return f"the calibration helps: {figures}"
        return f"the calibration does NOT help beyond noise: {figures}; do not use it"

    def to_dict(self) -> dict:
        return {**asdict(self), "kl_reduction": self.kl_reduction, "helps": self.helps}

    @classmethod
    def from_dict(cls, data: dict) -> FitSummary:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


class DecodingCalibration(LogitsProcessor):
    """Corrects the next-token scores of a modified model so they follow its reference model more closely.

    Use it like any ``LogitsProcessor``: ``model.generate(..., logits_processor=LogitsProcessorList([calibration]))``
    or ``pipeline("text-generation", ...)(prompt, logits_processor=[calibration])``. ``generate`` runs it before
    its own temperature/top-k/top-p warpers. The corrected scores are logits, not normalised log-probabilities:
    beam search should pass ``renormalize_logits=True``, as with any warper.

    :meth:`calibrate_sequence` applies the very same function to whole sequences (for measurement).
    """

    supports_continuous_batching = True

    def __init__(self, parameters: CorrectionParameters, *, summary: FitSummary | None = None):
        parameters.validate()
        self.parameters = parameters
        self.summary = summary
        self._on_device: dict[torch.device, CorrectionParameters] = {}

    def __repr__(self) -> str:
        return f"DecodingCalibration(families={list(self.families)}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self.parameters.vocab_size

    @property
    def families(self) -> tuple[str, ...]:
        return self.parameters.families

    def _parameters_for(self, scores: torch.Tensor) -> CorrectionParameters:
        if scores.shape[-1] != self.vocab_size:
            raise CalibrationError(
                f"this calibration was fitted for a vocabulary of {self.vocab_size} tokens, but the scores have "
                f"{scores.shape[-1]}; fit a calibration for this model"
            )
        if scores.device not in self._on_device:
            self._on_device[scores.device] = self.parameters.map(lambda tensor: tensor.to(scores.device))
        return self._on_device[scores.device]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """One generation step: ``scores[batch, vocab]`` after reading ``input_ids[batch, length]``."""
        return apply_correction(scores, input_ids[:, -1], self._parameters_for(scores))

    def calibrate_sequence(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Whole sequences: ``logits[b, t]`` (predicting token t+1) is corrected as if generated after ``input_ids[b, t]``."""
        if logits.shape[:-1] != input_ids.shape:
            raise CalibrationError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
        return apply_correction(logits, input_ids.to(logits.device), self._parameters_for(logits))

    def is_identity(self) -> bool:
        """All corrections at their identity values (what a fit on two identical models returns)."""
        return self.parameters.is_identity()

    @classmethod
    def fit(
        cls,
        reference: PreTrainedModel,
        modified: PreTrainedModel,
        calibration: CalibrationInput,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        families: Sequence[str] = DEFAULT_FAMILIES,
        window: int = 512,
        stride: int | None = None,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        batch_size: int = 1,
        rank: int = DEFAULT_RANK,
        regularization: float = 1e-4,
        max_iterations: int = 40,
        seed: int = 0,
        metadata: dict | None = None,
        progress: bool = True,
    ) -> DecodingCalibration:
        """Fit a calibration of ``modified`` towards ``reference`` on ``calibration`` text.

        Args:
            calibration: a text, a list of independent texts (these two need ``tokenizer``), a ``[n, length]``
                LongTensor of token ids (e.g. :func:`~hemorrhage_hf.corpus.calibration_windows`), or windows.
            families: corrections to fit, from :data:`~hemorrhage_hf.calibration_ops.FAMILIES`.
            window, stride: tokens per model input, and how far apart inputs start, when ``calibration`` is text.
            max_tokens: at most this many tokens are used, in windows drawn from all over the text (``seed``);
                both models' predictions are kept in fp16 meanwhile, 4 bytes × vocabulary per token (3.2 GB for
                16,384 tokens of a 49k vocabulary).
            rank: rank of the low-rank biases (families ``previous_token`` and ``state_bias``).
            regularization: weight of the squared norm of the per-token tensors.
            metadata: carried into the saved config (what was compared, on which text).

        One window in :data:`VALIDATION_EVERY` is held out; :attr:`summary` holds the KL there with and without
        the correction, and a :class:`CalibrationWarning` is issued when the correction does not help.
        """
        _check_same_vocabulary(reference, modified)
        windows = _spread(_as_windows(calibration, tokenizer, window=window, stride=stride), max_tokens, seed)
        fit_windows, validation_windows = _split(windows)
        description = "calibration: collecting predictions"
        with tqdm(total=len(windows), desc=description, unit="window", disable=not progress) as bar:
            fit_data = _collect(reference, modified, fit_windows, batch_size, bar)
            validation_data = _collect(reference, modified, validation_windows, batch_size, bar)
        parameters = fit_correction(
            fit_data, families, output_embeddings=modified.get_output_embeddings().weight, rank=rank,
            regularization=regularization, max_iterations=max_iterations, seed=seed,
        )
        before, after = kl_before_after(validation_data, parameters)
        difference = (after - before).double()
        summary = FitSummary(
            families=list(parameters.families),
            fit_tokens=len(fit_data),
            validation_tokens=len(validation_data),
            kl_before=before.double().mean().item(),
            kl_after=after.double().mean().item(),
            kl_difference_error=(difference.std() / math.sqrt(len(difference) - 1)).item(),
            metadata=dict(metadata or {}),
        )
        if summary.kl_before > 0 and not summary.helps:
            warnings.warn(summary.verdict(), CalibrationWarning, stacklevel=2)
        return cls(parameters, summary=summary)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``calibration.safetensors`` and ``calibration_config.json`` (each atomically) into the folder."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.parameters.tensors().items()}
        with atomic_path(folder / WEIGHTS_NAME) as temporary:
            save_file(tensors, str(temporary), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "families": list(self.families),
            "rank": self.parameters.rank,
            "fit": self.summary.to_dict() if self.summary is not None else None,
        }
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, vocab_size: int | None = None) -> DecodingCalibration:
        """Load a saved calibration; with ``vocab_size`` (e.g. ``model.config.vocab_size``) check it fits that model."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(directory)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise CalibrationError(f"{folder} is not a saved calibration: {path.name} is missing")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise CalibrationError(f"{config_path} is not valid JSON: {error}") from error
        if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(
                f"{config_path} is not a {FORMAT} v{FORMAT_VERSION} config "
                f"(format {config.get('format')!r}, version {config.get('format_version')!r})"
            )
        saved_vocab = config.get("vocab_size")
        if vocab_size is not None and saved_vocab != vocab_size:
            raise CalibrationError(
                f"the calibration in {folder} was fitted for a vocabulary of {saved_vocab} tokens; this model has "
                f"{vocab_size}"
            )
        try:
            tensors = load_file(str(weights_path))
        except SafetensorError as error:
            raise CalibrationError(f"{weights_path} is not a valid safetensors file: {error}") from error
        known = set(CorrectionParameters.__dataclass_fields__) - {"vocab_size"}
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise CalibrationError(f"{weights_path} holds unknown tensors {unknown}")
        parameters = CorrectionParameters(vocab_size=saved_vocab, **tensors)
        try:
            parameters.validate()
        except ValueError as error:
            raise CalibrationError(f"{weights_path} does not match its config: {error}") from error
        if list(parameters.families) != config.get("families"):
            raise CalibrationError(
                f"{weights_path} holds the families {list(parameters.families)}, its config names {config.get('families')}"
            )
        summary = FitSummary.from_dict(config["fit"]) if config.get("fit") else None
        return cls(parameters, summary=summary)


def _vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _check_same_vocabulary(reference: PreTrainedModel, modified: PreTrainedModel) -> None:
    reference_size, modified_size = _vocab_size(reference), _vocab_size(modified)
    if reference_size != modified_size:
        raise TokenizerMismatchError(
            f"the models score different vocabularies ({reference_size} vs {modified_size} tokens); a calibration "
            "maps one model's scores onto the other's, token by token, so they must share a vocabulary"
        )


def _as_windows(
    calibration: CalibrationInput, tokenizer: PreTrainedTokenizerBase | None, *, window: int, stride: int | None
) -> list[Window]:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise CorpusError(f"calibration token ids must be a [n, length] LongTensor, got {calibration.dtype} "
                              f"{tuple(calibration.shape)}")
        return [w for row in calibration for w in make_windows(row, window=row.shape[0])]
    if isinstance(calibration, str) or (calibration and isinstance(calibration[0], str)):
        if tokenizer is None:
            raise CalibrationError("calibration text needs the tokenizer (tokenizer=...)")
        if isinstance(calibration, str):
            return tokenize_corpus(tokenizer, calibration, window=window, stride=stride)
        documents = tokenize_documents(tokenizer, list(calibration), window=window, stride=stride)
        return [w for document in documents for w in document]
    return list(calibration)


def _spread(windows: list[Window], max_tokens: int | None, seed: int) -> list[Window]:
    """At most ``max_tokens`` scored tokens in windows drawn at seeded random places, kept in text order.

    Consecutive windows of one text share a topic; windows from all over it make a fit that carries to new text.
    """
    if max_tokens is None or sum(w.n_scored for w in windows) <= max_tokens:
        return windows
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, total = [], 0
    for index in order:
        if total >= max_tokens:
            break
        chosen.append(index)
        total += windows[index].n_scored
    return [windows[index] for index in sorted(chosen)]


def _split(windows: list[Window]) -> tuple[list[Window], list[Window]]:
    """Every :data:`VALIDATION_EVERY`-th window is held out, so both parts span the whole text."""
    validation = windows[VALIDATION_EVERY - 1 :: VALIDATION_EVERY] if len(windows) >= VALIDATION_EVERY else windows[-1:]
    held_out = {id(window) for window in validation}
    fit = [window for window in windows if id(window) not in held_out]
    fit_tokens = sum(w.n_scored for w in fit)
    validation_tokens = sum(w.n_scored for w in validation)
    if fit_tokens < MIN_FIT_TOKENS or validation_tokens < MIN_VALIDATION_TOKENS:
        raise CorpusError(
            f"calibration text too short: {len(windows)} window(s) give {fit_tokens} tokens to fit on and "
            f"{validation_tokens} to check on; at least {MIN_FIT_TOKENS} and {MIN_VALIDATION_TOKENS} are needed "
            f"(at least 2 windows; one in {VALIDATION_EVERY} is held out). Pass a longer text or a smaller window."
        )
    return fit, validation


@torch.no_grad()
def _collect(
    reference: PreTrainedModel, modified: PreTrainedModel, windows: list[Window], batch_size: int, bar
) -> CalibrationData:
    parts = []
    for batch in batch_windows(windows, batch_size):
        reference_logits = reference(input_ids=batch.input_ids.to(reference.device), use_cache=False).logits
        modified_logits = modified(input_ids=batch.input_ids.to(modified.device), use_cache=False).logits
        parts.append(
            CalibrationData.from_logits(
                batch.scored(reference_logits), batch.scored(modified_logits), batch.scored(batch.input_ids)
            )
        )
        del reference_logits, modified_logits
        bar.update(len(batch.first_scored))
    return CalibrationData.concatenate(parts)
