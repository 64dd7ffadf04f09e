"""The decoding correction as a ``LogitsProcessor``: it pulls a modified model's next-token scores back towards its
reference model's distribution, learnt once on fit text, and needs no second model at inference. Saved and loaded
like a model (``save_pretrained`` / ``from_pretrained``).

How it is fitted, and on which text it is judged, is :mod:`.fit`; the correction families and their arithmetic are
:mod:`.ops`; the opt-in non-linear family is :mod:`.network`.

Which families earn their cost is measured, not assumed (``bench/bench_correction.py --families-table``). The
default three are cheap and closed-form or convex: ``state_bias``, a low-rank affine correction of the modified
model's final hidden state read from its own scores, does most of the work on quantized models, and an
entropy-dependent temperature and a per-token bias, fitted around it, add a little. Pruning moves the state in ways
no linear map undoes: there the opt-in ``state_network`` family trains a small non-linear map of the state on the
KL over much more text, and is kept only if it helps on documents the fit did not train on.

Example:
    >>> import torch
    >>> from hemorrhage_hf.correction.corrections import CorrectionParameters, TokenBias
    >>> from hemorrhage_hf.correction.processor import DecodingCorrection
    >>> bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    >>> processor = DecodingCorrection(CorrectionParameters(4, [TokenBias(bias)]))
    >>> processor(torch.tensor([[1]]), torch.zeros(1, 4))
    tensor([[0., 0., 5., 0.]])

Fitted on real models (slow, so not run here):
    >>> from transformers import LogitsProcessorList
    >>> from hemorrhage_hf import apply_modification, load_model, python_docs_text
    >>> reference, tokenizer = load_model("default")  # doctest: +SKIP
    >>> modified = apply_modification(reference, "int4-g64")  # doctest: +SKIP
    >>> text = python_docs_text()
    >>> correction = DecodingCorrection.fit(reference, modified, text, tokenizer=tokenizer)  # doctest: +SKIP
    >>> correction.summary.helps  # on Python docs it never read; other text may gain less  # doctest: +SKIP
    True
    >>> correction.save_pretrained("int4-correction")  # doctest: +SKIP
    >>> inputs = tokenizer("The capital of France is", return_tensors="pt")  # doctest: +SKIP
    >>> modified.generate(**inputs, logits_processor=LogitsProcessorList([correction]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor

from ..atomic import atomic_path, atomic_write_text, read_json
from ..errors import CorrectionError
from .corrections import CorrectionParameters

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .fit import FitText

FORMAT = "hemorrhage-hf-decoding-correction"
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
CONFIG_NAME = "correction_config.json"
WEIGHTS_NAME = "correction.safetensors"
#: The config's name before the mitigation was called a correction: such a folder is refused with a clear message.
FORMER_CONFIG_NAME = "calibration_config.json"


class CorrectionWarning(UserWarning):
    """A fitted correction does not reduce the KL on its report share beyond noise, or raises the PPL ratio there."""


@dataclass
class FitSummary:
    """What the fit read, and what the correction did on its report share: documents it never used to fit or
    choose (:mod:`.fit`). What holds there holds for text like the fit text."""

    families: list[str]
    fit_tokens: int
    select_tokens: int
    report_tokens: int
    kl_before: float
    kl_after: float
    kl_difference_error: float  # standard error of the mean per-token (after − before), tokens in text order
    ppl_ratio_before: float
    ppl_ratio_after: float
    documents: list[int] = field(default_factory=list)  # documents in the fit, select and report shares
    sampled_tokens: int = 0  # of fit_tokens, the reference's own text (``NetworkOptions.sampled_tokens``)
    metadata: dict = field(default_factory=dict)
    network: dict | None = None  # the state network's check on the select share, and whether it was kept
    notes: list[str] = field(default_factory=list)  # families the fit left out, and why

    @property
    def kl_reduction(self) -> float:
        """Fraction of the report share's KL removed (negative: the correction made it worse)."""
        return 1.0 - self.kl_after / self.kl_before if self.kl_before > 0 else 0.0

    @property
    def raises_ppl_ratio(self) -> bool:
        """The corrected model's perplexity ratio to the reference rose, and above 1: it predicts the text worse
        than the uncorrected model and than the reference. (A ratio below 1 rising towards 1 is the correction
        doing its job: following the reference.)"""
        return self.ppl_ratio_after > max(self.ppl_ratio_before, 1.0)

    @property
    def helps(self) -> bool:
        """The report share's KL fell by more than two standard errors of the paired difference, and its PPL ratio
        did not rise."""
        return self.kl_before - self.kl_after > 2 * self.kl_difference_error and not self.raises_ppl_ratio

    def verdict(self) -> str:
        if self.kl_before == 0:
            return "the two models agree exactly on the held-out text: the correction is the identity"
        figures = (
            f"held-out KL {self.kl_before:.4f} → {self.kl_after:.4f} nats ({-self.kl_reduction:+.1%}, "
            f"± {self.kl_difference_error:.4f}), PPL ratio {self.ppl_ratio_before:.3f} → {self.ppl_ratio_after:.3f}, "
            f"on {self.report_tokens} tokens of documents the fit never used"
        )
        left_out = "".join(f"; {note}" for note in self.notes)
        if self.helps:
            return f"the correction helps on text like the fit text: {figures}{left_out}"
        why = "it RAISES the PPL ratio" if self.raises_ppl_ratio else "no help beyond noise"
        return f"the correction does NOT help ({why}): {figures}{left_out}; do not use it"

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "kl_reduction": self.kl_reduction,
            "raises_ppl_ratio": self.raises_ppl_ratio,
            "helps": self.helps,
        }

    @classmethod
    def from_dict(cls, data: dict) -> FitSummary:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


