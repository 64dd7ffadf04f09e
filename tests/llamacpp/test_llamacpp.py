"""GGUF as llama.cpp runs it: the engine's logits, llama.cpp scoring, export, and agreement with llama-perplexity."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from conftest import SCALE, shared_data_path

from hemorrhage_hf.cli import main
from hemorrhage_hf.comparison import LoadOptions, MeasureOptions, TextSource, compare
from hemorrhage_hf.corpus import LLAMACPP_SCORING, llamacpp_chunks, tokenize_corpus
from hemorrhage_hf.errors import HemorrhageError, ModelLoadError, TokenizerMismatchError
from hemorrhage_hf.llamacpp import tools
from hemorrhage_hf.llamacpp.export import convert, quantize, reference_checkpoint
from hemorrhage_hf.models import cache_dir

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (make install builds it)"
)


def _have(program: str) -> bool:
    try:
        tools.find_program(program)
    except tools.LlamaCppToolError:
        return False
    return True


needs_tools = pytest.mark.skipif(
    not all(_have(name) for name in tools.PROGRAMS), reason="llama.cpp's programs are not built (make install)"
)


@pytest.fixture(scope="session")
def gguf_folder() -> Path:
    folder = cache_dir() / "test-gguf"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def f32_gguf(gguf_folder) -> Path:
    """The embedded SmolLM2 converted by llama.cpp's converter (kept between runs)."""
    return convert(reference_checkpoint("default"), gguf_folder / "SmolLM2-135M-Instruct-f32.gguf")


@pytest.fixture(scope="session")
def q4_0_gguf(f32_gguf, gguf_folder) -> Path:
    target = gguf_folder / "SmolLM2-135M-Instruct-Q4_0.gguf"
    return target if target.is_file() else quantize(f32_gguf, target, "Q4_0")


# --- llama.cpp scoring (no llama.cpp needed) --------------------------------------------------------------------------


def test_llamacpp_chunks_score_the_second_half_after_bos():
    chunks = llamacpp_chunks(torch.arange(100, 1100), window=512, bos_id=1)
    # 1,000 tokens plus BOS make one whole chunk of 512 (the tail is dropped, as llama.cpp drops it)
    assert len(chunks) == 1
    assert chunks[0].input_ids[0].item() == 1 and chunks[0].input_ids[1].item() == 100
    assert chunks[0].n_scored == 255  # llama.cpp: n_ctx - 1 - n_ctx / 2
    later = llamacpp_chunks(torch.arange(100, 2148), window=512, bos_id=1)[1]
    assert later.input_ids[0].item() == 1 and later.input_ids[1].item() == 100 + 512  # first token replaced by BOS


def test_smollm2_gets_no_bos_because_its_tokenizer_adds_none(smollm2):
    _, tokenizer = smollm2
    windows = tokenize_corpus(tokenizer, "The cat sat on the mat. " * 200, window=256, scoring=LLAMACPP_SCORING)
    plain = tokenizer("The cat sat on the mat. " * 200, add_special_tokens=False).input_ids
    assert windows[0].input_ids.tolist() == plain[:256]
    assert len(windows) == len(plain) // 256
    assert all(w.first_scored == 129 for w in windows)


def test_report_states_its_scoring(smollm2, tmp_path):
    model, tokenizer = smollm2
    source = TextSource(text="The cat sat on the mat. " * 120, window=128, scoring="llama.cpp")
    report = compare(model, model, tokenizer=tokenizer, source=source, options=MeasureOptions(progress=False))
    assert report.metadata["scoring"] == "llama.cpp"
    assert report.figures["n_tokens"] == report.metadata["n_windows"] * 63
    written = report.save(tmp_path, plots=False)
    assert "llama.cpp perplexity: chunks of 128 tokens, no BOS" in written["markdown"].read_text()


