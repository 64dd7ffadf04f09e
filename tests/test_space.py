"""The Space on the real SmolLM2: its bounds and allow-list, its API through gradio_client, and its page in headless
Chromium (Debian's package, driven by Playwright; nothing downloads a browser)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from hemorrhage_hf.errors import HemorrhageError
from hemorrhage_hf.space.backend import (
    DEFAULT_MODEL_LABEL,
    ModelCache,
    SpaceLimits,
    allow_list_from_environment,
    bounded_text_windows,
    refuse_calibration_text,
    run_comparison,
    run_leaderboard,
    run_threshold_sweep,
    token_kl_html,
    token_pieces,
)

TEXT = "Any object can be tested for truth value, for use in an if or while condition."
#: Screenshots of the browser test are kept here (ignored by git, like every PNG outside model_cards/).
ARTIFACTS = Path(os.environ.get("HEMORRHAGE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.parametrize("typed", ["/etc/passwd", "default", "HuggingFaceTB/SmolLM2-135M-Instruct", "../model"])
def test_a_model_typed_by_a_visitor_is_never_loaded(typed):
    with pytest.raises(HemorrhageError, match="is not offered here"):
        ModelCache().reference(typed)


def test_operator_allow_list_from_the_environment(monkeypatch):
    monkeypatch.setenv("HEMORRHAGE_SPACE_MODELS", "Small=default, Local = /models/x")
    assert allow_list_from_environment() == {"Small": "default", "Local": "/models/x"}
    monkeypatch.setenv("HEMORRHAGE_SPACE_MODELS", "no-source")
    with pytest.raises(HemorrhageError, match="label=source"):
        allow_list_from_environment()
    monkeypatch.delenv("HEMORRHAGE_SPACE_MODELS")
    assert allow_list_from_environment() == {DEFAULT_MODEL_LABEL: "default"}


def test_text_longer_than_the_limit_is_refused(smollm2):
    _, tokenizer = smollm2
    with pytest.raises(HemorrhageError, match="this Space measures at most 8"):
        bounded_text_windows(tokenizer, TEXT, SpaceLimits(text_tokens=8))
    (window,) = bounded_text_windows(tokenizer, TEXT, SpaceLimits(text_tokens=64))
    assert window.first_scored == 1 and len(window.input_ids) == len(tokenizer(TEXT).input_ids)


def test_token_view_reproduces_the_text_and_escapes_html(smollm2):
    _, tokenizer = smollm2
    text = "<script>alert('x')</script>  Ünïcödé 日本語\n\ttabs & more"
    (window,) = bounded_text_windows(tokenizer, text, SpaceLimits())
    pieces = token_pieces(tokenizer, text, window.input_ids[1:].numpy())
    first = tokenizer.decode(window.input_ids[:1])
    assert first + "".join(pieces) == text
    kl = np.linspace(0, 5, len(pieces), dtype=np.float32)
    finite = np.ones(len(pieces), dtype=bool)
    finite[-1] = False
    rendered = token_kl_html(first, pieces, kl, finite)
    assert "<script" not in rendered and "</script" not in rendered and rendered.count("&lt;") == 2
    assert 'title="KL 5.0000 nats"' not in rendered  # the last token's logits were not finite
    assert 'title="NaN/inf logits"' in rendered and "rgba(178,34,34,0.850)" in rendered


def _space_on(smollm2) -> ModelCache:
    """A Space cache that serves the session's SmolLM2 (its modifications work on copies) instead of loading another."""
    cache = ModelCache(limits=SpaceLimits())
    cache._references[DEFAULT_MODEL_LABEL] = smollm2
    return cache


def _calibration_passage(cache: ModelCache) -> str:
    """A visitor's text that pastes the second Python-docs passage the Space calibrates Wanda, AWQ... on."""
    _, tokenizer = cache.reference(DEFAULT_MODEL_LABEL)
    passage = tokenizer.decode(cache.limits.calibration.windows(tokenizer)[1])
    return f"From the docs:\n{passage}\nThat is all."