class DecodingCorrection(LogitsProcessor):
    """Corrects the next-token scores of a modified model so they follow its reference model more closely.

    Use it like any ``LogitsProcessor``: ``model.generate(..., logits_processor=LogitsProcessorList([correction]))``
    or ``pipeline("text-generation", ...)(prompt, logits_processor=[correction])``. ``generate`` runs it before
    its own temperature/top-k/top-p warpers. The corrected scores are logits, not normalised log-probabilities:
    beam search should pass ``renormalize_logits=True``, as with any warper.

    :meth:`correct_sequence` applies the very same function to whole sequences (for measurement).
    """

    supports_continuous_batching = True

    def __init__(self, parameters: CorrectionParameters, *, summary: FitSummary | None = None):
        parameters.validate()
        self.parameters = parameters
        self.summary = summary
        self._on_device: dict[torch.device, CorrectionParameters] = {}

    def __repr__(self) -> str:
        return f"DecodingCorrection(families={list(self.families)}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self.parameters.vocab_size

    @property
    def families(self) -> tuple[str, ...]:
        return self.parameters.families

    def _parameters_for(self, scores: torch.Tensor) -> CorrectionParameters:
        if scores.shape[-1] != self.vocab_size:
            raise CorrectionError(
                f"this correction was fitted for a vocabulary of {self.vocab_size} tokens, but the scores have "
                f"{scores.shape[-1]}; fit a correction for this model"
            )
        if scores.device not in self._on_device:
            self._on_device[scores.device] = self.parameters.map(lambda tensor: tensor.to(scores.device))
        return self._on_device[scores.device]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """One generation step: ``scores[batch, vocab]`` after reading ``input_ids[batch, length]``."""
        return self._parameters_for(scores).apply(scores, input_ids[:, -1])

    def correct_sequence(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Whole sequences: ``logits[b, t]`` (predicting token t+1) is corrected as if generated after
        ``input_ids[b, t]``."""
        if logits.shape[:-1] != input_ids.shape:
            raise CorrectionError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
        return self._parameters_for(logits).apply(logits, input_ids.to(logits.device))

    def is_identity(self) -> bool:
        """All corrections at their identity values (what a fit on two identical models returns)."""
        return self.parameters.is_identity()

    @classmethod
    def fit(cls, reference: PreTrainedModel, modified: PreTrainedModel, text: FitText, **options) -> DecodingCorrection:
        """Fit a correction of ``modified`` towards ``reference`` on ``text``
        (:func:`~hemorrhage_hf.correction.fit.fit_processor`, which lists the options).

        The text is split by document into fit, select and report shares; :attr:`summary` holds the KL and the PPL
        ratio on the report share with and without the correction, and a :class:`CorrectionWarning` is issued when
        the correction does not help there or raises the PPL ratio.
        """
        from .fit import fit_processor

        return fit_processor(reference, modified, text, **options)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``correction.safetensors`` and ``correction_config.json`` (each atomically) into the folder."""
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
    def from_pretrained(cls, directory: str | Path, *, vocab_size: int | None = None) -> DecodingCorrection:
        """Load a saved correction; with ``vocab_size`` (e.g. ``model.config.vocab_size``) check it fits that model."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(directory)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if (folder / FORMER_CONFIG_NAME).is_file():
            raise CorrectionError(
                f"{folder} holds a processor saved under the former name 'decoding calibration' "
                f"({FORMER_CONFIG_NAME}); fit it again with `hemorrhage-hf correct`"
            )
        missing = f"{folder} is not a saved correction: {{}} is missing"
        config = read_json(config_path, missing=missing.format(CONFIG_NAME), error=CorrectionError)
        if not weights_path.is_file():
            raise CorrectionError(missing.format(WEIGHTS_NAME))
        if config.get("format") != FORMAT or config.get("format_version") not in READABLE_VERSIONS:
            raise CorrectionError(
                f"{config_path} is not a {FORMAT} config this version reads (format {config.get('format')!r}, "
                f"version {config.get('format_version')!r}; readable: {', '.join(map(str, READABLE_VERSIONS))})"
            )
        saved_vocab = config.get("vocab_size")
        if vocab_size is not None and saved_vocab != vocab_size:
            raise CorrectionError(
                f"the correction in {folder} was fitted for a vocabulary of {saved_vocab} tokens; this model has "
                f"{vocab_size}"
            )
        try:
            tensors = load_file(str(weights_path))
        except SafetensorError as error:
            raise CorrectionError(f"{weights_path} is not a valid safetensors file: {error}") from error
        try:
            parameters = CorrectionParameters.from_tensors(saved_vocab, tensors)
            parameters.validate()
        except ValueError as error:
            raise CorrectionError(f"{weights_path} does not match its config: {error}") from error
        if list(parameters.families) != config.get("families"):
            raise CorrectionError(
                f"{weights_path} holds the families {list(parameters.families)}, "
                f"its config names {config.get('families')}"
            )
        summary = FitSummary.from_dict(config["fit"]) if config.get("fit") else None
        return cls(parameters, summary=summary)
