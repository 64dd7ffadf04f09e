"""The one-call entry point shared by the CLI, the `evaluate` metric and the Space: resolve both models (names,
paths or objects), check they tokenize alike, cut the text into windows, and :func:`~hemorrhage_hf.measurement.engine.measure`.

Example:
    >>> from hemorrhage_hf.comparison import MeasureOptions, TextSource, compare
    >>> source = TextSource(max_tokens=1024, window=256)
    >>> report = compare("default", modification="int8", source=source, options=MeasureOptions(progress=False))  # doctest: +SKIP
    >>> report.severity  # doctest: +SKIP
    'none'
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class TextSource:
    """What to measure on, and how to cut it into windows.

    The text is ``texts`` (independent documents, each windowed alone), else ``text`` (named ``label`` in the
    report), else the ``corpus`` (``"python-docs"`` or a file path), cut to ``max_tokens``.

    Example:
        >>> TextSource(text="One sentence. Another one.", window=8).describe()
        'text argument'
    """

    text: str | None = None
    texts: Sequence[str] | None = None
    label: str | None = None
    corpus: str = PYTHON_DOCS
    window: int = 512
    stride: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 2:
            raise CorpusError(f"max_tokens must be at least 2, got {self.max_tokens}")

    def describe(self) -> str:
        """The label the report gives this text."""
        if self.texts is not None:
            return f"{len(self.texts)} texts"
        return self.label or ("text argument" if self.text is not None else self.corpus)

    def windows(self, tokenizer: PreTrainedTokenizerBase) -> list[Window]:
        """The token windows to measure on."""
        if self.texts is not None:
            documents = tokenize_documents(tokenizer, list(self.texts), window=self.window, stride=self.stride)
            return [w for document in documents for w in document]
        text = self.text if self.text is not None else load_corpus(self.corpus)
        return tokenize_corpus(tokenizer, text, window=self.window, stride=self.stride, max_tokens=self.max_tokens)


@dataclass(frozen=True)
class LoadOptions:
    """How models named by a string load (dtype, device map, remote code), so both sides load alike.

    Example:
        >>> LoadOptions(dtype="bf16").dtype
        'bf16'
    """

    dtype: str | torch.dtype = "fp32"
    device_map: str | None = None
    trust_remote_code: bool = False

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


@dataclass(frozen=True)
class MeasureOptions:
    """What :func:`compare` measures and how.

    With ``sequential`` only one model is in memory at a time: the reference runs first into a top-``top_k``
    reference cache (:mod:`hemorrhage_hf.measurement.refcache`), is freed (or, for a modification of a reference
    loaded here, modified in place), then the modified model runs against the cache. Peak memory halves; KL becomes
    the cache's lower bound (stated in the report with k and the tail mass); layer statistics are not available.

    ``modified_variants`` (name → logit transform, e.g. a decoding correction's ``calibrate_sequence``) are measured
    from the same forward passes into ``report.variants``; see :func:`~hemorrhage_hf.measurement.engine.measure`.

    Example:
        >>> MeasureOptions(layers=True, sequential=True)
        Traceback (most recent call last):
        ...
        hemorrhage_hf.errors.HemorrhageError: sequential mode keeps only a top-k cache of the reference: it cannot compare layers
    """

    batch_size: int = 1
    layers: bool = False
    attention: bool = False
    layer_map: Sequence[int] | None = None
    sequential: bool = False
    top_k: int = DEFAULT_TOP_K
    progress: bool = True
    modified_variants: Mapping[str, Callable] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise HemorrhageError(f"batch size must be at least 1, got {self.batch_size}")
        if self.sequential and (self.layers or self.attention):
            raise HemorrhageError("sequential mode keeps only a top-k cache of the reference: it cannot compare layers")

    def engine_options(self, modified_label: str) -> dict:
        """The keyword arguments :func:`~hemorrhage_hf.measurement.engine.measure` takes."""
        return dict(
            description=f"measuring {modified_label}",
            batch_size=self.batch_size,
            layers=self.layers or self.attention,
            attention=self.attention,
            layer_map=self.layer_map,
            progress=self.progress,
            modified_variants=dict(self.modified_variants) if self.modified_variants else None,
        )


def _modify(
    reference: PreTrainedModel,
    modification: str,
    tokenizer: PreTrainedTokenizerBase,
    calibration: CalibrationSettings | None,
    *,
    in_place: bool = False,
    progress: bool = False,
) -> PreTrainedModel:
    spec = parse_spec(modification)
    calibration_ids = (calibration or CalibrationSettings()).windows(tokenizer) if spec.needs_calibration else None
    # With progress on, the modification shows its own labelled bar ("quantizing int4-g64"): seconds to minutes.
    return apply_modification(reference, spec, calibration=calibration_ids, in_place=in_place, progress=progress)


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
    load: LoadOptions | None = None,
    calibration: CalibrationSettings | None = None,
    progress: bool = False,
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load or accept the two models; the modified one is ``modified`` or ``modification`` applied to a copy (with
    ``progress``, under a progress bar named after it)."""
    _check_sources(modified, modification)
    load = load or LoadOptions()
    reference, tokenizer = load.model(reference, tokenizer)
    if tokenizer is None:
        raise HemorrhageError("the reference model object has no name to load its tokenizer from: pass tokenizer=")
    if modification is not None:
        return reference, _modify(reference, modification, tokenizer, calibration, progress=progress), tokenizer
    if not isinstance(modified, str) and modified_tokenizer is None and modified.name_or_path == reference.name_or_path:
        modified_tokenizer = tokenizer  # the same checkpoint's tokenizer: nothing to load or compare
    modified, modified_tokenizer = load.model(modified, modified_tokenizer)
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


def compare(
    reference: ModelLike,
    modified: ModelLike | None = None,
    *,
    modification: str | None = None,
    source: TextSource | None = None,
    load: LoadOptions | None = None,
    options: MeasureOptions | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calibration: CalibrationSettings | None = None,
) -> HemorrhageReport:
    """Measure ``modified`` (or ``modification`` applied to ``reference``) against ``reference`` on ``source``.

    ``source`` defaults to the prose of Python's docs in windows of 512 tokens, ``load`` to fp32 on the CPU,
    ``options`` to logits-level figures of both models held together; ``calibration`` names the tokens a
    modification that looks at activations (Wanda, AWQ) calibrates on.

    Example:
        >>> from hemorrhage_hf import compare
        >>> from hemorrhage_hf.comparison import TextSource
        >>> report = compare("default", modification="int8", source=TextSource(max_tokens=1024))  # doctest: +SKIP
        >>> report.severity  # doctest: +SKIP
        'none'
    """
    source, load, options = source or TextSource(), load or LoadOptions(), options or MeasureOptions()
    _check_sources(modified, modification)
    metadata = {
        "reference": _label(reference),
        "modified": f"{_label(reference)} + {modification}" if modification else _label(modified),
        "modification": modification,
        "window": source.window,
        "stride": source.stride or source.window,
        "max_tokens": source.max_tokens,
        "dtype": str(load.dtype),
    }
    if options.sequential:
        return _compare_sequential(
            reference, modified, modification, tokenizer, source, metadata, options, load, calibration
        )
    reference_model, modified_model, tokenizer = resolve_pair(
        reference,
        modified,
        modification=modification,
        tokenizer=tokenizer,
        load=load,
        calibration=calibration,
        progress=options.progress,
    )
    windows = source.windows(tokenizer)
    metadata.update(corpus=source.describe(), n_windows=len(windows))
    return measure(
        reference_model, modified_model, windows, metadata=metadata, **options.engine_options(metadata["modified"])
    )


def _compare_sequential(
    reference: ModelLike,
    modified: ModelLike | None,
    modification: str | None,
    tokenizer: PreTrainedTokenizerBase | None,
    source: TextSource,
    metadata: dict,
    options: MeasureOptions,
    load: LoadOptions,
    calibration: CalibrationSettings | None,
) -> HemorrhageReport:
    loaded_here = isinstance(reference, str)
    reference_model, tokenizer = load.model(reference, tokenizer)
    windows = source.windows(tokenizer)
    metadata.update(corpus=source.describe(), n_windows=len(windows), sequential=True)
    cache = ReferenceCache.build(
        reference_model,
        windows,
        k=options.top_k,
        batch_size=options.batch_size,
        description={"reference": metadata["reference"]},
        progress=options.progress,
    )
    if modification is not None:
        # A reference this call loaded is nobody else's: modify it in place instead of holding a copy beside it.
        modified_model = _modify(
            reference_model, modification, tokenizer, calibration, in_place=loaded_here, progress=options.progress
        )
        modified_tokenizer = tokenizer
    else:
        del reference_model
        gc.collect()
        modified_model, modified_tokenizer = load.model(modified)
    _check_modified(None, modified_model, tokenizer, modified_tokenizer)
    return measure(cache, modified_model, windows, metadata=metadata, **options.engine_options(metadata["modified"]))
