"""Token windows: every token but the first scored exactly once; bad text rejected with a reason."""

import pytest
import torch

from hemorrhage_hf.comparison import TextSource
from hemorrhage_hf.corpus import (
    calibration_windows,
    load_corpus,
    make_windows,
    python_docs_text,
    shared_calibration_run,
    tokenize_corpus,
    tokenize_documents,
)
from hemorrhage_hf.errors import CorpusError


def _scored(n_tokens, window, stride):
    scored = []
    for w in make_windows(torch.arange(n_tokens), window=window, stride=stride):
        assert len(w.input_ids) <= window
        scored += w.input_ids[w.first_scored :].tolist()
    return scored


@pytest.mark.parametrize(("n_tokens", "window", "stride"), [(10, 4, 2), (1000, 128, 32), (130, 128, 64), (7, 7, 3)])
def test_overlapping_windows_score_every_token_once(n_tokens, window, stride):
    assert _scored(n_tokens, window, stride) == list(range(1, n_tokens))


def test_non_overlapping_windows_skip_only_each_window_start():
    # Token 4 and 8 open windows 2 and 3: they have no context inside their window.
    assert _scored(10, 4, 4) == [1, 2, 3, 5, 6, 7, 9]


def test_windows_keep_context_when_strided():
    windows = make_windows(torch.arange(20), window=8, stride=4)
    assert all(w.first_scored >= 4 for w in windows[1:])


@pytest.mark.parametrize(("window", "stride"), [(1, 1), (8, 0), (8, 9)])
def test_bad_window_arguments(window, stride):
    with pytest.raises(CorpusError):
        make_windows(torch.arange(20), window=window, stride=stride)


def test_python_docs_corpus_is_english_prose_and_stable():
    text = python_docs_text()
    assert len(text) > 300_000
    assert "statement" in text and "\n*****" not in text
    assert text == python_docs_text()


def test_bad_text_inputs(tmp_path, smollm2):
    _, tokenizer = smollm2
    with pytest.raises(CorpusError, match="empty"):
        tokenize_corpus(tokenizer, "  \n\t ", window=16)
    with pytest.raises(CorpusError, match="shorter than one window"):
        tokenize_corpus(tokenizer, "A few words only.", window=512)
    with pytest.raises(CorpusError, match="text 1 is empty"):
        tokenize_documents(tokenizer, ["fine text here", ""], window=16)
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(str(tmp_path / "latin1.txt"))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(str(tmp_path / "blank.txt"))


def test_calibration_windows_seeded_distinct_and_bounded(smollm2):
    _, tokenizer = smollm2
    text = python_docs_text()[:20_000]
    first = calibration_windows(tokenizer, text, n_sequences=4, seq_len=64, seed=3)
    assert first.shape == (4, 64)
    assert torch.equal(first, calibration_windows(tokenizer, text, n_sequences=4, seq_len=64, seed=3))
    assert len({tuple(row.tolist()) for row in first}) == 4
    with pytest.raises(CorpusError, match="too short"):
        calibration_windows(tokenizer, text[:500], n_sequences=64, seq_len=512)


def test_calibration_on_the_judged_text_never_draws_the_judged_tokens(smollm2):
    """The defaults of report and leaderboard (Python's docs, 16 × 512 calibration tokens, 8,192 judged) once drew a
    calibration window that was also a judged window."""
    tokenizer = smollm2[1]
    source = TextSource(max_tokens=8192)
    judged = {tuple(window.input_ids.tolist()) for window in source.windows(tokenizer)}
    calibration = source.calibration_apart(None)
    assert calibration.held_out == (0, 8192)
    drawn = calibration.windows(tokenizer)
    assert drawn.shape == (16, 512) and not judged & {tuple(row.tolist()) for row in drawn}
    whole = tokenizer(python_docs_text(), add_special_tokens=False).input_ids
    starts = [next(i for i in range(0, len(whole), 512) if whole[i : i + 512] == row.tolist()) for row in drawn]
    assert min(starts) >= 8192
    # Held out from the text it is judged on only: another text keeps the calibration as given.
    other = TextSource(text="Some other text entirely.", window=8)
    assert other.calibration_apart(calibration).held_out == (0, 8192)
    assert other.calibration_apart(None).held_out is None
    span = TextSource(max_tokens=1000, skip_tokens=1536).calibration_apart(None).held_out
    assert span == (1536, 2536)
    with pytest.raises(CorpusError, match="outside the judged tokens 0–end"):
        TextSource().calibration_apart(None).windows(tokenizer)


def test_a_shared_calibration_run_is_a_long_run_only():
    calibration = torch.arange(200).reshape(2, 100)
    filler = torch.arange(1000, 1010)
    boilerplate = torch.cat([filler, calibration[0, 40:71], filler])  # 31 tokens in common: a phrase, not a passage
    assert shared_calibration_run([boilerplate], calibration) is None
    pasted = torch.cat([filler[:5], calibration[1, 10:50], filler])  # 40 tokens of sequence 1, from its token 10
    found = shared_calibration_run([boilerplate, pasted], calibration)
    assert (found.window, found.start, found.stop, found.sequence, found.sequence_start) == (1, 5, 45, 1, 10)
    assert shared_calibration_run([pasted], calibration, run=41) is None
    assert shared_calibration_run([boilerplate], calibration, run=31).start == 10


@pytest.mark.parametrize("max_tokens, skip_tokens", [(256, 0), (4096, 0), (1000, 1536), (30_000, 100)])
def test_the_first_tokens_of_a_long_text_are_those_of_the_whole_text(smollm2, wikitext_text, max_tokens, skip_tokens):
    tokenizer = smollm2[1]
    for text in (wikitext_text, python_docs_text()):
        whole = tokenizer(text, add_special_tokens=False).input_ids
        windows = tokenize_corpus(tokenizer, text, window=256, max_tokens=max_tokens, skip_tokens=skip_tokens)
        measured = torch.cat([window.input_ids for window in windows]).tolist()
        assert measured == whole[skip_tokens : skip_tokens + max_tokens]
