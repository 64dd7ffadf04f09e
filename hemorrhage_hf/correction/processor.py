"""Decoding calibration: a ``LogitsProcessor`` that pulls a modified model's next-token scores back towards the
reference model's distribution, learnt once on calibration text. At inference it needs no second model.

``DecodingCalibration.fit(reference, modified, text)`` runs both models over the text, stores their next-token
predictions and fits a correction (see :mod:`hemorrhage_hf.correction.ops`) that minimises
KL(P_ref ‖ P_mod-corrected). A fifth of the windows is held out: ``fit`` reports the KL on them with and without
the correction and warns (:class:`CalibrationWarning`) when the correction does not help beyond noise.

Which corrections earn their cost is measured, not assumed: ``bench/bench_calibration.py --families-table`` fits
each family on the same predictions and reports its KL reduction in sample and on held-out text (BENCHMARKS.md,
"Decoding calibration"). The ``state_bias``, a rank-32 affine correction of the modified model's final hidden state
read from its scores and fitted in closed form, does most of the work (int4-g64: 27 % of the KL removed on held-out
text alone, against 3 % for a temperature and 14.5 % for a per-token bias); an entropy-dependent temperature and a
per-token bias, fitted around it, add about a point. Fitted on 16,384 tokens of WikiText-2, the three remove 29 %
of int4-g64's KL on articles the fit never saw, for about 1 % of a generation step.

Pruning moves the state in ways no linear map undoes: on wanda-50 the default removes 5 %. The opt-in
``state_network`` family (:mod:`~hemorrhage_hf.correction.network`) trains a small non-linear map of the state on
the KL, over up to 262,144 tokens of text (it keeps two hidden-sized vectors per token, not logits): on wanda-50 it
removed 19.8 % of the held-out KL (PPL ratio 2.667 → 2.103), for a call of 1.7 % of a generation step
(``generate`` 3–5 % slower), after a fit of about 27 minutes on two CPU cores. It is fitted first and kept only if
it helps on the held-out windows; the other families asked for are then fitted around it and left out, with a note
in :attr:`FitSummary.notes`, if they do not help there too.
When text like the one to calibrate for runs short, ``sampled_tokens`` adds the reference's own samples to the
network's fit (:mod:`~hemorrhage_hf.correction.reference_samples`): per token they did as much as more WikiText-2 on wanda-50.

Example:
    >>> from transformers import LogitsProcessorList
    >>> from hemorrhage_hf import apply_modification, load_model, python_docs_text
    >>> from hemorrhage_hf.correction.processor import DecodingCalibration
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

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from ..atomic import atomic_path, atomic_write_text
from ..corpus import Window, make_windows, tokenize_corpus, tokenize_documents
from ..errors import CorpusError, HemorrhageError, TokenizerMismatchError
from ..measurement.engine import batch_windows
from ..measurement.statistics import block_standard_error
from .network import (
    DEFAULT_EPOCHS,
    DEFAULT_NETWORK_RANK,
    DEFAULT_NETWORK_WIDTH,
    OutputHead,
    StateData,
    fit_state_network,
    read_tokens,
    vocabulary_tensors,
)
from .ops import (
    DEFAULT_RANK,
    CalibrationData,
    CorrectionParameters,
    apply_correction,
    fit_correction,
    kl_before_after,
    state_network_term,
)
from .reference_samples import sample_windows

FORMAT = "hemorrhage-hf-decoding-calibration"
FORMAT_VERSION = 3  # 2: the state bias gained its offset; 3: the state network (a v2 file reads as v3)
READABLE_VERSIONS = (2, 3)
CONFIG_NAME = "calibration_config.json"
WEIGHTS_NAME = "calibration.safetensors"

DEFAULT_FAMILIES = ("entropy_temperature", "token_bias", "state_bias")
#: Tokens a fit uses by default: more text of more kinds carries better to new text (BENCHMARKS.md: 16k beat 8k).
DEFAULT_MAX_TOKENS = 16384
#: Tokens a fit with the ``state_network`` uses by default: the network learns the fit text unless it sees a great
#: deal of it (SmolLM2 wanda-50, held out, a full-width network: 16.4 % of the KL removed after 131k tokens, 22.0 %
#: after 262k; BENCHMARKS.md).
NETWORK_MAX_TOKENS = 262144
#: With the ``state_network``, the other families still fit on logits (4 bytes × vocabulary per prediction): they
#: keep them for this many tokens of the text, spread over it; the rest is kept as states only.
LOGIT_MAX_TOKENS = DEFAULT_MAX_TOKENS
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
    kl_difference_error: float  # batch-means standard error of the mean per-token (after − before)
    sampled_tokens: int = 0  # of fit_tokens, the reference's own text (``fit(sampled_tokens=...)``)
    metadata: dict = field(default_factory=dict)
    network: dict | None = None  # the state network's own held-out check (NetworkFit.to_dict), and whether it was kept
    notes: list[str] = field(default_factory=list)  # families the fit left out, and why

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
        left_out = "".join(f"; {note}" for note in self.notes)
        if self.helps:
            return f"the calibration helps: {figures}{left_out}"
        return f"the calibration does NOT help beyond noise: {figures}{left_out}; do not use it"

    def to_dict(self) -> dict:
        return {**asdict(self), "kl_reduction": self.kl_reduction, "helps": self.helps}

    @classmethod
    def from_dict(cls, data: dict) -> FitSummary:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


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
        max_tokens: int | None = None,
        batch_size: int = 1,
        rank: int = DEFAULT_RANK,
        regularization: float = 1e-4,
        max_iterations: int = 40,
        network_rank: int = DEFAULT_NETWORK_RANK,
        network_width: int = DEFAULT_NETWORK_WIDTH,
        network_epochs: int = DEFAULT_EPOCHS,
        network_write_rank: int | None = None,
        sampled_tokens: int = 0,
        seed: int = 0,
        metadata: dict | None = None,
        progress: bool = True,
    ) -> DecodingCalibration:
        """Fit a calibration of ``modified`` towards ``reference`` on ``calibration`` text.

        Args:
            calibration: a text, a list of independent texts (these two need ``tokenizer``), a ``[n, length]``
                LongTensor of token ids (e.g. :func:`~hemorrhage_hf.corpus.calibration_windows`), or windows.
            families: corrections to fit, from :data:`~hemorrhage_hf.correction.ops.FAMILIES`.
            window, stride: tokens per model input, and how far apart inputs start, when ``calibration`` is text.
            max_tokens: at most this many tokens are used, in windows drawn from all over the text (``seed``);
                by default :data:`DEFAULT_MAX_TOKENS`, or :data:`NETWORK_MAX_TOKENS` with the ``state_network``.
                Both models' predictions are kept in fp16 for the families fitted on logits, 4 bytes × vocabulary
                per token (3.2 GB for 16,384 tokens of a 49k vocabulary); with the ``state_network`` only
                :data:`LOGIT_MAX_TOKENS` of them are, the rest as 2 × hidden fp32 numbers per token.
            rank: rank of the low-rank biases (families ``previous_token`` and ``state_bias``).
            regularization: weight of the squared norm of the per-token tensors.
            network_rank, network_width, network_epochs: the ``state_network``'s bottleneck, hidden units and
                passes over the text (:mod:`~hemorrhage_hf.correction.network`).
            network_write_rank: after training, cut the ``state_network``'s write to this many directions (at
                most ``network_rank``): the processor's cost per generation step scales with it.
            sampled_tokens: this many tokens of the reference's own text, sampled after prompts cut from the
                calibration text (:func:`~hemorrhage_hf.correction.reference_samples.sample_windows`), are added to the
                ``state_network``'s fit; the held-out windows stay calibration text.
            metadata: carried into the saved config (what was compared, on which text).

        One window in :data:`VALIDATION_EVERY` is held out; :attr:`summary` holds the KL there with and without
        the correction, and a :class:`CalibrationWarning` is issued when the correction does not help. The
        ``state_network`` is fitted first, and kept only if it helps on the held-out windows by itself; the other
        families are then fitted on the scores it corrected.
        """
        _check_same_vocabulary(reference, modified)
        families = tuple(families)
        with_network = "state_network" in families
        if sampled_tokens < 0:
            raise CalibrationError(f"sampled_tokens must be 0 or more, got {sampled_tokens}")
        if sampled_tokens and not with_network:
            raise CalibrationError(
                "sampled_tokens adds text to the state_network's fit; add state_network to the families"
            )
        if max_tokens is None:
            max_tokens = NETWORK_MAX_TOKENS if with_network else DEFAULT_MAX_TOKENS
        windows = _spread(_as_windows(calibration, tokenizer, window=window, stride=stride), max_tokens, seed)
        other_families = [family for family in families if family != "state_network"]
        fit_windows, fit_states_only, validation_windows = _plan(windows, with_network, bool(other_families), seed)
        samples = (
            sample_windows(
                reference,
                fit_windows + fit_states_only,
                tokens=sampled_tokens,
                window=window,
                seed=seed,
                progress=progress,
            )
            if sampled_tokens
            else []
        )
        fit_states_only += samples
        head = OutputHead.of(modified) if with_network else None
        with tqdm(
            total=len(windows) + len(samples),
            desc="calibration: collecting predictions",
            unit="window",
            disable=not progress,
        ) as bar:
            fit_data, fit_states = _collect(reference, modified, fit_windows, batch_size, bar, head=head)
            _, more_fit_states = _collect(
                reference, modified, fit_states_only, batch_size, bar, head=head, keep_logits=False
            )
            validation_data, validation_states = _collect(
                reference, modified, validation_windows, batch_size, bar, head=head
            )
        network_tensors, network_summary = {}, None
        if with_network:
            read_ids = read_tokens(
                _token_counts(windows, _vocab_size(modified)),
                _special_ids(modified),
                hidden_size=head.weight.shape[1],
                seed=seed,
            )
            network_tensors, network_summary = _fit_network(
                _join(fit_states, more_fit_states),
                validation_states,
                head,
                read_ids,
                rank=network_rank,
                width=network_width,
                epochs=network_epochs,
                write_rank=network_write_rank,
                seed=seed,
                progress=progress,
            )
        parameters = CorrectionParameters(vocab_size=_vocab_size(modified))
        notes = [] if network_summary is None or network_summary["kept"] else [_network_left_out(network_summary)]
        if other_families:
            network_only = replace(parameters, **network_tensors)
            if network_tensors:  # the other families fit on the scores the network corrected
                fit_data = fit_data.with_modified_logits(
                    lambda logits: logits + state_network_term(logits, network_only)
                )
            parameters = fit_correction(
                fit_data,
                other_families,
                output_embeddings=modified.get_output_embeddings().weight,
                rank=rank,
                regularization=regularization,
                max_iterations=max_iterations,
                seed=seed,
            )
            parameters = replace(parameters, **network_tensors)
            if network_tensors:
                parameters, note = _keep_if_helping(parameters, network_only, validation_data, other_families)
                notes += [note] if note else []
        else:
            parameters = replace(parameters, **network_tensors)
        before, after = kl_before_after(validation_data, parameters)
        difference = (after - before).double()
        summary = FitSummary(
            families=list(parameters.families),
            fit_tokens=sum(window.n_scored for window in fit_windows + fit_states_only),
            sampled_tokens=sum(window.n_scored for window in samples),
            validation_tokens=len(validation_data),
            kl_before=before.double().mean().item(),
            kl_after=after.double().mean().item(),
            kl_difference_error=block_standard_error(difference.numpy()),
            metadata=dict(metadata or {}),
            network=network_summary,
            notes=notes,
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
        if config.get("format") != FORMAT or config.get("format_version") not in READABLE_VERSIONS:
            raise CalibrationError(
                f"{config_path} is not a {FORMAT} config this version reads (format {config.get('format')!r}, "
                f"version {config.get('format_version')!r}; readable: {', '.join(map(str, READABLE_VERSIONS))})"
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
            raise CorpusError(
                f"calibration token ids must be a [n, length] LongTensor, got {calibration.dtype} "
                f"{tuple(calibration.shape)}"
            )
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


def _plan(
    windows: list[Window], with_network: bool, with_logit_families: bool, seed: int
) -> tuple[list[Window], list[Window], list[Window]]:
    """The windows to fit on with logits kept, to fit on as states only (the state network's extra text), and to
    hold out.

    With the state network, logits are kept for a spread share of the fit windows (:data:`LOGIT_MAX_TOKENS`, none
    without other families), for the families fitted on them; the held-out windows stay as many as without it, and
    the rest of the text goes to the network's fit.
    """
    fit_windows, validation_windows = _split(windows)
    if not with_network:
        return fit_windows, [], validation_windows
    validation_budget = LOGIT_MAX_TOKENS // VALIDATION_EVERY
    validation_windows, more_fit = _divide(validation_windows, validation_budget, seed)
    logit_budget = LOGIT_MAX_TOKENS - validation_budget if with_logit_families else 0
    fit_windows, fit_states_only = _divide(fit_windows + more_fit, logit_budget, seed)
    return fit_windows, fit_states_only, validation_windows


def _fit_network(
    fit: StateData, validation: StateData, head: OutputHead, read_ids: torch.Tensor, **options
) -> tuple[dict[str, torch.Tensor], dict]:
    """The state network's tensors in vocabulary space (none if it did not help on ``validation``), and its summary."""
    network_fit = fit_state_network(fit, validation, head, **options)
    kept = network_fit.helps or network_fit.epochs == 0  # untrained: the exact identity of equal models
    summary = {**network_fit.to_dict(), "kept": kept}
    if not kept:
        return {}, summary
    tensors = vocabulary_tensors(network_fit.network, head, read_ids)
    return {name: tensor.cpu() for name, tensor in tensors.items()}, summary  # where the other families fit


def _network_left_out(network: dict) -> str:
    return (
        f"the state_network was left out: on its {network['validation_tokens']} held-out tokens it took the KL "
        f"from {network['kl_before']:.4f} to {network['kl_after']:.4f} (± {network['kl_difference_error']:.4f}), "
        "no help beyond noise (more text helps it)"
    )


def _keep_if_helping(
    parameters: CorrectionParameters,
    network_only: CorrectionParameters,
    validation: CalibrationData,
    families: list[str],
) -> tuple[CorrectionParameters, str | None]:
    """``parameters`` if the families fitted around the network help on the held-out windows beyond noise, else the
    network alone and a note why (on SmolLM2 wanda-50 they made the network's held-out KL worse; BENCHMARKS.md)."""
    _, alone = kl_before_after(validation, network_only)
    _, together = kl_before_after(validation, parameters)
    difference = (together - alone).double()
    error = block_standard_error(difference.numpy())
    if not difference.any() or -difference.mean().item() > 2 * error:  # all zero: equal models, nothing to choose
        return parameters, None
    return network_only, (
        f"left out {', '.join(families)}: fitted around the state_network they took its "
        f"held-out KL from {alone.double().mean():.4f} to {together.double().mean():.4f} "
        f"(± {error:.4f}), no help beyond noise"
    )


def _token_counts(windows: list[Window], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.cat([window.input_ids for window in windows]), minlength=vocab_size)[:vocab_size]


def _special_ids(model: PreTrainedModel) -> set[int]:
    """Token ids generation may ban or force (beginning, end, padding), from the model's configs."""
    ids = set()
    for config in (model.config, getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, name, None)
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return {int(token) for token in ids if 0 <= int(token) < _vocab_size(model)}


def _divide(windows: list[Window], budget: int, seed: int) -> tuple[list[Window], list[Window]]:
    """About ``budget`` tokens of ``windows`` drawn from all over them (:func:`_spread`), and the rest."""
    chosen = _spread(windows, budget, seed)
    taken = {id(window) for window in chosen}
    return chosen, [window for window in windows if id(window) not in taken]


def _join(*parts: StateData | None) -> StateData:
    return StateData.concatenate([part for part in parts if part is not None])


@contextlib.contextmanager
def _head_inputs(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """The final hidden states the output head reads during the ``with`` block, one tensor per forward pass."""
    captured: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        yield captured
    finally:
        handle.remove()


def _check_plain_head(states: torch.Tensor, logits: torch.Tensor, head: OutputHead) -> None:
    """The state network corrects scores as ``states @ Eᵀ + b``: a model that changes its scores after the head
    (soft-capping, scaling) is refused rather than calibrated wrongly. The tolerance allows for the scores' own
    rounding: a bfloat16 model's are rounded to 8 bits (a 1e-3 tolerance refused every such model)."""
    expected = torch.addmm(head.bias, states[:8].float(), head.weight.T)
    tolerance = max(1e-3, 2 * torch.finfo(logits.dtype).eps)
    if not torch.allclose(expected, logits[:8].float(), rtol=tolerance, atol=tolerance * logits[:8].abs().max().item()):
        raise CalibrationError(
            "the state_network family needs scores that are the output head applied to the final hidden state; "
            "this model changes them after its head (logit soft-capping or scaling?). Leave state_network out."
        )


@torch.no_grad()
def _collect(
    reference: PreTrainedModel,
    modified: PreTrainedModel,
    windows: list[Window],
    batch_size: int,
    bar,
    *,
    head: OutputHead | None,
    keep_logits: bool = True,
) -> tuple[CalibrationData | None, StateData | None]:
    """Both models' predictions on ``windows``: their fp16 logits (``keep_logits``) and, given the modified model's
    ``head``, the states the state network fits on."""
    logit_parts = []
    states_kept = (
        StateData.empty(sum(window.n_scored for window in windows), head.weight.shape[1], head.weight.device)
        if head is not None and windows
        else None
    )
    states_written = 0
    for batch in batch_windows(windows, batch_size):
        reference_logits = reference(input_ids=batch.input_ids.to(reference.device), use_cache=False).logits
        with _head_inputs(modified) as states:
            modified_logits = modified(input_ids=batch.input_ids.to(modified.device), use_cache=False).logits
        if keep_logits:
            logit_parts.append(
                CalibrationData.from_logits(
                    batch.scored(reference_logits), batch.scored(modified_logits), batch.scored(batch.input_ids)
                )
            )
        if head is not None:
            scored_states = batch.scored(states[-1]).to(head.weight.device)
            scored_modified = batch.scored(modified_logits)
            if not states_written:
                _check_plain_head(scored_states, scored_modified.to(head.weight.device), head)
            part = StateData.from_predictions(
                batch.scored(reference_logits).to(head.weight.device),
                scored_modified.to(head.weight.device),
                scored_states,
                head,
            )
            states_kept.write(states_written, part)
            states_written += len(part)
        del reference_logits, modified_logits, states
        bar.update(len(batch.first_scored))
    return CalibrationData.concatenate(logit_parts) if logit_parts else None, states_kept
