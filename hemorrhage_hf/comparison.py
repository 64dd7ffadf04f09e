"""The one-call entry point shared by the CLI, the `evaluate` metric and the Space: resolve both models (names,
paths or objects), check they tokenize alike, cut the text into windows, and
:func:`~hemorrhage_hf.measurement.engine.measure`.

Example:
    >>> from hemorrhage_hf.comparison import MeasureOptions, TextSource, compare
    >>> source = TextSource(max_tokens=1024, window=256)
    >>> options = MeasureOptions(progress=False)
    >>> report = compare("default", modification="int8", source=source, options=options)  # doctest: +SKIP
    >>> report.severity  # doctest: +SKIP
    'none'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .corpus import (
    LLAMACPP_SCORING,
    PYTHON_DOCS,
    SLIDING_SCORING,
    Window,
    added_bos_id,
    load_corpus,
    tokenize_corpus,
    tokenize_documents,
)
from .errors import CorpusError, HemorrhageError, ModificationError, TokenizerMismatchError
from .llamacpp.engine import ENGINE_NAME, ENGINES, TORCH_ENGINE, LlamaCppModel, is_gguf, load_llamacpp_model
from .measurement.engine import LogitsModel, is_logits_model, measure
from .measurement.memory import large_blocks_returned, release_freed_memory
from .measurement.refstore import build_reference_file
from .measurement.report import HemorrhageReport
from .models import assert_same_tokenizer, load_model, load_tokenizer, model_label
from .modify import apply_modification, describe_model, parse_spec
from .modify.calibration import CalibrationSettings

ModelLike = str | PreTrainedModel | LogitsModel


def _label(model: ModelLike) -> str:
    if isinstance(model, str):
        return model_label(model)
    return getattr(model, "name_or_path", None) or type(model).__name__


@dataclass(frozen=True)
class TextSource:
    """What to measure on, and how to cut it into windows.

    The text is ``texts`` (independent documents, each windowed alone), else ``text`` (named ``label`` in the
    report), else the ``corpus`` (``"python-docs"`` or a file path), from its token ``skip_tokens`` on (text held out
    from an earlier measurement), cut to ``max_tokens``. ``scoring="llama.cpp"`` cuts and scores it as llama.cpp's
    ``perplexity`` does (:func:`~hemorrhage_hf.corpus.llamacpp_chunks`).

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
    scoring: str = SLIDING_SCORING
    skip_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 2:
            raise CorpusError(f"max_tokens must be at least 2, got {self.max_tokens}")
        if self.texts is not None and self.scoring != SLIDING_SCORING:
            raise CorpusError("llama.cpp scoring cuts one long text into chunks; give one text, not several")
        if self.texts is not None and self.skip_tokens:
            raise CorpusError("skip_tokens skips into one long text; give one text, not several")

    def describe(self) -> str:
        """The label the report gives this text."""
        if self.texts is not None:
            return f"{len(self.texts)} texts"
        return self.label or ("text argument" if self.text is not None else self.corpus)

    def resolved_texts(self) -> list[str]:
        """The texts the windows are cut from (the corpus read from disk where that is the source)."""
        if self.texts is not None:
            return list(self.texts)
        return [self.text if self.text is not None else load_corpus(self.corpus)]

    def calibration_apart(self, calibration: CalibrationSettings | None) -> CalibrationSettings:
        """``calibration`` (the default one for None), kept off the tokens these windows judge when it draws from
        this same text: a modification calibrated on the tokens it is judged on would look better than it is.

        Example:
            >>> source = TextSource(max_tokens=8192)
            >>> source.calibration_apart(None).held_out  # the default calibration text is the default text too
            (0, 8192)
        """
        calibration = calibration or CalibrationSettings()
        if self.texts is not None or self.resolved_texts()[0] != load_corpus(calibration.text_source):
            return calibration
        stop = None if self.max_tokens is None else self.skip_tokens + self.max_tokens
        return replace(calibration, held_out=(self.skip_tokens, stop))

    def windows(self, tokenizer: PreTrainedTokenizerBase) -> list[Window]:
        """The token windows to measure on."""
        if self.texts is not None:
            documents = tokenize_documents(tokenizer, list(self.texts), window=self.window, stride=self.stride)
            return [w for document in documents for w in document]
        (text,) = self.resolved_texts()
        return tokenize_corpus(
            tokenizer,
            text,
            window=self.window,
            stride=self.stride,
            max_tokens=self.max_tokens,
            scoring=self.scoring,
            skip_tokens=self.skip_tokens,
        )

    def scoring_metadata(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        """How the windows were scored, in words a report can print."""
        if self.scoring == LLAMACPP_SCORING:
            bos = added_bos_id(tokenizer)
            return {
                "scoring": LLAMACPP_SCORING,
                "scoring_description": f"llama.cpp perplexity: chunks of {self.window} tokens, "
                + (f"BOS ({bos}) first" if bos is not None else "no BOS (the tokenizer adds none)")
                + f", the last {self.window - 1 - self.window // 2} predictions of each chunk scored",
            }
        return {
            "scoring": SLIDING_SCORING,
            "scoring_description": "sliding windows: every token after the first scored once, no BOS added",
        }


@dataclass(frozen=True)
class LoadOptions:
    """How models named by a string load (dtype, device map, remote code, engine), so both sides load alike.

    With ``engine="llama.cpp"`` every ``.gguf`` file runs in llama.cpp
    (:class:`~hemorrhage_hf.llamacpp.engine.LlamaCppModel`: its own quantized kernels, logits only); other models
    run in torch.

    Example:
        >>> LoadOptions(dtype="bf16").dtype
        'bf16'
    """

    dtype: str | torch.dtype = "fp32"
    device_map: str | None = None
    trust_remote_code: bool = False
    engine: str = TORCH_ENGINE

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise HemorrhageError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")

    def runs_in_llamacpp(self, model: ModelLike | None) -> bool:
        return self.engine == ENGINE_NAME and is_gguf(model)

    def check_engine(self, *models: ModelLike | None) -> None:
        """The llama.cpp engine runs ``.gguf`` files: refuse it where neither model is one (before loading)."""
        if self.engine == ENGINE_NAME and not any(self.runs_in_llamacpp(m) or is_logits_model(m) for m in models):
            raise HemorrhageError("--engine llama.cpp runs .gguf files; neither model is one")

    def model(
        self, model: ModelLike, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[PreTrainedModel | LogitsModel, PreTrainedTokenizerBase | None]:
        """(model, its tokenizer); for a model object, the given tokenizer, else one loaded from its name if it has
        one."""
        if self.runs_in_llamacpp(model):
            loaded, own_tokenizer = load_llamacpp_model(model)
            return loaded, tokenizer or own_tokenizer
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

    With ``sequential`` only one model is in memory at a time: the reference runs first into an exact reference
    store (:mod:`hemorrhage_hf.measurement.refstore`: its output head once and d numbers per token), is freed (or,
    for a modification of a reference loaded here, modified in place), then the modified model runs against the
    store. Peak memory halves and every figure stays exact; layer statistics are not available. So that freed
    temporaries do not pile up in the heap, glibc's mmap threshold is fixed low while it runs
    (:mod:`hemorrhage_hf.measurement.memory`). With ``top_k`` the
    reference goes into a top-k cache instead (:mod:`hemorrhage_hf.measurement.refcache`, ~8·k bytes per token):
    KL becomes its lower bound, stated in the report with k and the tail mass.

    ``modified_variants`` (name → logit transform, e.g. a decoding correction's ``correct_sequence``) are measured
    from the same forward passes into ``report.variants``; see :func:`~hemorrhage_hf.measurement.engine.measure`.

    Example:
        >>> MeasureOptions(layers=True, sequential=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hemorrhage_hf.errors.HemorrhageError: sequential mode keeps only the reference's outputs: ...
    """

    batch_size: int = 1
    layers: bool = False
    attention: bool = False
    layer_map: Sequence[int] | None = None
    sequential: bool = False
    top_k: int | None = None
    progress: bool = True
    modified_variants: Mapping[str, Callable] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise HemorrhageError(f"batch size must be at least 1, got {self.batch_size}")
        if self.sequential and (self.layers or self.attention):
            raise HemorrhageError(
                "sequential mode keeps only the reference's outputs: it cannot compare layers (drop --sequential)"
            )
        if self.top_k is not None and not self.sequential:
            raise HemorrhageError("top_k chooses the top-k reference cache of sequential mode: add sequential")

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
    if is_logits_model(reference):
        raise ModificationError(
            f"a modification applies to a torch model, and {reference.name_or_path} runs in {reference.engine}: "
            "export the modified model to GGUF (hemorrhage-hf export-gguf) and pass it as the modified model"
        )
    spec = parse_spec(modification)
    calibration_ids = (calibration or CalibrationSettings()).windows(tokenizer) if spec.needs_calibration else None
    # With progress on, the modification shows its own labelled bar ("quantizing int4-g64"): seconds to minutes.
    return apply_modification(
        reference, spec, calibration=calibration_ids, tokenizer=tokenizer, in_place=in_place, progress=progress
    )


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
) -> tuple[PreTrainedModel | LogitsModel, PreTrainedModel | LogitsModel, PreTrainedTokenizerBase]:
    """Load or accept the two models; the modified one is ``modified`` or ``modification`` applied to a copy (with
    ``progress``, under a progress bar named after it).

    With ``load.engine == "llama.cpp"`` a ``.gguf`` model runs in llama.cpp (see :class:`LoadOptions`); call
    :func:`check_engine_tokenization` on the text before measuring.
    """
    _check_sources(modified, modification)
    load = load or LoadOptions()
    load.check_engine(reference, modified)
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


def _check_vocabulary(role: str, model: PreTrainedModel | LogitsModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Token ids past a model's embedding table would crash deep inside the forward pass; refuse them here."""
    n_embeddings = model.n_vocab if is_logits_model(model) else model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise TokenizerMismatchError(
            f"the tokenizer has {len(tokenizer)} tokens but the {role} model embeds only {n_embeddings}: "
            "they do not belong together"
        )


def check_engine_tokenization(
    tokenizer: PreTrainedTokenizerBase, source: TextSource, *models: PreTrainedModel | LogitsModel
) -> None:
    """Every llama.cpp model must cut the source's text into exactly the tokenizer's ids (else a clear error)."""
    engines = [model for model in models if isinstance(model, LlamaCppModel)]
    for text in source.resolved_texts() if engines else ():
        for model in engines:
            model.check_tokenizer(tokenizer, text)


def _run_metadata(source: TextSource, windows: Sequence[Window], tokenizer: PreTrainedTokenizerBase, **models) -> dict:
    """Corpus, window count, scoring convention and, per llama.cpp model (by role), which file and build ran it."""
    metadata = {"corpus": source.describe(), "n_windows": len(windows), **source.scoring_metadata(tokenizer)}
    for role, model in models.items():
        if isinstance(model, LlamaCppModel):
            metadata[f"{role}_engine"] = model.describe()
    return metadata


def _modification_details(model: ModelLike, modification: str | None) -> dict | None:
    """What made the modified model (backend, version, config, bits per weight), read before its first forward pass:
    some backends repack their weights for the CPU kernel when they first run. None for llama.cpp engines."""
    if not isinstance(model, PreTrainedModel):
        return None
    return describe_model(model, modification and parse_spec(modification))


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
    modification that looks at activations (Wanda, AWQ) calibrates on. With ``load.engine == "llama.cpp"`` every
    ``.gguf`` model runs in llama.cpp (logits only: no ``options.layers``); the report's metadata names the engine
    and the scoring.

    Example:
        >>> from hemorrhage_hf import compare
        >>> from hemorrhage_hf.comparison import TextSource
        >>> report = compare("default", modification="int8", source=TextSource(max_tokens=1024))  # doctest: +SKIP
        >>> report.severity  # doctest: +SKIP
        'none'
    """
    source, load, options = source or TextSource(), load or LoadOptions(), options or MeasureOptions()
    calibration = source.calibration_apart(calibration)
    _check_sources(modified, modification)
    if load.engine == ENGINE_NAME and (options.layers or options.attention):
        raise HemorrhageError(
            "--layers and --attention are unavailable with the llama.cpp engine: it yields logits, not hidden states"
        )
    metadata = {
        "reference": _label(reference),
        "modified": f"{_label(reference)} + {modification}" if modification else _label(modified),
        "modification": modification,
        "window": source.window,
        "stride": source.stride or source.window,
        "max_tokens": source.max_tokens,
        "dtype": str(load.dtype),
        "engine": load.engine,
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
    check_engine_tokenization(tokenizer, source, reference_model, modified_model)
    metadata.update(_run_metadata(source, windows, tokenizer, reference=reference_model, modified=modified_model))
    metadata["modification_details"] = _modification_details(modified_model, modification)
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
    # Freed temporaries must leave the process, or the heap keeps about as much as a second model (see memory.py).
    with large_blocks_returned():
        loaded_here = isinstance(reference, str)
        load.check_engine(reference, modified)
        reference_model, tokenizer = load.model(reference, tokenizer)
        windows = source.windows(tokenizer)
        check_engine_tokenization(tokenizer, source, reference_model)
        metadata.update(_run_metadata(source, windows, tokenizer, reference=reference_model), sequential=True)
        store_options = dict(
            batch_size=options.batch_size,
            description={"reference": metadata["reference"]},
            progress=options.progress,
        )
        cache = build_reference_file(
            reference_model, windows, top_k=options.top_k, tokenizer=tokenizer, **store_options
        )
        if modification is not None:
            # A reference this call loaded is nobody else's: modify it in place instead of holding a copy beside it.
            modified_model = _modify(
                reference_model, modification, tokenizer, calibration, in_place=loaded_here, progress=options.progress
            )
            modified_tokenizer = tokenizer
        else:
            del reference_model
            release_freed_memory()
            modified_model, modified_tokenizer = load.model(modified)
        _check_modified(None, modified_model, tokenizer, modified_tokenizer)
        check_engine_tokenization(tokenizer, source, modified_model)
        metadata.update(_run_metadata(source, windows, tokenizer, modified=modified_model))
        metadata["modification_details"] = _modification_details(modified_model, modification)
        return measure(
            cache, modified_model, windows, metadata=metadata, **options.engine_options(metadata["modified"])
        )
