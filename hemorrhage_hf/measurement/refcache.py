"""A compact, resumable cache of the reference model's next-token distributions on fixed token windows.

A sweep compares K modified models with one reference. Running the reference once, storing what the comparison
needs, and reading it back for every level makes the sweep cost K + 1 forward passes instead of 2K. Full logits of
a 49k vocabulary are ~200 KB per token, so per scored token the cache keeps only:

- the reference's top-k log-probabilities and their token indices (sorted, most likely first),
- the log of the probability mass outside those k tokens (the *tail* bin),
- the reference's log-probability of the true next token, its top-1 token, and the true token itself.

Every figure of the report is then exact (reference NLL, top-1 agreement, Δp need nothing else) except KL: it is
computed between the (k + 1)-bin coarse-grainings of the two distributions — the reference's k tokens plus one bin
for everything else, the same bins for both models. Merging bins never raises KL (the data-processing inequality),
so cached KL is a **lower bound** of the full KL; the mean tail mass says how much of the distribution was merged.

On disk (folder ``<cache_dir()>/reference-cache/<key>/``): ``header.json`` plus ``shard-wNNNNNNN.safetensors`` files,
each holding consecutive windows from window NNNNNNN on. The header names the model fingerprint (a SHA-256 of its
weights and config), the windows fingerprint (their token ids and scored positions), k, the batch size, and each
shard's window range and SHA-256. The key is derived from all of these, so a rerun with the same model, corpus and
windows finds its cache, and an interrupted build resumes after the last complete shard. Shards are checked against
their checksums before use. The reference model is needed only while building: build the cache, free the model,
then measure. This folder machinery is :class:`ShardedReference`, shared with the exact reference store
(:mod:`hemorrhage_hf.measurement.refstore`), which keeps the reference's final hidden states instead of its top-k.

Under ``accelerate launch`` each process caches its own share of the windows (the share it will measure) into its
own shard files, and the main process writes the header once all are done; such a build resumes only when complete
(an interrupted multi-process build starts over), and the processes need a shared file system for the folder.

Example:
    >>> import torch
    >>> from hemorrhage_hf.measurement.refcache import coarse_grain, coarse_kl
    >>> p = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    >>> q = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    >>> top, tail = coarse_grain(p, torch.tensor([[0]]))  # bins {token 0} and {tokens 1, 2}
    >>> round(tail.exp().item(), 6)
    0.3
    >>> bound = coarse_kl(top, tail, *coarse_grain(q, torch.tensor([[0]])))
    >>> round(bound.item(), 4), bound.item() <= 0.0851  # full KL(p ‖ q) is 0.0851
    (0.0823, True)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..atomic import atomic_path, atomic_write_text
from ..corpus import Window
from ..errors import HemorrhageError
from ..models import cache_dir
from . import distributed
from .divergence import (
    AGREEMENT_KS,
    TokenStatistics,
    concatenate_row_chunks,
    kl_divergence,
    log_probs,
    same_top_k,
)
from .engine import Batch, LogitsModel, batch_windows, is_logits_model, model_outputs
from .memory import return_free_pages

CACHE_FORMAT = "hemorrhage-hf reference cache"
# 2: float64 tails; 3: entries built in the row chunks that read them. A cache must come from the code that reads it.
CACHE_VERSION = 3
DEFAULT_TOP_K = 64
DEFAULT_SHARD_TOKENS = 16384
#: Tails smaller than this are summed exactly over the vocabulary (see :func:`coarse_grain`).
EXACT_TAIL_BELOW = 1e-3
HEADER_FILE = "header.json"
#: The per-token arrays of a cache; ``topk_*`` are ``[tokens, k]``, the others ``[tokens]``.
FIELDS = ("topk_logprobs", "topk_indices", "tail_logmass", "true_logprob", "top1", "targets")


class ReferenceCacheError(HemorrhageError):
    """A reference cache (or store) is corrupt, incomplete, or does not match the windows it is used on."""


def coarse_grain(logprobs: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the ``indices`` bins ``[n, k]`` and the log-mass of every other token ``[n]``.

    The tail is ``log(1 − Σ top-k)``, summed in float64: k reads per token instead of a pass over the vocabulary.
    fp32 log-softmax sums to 1 only within ~1e-7, so rows whose top-k hold all but ``EXACT_TAIL_BELOW`` of the mass
    get the exact log-sum-exp of the other tokens instead (a rounded-away tail would make KL infinite).
    """
    binned = logprobs.gather(-1, indices)
    covered = binned.double().exp().sum(-1)
    tail = torch.log1p(-covered.clamp(max=1.0)).float()
    exact = covered > 1 - EXACT_TAIL_BELOW
    if exact.any():
        rest = logprobs[exact].scatter(-1, indices[exact], float("-inf"))
        tail[exact] = torch.logsumexp(rest, dim=-1)
    return binned, tail


