"""hemorrhage-hf: measure, locate and mitigate the quality an LLM loses when it is modified for deployment.

Example:
    >>> import hemorrhage_hf as hh
    >>> reference, tokenizer = hh.load_model("default")  # doctest: +SKIP
    >>> modified = hh.apply_modification(reference, "int4-g64")  # doctest: +SKIP
    >>> windows = hh.tokenize_corpus(tokenizer, hh.python_docs_text(), window=512, max_tokens=4096)  # doctest: +SKIP
    >>> print(hh.measure(reference, modified, windows).severity)  # doctest: +SKIP
    severe
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Heavy dependencies (torch, transformers) load on first use, so `hemorrhage-hf --help` answers at once.
_EXPORTS = {
    "CorpusError": ".errors",
    "HemorrhageError": ".errors",
    "ModelLoadError": ".errors",
    "ModificationError": ".errors",
    "SpecError": ".errors",
    "TokenizerMismatchError": ".errors",
    "HemorrhageQuantConfig": ".integrations",
    "HemorrhageReport": ".measurement.report",
    "severity_grade": ".measurement.report",
    "ReferenceCache": ".measurement.refcache",
    "ReferenceStore": ".measurement.refstore",
    "measure": ".measurement.engine",
    "compare": ".comparison",
    "assert_same_tokenizer": ".models",
    "load_model": ".models",
    "apply_modification": ".modify",
    "parse_spec": ".modify",
    "run_sweep": ".sweep.runner",
    "load_corpus": ".corpus",
    "make_windows": ".corpus",
    "python_docs_text": ".corpus",
    "tokenize_corpus": ".corpus",
    "tokenize_documents": ".corpus",
}

__all__ = sorted(_EXPORTS)

# Modified models saved from here must reload with what their weights cannot carry: the transformers integration
# hooks itself into modify (which never imports it) before modify's exports are used.
_PLUGINS = {".modify": ".integrations.transformers"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _EXPORTS[name] in _PLUGINS:
        importlib.import_module(_PLUGINS[_EXPORTS[name]], __name__)
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .comparison import compare
    from .corpus import load_corpus, make_windows, python_docs_text, tokenize_corpus, tokenize_documents
    from .errors import (
        CorpusError,
        HemorrhageError,
        ModelLoadError,
        ModificationError,
        SpecError,
        TokenizerMismatchError,
    )
    from .integrations import HemorrhageQuantConfig
    from .measurement.engine import measure
    from .measurement.refcache import ReferenceCache
    from .measurement.refstore import ReferenceStore
    from .measurement.report import HemorrhageReport, severity_grade
    from .models import assert_same_tokenizer, load_model
    from .modify import apply_modification, parse_spec
    from .sweep.runner import run_sweep
