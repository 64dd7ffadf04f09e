"""A ``.gguf`` model as llama.cpp runs it: its own quantized kernels, through ``llama-cpp-python``.

Loading a GGUF file through transformers dequantizes it to fp32 and measures the rounding of the weight format;
llama.cpp's quantized matmuls also round activations (to 8 bits for Q4_0/Q8_0 dot products), so the figure a user
of llama.cpp sees differs. :class:`LlamaCppModel` yields full-vocabulary logits for every position of every
window, exactly where the torch path yields them, so the measurement reduces both the same way
(:func:`hemorrhage_hf.measurement.engine.model_outputs` calls :meth:`LlamaCppModel.logits`).

The token ids a window holds come from the Hugging Face tokenizer; :meth:`LlamaCppModel.check_tokenizer` refuses a
model whose own tokenizer cuts the measured text differently, so no position is ever silently misaligned.

Example:
    >>> import torch
    >>> from hemorrhage_hf.llamacpp.engine import LlamaCppModel
    >>> model = LlamaCppModel("SmolLM2-Q4_K_M.gguf")  # doctest: +SKIP
    >>> model.logits(torch.tensor([[28120, 905, 253]])).shape  # doctest: +SKIP
    torch.Size([1, 3, 49152])
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ..errors import HemorrhageError, ModelLoadError, TokenizerMismatchError

ENGINE_NAME = "llama.cpp"
TORCH_ENGINE = "torch"
ENGINES = (TORCH_ENGINE, ENGINE_NAME)
#: "1"/"0" forces llama.cpp's weight repacking on/off; unset: off on CPUs with AMX (see :func:`repack_is_safe`)
REPACK_ENVIRONMENT = "HEMORRHAGE_HF_LLAMA_REPACK"
_INSTALL_HINT = (
    "the llama.cpp engine needs llama-cpp-python (an sdist: `pip install llama-cpp-python` compiles llama.cpp and "
    "needs cmake and a C++ compiler; `make install` builds it once and pip's wheel cache keeps it)"
)


def import_llama_cpp():
    """The ``llama_cpp`` module, or a clear error saying how to get it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ModelLoadError(f"{_INSTALL_HINT}: {error}") from error
    return llama_cpp


def repack_is_safe() -> bool:
    """Whether llama.cpp may repack Q4_0/Q8_0 weights into its CPU-specific layouts.

    On Intel CPUs with AMX inside some virtual machines the repacked kernels die with SIGILL, which would kill the
    whole process; repacking is then left off (same figures, somewhat slower). ``HEMORRHAGE_HF_LLAMA_REPACK`` overrides.
    """
    forced = os.environ.get(REPACK_ENVIRONMENT)
    if forced is not None:
        return forced.strip() not in ("0", "", "false", "no")
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True
    return "amx_" not in flags


def is_gguf(name: object) -> bool:
    return isinstance(name, (str, Path)) and str(name).endswith(".gguf")


