"""Text sources and the fixed token windows both models are measured on.

Windows follow the sliding-window recipe of transformers' perplexity guide: windows of ``window`` tokens that
start every ``stride`` tokens, where each window scores only the tokens no earlier window scored, with up to
``window - stride`` tokens of extra context. With ``stride < window`` every token after the first is scored exactly
once. With ``stride == window`` (non-overlapping windows, the fastest) the first token of each later window has no
context inside its window and is not scored either; ``n_tokens`` in a report always counts exactly what was scored.

``scoring="llama.cpp"`` cuts the text the way llama.cpp's ``perplexity`` does instead (:func:`llamacpp_chunks`):
non-overlapping chunks of ``window`` tokens, each opened by BOS when the tokenizer adds one, and only the second
half of each chunk scored, so figures sit beside ``llama-perplexity`` output.

Example:
    >>> import torch
    >>> from hemorrhage_hf.corpus import make_windows
    >>> windows = make_windows(torch.arange(10), window=4, stride=2)
    >>> [w.input_ids.tolist() for w in windows], [w.first_scored for w in windows]
    ([[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]], [1, 2, 2, 2])
    >>> sum(w.n_scored for w in windows)
    9
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CorpusError

if TYPE_CHECKING:  # torch loads where windows are made, so the CLI can name PYTHON_DOCS without loading it
    import torch
    from transformers import PreTrainedTokenizerBase

PYTHON_DOCS = "python-docs"
#: how windows are cut and which of their tokens are scored (see the module docstring)
SLIDING_SCORING, LLAMACPP_SCORING = "sliding", "llama.cpp"
SCORINGS = (SLIDING_SCORING, LLAMACPP_SCORING)
_RULE_LINE = re.compile(r"^\s*([*=\-~^\"'`#+])\1{2,}\s*$")


def python_docs_text() -> str:
    """The English prose of Python's own documentation (``pydoc_data.topics``), present in every install.

    Topics are joined in sorted order so the corpus is the same on every run; reST rule lines are dropped.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        lines = [line for line in topics[name].splitlines() if not _RULE_LINE.match(line)]
        paragraphs.append("\n".join(lines).strip())
    return "\n\n".join(paragraphs)


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, failing with the path in the message."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(f"{path} is not UTF-8 text: {error}") from error


def dataset_text(name: str, *, config: str | None = None, split: str = "test", column: str = "text") -> str:
    """Join one column of a `datasets` dataset (Hub id or local path) into one text."""
    import datasets

    data = datasets.load_dataset(name, config, split=split)
    if column not in data.column_names:
        raise CorpusError(f"dataset {name!r} has no column {column!r}; it has {data.column_names}")
    return "\n\n".join(row for row in data[column] if row and row.strip())


def load_corpus(source: str) -> str:
    """``"python-docs"`` or a path to a UTF-8 file."""
    text = python_docs_text() if source == PYTHON_DOCS else read_text_file(source)
    if not text.strip():
        raise CorpusError(f"the corpus {source!r} is empty or only whitespace")
    return text


@dataclass(frozen=True)
class Window:
    """One model input. Positions ``first_scored..len-1`` are the tokens this window predicts (and scores)."""

    input_ids: torch.Tensor
    first_scored: int

    @property
    def n_scored(self) -> int:
        return len(self.input_ids) - self.first_scored


def make_windows(token_ids: torch.Tensor, *, window: int, stride: int | None = None) -> list[Window]:
    """Cut one token sequence into sliding windows; no token is scored twice (see the module docstring)."""
    stride = window if stride is None else stride
    if window < 2:
        raise CorpusError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise CorpusError(f"stride must be between 1 and the window ({window}), got {stride}")
    n_tokens = len(token_ids)
    if n_tokens < 2:
        raise CorpusError(f"the text has {n_tokens} token(s); at least 2 are needed to score a prediction")
    windows, scored_until = [], 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append(Window(token_ids[begin:end], first_scored=max(scored_until - begin, 1)))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


#: Tokens a prefix of the text must yield beyond those kept: only the last few tokens before a cut can differ from
#: the whole text's (a merge or a run of whitespace the cut splits), never dozens.
PREFIX_MARGIN_TOKENS = 64
#: First guess of characters per token when cutting a prefix (English prose runs ~4–5 for BPE vocabularies); a wrong
#: guess costs another, doubled, prefix, never a different result.
_CHARACTERS_PER_TOKEN = 6