def coarse_kl(
    reference_binned: torch.Tensor,
    reference_tail: torch.Tensor,
    modified_binned: torch.Tensor,
    modified_tail: torch.Tensor,
) -> torch.Tensor:
    """KL between two (k + 1)-bin coarse-grainings (k bins + tail); a lower bound of the full KL."""
    reference = torch.cat([reference_binned, reference_tail[:, None]], dim=-1)
    modified = torch.cat([modified_binned, modified_tail[:, None]], dim=-1)
    return kl_divergence(reference, modified)


def reference_entries(logits: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What the cache keeps of reference logits ``[n, vocab]`` at positions whose true next tokens are ``targets``.

    The log-probabilities and top-1 are computed exactly as
    :func:`hemorrhage_hf.measurement.divergence.token_statistics` does, in the same row chunks as
    :func:`cached_token_statistics`, so cached and live runs give bit-identical NLL, agreement and Δp, and a model
    measured against its own cache gives a KL of exactly 0.
    """
    return concatenate_row_chunks(lambda *chunk: _reference_chunk_entries(*chunk, k=k), logits, targets)


def _reference_chunk_entries(logits: torch.Tensor, targets: torch.Tensor, *, k: int) -> dict[str, torch.Tensor]:
    logprobs = log_probs(logits)
    top = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    _, tail = coarse_grain(logprobs, top.indices)
    return {
        "topk_logprobs": top.values,
        "topk_indices": top.indices.to(torch.int32),
        "tail_logmass": tail,
        "true_logprob": logprobs.gather(-1, targets[:, None]).squeeze(-1),
        "top1": logits.argmax(-1).to(torch.int32),
        "targets": targets.to(torch.int32),
    }


def cached_token_statistics(entries: dict[str, torch.Tensor], modified_logits: torch.Tensor) -> TokenStatistics:
    """:class:`TokenStatistics` of modified logits ``[n, vocab]`` against cached reference entries of the same
    tokens, in chunks of rows as :func:`~hemorrhage_hf.measurement.divergence.token_statistics` does, so memory stays
    flat in ``n``."""
    names = list(entries)

    def chunk_statistics(logits: torch.Tensor, *values: torch.Tensor) -> dict[str, torch.Tensor]:
        return vars(_cached_chunk_statistics(dict(zip(names, values)), logits))

    return TokenStatistics(**concatenate_row_chunks(chunk_statistics, modified_logits, *entries.values()))


def _cached_chunk_statistics(entries: dict[str, torch.Tensor], modified_logits: torch.Tensor) -> TokenStatistics:
    modified_logprobs = log_probs(modified_logits)
    modified_binned, modified_tail = coarse_grain(modified_logprobs, entries["topk_indices"].long())
    modified_true = modified_logprobs.gather(-1, entries["targets"].long()[:, None]).squeeze(-1)
    reference_true = entries["true_logprob"]
    reference_top = entries["topk_indices"].long()[:, : max(AGREEMENT_KS)]
    modified_top = modified_logprobs.topk(reference_top.shape[1], dim=-1).indices
    return TokenStatistics(
        kl=coarse_kl(entries["topk_logprobs"], entries["tail_logmass"], modified_binned, modified_tail),
        reference_nll=-reference_true,
        modified_nll=-modified_true,
        same_top1=entries["top1"].long() == modified_logits.argmax(-1),
        delta_p=modified_true.exp() - reference_true.exp(),
        # Per element, as the live path checks: a row *sum* of finite fp16/bf16 logits can overflow (SmolLM2's ~1e6).
        finite=torch.isfinite(modified_logits).all(-1),
        # Over the same k + 1 bins: a lower bound of the full reverse KL, as the forward one is.
        reverse_kl=coarse_kl(modified_binned, modified_tail, entries["topk_logprobs"], entries["tail_logmass"]),
        # Agreement on the top 5 (10) of the cache's k tokens; with k < 10, on its k.
        same_top5=same_top_k(reference_top, modified_top, 5),
        same_top10=same_top_k(reference_top, modified_top, 10),
        reference_confidence=entries["topk_logprobs"][:, 0].exp(),
    )


def model_fingerprint(model: PreTrainedModel) -> str:
    """SHA-256 of a model's class, config and every weight (shared tensors once); ~0.6 s for 135 M fp32 params.

    A model run outside torch (:class:`~hemorrhage_hf.measurement.engine.LogitsModel`) gives its own digest.
    """
    if is_logits_model(model):
        return model.fingerprint()
    digest = hashlib.sha256()
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if key not in ("_name_or_path", "transformers_version")
    }
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    seen: set[tuple] = set()
    for name, value in model.state_dict().items():
        for tensor in _plain_tensors(value.detach()):
            key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
            tensor = tensor.cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # 0-d scalars too (quantizer states)
    return digest.hexdigest()


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor``: quantized tensor subclasses (torchao, quanto) flattened to their parts."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [part for name in names for part in _plain_tensors(getattr(tensor, name))]
    return [tensor]


def windows_fingerprint(windows: Sequence[Window]) -> str:
    """SHA-256 of every window's token ids and first scored position: two window lists match iff this does."""
    digest = hashlib.sha256()
    for window in windows:
        digest.update(f"{len(window.input_ids)}:{window.first_scored};".encode())
        digest.update(window.input_ids.to(torch.int64).contiguous().numpy().data)
    return digest.hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks (a stored head is ~100 MB: never hold it twice)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_checksummed(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write ``tensors`` as safetensors atomically; returns the file's SHA-256."""
    with atomic_path(path) as temporary:
        save_safetensors_file(tensors, temporary, metadata=metadata)
        return file_sha256(temporary)


@dataclass(frozen=True)
class CacheKey:
    """Everything the stored numbers depend on: the file kind, the model, the windows, the kind's own setting
    (k for a top-k cache, the dtype for an exact store) and the batch size."""

    format: str
    version: int
    model: str
    windows: str
    setting: str
    batch_size: int  # batched matmuls may round differently; the same batching keeps level 0 exactly zero

    def digest(self) -> str:
        text = f"{self.format}:{self.version}:{self.model}:{self.windows}:{self.setting}:{self.batch_size}"
        return sha256(text.encode())[:24]


class ShardedReference:
    """What every file of reference outputs shares: a keyed folder, a header, checksummed shard files of
    consecutive windows, resuming after the last whole shard, and one share of the windows per process under
    ``accelerate launch``. A subclass says what it keeps per batch (:meth:`batch_entries`) and how it compares a
    modified model's logits with those entries (:meth:`compare`).
    """

    #: written into every header and shard, and part of the key: a folder is read only by the code that wrote it
    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    #: the per-token arrays of a shard
    FIELDS: ClassVar[tuple[str, ...]]
    #: sub-folder of :func:`~hemorrhage_hf.models.cache_dir` holding one folder per key
    ROOT_NAME: ClassVar[str]
    ERROR: ClassVar[type[HemorrhageError]]

    def __init__(self, directory: Path, header: dict):
        self.directory = directory
        self.header = header
        self._shard_index: int | None = None
        self._shard: dict[str, torch.Tensor] = {}
        self._cursor = 0

    # --- what a kind of file keeps (subclasses) -------------------------------------------------------------------

    def batch_entries(self, model: PreTrainedModel, batch: Batch) -> dict[str, torch.Tensor]:
        """The arrays of :attr:`FIELDS` for a batch's scored tokens, from one forward pass of ``model``."""
        raise NotImplementedError

    @classmethod
    def shard_summary(cls, tensors: dict[str, torch.Tensor]) -> dict:
        """Extra numbers a shard's header record keeps (e.g. sums the metadata reports without reading shards)."""
        return {}

    def prepare(self, model: PreTrainedModel) -> None:
        """Write what the folder needs beside its shards before any shard is built (the main process only)."""

    # --- building and opening -------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()  # not inference_mode: quanto and torchao tensors fail under it
    def _build(
        cls,
        model: PreTrainedModel,
        windows: Sequence[Window],
        *,
        setting: str,
        header_fields: dict,
        batch_size: int,
        root: str | Path | None,
        shard_tokens: int,
        description: dict | None,
        progress: bool,
    ):
        """Run ``model`` over ``windows`` once and store its outputs, or reuse/resume a folder of the same key."""
        if not windows:
            raise cls.ERROR("no windows to store")
        key = CacheKey(
            cls.FORMAT, cls.VERSION, model_fingerprint(model), windows_fingerprint(windows), setting, batch_size
        )
        directory = Path(root) if root is not None else cache_dir() / cls.ROOT_NAME
        directory = directory / key.digest()
        header = cls._load_or_new_header(directory, key, windows, {**header_fields, "description": description or {}})
        if header["complete"]:
            return cls.open(directory)
        builder = cls(directory, header)
        if distributed.is_main_process():
            builder.prepare(model)
        if distributed.n_processes() > 1:
            # Every process stores the windows it will measure; the main one lists all shards once they exist.
            distributed.barrier()  # all have read the old header before anything in the folder changes
            header["shards"] = []
            bounds = distributed.local_bounds(len(windows), batch_size)
            show = progress and distributed.is_main_process()
            local = builder._store_windows(
                model, windows, bounds, batch_size, shard_tokens, progress=show, resumable=False
            )
            shards = [shard for shards in distributed.gather(local) for shard in shards]
            if distributed.is_main_process():
                header["shards"] = shards
                builder._finish()
            distributed.barrier()  # the header is written before anyone opens it
            return cls.open(directory)
        start = header["shards"][-1]["windows"][1] if header["shards"] else 0
        builder._store_windows(
            model, windows, (start, len(windows)), batch_size, shard_tokens, progress=progress, resumable=True
        )
        builder._finish()
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | Path):
        """Open a complete folder. Each shard's checksum is verified when it is first read."""
        directory = Path(directory)
        header = cls._read_header(directory)
        if not header.get("complete"):
            raise cls.ERROR(f"the {cls.FORMAT} in {directory} is incomplete; rebuild it to resume")
        missing = [shard["file"] for shard in header["shards"] if not (directory / shard["file"]).is_file()]
        if missing:
            raise cls.ERROR(f"the {cls.FORMAT} in {directory} lacks {', '.join(missing)}")
        return cls(directory, header)

    # --- what it holds ---------------------------------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        return self.header["window_token_offsets"][-1]

    @property
    def bytes_per_token(self) -> float:
        """Size of the shard files per scored token (what grows with the text; fixed files are not counted)."""
        total = sum((self.directory / shard["file"]).stat().st_size for shard in self.header["shards"])
        return total / self.n_tokens

    def tokens(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Stored entries of scored tokens ``start..stop`` in corpus order (random access, shard by shard)."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.FIELDS}
        for index, shard in enumerate(self.header["shards"]):
            first, last = shard["tokens"]
            if last <= start or first >= stop:
                continue
            arrays = self._load(index)
            for name in self.FIELDS:
                parts[name].append(arrays[name][max(start, first) - first : min(stop, last) - first])
        return {name: torch.cat(values) for name, values in parts.items()}

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        # Measurement reads shards in order; keeping the last one makes that one read per shard.
        if self._shard_index != index:
            self._shard, self._shard_index = {}, None  # the last shard goes before the next is read: never two at once
            self._shard = self._read_shard(self.header["shards"][index])
            self._shard_index = index
        return self._shard

    # --- the ReferenceSource protocol of hemorrhage_hf.measurement.engine ---------------------------------------------

    def begin(
        self,
        windows: Sequence[Window],
        *,
        batch_size: int,
        layers: bool,
        attention: bool,
        modified: PreTrainedModel | LogitsModel | None = None,
    ) -> None:
        if layers or attention:
            raise self.ERROR(
                f"a {self.FORMAT} holds no per-layer hidden states or attention; measure layers against the live "
                "reference model"
            )
        self.check_windows(windows)
        if batch_size != self.header["batch_size"]:
            raise self.ERROR(
                f"the {self.FORMAT} was built with batch size {self.header['batch_size']}; measure with the same "
                f"batch size (got {batch_size}) so both sides are computed alike"
            )
        # Under `accelerate launch`, measure() runs this process's share of the windows only.
        self._cursor = self.header["window_token_offsets"][distributed.local_bounds(len(windows), batch_size)[0]]

    def modified_head(self) -> None:
        return None  # subclasses that recompute logits from hidden states say otherwise

    def check_windows(self, windows: Sequence[Window]) -> None:
        """Raise unless ``windows`` are the token windows this folder was built on."""
        if windows_fingerprint(windows) != self.header["windows_fingerprint"]:
            raise self.ERROR(
                f"the {self.FORMAT} in {self.directory} was built on other windows (another text, tokenizer or "
                f"window size: {self.header['n_windows']} windows, {self.n_tokens} scored tokens; these are "
                f"{len(windows)} windows)"
            )

    def next_entries(self, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored entries of the next ``len(targets)`` tokens of the pass, checked against ``targets``."""
        entries = self.tokens(self._cursor, self._cursor + len(targets))
        if not torch.equal(entries["targets"].long(), targets.long()):
            raise self.ERROR(f"stored tokens {self._cursor}.. do not match the windows being measured")
        self._cursor += len(targets)
        return entries

    # --- the folder --------------------------------------------------------------------------------------------------

    @classmethod
    def _load_or_new_header(cls, directory: Path, key: CacheKey, windows: Sequence[Window], fields: dict) -> dict:
        """The header of a partial folder of this key with its verified shards, or a fresh one."""
        offsets = [0]
        for window in windows:
            offsets.append(offsets[-1] + window.n_scored)
        fresh = {
            "format": cls.FORMAT,
            "version": cls.VERSION,
            "key": key.digest(),
            "model_fingerprint": key.model,
            "windows_fingerprint": key.windows,
            **fields,
            "batch_size": key.batch_size,
            "n_windows": len(windows),
            "window_token_offsets": offsets,
            "shards": [],
            "complete": False,
        }
        if not (directory / HEADER_FILE).is_file():
            directory.mkdir(parents=True, exist_ok=True)
            return fresh
        try:
            header = cls._read_header(directory)
        except cls.ERROR:
            return fresh
        reader = cls(directory, header)
        kept = []
        for shard in header["shards"]:
            try:
                reader._read_shard(shard)
            except cls.ERROR:
                break  # this and later shards are recomputed
            kept.append(shard)
        fresh["shards"] = kept
        fresh["complete"] = header.get("complete", False) and len(kept) == len(header["shards"])
        return fresh

    @classmethod
    def _read_header(cls, directory: Path) -> dict:
        path = directory / HEADER_FILE
        try:
            header = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise cls.ERROR(f"cannot read the {cls.FORMAT} header {path}: {error}") from error
        if header.get("format") != cls.FORMAT or header.get("version") != cls.VERSION:
            raise cls.ERROR(f"{path} is not a version-{cls.VERSION} {cls.FORMAT}")
        return header

    def _store_windows(
        self,
        model: PreTrainedModel,
        windows: Sequence[Window],
        window_range: tuple[int, int],
        batch_size: int,
        shard_tokens: int,
        *,
        progress: bool,
        resumable: bool,
    ) -> list[dict]:
        """Store windows ``window_range`` into shard files of about ``shard_tokens`` tokens; returns their records.

        With ``resumable`` each record is appended to the header and the header rewritten after every shard, so an
        interrupted build knows which shards are whole.
        """
        start, stop = window_range
        records: list[dict] = []
        pending: dict[str, list[torch.Tensor]] = {name: [] for name in self.FIELDS}
        first_pending = done = start
        with tqdm(total=stop, initial=start, desc="storing reference", unit="window", disable=not progress) as bar:
            for batch in batch_windows(windows[start:stop], batch_size):
                for name, values in self.batch_entries(model, batch).items():
                    pending[name].append(values)
                return_free_pages()
                done += len(batch.first_scored)
                bar.update(len(batch.first_scored))
                if sum(len(part) for part in pending["targets"]) >= shard_tokens or done == stop:
                    records.append(self._write_shard(pending, (first_pending, done)))
                    if resumable:
                        self.header["shards"].append(records[-1])
                        self._write_header()
                    pending = {name: [] for name in self.FIELDS}
                    first_pending = done
        return records

    def _write_header(self) -> None:
        atomic_write_text(self.directory / HEADER_FILE, json.dumps(self.header, indent=2) + "\n")

    def _finish(self) -> None:
        self.header["complete"] = True
        self._write_header()

    def _write_shard(self, pending: dict[str, list[torch.Tensor]], window_range: tuple[int, int]) -> dict:
        """Write one shard file of windows ``window_range`` and return its header record."""
        tensors = {name: torch.cat(parts).contiguous() for name, parts in pending.items()}
        name = f"shard-w{window_range[0]:07d}.safetensors"
        checksum = save_checksummed(self.directory / name, tensors, {"format": self.FORMAT, "key": self.header["key"]})
        offsets = self.header["window_token_offsets"]
        return {
            "file": name,
            "windows": list(window_range),
            "tokens": [offsets[window_range[0]], offsets[window_range[1]]],
            "sha256": checksum,
            **self.shard_summary(tensors),
        }

    def _read_shard(self, shard: dict) -> dict[str, torch.Tensor]:
        path = self.directory / shard["file"]
        arrays = self.load_checked(path, shard["sha256"])
        n_tokens = shard["tokens"][1] - shard["tokens"][0]
        if set(arrays) != set(self.FIELDS) or any(len(values) != n_tokens for values in arrays.values()):
            raise self.ERROR(f"{self.FORMAT} shard {path} does not hold the expected {n_tokens} tokens")
        return arrays

    def load_checked(self, path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
        """The tensors of a safetensors file of this folder, refused unless it matches its recorded checksum."""
        try:
            checksum = file_sha256(path)
        except OSError as error:
            raise self.ERROR(f"{self.FORMAT} file {path} is missing: {error}") from error
        if checksum != expected_sha256:
            raise self.ERROR(f"{self.FORMAT} file {path} does not match its checksum (corrupt or changed)")
        return load_safetensors_file(path)


class ReferenceCache(ShardedReference):
    """An opened, complete top-k reference cache; pass it to :func:`hemorrhage_hf.measurement.engine.measure` as the
    reference. KL against it is a lower bound; :class:`~hemorrhage_hf.measurement.refstore.ReferenceStore` is exact.

    Build one with :meth:`build` (which resumes a partial one), or reopen a folder with :meth:`open`.

    Example:
        >>> from hemorrhage_hf import load_model, tokenize_corpus, python_docs_text, measure
        >>> from hemorrhage_hf.modify import apply_modification
        >>> reference, tokenizer = load_model("default")  # doctest: +SKIP
        >>> windows = tokenize_corpus(tokenizer, python_docs_text(), window=256, max_tokens=1024)  # doctest: +SKIP
        >>> cache = ReferenceCache.build(reference, windows, k=64)  # doctest: +SKIP
        >>> report = measure(cache, apply_modification(reference, "int4-g64"), windows)  # doctest: +SKIP
        >>> report.metadata["reference_cache"]["kl_is_lower_bound"]  # doctest: +SKIP
        True
    """

    FORMAT = CACHE_FORMAT
    VERSION = CACHE_VERSION
    FIELDS = FIELDS
    ROOT_NAME = "reference-cache"
    ERROR = ReferenceCacheError

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        windows: Sequence[Window],
        *,
        k: int = DEFAULT_TOP_K,
        batch_size: int = 1,
        root: str | Path | None = None,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        description: dict | None = None,
        progress: bool = True,
    ) -> ReferenceCache:
        """Run ``model`` over ``windows`` once and store its outputs, or reuse/resume a cache of the same key.

        Args:
            k: top tokens kept per position (the KL bound tightens as k grows; 64 costs 528 bytes per token).
            batch_size: windows per forward pass; measure with the same batch size (it is part of the key).
            root: parent folder of caches (default ``<cache_dir()>/reference-cache``).
            shard_tokens: scored tokens per shard file, the unit an interrupted build resumes from.
            description: free-form labels (model name, corpus) written into the header for people to read.
        """
        if k < 1:
            raise ReferenceCacheError(f"k must be at least 1, got {k}")
        return cls._build(
            model,
            windows,
            setting=str(k),
            header_fields={"k": k},
            batch_size=batch_size,
            root=root,
            shard_tokens=shard_tokens,
            description=description,
            progress=progress,
        )

    @property
    def k(self) -> int:
        return self.header["k"]

    @property
    def tail_mass_mean(self) -> float:
        """Mean reference probability outside the top-k: how coarse the KL bound is."""
        return sum(shard["tail_mass_sum"] for shard in self.header["shards"]) / self.n_tokens

    def batch_entries(self, model: PreTrainedModel, batch: Batch) -> dict[str, torch.Tensor]:
        outputs = model_outputs(model, batch.input_ids)
        return reference_entries(batch.scored(outputs.logits), batch.targets(), self.k)

    @classmethod
    def shard_summary(cls, tensors: dict[str, torch.Tensor]) -> dict:
        return {"tail_mass_sum": float(tensors["tail_logmass"].double().exp().sum())}

    def compare(self, batch: Batch, modified_logits: torch.Tensor, targets: torch.Tensor):
        return cached_token_statistics(self.next_entries(targets), modified_logits), None

    def metadata(self) -> dict:
        return {
            "reference_cache": {
                "path": str(self.directory),
                "k": self.k,
                "tail_mass_mean": self.tail_mass_mean,
                "kl_is_lower_bound": True,
                "bytes_per_token": self.bytes_per_token,
            }
        }
