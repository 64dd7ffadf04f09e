"""hemorrhage-hf: measure, locate and mitigate the quality an LLM loses when it is modified for deployment.

Example:
    >>> import hemorrhage_hf as hh
    >>> reference, tokenizer = hh.load_model("default")  # doctest: +SKIP
    >>> modified = hh.apply_modification(reference, "int4-g64")  # doctest: +SKIP
    >>> windows = hh.tokenize_corpus(tokenizer, hh.python_docs_text(), window=512, max_tokens=4096)  # doctest: +SKIP
    >>> print(hh.measure(reference, modified, windows).severity)  # doctest: +SKIP
    severe
"""

from .corpus import load_corpus, make_windows, python_docs_text, tokenize_corpus, tokenize_documents
from .errors import (
    CorpusError,
    HemorrhageError,
    ModelLoadError,
    ModificationError,
    SpecError,
    TokenizerMismatchError,
)
from .integrations import HemorrhageQuantConfig  # registers the transformers quantizer
from .measure import measure
from .models import assert_same_tokenizer, load_model
from .modify import apply_modification, parse_spec
from .refcache import ReferenceCache
from .report import HemorrhageReport, severity_grade
from .sweep import run_sweep

__version__ = "0.1.0"

__all__ = [
    "CorpusError",
    "HemorrhageError",
    "HemorrhageQuantConfig",
    "HemorrhageReport",
    "ModelLoadError",
    "ModificationError",
    "ReferenceCache",
    "SpecError",
    "TokenizerMismatchError",
    "apply_modification",
    "assert_same_tokenizer",
    "load_corpus",
    "load_model",
    "make_windows",
    "measure",
    "parse_spec",
    "python_docs_text",
    "run_sweep",
    "severity_grade",
    "tokenize_corpus",
    "tokenize_documents",
]