def _leading_token_ids(tokenizer: PreTrainedTokenizerBase, text: str, count: int) -> torch.Tensor:
    """The first ``count`` token ids of ``text``, tokenizing only a prefix of it when that is enough.

    The prefix ends at a line break and must yield :data:`PREFIX_MARGIN_TOKENS` more tokens than are kept, so the
    kept ones are those of the whole text; measuring 4,096 tokens of a long corpus need not tokenize all of it.

    Example:
        >>> from hemorrhage_hf.models import load_tokenizer
        >>> tokenizer = load_tokenizer("default")
        >>> text = python_docs_text()
        >>> bool((_leading_token_ids(tokenizer, text, 100) == _token_ids(tokenizer, text)[:100]).all())
        True
    """
    length = (count + PREFIX_MARGIN_TOKENS) * _CHARACTERS_PER_TOKEN
    while length < len(text):
        cut = text.rfind("\n", 0, length)
        if cut > 0:
            token_ids = _token_ids(tokenizer, text[:cut])
            if len(token_ids) >= count + PREFIX_MARGIN_TOKENS:
                return token_ids[:count]
        length *= 2
    return _token_ids(tokenizer, text)[:count]


def llamacpp_chunks(token_ids: torch.Tensor, *, window: int, bos_id: int | None) -> list[Window]:
    """Chunks as llama.cpp's ``perplexity`` cuts them: the text (after a BOS where the tokenizer adds one) in
    ``len // window`` non-overlapping chunks; each chunk's first token replaced by BOS (where there is one); the
    logits of positions ``window // 2 .. window - 2`` scored, i.e. ``window - 1 - window // 2`` tokens per chunk.
    A tail shorter than a chunk is dropped, as llama.cpp drops it.

    Example:
        >>> import torch
        >>> chunks = llamacpp_chunks(torch.arange(10, 19), window=4, bos_id=1)
        >>> [c.input_ids.tolist() for c in chunks], [c.first_scored for c in chunks]
        ([[1, 10, 11, 12], [1, 14, 15, 16]], [3, 3])
    """
    import torch

    if window < 4:
        raise CorpusError(f"llama.cpp scoring needs a window of at least 4 tokens, got {window}")
    stream = token_ids if bos_id is None else torch.cat([torch.tensor([bos_id], dtype=token_ids.dtype), token_ids])
    n_chunks = len(stream) // window
    if n_chunks == 0:
        raise CorpusError(f"the text has {len(stream)} tokens, fewer than one llama.cpp chunk of {window}")
    chunks = []
    for index in range(n_chunks):
        chunk = stream[index * window : (index + 1) * window].clone()
        if bos_id is not None:
            chunk[0] = bos_id
        # llama.cpp scores logits from position window // 2 on: they predict tokens window // 2 + 1 ...
        chunks.append(Window(chunk, first_scored=window // 2 + 1))
    return chunks


def added_bos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id the tokenizer puts before a text when asked for special tokens, else None (SmolLM2 adds none)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    special = tokenizer("a", add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id
    return bos if bos is not None and special[:1] == [bos] and plain[:1] != [bos] else None


def tokenize_corpus(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    window: int,
    stride: int | None = None,
    max_tokens: int | None = None,
    scoring: str = SLIDING_SCORING,
    skip_tokens: int = 0,
) -> list[Window]:
    """Tokenize one long text (no special tokens added), drop its first ``skip_tokens`` tokens (to measure on text
    held out from an earlier measurement), and cut it into windows (``scoring``: see the module docstring;
    llama.cpp scoring ignores ``stride``).

    A text shorter than one window is an error: the figures would not be measured at the context length asked for.
    """
    if scoring not in SCORINGS:
        raise CorpusError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    if not text.strip():
        raise CorpusError("the text is empty or only whitespace")
    if skip_tokens < 0:
        raise CorpusError(f"skip_tokens must not be negative, got {skip_tokens}")
    if max_tokens is None:
        token_ids = _token_ids(tokenizer, text)[skip_tokens:]
    else:
        token_ids = _leading_token_ids(tokenizer, text, skip_tokens + max_tokens)[skip_tokens:]
    if len(token_ids) < window:
        raise CorpusError(
            f"the text has {len(token_ids)} tokens{' (after skipped tokens and --max-tokens)' if max_tokens else ''}, "
            f"shorter than one window of {window}; pass a smaller window or a longer text"
        )
    if scoring == LLAMACPP_SCORING:
        return llamacpp_chunks(token_ids, window=window, bos_id=added_bos_id(tokenizer))
    return make_windows(token_ids, window=window, stride=stride)


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], *, window: int, stride: int | None = None
) -> list[list[Window]]:
    """Windows for each of several independent texts; a text shorter than the window is one shorter window."""
    if not texts:
        raise CorpusError("no texts given")
    documents = []
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(f"text {index} is empty or only whitespace")
        token_ids = _token_ids(tokenizer, text)
        if len(token_ids) < 2:
            raise CorpusError(f"text {index} has {len(token_ids)} token(s); at least 2 are needed")
        documents.append(make_windows(token_ids, window=window, stride=stride))
    return documents


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    n_sequences: int,
    seq_len: int,
    seed: int = 0,
    held_out: tuple[int, int | None] | None = None,
) -> torch.Tensor:
    """``[n_sequences, seq_len]`` token windows drawn from ``text`` at seeded random offsets (for calibration).

    Offsets are drawn without replacement from the non-overlapping window starts, so sequences never repeat.
    ``held_out``: a token span ``[start, stop)`` of ``text`` (``stop`` None: to its end) that no window may touch,
    the tokens a measurement judges when it reads the same text.
    """
    if n_sequences < 1 or seq_len < 2:
        raise CorpusError(f"calibration needs n_sequences ≥ 1 and seq_len ≥ 2, got {n_sequences} × {seq_len}")
    import torch

    token_ids = _token_ids(tokenizer, text)
    candidates = torch.arange(len(token_ids) // seq_len) * seq_len
    if held_out is not None:
        start, stop = held_out
        stop = len(token_ids) if stop is None else stop
        candidates = candidates[(candidates + seq_len <= start) | (candidates >= stop)]
    if len(candidates) < n_sequences:
        avoided = "" if held_out is None else f" outside the judged tokens {held_out[0]}–{held_out[1] or 'end'}"
        raise CorpusError(
            f"calibration text too short: {len(token_ids)} tokens hold {len(candidates)} windows of {seq_len}"
            f"{avoided}, {n_sequences} asked for"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = candidates[torch.randperm(len(candidates), generator=generator)[:n_sequences].sort().values]
    return torch.stack([token_ids[start : start + seq_len] for start in starts.tolist()])


#: Consecutive token ids judged text must share with calibration tokens to count as calibrated on. 32 tokens are
#: about 25 words of prose, a sentence or two: boilerplate that recurs across independent texts ("Changed in version
#: 3.x:", "Return True if ...", a licence line) stays well under it, while a pasted calibration passage (whole
#: calibration sequences are 128 tokens and more) is caught even when only a quarter of one is pasted, and even
#: though its first and last tokens may tokenize differently out of their context.
SHARED_RUN_TOKENS = 32


@dataclass(frozen=True)
class SharedRun:
    """Judged tokens ``[start, stop)`` of window ``window`` that equal calibration sequence ``sequence`` from its
    token ``sequence_start`` on."""

    window: int
    start: int
    stop: int
    sequence: int
    sequence_start: int


def shared_calibration_run(
    judged: Sequence[torch.Tensor], calibration: torch.Tensor, *, run: int = SHARED_RUN_TOKENS
) -> SharedRun | None:
    """The first run of at least ``run`` consecutive token ids that the ``judged`` windows (1-D token ids each)
    share with a ``[n_sequences, seq_len]`` ``calibration``, extended as far as the two keep agreeing; None when
    no such run exists. A model calibrated on those tokens would be judged partly on what it was fitted to.

    Every ``run``-gram of the calibration goes into a hash set, so the cost is one pass over each.

    Example:
        >>> import torch
        >>> calibration = torch.arange(100, 140).reshape(2, 20)
        >>> judged = [torch.tensor([1, 2, 3, 104, 105, 106, 107, 108, 9])]
        >>> shared_calibration_run(judged, calibration, run=4)
        SharedRun(window=0, start=3, stop=8, sequence=0, sequence_start=4)
        >>> shared_calibration_run([torch.tensor([1, 104, 105, 106, 9])], calibration, run=4) is None
        True
    """
    if run < 1:
        raise CorpusError(f"a shared run must be at least 1 token long, got {run}")
    sequences = calibration.tolist()
    grams: dict[tuple[int, ...], tuple[int, int]] = {}
    for index, sequence in enumerate(sequences):
        for position in range(len(sequence) - run + 1):
            grams.setdefault(tuple(sequence[position : position + run]), (index, position))
    if not grams:
        return None
    for window, token_ids in enumerate(judged):
        ids = token_ids.tolist()
        for start in range(len(ids) - run + 1):
            found = grams.get(tuple(ids[start : start + run]))
            if found is None:
                continue
            index, position = found
            sequence, stop, offset = sequences[index], start + run, position - start
            while stop < len(ids) and stop + offset < len(sequence) and ids[stop] == sequence[stop + offset]:
                stop += 1
            return SharedRun(window, start, stop, index, position)
    return None