class LlamaCppModel:
    """One ``.gguf`` file loaded by llama.cpp, evaluated window by window with logits for every position.

    A context is made for the longest window seen so far, with one micro-batch as long as the window (as
    ``llama-perplexity`` evaluates a chunk of ``n_ctx`` tokens in one micro-batch); its KV cache is cleared before
    every window, so windows never see each other.
    """

    engine = ENGINE_NAME

    def __init__(self, path: str | Path, *, n_threads: int | None = None, repack: bool | None = None):
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        llama_cpp = import_llama_cpp()
        from llama_cpp import _internals

        llama_cpp.llama_backend_init()
        # llama-cpp-python prints every llama.cpp log line (hundreds per context) unless its logger says otherwise.
        log = logging.getLogger("llama-cpp-python")
        if log.level == logging.NOTSET:
            log.setLevel(logging.ERROR)
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = repack_is_safe() if repack is None else repack
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as error:
            raise ModelLoadError(
                f"llama.cpp could not load {path}: {error} (an architecture or tensor type this llama.cpp build does "
                "not know, or not a GGUF file)"
            ) from error
        self._llama_cpp, self._internals = llama_cpp, _internals
        self.path = path
        self.name_or_path = str(path)
        self.n_vocab = self._model.n_vocab()
        self.n_threads = n_threads or torch.get_num_threads()
        self.repack = bool(params.use_extra_bufts)
        self._context = None
        self._context_length = 0
        self._batch = None

    def describe(self) -> dict:
        """What a report says about the engine that produced the figures."""
        return {
            "engine": ENGINE_NAME,
            "file": str(self.path),
            "llama_cpp_python": getattr(self._llama_cpp, "__version__", "?"),
            "description": self._model.desc(),
            "weight_repacking": self.repack,
        }

    def fingerprint(self) -> str:
        """SHA-256 of the file's bytes: two models share cached figures iff this does."""
        digest = hashlib.sha256(b"llama.cpp\0")
        with self.path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        return digest.hexdigest()

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """llama.cpp's token ids for ``text`` (BOS first where the model adds one; special tokens in the text are
        plain text, as ``llama-perplexity`` reads a file)."""
        return self._model.tokenize(text.encode("utf-8"), add_special, False)

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase, text: str) -> None:
        """Refuse unless the Hugging Face tokenizer gives exactly llama.cpp's ids for ``text``."""
        if len(tokenizer) > self.n_vocab:
            raise TokenizerMismatchError(
                f"the tokenizer has {len(tokenizer)} tokens but {self.path.name} has a vocabulary of {self.n_vocab}: "
                "they do not belong together"
            )
        ours = tokenizer(text, add_special_tokens=True).input_ids
        theirs = self.tokenize(text)
        if ours == theirs:
            return
        index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise TokenizerMismatchError(
            f"llama.cpp tokenizes the text differently from the Hugging Face tokenizer ({len(theirs)} vs {len(ours)} "
            f"tokens; first difference at token {index}: llama.cpp {theirs[index : index + 5]} vs Hugging Face "
            f"{ours[index : index + 5]}, i.e. {tokenizer.decode(theirs[index : index + 5])!r} vs "
            f"{tokenizer.decode(ours[index : index + 5])!r}); per-token figures would be misaligned"
        )

    def _ensure_context(self, length: int) -> None:
        if self._context is not None and length <= self._context_length:
            return
        llama_cpp = self._llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = length
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.n_threads
        self.close_context()
        try:
            self._context = self._internals.LlamaContext(model=self._model, params=params, verbose=False)
        except ValueError as error:
            raise HemorrhageError(f"llama.cpp could not make a context of {length} tokens: {error}") from error
        self._batch = self._internals.LlamaBatch(n_tokens=length, embd=0, n_seq_max=1, verbose=False)
        self._context_length = length

    def close_context(self) -> None:
        for part in (self._batch, self._context):
            if part is not None:
                part.close()
        self._context = self._batch = None
        self._context_length = 0

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits ``[B, T, V]`` of every position; each row runs alone, up to its ``attention_mask`` length
        (right padding; padded positions stay 0)."""
        rows, length = input_ids.shape
        lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else [length] * rows
        self._ensure_context(length)
        out = torch.zeros(rows, length, self.n_vocab, dtype=torch.float32)
        for row, n in enumerate(lengths):
            tokens = input_ids[row, :n].tolist()
            if tokens and not 0 <= min(tokens) <= max(tokens) < self.n_vocab:
                raise TokenizerMismatchError(f"token ids outside {self.path.name}'s vocabulary of {self.n_vocab}")
            self._context.kv_cache_clear()
            self._batch.set_batch(tokens, 0, True)
            try:
                self._context.decode(self._batch)
            except RuntimeError as error:
                raise HemorrhageError(f"llama.cpp failed to evaluate a window of {n} tokens: {error}") from error
            values = np.ctypeslib.as_array(self._context.get_logits(), shape=(n, self.n_vocab))
            out[row, :n] = torch.from_numpy(values.copy())
        return out


def load_llamacpp_model(name: str | Path, **options) -> tuple[LlamaCppModel, PreTrainedTokenizerBase]:
    """A ``.gguf`` file run by llama.cpp, and the Hugging Face tokenizer transformers reads from the same file
    (windows are cut with it; :meth:`LlamaCppModel.check_tokenizer` proves both tokenize alike)."""
    from ..models import load_tokenizer

    model = LlamaCppModel(name, **options)
    try:
        tokenizer = load_tokenizer(str(name))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(
            f"transformers cannot read the tokenizer of {name} ({error}); pass the reference's tokenizer or a "
            "GGUF of an architecture transformers knows"
        ) from error
    return model, tokenizer