def test_layers_with_the_llamacpp_engine_is_a_clear_error(tmp_path, capsys):
    code = main(
        ["report", "--reference", "a.gguf", "--modified", "b.gguf", "--engine", "llama.cpp", "--layers"]
        + ["--output", str(tmp_path)]
    )
    assert code == 2
    assert "--layers and --attention are unavailable with the llama.cpp engine" in capsys.readouterr().err


def test_missing_cmake_and_compiler_name_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(tools.TOOLS_ENVIRONMENT, str(tmp_path / "tools"))
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(tools.LlamaCppToolError, match="cmake .*and a C\\+\\+ compiler"):
        tools.install()


def test_a_missing_program_names_the_command_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.setenv(tools.TOOLS_ENVIRONMENT, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(tools.LlamaCppToolError, match="hemorrhage-hf install-llama-cpp"):
        tools.find_program("llama-quantize")


# --- the engine ------------------------------------------------------------------------------------------------------


@needs_llama_cpp
def test_unknown_architecture_is_a_load_error(tmp_path):
    import gguf

    from hemorrhage_hf.llamacpp.engine import LlamaCppModel

    path = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-architecture")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="llama.cpp could not load"):
        LlamaCppModel(path)


@needs_llama_cpp
def test_f32_gguf_in_llamacpp_matches_torch(smollm2, f32_gguf):
    """The same fp32 weights through llama.cpp's kernels and through torch: near-identical next-token distributions."""
    from hemorrhage_hf.llamacpp.engine import LlamaCppModel

    model, tokenizer = smollm2
    ids = torch.tensor(
        [tokenizer("The history of the city begins in the Roman era, when", add_special_tokens=False).input_ids]
    )
    engine = LlamaCppModel(f32_gguf)
    ours = torch.log_softmax(engine.logits(ids)[0], -1)
    with torch.no_grad():
        theirs = torch.log_softmax(model(ids).logits[0].float(), -1)
    kl = (theirs.exp() * (theirs - ours)).sum(-1)
    assert kl.max().item() < 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9


@needs_llama_cpp
def test_a_tokenizer_that_cuts_text_differently_is_refused(f32_gguf):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from hemorrhage_hf.llamacpp.engine import LlamaCppModel

    word_level = Tokenizer(WordLevel({"[UNK]": 0, "the": 1, "cat": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    with pytest.raises(TokenizerMismatchError, match="llama.cpp tokenizes the text differently"):
        LlamaCppModel(f32_gguf).check_tokenizer(other, "the cat")


# --- against llama.cpp's own tools -----------------------------------------------------------------------------------


@needs_llama_cpp
@needs_tools
@pytest.mark.heavy
def test_figures_match_llama_perplexity_kl_divergence(f32_gguf, q4_0_gguf, tmp_path):
    """Same file, same chunks: mean KL within 2 %, same-top within 0.5 points, reference PPL within 0.5 %."""
    from hemorrhage_hf.llamacpp.perplexity import llamacpp_base_logits, llamacpp_kl_divergence

    window, chunks = 512, 2 * SCALE
    text = shared_data_path("wikitext-2-raw/wiki.valid.raw").read_text(encoding="utf-8")[: 12_000 * chunks]
    text_file = tmp_path / "wiki.txt"
    text_file.write_text(text, encoding="utf-8")
    base_logits = llamacpp_base_logits(f32_gguf, text_file, tmp_path / "f32.kld", window=window, chunks=chunks)
    theirs = llamacpp_kl_divergence(q4_0_gguf, base_logits, window=window, chunks=chunks)
    report = compare(
        str(f32_gguf),
        str(q4_0_gguf),
        source=TextSource(text=text, window=window, max_tokens=window * chunks, scoring="llama.cpp"),
        load=LoadOptions(engine="llama.cpp"),
        options=MeasureOptions(progress=False),
    )
    ours = report.figures
    assert ours["n_tokens"] == chunks * (window - 1 - window // 2)
    assert ours["kl_mean"] == pytest.approx(theirs["kl_mean"], rel=0.02)
    assert abs(ours["top1_agreement"] - theirs["top1_agreement"]) <= 0.005
    assert ours["ppl_reference"] == pytest.approx(theirs["ppl_reference"], rel=0.005)
    assert ours["ppl_ratio"] == pytest.approx(theirs["ppl_ratio"], rel=0.005)


@needs_tools
def test_export_gguf_writes_each_type(f32_gguf, gguf_folder, tmp_path):
    os.link(f32_gguf, tmp_path / f32_gguf.name)  # the export keeps an existing base: no second conversion
    code = main(["export-gguf", "--reference", "default", "--type", "q8_0", "--output", str(tmp_path)])
    assert code == 0
    exported = tmp_path / "SmolLM2-135M-Instruct-Q8_0.gguf"
    # Q8_0 stores 34 bytes per 32 weights: a little over a quarter of the f32 file
    assert 0.25 < exported.stat().st_size / f32_gguf.stat().st_size < 0.30


def test_export_gguf_refuses_an_unknown_type(tmp_path, capsys):
    assert main(["export-gguf", "--reference", "default", "--type", "Q4_0,Q9_9", "--output", str(tmp_path)]) == 2
    assert "unknown GGUF type 'Q9_9'" in capsys.readouterr().err


def test_llamacpp_engine_without_a_gguf_is_refused():
    with pytest.raises(HemorrhageError, match="neither model is one"):
        compare("default", modification="int8", load=LoadOptions(engine="llama.cpp"))


@needs_llama_cpp
def test_task_scoring_through_llamacpp_matches_torch(smollm2, f32_gguf):
    """Padded batches of different lengths: each row runs alone in llama.cpp, and its log-likelihoods match torch's."""
    from hemorrhage_hf.llamacpp.engine import LlamaCppModel
    from hemorrhage_hf.tasks.scoring import score_continuations

    model, tokenizer = smollm2
    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " a large potato field in the north"),
        ("Water boils at a temperature of one hundred degrees", " Celsius"),
        ("She opened the door and", " walked in"),
    ]
    ours = score_continuations(LlamaCppModel(f32_gguf), tokenizer, pairs, batch_size=4)
    theirs = score_continuations(model, tokenizer, pairs, batch_size=4)
    for a, b in zip(ours, theirs):
        assert a.log_likelihood == pytest.approx(b.log_likelihood, abs=0.02)
        assert a.greedy == b.greedy


@needs_llama_cpp
@needs_tools
def test_gguf_sweep_runs_each_type_in_llamacpp(smollm2, f32_gguf, q4_0_gguf, gguf_folder, tmp_path):
    from hemorrhage_hf.llamacpp.engine import LlamaCppModel
    from hemorrhage_hf.llamacpp.export import GgufLevels
    from hemorrhage_hf.sweep.runner import SweepOptions, run_sweep

    _, tokenizer = smollm2
    text = "The river flows through the old town, past the mill and the church, to the sea. " * 30
    windows = tokenize_corpus(tokenizer, text, window=128, max_tokens=256, scoring=LLAMACPP_SCORING)
    result = run_sweep(
        LlamaCppModel(f32_gguf),
        tokenizer,
        windows,
        "gguf",
        ["f32", "Q8_0", "Q4_0"],
        options=SweepOptions(top_k=8, cache_root=tmp_path, progress=False),
        gguf_levels=GgufLevels(f32_gguf, gguf_folder, engine="llama.cpp"),
    )
    unmodified, q8_0, q4_0 = result.levels
    assert unmodified["spec"] is None and unmodified["figures"]["kl_max"] == 0.0
    # strength: bits per weight, negated (fewer bits is a stronger modification)
    assert (q8_0["strength"], q4_0["strength"]) == (-8.5, -4.5)
    assert q8_0["figures"]["kl_mean"] < 0.05 < q4_0["figures"]["kl_mean"]
