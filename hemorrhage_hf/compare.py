"""The one-call entry point shared by the CLI, the `evaluate` metric and the Space: resolve both models (names,
paths or objects), check they tokenize alike, cut the text into windows, and :func:`~hemorrhage_hf.measure.measure`.

Example:
    >>> from hemorrhage_hf.compare import compare
    >>> report = compare("default", modification="int8", max_tokens=1024, window=256)  # doctest: +SKIP
    >>> report.severity  # doctest: +SKIP
    'none'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .corpus import PYTHON_DOCS, calibration_windows, load_corpus, tokenize_corpus, tokenize_documents
from .errors import CorpusError, HemorrhageError, TokenizerMismatchError
from .measure import measure
from .models import DEFAULT_MODEL, DEFAULT_MODEL_LABEL, assert_same_tokenizer, load_model, load_tokenizer
from .modify import apply_modification, parse_spec
from .report import HemorrhageReport

ModelLike = str | PreTrainedModel


@dataclass
class CalibrationSettings:
    """Where calibration tokens come from for modifications that need them (Wanda, AWQ-style scaling...)."""

    text_source: str = PYTHON_DOCS
    n_sequences: int = 16
    seq_len: int = 512
    seed: int = 0

    def windows(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """The ``[n_sequences, seq_len]`` calibration token ids these settings name."""
        return calibration_windows(
            tokenizer, load_corpus(self.text_source), n_sequences=self.n_sequences, seq_len=self.seq_len, seed=self.seed
        )


def _label(model: ModelLike) -> str:
    if isinstance(model, str):
        return DEFAULT_MODEL_LABEL if model == DEFAULT_MODEL else model
    return getattr(model, "name_or_path", None) or type(model).__name__


def resolve_pair(
    reference: ModelLike,
    modified: ModelLike | None = None,
    *,
    modification: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    modified_tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: str | torch.dtype = "fp32",
    trust_remote_code: bool = False,
    calibration: CalibrationSettings | None = None,
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load or accept the two models; the modified one is ``modified`` or ``modification`` applied to a copy."""
    if (modified is None) == (modification is None):
        raise HemorrhageError("give exactly one of a modified model or a modification spec")
    if modification is not None:
        parse_spec(modification)  # reject a bad spec before spending seconds loading a model
    if isinstance(reference, str):
        reference, tokenizer = load_model(reference, dtype=dtype, trust_remote_code=trust_remote_code)
    elif tokenizer is None:
        tokenizer = load_tokenizer(reference.name_or_path, trust_remote_code=trust_remote_code)
    if modification is not None:
        spec = parse_spec(modification)
        calibration_ids = (calibration or CalibrationSettings()).windows(tokenizer) if spec.needs_calibration else None
        return reference, apply_modification(reference, modification, calibration=calibration_ids), tokenizer
    if isinstance(modified, str):
        modified, modified_tokenizer = load_model(modified, dtype=dtype, trust_remote_code=trust_remote_code)
    elif modified_tokenizer is None and modified.name_or_path and modified.name_or_path != reference.name_or_path:
        modified_tokenizer = load_tokenizer(modified.name_or_path, trust_remote_code=trust_remote_code)
    if modified_tokenizer is not None:
        assert_same_tokenizer(tokenizer, modified_tokenizer)
    for role, model in (("reference", reference), ("modified", modified)):
        _check_vocabulary(role, model, tokenizer)
    return reference, modified, tokenizer


def _check_vocabulary(role: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Token ids past a model's embedding table would crash deep inside the forward pass; refuse them here."""
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise TokenizerMismatchError(
            f"the tokenizer has {len(tokenizer)} tokens but the {role} model embeds only {n_embeddings}: "
            "they do not belong together"
        )


def compare(
    reference: ModelLike,
    modified: ModelLike | None = None,
    *,
    modification: str | None = None,
    text: str | None = None,
    texts: Sequence[str] | None = None,
    text_label: str | None = None,
    corpus: str = PYTHON_DOCS,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    layers: bool = False,
    attention: bool = False,
    layer_map: Sequence[int] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: str | torch.dtype = "fp32",
    trust_remote_code: bool = False,
    calibration: CalibrationSettings | None = None,
    progress: bool = True,
) -> HemorrhageReport:
    """Measure ``modified`` (or ``modification`` applied to ``reference``) against ``reference``.

    The text is ``texts`` (independent documents, each windowed alone), else ``text`` (named ``text_label`` in the
    report), else the ``corpus`` (``"python-docs"`` or a file path) cut to ``max_tokens``.
    """
    if batch_size < 1:
        raise HemorrhageError(f"batch size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise CorpusError(f"max_tokens must be at least 2, got {max_tokens}")
    reference_model, modified_model, tokenizer = resolve_pair(
        reference,
        modified,
        modification=modification,
        tokenizer=tokenizer,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        calibration=calibration,
    )
    if texts is not None:
        windows = [w for document in tokenize_documents(tokenizer, list(texts), window=window, stride=stride) for w in document]
        corpus_label = f"{len(texts)} texts"
    else:
        corpus_label = text_label or ("text argument" if text is not None else corpus)
        text = text if text is not None else load_corpus(corpus)
        windows = tokenize_corpus(tokenizer, text, window=window, stride=stride, max_tokens=max_tokens)
    metadata = {
        "reference": _label(reference),
        "modified": f"{_label(reference)} + {modification}" if modification else _label(modified),
        "modification": modification,
        "corpus": corpus_label,
        "window": window,
        "stride": stride or window,
        "max_tokens": max_tokens,
        "n_windows": len(windows),
        "dtype": str(dtype),
    }
    return measure(
        reference_model,
        modified_model,
        windows,
        batch_size=batch_size,
        layers=layers,
        attention=attention,
        layer_map=layer_map,
        progress=progress,
        metadata=metadata,
    )
