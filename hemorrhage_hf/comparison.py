"""The one-call entry point shared by the CLI, the `evaluate` metric and the Space: resolve both models (names,
paths or objects), check they tokenize alike, cut the text into windows, and :func:`~hemorrhage_hf.measurement.engine.measure`.

Example:
    >>> from hemorrhage_hf.comparison import compare
    >>> report = compare("default", modification="int8", max_tokens=1024, window=256)  # doctest: +SKIP
    >>> report.severity  # doctest: +SKIP
    'none'
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .corpus import PYTHON_DOCS, Window, load_corpus, tokenize_corpus, tokenize_documents
from .errors import CorpusError, HemorrhageError, TokenizerMismatchError
from .measurement.engine import measure
from .measurement.refcache import DEFAULT_TOP_K, ReferenceCache
from .measurement.report import HemorrhageReport
from .models import DEFAULT_MODEL, DEFAULT_MODEL_LABEL, assert_same_tokenizer, load_model, load_tokenizer
from .modify import apply_modification, parse_spec
from .modify.calibration import CalibrationSettings

ModelLike = str | PreTrainedModel


def _label(model: ModelLike) -> str:
    if isinstance(model, str):
        return DEFAULT_MODEL_LABEL if model == DEFAULT_MODEL else model
    return getattr(model, "name_or_path", None) or type(model).__name__


class ModelLoader:
    """Loads models by name with one set of options (dtype, device map, remote code), so both sides load alike."""

    def __init__(
        self, *, dtype: str | torch.dtype = "fp32", device_map: str | None = None, trust_remote_code: bool = False
    ):
        self.dtype, self.device_map, self.trust_remote_code = dtype, device_map, trust_remote_code

    def model(
        self, model: ModelLike, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
        """(model, its tokenizer); for a model object, the given tokenizer, else one loaded from its name if it has one."""
        if isinstance(model, str):
            return load_model(
                model, dtype=self.dtype, device_map=self.device_map, trust_remote_code=self.trust_remote_code
            )
        if tokenizer is None and model.name_or_path:
            tokenizer = load_tokenizer(model.name_or_path, trust_remote_code=self.trust_remote_code)
        return model, tokenizer


def _modify(
    reference: PreTrainedModel,
    modification: str,
    tokenizer: PreTrainedTokenizerBase,
    calibration: CalibrationSettings | None,
    *,
    in_place: bool = False,
) -> PreTrainedModel:
    spec = parse_spec(modification)
    calibration_ids = (calibration or CalibrationSettings()).windows(tokenizer) if spec.needs_calibration else None
    return apply_modification(reference, modification, calibration=calibration_ids, in_place=in_place)


def _check_modified(
    reference: PreTrainedModel | None,
    modified: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    modified_tokenizer: PreTrainedTokenizerBase | None,
) -> None:
    if modified_tokenizer is not None and modified_tokenizer is not tokenizer:
        assert_same_tokenizer(tokenizer, modified_tokenizer)
    for role, model in (("reference", reference), ("modified", modified)):
        if model is not None:
            _check_vocabulary(role, model, tokenizer)


def resolve_pair(
    reference: ModelLike,
    modified: ModelLike | None = None,
    *,
    modification: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    modified_tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: str | torch.dtype = "fp32",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    calibration: CalibrationSettings | None = None,
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load or accept the two models; the modified one is ``modified`` or ``modification`` applied to a copy."""
    _check_sources(modified, modification)
    loader = ModelLoader(dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    reference, tokenizer = loader.model(reference, tokenizer)
    if tokenizer is None:
        raise HemorrhageError("the reference model object has no name to load its tokenizer from: pass tokenizer=")
    if modification is not None:
        return reference, _modify(reference, modification, tokenizer, calibration), tokenizer
    if not isinstance(modified, str) and modified_tokenizer is None and modified.name_or_path == reference.name_or_path:
        modified_tokenizer = tokenizer  # the same checkpoint's tokenizer: nothing to load or compare
    modified, modified_tokenizer = loader.model(modified, modified_tokenizer)
    _check_modified(reference, modified, tokenizer, modified_tokenizer)
    return reference, modified, tokenizer


def _check_sources(modified: ModelLike | None, modification: str | None) -> None:
    if (modified is None) == (modification is None):
        raise HemorrhageError("give exactly one of a modified model or a modification spec")
    if modification is not None:
        parse_spec(modification)  # reject a bad spec before spending seconds loading a model


def _check_vocabulary(role: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Token ids past a model's embedding table would crash deep inside the forward pass; refuse them here."""
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise TokenizerMismatchError(
            f"the tokenizer has {len(tokenizer)} tokens but the {role} model embeds only {n_embeddings}: "
            "they do not belong together"
        )


def _windows(
    tokenizer: PreTrainedTokenizerBase,
    *,
    texts: Sequence[str] | None,
    text: str | None,
    text_label: str | None,
    corpus: str,
    window: int,
    stride: int | None,
    max_tokens: int | None,
) -> tuple[list[Window], str]:
    """The token windows to measure on, and a label for the report."""
    if texts is not None:
        documents = tokenize_documents(tokenizer, list(texts), window=window, stride=stride)
        return [w for document in documents for w in document], f"{len(texts)} texts"
    label = text_label or ("text argument" if text is not None else corpus)
    text = text if text is not None else load_corpus(corpus)
    return tokenize_corpus(tokenizer, text, window=window, stride=stride, max_tokens=max_tokens), label


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
    device_map: str | None = None,
    trust_remote_code: bool = False,
    calibration: CalibrationSettings | None = None,
    sequential: bool = False,
    top_k: int = DEFAULT_TOP_K,
    progress: bool = True,
    modified_variants: dict | None = None,
) -> HemorrhageReport:
    """Measure ``modified`` (or ``modification`` applied to ``reference``) against ``reference``.

    The text is ``texts`` (independent documents, each windowed alone), else ``text`` (named ``text_label`` in the
    report), else the ``corpus`` (``"python-docs"`` or a file path) cut to ``max_tokens``.

    With ``sequential`` only one model is in memory at a time: the reference runs first into a top-``top_k``
    reference cache (:mod:`hemorrhage_hf.measurement.refcache`), is freed (or, for a modification of a reference loaded here,
    modified in place), then the modified model runs against the cache. Peak memory halves; KL becomes the cache's
    lower bound (stated in the report with k and the tail mass); layer statistics are not available.

    ``modified_variants`` (name → logit transform, e.g. a decoding calibration's ``calibrate_sequence``) are measured
    from the same forward passes into ``report.variants``; see :func:`~hemorrhage_hf.measurement.engine.measure`.
    """
    if batch_size < 1:
        raise HemorrhageError(f"batch size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise CorpusError(f"max_tokens must be at least 2, got {max_tokens}")
    if sequential and (layers or attention):
        raise HemorrhageError("sequential mode keeps only a top-k cache of the reference: it cannot compare layers")
    _check_sources(modified, modification)
    text_options = dict(
        texts=texts,
        text=text,
        text_label=text_label,
        corpus=corpus,
        window=window,
        stride=stride,
        max_tokens=max_tokens,
    )
    metadata = {
        "reference": _label(reference),
        "modified": f"{_label(reference)} + {modification}" if modification else _label(modified),
        "modification": modification,
        "window": window,
        "stride": stride or window,
        "max_tokens": max_tokens,
        "dtype": str(dtype),
    }
    measure_options = dict(
        batch_size=batch_size,
        layers=layers,
        attention=attention,
        layer_map=layer_map,
        progress=progress,
        modified_variants=modified_variants,
    )
    if sequential:
        return _compare_sequential(
            reference,
            modified,
            modification,
            tokenizer,
            text_options,
            metadata,
            measure_options,
            ModelLoader(dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code),
            calibration,
            top_k,
        )
    reference_model, modified_model, tokenizer = resolve_pair(
        reference,
        modified,
        modification=modification,
        tokenizer=tokenizer,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        calibration=calibration,
    )
    windows, metadata["corpus"] = _windows(tokenizer, **text_options)
    metadata["n_windows"] = len(windows)
    return measure(reference_model, modified_model, windows, metadata=metadata, **measure_options)


def _compare_sequential(
    reference: ModelLike,
    modified: ModelLike | None,
    modification: str | None,
    tokenizer: PreTrainedTokenizerBase | None,
    text_options: dict,
    metadata: dict,
    measure_options: dict,
    loader: ModelLoader,
    calibration: CalibrationSettings | None,
    top_k: int,
) -> HemorrhageReport:
    loaded_here = isinstance(reference, str)
    reference_model, tokenizer = loader.model(reference, tokenizer)
    windows, metadata["corpus"] = _windows(tokenizer, **text_options)
    metadata["n_windows"] = len(windows)
    metadata["sequential"] = True
    cache = ReferenceCache.build(
        reference_model,
        windows,
        k=top_k,
        batch_size=measure_options["batch_size"],
        description={"reference": metadata["reference"]},
        progress=measure_options["progress"],
    )
    if modification is not None:
        # A reference this call loaded is nobody else's: modify it in place instead of holding a copy beside it.
        modified_model = _modify(reference_model, modification, tokenizer, calibration, in_place=loaded_here)
        modified_tokenizer = tokenizer
    else:
        del reference_model
        gc.collect()
        modified_model, modified_tokenizer = loader.model(modified)
    _check_modified(None, modified_model, tokenizer, modified_tokenizer)
    return measure(cache, modified_model, windows, metadata=metadata, **measure_options)