def test_a_calibrated_spec_is_never_judged_on_its_calibration_passage(smollm2, tmp_path, monkeypatch):
    """Modified models are calibrated (and cached) before the visitor's text is known: a text holding the calibration
    passage would judge them partly on the tokens they were fitted to. Every tab refuses it before any model runs."""
    import hemorrhage_hf.space.backend as backend
    from hemorrhage_hf.space.ui import sample_text

    cache = _space_on(smollm2)
    text = _calibration_passage(cache)
    refused = r"contains the Python-docs passage that calibrated modifications \(wanda-50\) are fitted on here"
    with pytest.raises(HemorrhageError, match=refused + r" \(its tokens 5–133 are calibration tokens\)"):
        run_comparison(cache, DEFAULT_MODEL_LABEL, "wanda-50", text, output_dir=tmp_path)
    with pytest.raises(HemorrhageError, match=refused):
        run_threshold_sweep(cache, DEFAULT_MODEL_LABEL, "sparsity:wanda", ["0", "50"], text, output_dir=tmp_path)
    monkeypatch.setattr(backend, "LEADERBOARD_SPECS", (*backend.LEADERBOARD_SPECS, "wanda-50"))
    with pytest.raises(HemorrhageError, match=refused):
        run_leaderboard(cache, DEFAULT_MODEL_LABEL, ["int8", "wanda-50"], "int8", text, output_dir=tmp_path)
    with pytest.raises(HemorrhageError, match=refused):
        run_leaderboard(cache, DEFAULT_MODEL_LABEL, ["int8"], "wanda-50", text, output_dir=tmp_path)
    assert not cache._modified  # refused before anything was calibrated

    # The same text judges a spec that needs no calibration; the calibrated spec may judge other text, the Compare
    # tab's own Python-docs sample included (checked without fitting it: calibrating takes 6 s and more on 2 cores).
    plain = run_comparison(cache, DEFAULT_MODEL_LABEL, "int4-g64", text, output_dir=tmp_path)
    assert plain.report.metadata["modification"] == "int4-g64" and plain.report.figures["n_tokens"] > 128
    _, tokenizer = smollm2
    for other in (TEXT, sample_text()):
        windows = bounded_text_windows(tokenizer, other, cache.limits)
        refuse_calibration_text(cache, DEFAULT_MODEL_LABEL, ["wanda-50"], windows, cache.limits.calibration)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def space_url():
    """The Space served on 127.0.0.1 for this module, with tiny generation limits and a short correction fit."""
    from hemorrhage_hf.space import build_demo, launch

    demo = build_demo(ModelCache(limits=SpaceLimits(new_tokens=4, correction_iterations=8)))
    _, url, _ = launch(demo, port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_api_compare_then_card_section(space_url, tmp_path):
    from gradio_client import Client

    assert space_url.startswith("http://127.0.0.1:")
    client = Client(space_url, download_files=str(tmp_path), verbose=False)
    (
        severity,
        table,
        layer_plot,
        kl_plot,
        tokens_html,
        reference_text,
        modified_text,
        corrected_text,
        verdict,
        report,
    ) = client.predict(DEFAULT_MODEL_LABEL, "int4-g64", TEXT, "Name a colour.", 4, True, api_name="/compare")
    assert report["metadata"]["modification"] == "int4-g64" and report["n_tokens"] == 17
    assert report["kl_mean"] > 0.05 and report["ppl_ratio"] > 1  # int4 on SmolLM2 bleeds visibly
    assert len(report["layer_attention_js"]) == 30 and max(report["layer_cosine_distance"]) > 0
    assert f"**{report['severity']}**" in severity
    rows = {row[0]: row[1:] for row in table["data"]}
    assert rows["KL mean (nats)"][1].startswith(f"{report['kl_mean']:.5f}")
    assert rows["severity"] == ["—", report["severity"]]
    for png in (layer_plot, kl_plot):
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    assert tokens_html.count('title="KL ') == report["n_tokens"]  # each scored token; the first is context only
    assert reference_text and modified_text and corrected_text
    # The correction's own held-out check (fitted on the Python docs, never on this text) is shown with it.
    assert verdict.startswith("Decoding correction (fitted and checked on Python docs") and "held-out KL" in verdict

    card, section = client.predict("smollm2-int4", api_name="/card_section")
    assert card.startswith("---\nmodel-index:\n- name: smollm2-int4\n") and section in card
    assert section.startswith("## Hemorrhage report") and f"{report['kl_mean']:.5f}" in section


def test_api_threshold_sweep_feeds_the_card(space_url, tmp_path):
    from gradio_client import Client

    client = Client(space_url, download_files=str(tmp_path), verbose=False)
    client.predict(DEFAULT_MODEL_LABEL, "int4-g64", TEXT, "", 0, False, api_name="/compare")
    (
        threshold,
        plot,
        table,
    ) = client.predict(DEFAULT_MODEL_LABEL, "bits", "32,8,4,2", TEXT, api_name="/sweep")
    assert threshold.startswith("Swept over bits levels 32, 8, 4, 2")
    assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert table["headers"][:4] == ["level", "spec", "PPL ratio", "KL mean (nats)"]
    levels = {row[0]: row for row in table["data"]}
    # The identity level bleeds nothing: the store recomputes the head's product in row chunks, so its KL is zero up
    # to float rounding (-4e-9 measured on this text).
    assert levels["32"][1] == "(unmodified)" and abs(float(levels["32"][3])) < 1e-6
    assert float(levels["32"][2]) == 1
    kl = [float(levels[level][3]) for level in ("8", "4", "2")]
    assert kl == sorted(kl) and kl[-1] > 1  # fewer bits, more hemorrhage; 2 bits collapses
    _, section = client.predict("m", api_name="/card_section")
    assert "### Robustness threshold" in section and threshold in section


def test_api_leaderboard_ranks_plots_and_maps(space_url, tmp_path):
    from gradio_client import Client

    client = Client(space_url, download_files=str(tmp_path), verbose=False)
    table, pareto, layer_map, map_text = client.predict(
        DEFAULT_MODEL_LABEL, ["int4-g64", "int8"], "int4-g64", TEXT, api_name="/leaderboard"
    )
    assert table["headers"] == ["spec", "bits per weight", "KL mean (nats)", "top-1 agreement", "PPL ratio"]
    rows = {row[0]: row for row in table["data"]}
    assert [row[0] for row in table["data"]] == ["int8", "int4-g64"]  # lowest KL first
    assert rows["int4-g64"][1] == "4.250" and rows["int8"][1].startswith("8.0")  # per-row fp16 scales: 8 + 16/576…
    assert float(rows["int8"][2].split(" ± ")[0]) < 0.02 < float(rows["int4-g64"][2].split(" ± ")[0])
    for png in (pareto, layer_map):
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    assert map_text.startswith("**Layer map of `int4-g64`** on 17 tokens") and "the top 3 layers (layers." in map_text
    with pytest.raises(Exception, match="int2 is not in the list of choices"):  # gradio checks the menu first
        client.predict(DEFAULT_MODEL_LABEL, ["int4-g64"], "int2", TEXT, api_name="/leaderboard")


@pytest.mark.parametrize(
    ("model", "spec", "message"),
    [
        (DEFAULT_MODEL_LABEL, "int99", "bits must be between 2 and 8"),
        ("/etc/passwd", "int8", "not in the list of choices"),
    ],
)
def test_api_reports_bad_input(space_url, model, spec, message):
    from gradio_client import Client

    client = Client(space_url, verbose=False)
    with pytest.raises(Exception, match=message):
        client.predict(model, spec, TEXT, "", 0, False, api_name="/compare")


def _chromium() -> str:
    """Debian's chromium; missing, the test fails where `make install` could have installed it (as root)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        message = "Debian's chromium is not installed (`make install` installs it when run as root)"
        if os.geteuid() == 0 or os.environ.get("HEMORRHAGE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return chromium


@pytest.mark.browser
def test_page_runs_a_comparison_in_chromium(space_url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(space_url)
            page.fill("#text textarea", TEXT)
            page.check("#correct input[type=checkbox]")
            page.click("#compare-button")
            table = page.locator("#figures-table")
            expect(table).to_contain_text("KL mean (nats)", timeout=240_000)
            expect(table).to_contain_text("top-1 agreement")
            expect(page.locator("#severity")).to_contain_text("Severity:")
            plot = page.locator("#layer-plot img")
            expect(plot).to_be_visible()
            assert plot.evaluate("image => image.complete && image.naturalWidth") > 400
            expect(page.locator("#token-kl span[title^='KL ']").first).to_be_visible()
            expect(page.locator("#correction-verdict")).to_contain_text("held-out KL")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=ARTIFACTS / "space-compare.png", full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "space-compare.png").stat().st_size > 10_000
