"""An exact reference store: the reference model's output head once, and per scored token only what enters it.

Full logits are ~200 KB per token for a 49k vocabulary, so storing them is what makes KL against a reference
expensive (llama.cpp keeps them as uint16: ~11 GiB for LLaMA-2-7B on WikiText-2). But a causal LM's logits are a
fixed function of a small vector: ``logits = head(h)``, where ``h`` is the final normalised hidden state (``d``
numbers) and ``head`` a linear map followed, in some families, by a known transform (Cohere's ``logit_scale``,
Granite's ``logits_scaling``, Gemma 2's final soft-capping). The store keeps

- per scored token: ``h`` (fp32 by default, bf16 optional) and the true next token (int32);
- once: the head's weight and bias and its post-head transform (``head.safetensors``).

Reading recomputes ``head(h)`` a block of rows at a time (:mod:`hemorrhage_hf.measurement.head`), so every
figure — the full-vocabulary KL included — is exact, not a bound. Per token this is ``4·d + 4`` bytes (SmolLM2-135M,
d = 576: 2,308 B, against 196,608 B for fp32 logits and 98,304 B for llama.cpp's uint16 logits); the head (113 MB
for SmolLM2) is stored once.

A model whose logits are not ``head(h)`` under a known transform is refused: every batch of a build compares
``head(h)`` with the model's own logits at the window's last position (the only logits the pass computes) and stops
with :class:`~hemorrhage_hf.measurement.head.UnknownHeadError` if they differ. A modified model with a plain head is
compared the same way: its logits, too, are computed a block of rows at a time from what enters its head.

The folder, its key (model fingerprint, windows fingerprint, store dtype, batch size), checksums, resuming and the
per-process shards under ``accelerate launch`` are those of
:class:`~hemorrhage_hf.measurement.refcache.ShardedReference`; the header also names the tokenizer
(:func:`tokenizer_fingerprint`), so a store is refused for another reference, tokenizer or text with an error
saying which.

Example:
    >>> from hemorrhage_hf.measurement.refstore import SHARD_BYTES, STORE_DTYPES
    >>> SHARD_BYTES // (576 * STORE_DTYPES["fp32"].itemsize)  # SmolLM2 tokens per shard file
    3640
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..corpus import Window
from ..errors import TokenizerMismatchError
from .divergence import STATISTICS_CHUNK_ROWS, TokenStatistics, concatenate_row_chunks, token_statistics
from .engine import Batch, LogitsModel, is_logits_model, model_outputs
from .head import HeadInputs, HeadRows, OutputHead, UnknownHeadError
from .refcache import (
    DEFAULT_TOP_K,
    ReferenceCache,
    ReferenceCacheError,
    ShardedReference,
    model_fingerprint,
    save_checksummed,
)

STORE_FORMAT = "hemorrhage-hf reference store"
STORE_VERSION = 1
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD_FILE = "head.safetensors"
#: Rows of logits recomputed per head product, for the reference and the modified model alike (SmolLM2: 25 MB
#: each). Each product streams the whole head (113 MB for SmolLM2) through the CPU: over 1,024 rows of SmolLM2's head
#: on 2 cores, products of 16 rows took 1.25 s, of 64 rows 0.60 s, of 128 or 256 rows 0.50 s. The per-token figures
#: are still computed in their usual 16-row slices within each block.
HEAD_BLOCK_ROWS = 8 * STATISTICS_CHUNK_ROWS


#: Stored hidden states per shard file, in bytes: measuring holds one shard in memory, building one being filled, so it
#: adds to the peak; 8 MiB is ~3,600 SmolLM2 tokens in fp32.
SHARD_BYTES = 8 << 20


class ReferenceStoreError(ReferenceCacheError):
    """A reference store is corrupt, incomplete, or was made for another reference, tokenizer or text."""


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of a tokenizer's vocabulary (token → id) and special tokens: equal iff token ids mean the same."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.all_special_tokens).encode())
    return digest.hexdigest()


class ReferenceStore(ShardedReference):
    """An opened, complete exact reference store; pass it to :func:`hemorrhage_hf.measurement.engine.measure` as
    the reference: every figure equals the live two-model figure (fp32 store: to ~1e-7 relative).

    Example:
        >>> from hemorrhage_hf import load_model, tokenize_corpus, python_docs_text, measure
        >>> from hemorrhage_hf.modify import apply_modification
        >>> reference, tokenizer = load_model("default")  # doctest: +SKIP
        >>> windows = tokenize_corpus(tokenizer, python_docs_text(), window=256, max_tokens=1024)  # doctest: +SKIP
        >>> store = ReferenceStore.build(reference, windows, tokenizer=tokenizer)  # doctest: +SKIP
        >>> store.bytes_per_token  # doctest: +SKIP
        2308.1...
        >>> report = measure(store, apply_modification(reference, "int4-g64"), windows)  # doctest: +SKIP
        >>> report.metadata["reference_store"]["kl_is_exact"]  # doctest: +SKIP
        True
    """

    FORMAT = STORE_FORMAT
    VERSION = STORE_VERSION
    FIELDS = ("hidden", "targets")
    ROOT_NAME = "reference-store"
    ERROR = ReferenceStoreError

    def __init__(self, directory: Path, header: dict):
        super().__init__(directory, header)
        self._head: OutputHead | None = None
        self._modified_head: OutputHead | None = None  # is _head too where the two heads are identical

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        windows: Sequence[Window],
        *,
        dtype: str = "fp32",
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 1,
        root: str | Path | None = None,
        shard_tokens: int | None = None,
        description: dict | None = None,
        progress: bool = True,
    ) -> ReferenceStore:
        """Run ``model`` over ``windows`` once and store its head inputs, or reuse/resume a store of the same key.

        Args:
            dtype: ``"fp32"`` (figures equal the live ones to fp32 rounding) or ``"bf16"`` (half the size; see
                BENCHMARKS.md for its error).
            tokenizer: recorded (as :func:`tokenizer_fingerprint`) so the store is refused for another tokenizer.
            batch_size: windows per forward pass; measure with the same batch size (it is part of the key).
            root: parent folder of stores (default ``<cache_dir()>/reference-store``).
            shard_tokens: scored tokens per shard file, the unit an interrupted build resumes from (default: as
                many as fill :data:`SHARD_BYTES`).
            description: free-form labels (model name, corpus) written into the header for people to read.
        """
        if is_logits_model(model):
            raise ReferenceStoreError(
                f"the {model.engine} engine yields logits, not the hidden states an exact store keeps: use the top-k "
                "cache (--top-k K) for this reference"
            )
        if dtype not in STORE_DTYPES:
            raise ReferenceStoreError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
        head = OutputHead.of(model)  # refuse an unknown head before any forward pass
        return cls._build(
            model,
            windows,
            setting=dtype,
            header_fields={
                "dtype": dtype,
                "hidden_size": head.weight.shape[1],
                "vocab_size": head.vocab_size,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
            },
            batch_size=batch_size,
            root=root,
            shard_tokens=shard_tokens or max(1, SHARD_BYTES // (head.weight.shape[1] * STORE_DTYPES[dtype].itemsize)),
            description=description,
            progress=progress,
        )

    # --- building -----------------------------------------------------------------------------------------------------

    def prepare(self, model: PreTrainedModel) -> None:
        head = OutputHead.of(model)
        path = self.directory / HEAD_FILE
        checksum = save_checksummed(path, head.tensors(), {"format": STORE_FORMAT})
        self.header["head"] = {
            "file": HEAD_FILE,
            "sha256": checksum,
            "bytes": path.stat().st_size,
            "fingerprint": head.fingerprint(),
            "transform": {"scale": head.scale, "softcap": head.softcap},
        }
        self._head = head

    def batch_entries(self, model: PreTrainedModel, batch: Batch) -> dict[str, torch.Tensor]:
        with HeadInputs(model) as head_inputs:
            last_logits = model_outputs(model, batch.input_ids).logits
        # Under `accelerate launch` only the main process prepares (and holds) the head.
        (self._head or OutputHead.of(model)).check(head_inputs.last(), last_logits, model)
        hidden = batch.scored(head_inputs.value)
        return {"hidden": hidden.to(STORE_DTYPES[self.header["dtype"]]), "targets": batch.targets().to(torch.int32)}

    # --- reading ------------------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> str:
        return self.header["dtype"]

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    def begin(
        self,
        windows: Sequence[Window],
        *,
        batch_size: int,
        layers: bool,
        attention: bool,
        modified: PreTrainedModel | LogitsModel | None = None,
    ) -> None:
        super().begin(windows, batch_size=batch_size, layers=layers, attention=attention)
        if self._head is not None and self._head is self._modified_head:
            self._head = None  # never keep an earlier modified model's tensor alive
        self._modified_head = None
        if modified is not None and not is_logits_model(modified):
            try:
                self._modified_head = OutputHead.of(modified)
            except UnknownHeadError:
                return  # compared from its whole logits
            # A modification that left the head alone: the same numbers, without a second copy of the largest matrix
            if self._modified_head.fingerprint() == self.header["head"]["fingerprint"]:
                self._head = self._modified_head

    def modified_head(self) -> OutputHead | None:
        """The modified model's own head, through which :meth:`compare` takes its logits a block of rows at a time
        (:class:`~hemorrhage_hf.measurement.head.HeadRows`); None where it is not a plain head (then whole logits)."""
        return self._modified_head

    @property
    def head(self) -> OutputHead:
        """The stored output head (checked against its checksum on first use)."""
        if self._head is None:
            record = self.header["head"]
            tensors = self.load_checked(self.directory / record["file"], record["sha256"])
            self._head = OutputHead.from_tensors(tensors, record["transform"])
        return self._head

    def check_reference(self, model: PreTrainedModel) -> None:
        """Raise unless ``model`` is the reference this store was built from (same weights and config)."""
        if model_fingerprint(model) != self.header["model_fingerprint"]:
            raise ReferenceStoreError(
                f"the reference store in {self.directory} was made for another reference model "
                f"({self.header['description'].get('reference', 'unnamed')}): its weights or config differ"
            )

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raise unless ``tokenizer`` maps tokens to the same ids as the store's reference."""
        recorded = self.header["tokenizer_fingerprint"]
        if recorded is not None and tokenizer_fingerprint(tokenizer) != recorded:
            raise TokenizerMismatchError(
                f"the reference store in {self.directory} was made with another tokenizer: its token ids mean "
                "other strings"
            )

    def check_vocabulary(self, vocab_size: int, name: str = "the model") -> None:
        """Raise unless a model with ``vocab_size`` output logits can be compared with the stored head."""
        if vocab_size != self.vocab_size:
            raise TokenizerMismatchError(
                f"{name} predicts {vocab_size} tokens but the reference predicts {self.vocab_size}: they do not "
                "share a vocabulary"
            )

    def compare(self, batch: Batch, modified_logits: torch.Tensor | HeadRows, targets: torch.Tensor):
        self.check_vocabulary(modified_logits.shape[-1], "the modified model")
        entries = self.next_entries(targets)
        head = self.head

        # The reference's logits, and the modified model's where it is given as HeadRows, exist a block of rows at a
        # time only (~25 MB each), never for a whole batch (~100 MB per 512-token window of a 49k vocabulary).
        def block(hidden: torch.Tensor, logits: torch.Tensor, block_targets: torch.Tensor) -> dict:
            return vars(token_statistics(head(hidden), logits, block_targets))

        figures = concatenate_row_chunks(block, entries["hidden"], modified_logits, targets, rows=HEAD_BLOCK_ROWS)
        return TokenStatistics(**figures), None

    def metadata(self) -> dict:
        return {
            "reference_store": {
                "path": str(self.directory),
                "dtype": self.dtype,
                "kl_is_exact": True,
                "bytes_per_token": self.bytes_per_token,
                "head_bytes": self.header["head"]["bytes"],
            }
        }


def build_reference_file(
    model: PreTrainedModel | LogitsModel,
    windows: Sequence[Window],
    *,
    top_k: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **options,
) -> ReferenceStore | ReferenceCache:
    """The exact :class:`ReferenceStore` of ``model`` on ``windows``; with ``top_k``, or for a model that yields
    logits only (llama.cpp), a top-k :class:`~hemorrhage_hf.measurement.refcache.ReferenceCache` (KL a lower bound,
    said in its metadata). ``options`` go to ``build`` (batch_size, root, description, progress...).

    Example:
        >>> from hemorrhage_hf import load_model, tokenize_corpus, python_docs_text
        >>> reference, tokenizer = load_model("default")  # doctest: +SKIP
        >>> windows = tokenize_corpus(tokenizer, python_docs_text(), window=256, max_tokens=1024)  # doctest: +SKIP
        >>> type(build_reference_file(reference, windows, tokenizer=tokenizer)).__name__  # doctest: +SKIP
        'ReferenceStore'
    """
    if top_k is None and not is_logits_model(model):
        return ReferenceStore.build(model, windows, tokenizer=tokenizer, **options)
    return ReferenceCache.build(model, windows, k=top_k or DEFAULT_TOP_K, **options)
