"""Strength sweeps: families, exact zero at the identity level, outputs, resume, and thresholds on SmolLM2."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import SCALE, shared_data_path, tiny_llama

from hemorrhage_hf import render
from hemorrhage_hf.cli import main
from hemorrhage_hf.corpus import make_windows, tokenize_corpus
from hemorrhage_hf.errors import SpecError
from hemorrhage_hf.models import load_tokenizer
from hemorrhage_hf.modify.calibration import CalibrationSettings
from hemorrhage_hf.sweep.runner import (
    FAMILIES,
    MODEL_CURVES,
    StrengthScale,
    SweepOptions,
    SweepResult,
    level_value,
    resolve_family,
    run_sweep,
)
from hemorrhage_hf.tasks.scoring import load_task


def tiny_windows():
    return make_windows(torch.arange(400) * 7 % 64, window=40)


def test_families_turn_levels_into_specs():
    bits = resolve_family("bits")
    assert [bits.spec(level) for level in ("32", "8", "3")] == [None, "int8-g64", "int3-g64"]
    assert resolve_family("sparsity:wanda").spec("0") is None and resolve_family("nm:wanda").spec("2:4") == "2:4-wanda"
    custom = resolve_family("int{}-g128-asym", identity_levels=["16"])
    assert custom.spec("4") == "int4-g128-asym" and custom.spec("16") is None and custom.kind == "model"
    assert resolve_family("top_p={}").kind == "decoding" and resolve_family("top_k").log_strength
    assert level_value("2:4") == 50 and level_value("1:4") == 75
    scale = StrengthScale.infer(bits, ["32", "8", "4", "2"])
    assert scale.strength("4") == -4 and scale.level(-2.5) == 2.5
    with pytest.raises(SpecError, match="unknown sweep family"):
        resolve_family("bogus")
    with pytest.raises(SpecError, match="monotonically"):
        StrengthScale.infer(bits, ["32", "4", "8", "2"])


def test_bad_levels_fail_before_any_model_runs():
    for family, levels, message in (
        ("bits", ["32", "9"], "between 2 and 8"),
        ("bits", ["8", "8"], "repeat"),
        ("top_p", ["1", "2"], r"\(0, 1\]"),
        ("bits", ["x"], "not a number"),
    ):
        with pytest.raises(SpecError, match=message):
            run_sweep(None, None, [], family, levels)


#: PPL ratios of a Wanda sweep of SmolLM2 on WikiText-2, 0-90 % (a collapse from 60 % on).
WANDA_RATIOS = (1.0, 1.004, 1.058, 1.200, 1.594, 2.564, 7.32, 45.2, 1835, 1998)


def wanda_like_sweep(ratio_errors=None) -> SweepResult:
    family = resolve_family("sparsity:wanda")
    levels = []
    for index, ratio in enumerate(WANDA_RATIOS):
        level = str(10 * index)
        figures = {"ppl_ratio": ratio, "kl_mean": math.log(ratio), "top1_agreement": 1 / ratio}
        if ratio_errors is not None:
            figures["ppl_ratio_error_block"] = ratio_errors[index]
        spec = family.spec(level)
        levels.append({"level": level, "spec": spec, "strength": None if spec is None else 10.0 * index})
        levels[-1].update(figures=figures, seconds=1.0)
    return SweepResult(family, levels, {}, MODEL_CURVES)


def test_the_plotted_curve_meets_the_tolerance_line_at_the_crossing_it_reports(monkeypatch, tmp_path):
    """The crossing is interpolated in ln(PPL ratio − 1); the plot draws the ratio itself, so straight segments
    between the points would meet the 1.1 line at another level than the one printed."""
    result = wanda_like_sweep()
    rules = result.thresholds()["ppl_ratio"]
    crossing = rules["tolerance"]["crossing_level"]
    assert 20 < crossing < 30
    drawn = []
    monkeypatch.setattr(render, "_save_figure", lambda figure, path: drawn.append(figure))
    render.plot_sweep_curve(result, MODEL_CURVES[0], rules, tmp_path / "curve.png")
    line = max(drawn[0].axes[0].get_lines(), key=lambda line: len(line.get_xdata()))
    xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    inside = (xs >= 20) & (xs <= 30)  # the segment holding the crossing, on the plot's log axis
    assert math.exp(np.interp(crossing, xs[inside], np.log(ys[inside]))) == pytest.approx(1.1, abs=1e-3)


def test_the_breakpoint_weighs_levels_by_their_errors_and_reports_leave_one_out_levels(tmp_path):
    ratios = np.array(WANDA_RATIOS)
    weighted = wanda_like_sweep(list(0.01 * ratios)).to_dict()["thresholds"]["ppl_ratio"]["breakpoint"]
    unweighted = wanda_like_sweep().to_dict()["thresholds"]["ppl_ratio"]["breakpoint"]
    assert weighted["weighted"] and not unweighted["weighted"]
    refits = weighted["leave_one_out_levels"]
    assert [refit["left_out"] for refit in refits] == [
        str(level) for level in range(10, 10 * weighted["n_points"] + 1, 10)
    ]
    assert all(refit["level"] is None or 10 <= refit["level"] <= 90 for refit in refits)


def test_tiny_bits_sweep_writes_everything_and_resumes(tmp_path):
    model, windows = tiny_llama(hidden=64), tiny_windows()  # groups of 64 need 64 input features
    options = dict(
        options=SweepOptions(top_k=8, cache_root=tmp_path / "cache", progress=False), output_dir=tmp_path / "out"
    )
    first = run_sweep(model, None, windows, "bits", ["32", "8", "4"], **options)
    identity = first.levels[0]["figures"]
    assert first.levels[0]["spec"] is None and first.levels[0]["strength"] is None
    assert identity["kl_max"] == 0.0 and identity["ppl_ratio"] == 1.0 and identity["top1_agreement"] == 1.0
    assert 0 < first.levels[1]["figures"]["kl_mean"] < first.levels[2]["figures"]["kl_mean"]
    assert first.metadata["reference_cache"]["k"] == 8 and first.metadata["reference_cache"]["kl_is_lower_bound"]

    resumed = run_sweep(model, None, windows, "bits", ["32", "8", "4", "2"], **options)
    assert [entry["seconds"] for entry in resumed.levels[:3]] == [entry["seconds"] for entry in first.levels]
    out = tmp_path / "out"
    saved = json.loads((out / "sweep.json").read_text())
    assert [entry["level"] for entry in saved["levels"]] == ["32", "8", "4", "2"]
    assert set(saved["thresholds"]) == {"kl_mean", "ppl_ratio", "top1_agreement"}
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [row["spec"] for row in rows] == ["", "int8-g64", "int4-g64", "int2-g64"] and float(rows[0]["kl_mean"]) == 0
    assert all((out / f"sweep_{key}.png").stat().st_size > 10_000 for key in saved["thresholds"])


def test_every_model_family_sweeps_a_tiny_model(tmp_path):
    """Each family's first two levels are valid specs of the registry: an identity level is exactly zero."""
    tokenizer = load_tokenizer("default")  # calibration text is tokenized with it, so the vocabulary must match
    # 128 wide: every backend family must accept its default group size (HQQ refuses groups that do not divide)
    model = tiny_llama(n_layers=4, vocab_size=len(tokenizer), hidden=128, heads=8, kv_heads=2)
    windows = make_windows(torch.arange(100) * 7919 % len(tokenizer), window=50)
    calibration_text = tmp_path / "calibration.txt"  # short, so tokenizing it per family stays cheap
    calibration_text.write_text(shared_data_path("wikitext-2-raw/wiki.valid.raw").read_text()[:20_000])
    for name, family in FAMILIES.items():
        # llm-compressor's GPTQ reads the model's processor from its folder, which a random tiny model has not;
        # tests/modify/test_backends.py runs GPTQ on a saved tiny model.
        if family.kind != "model" or name.endswith(":gptq"):
            continue
        levels = list(family.default_levels[:2])
        result = run_sweep(
            model,
            tokenizer,
            windows,
            family,
            levels,
            options=SweepOptions(top_k=8, cache_root=tmp_path, progress=False),
            calibration=CalibrationSettings(str(calibration_text), n_sequences=4, seq_len=64),
        )
        assert [entry["spec"] for entry in result.levels] == [family.spec(level) for level in levels], name
        first = result.levels[0]["figures"]
        assert first["kl_max"] == 0.0 or family.identity_levels == (), name
        assert all(entry["figures"]["n_tokens"] == first["n_tokens"] for entry in result.levels), name


def test_tiny_temperature_sweep_runs_all_levels_in_one_pass(tmp_path):
    result = run_sweep(
        tiny_llama(),
        None,
        tiny_windows(),
        "temperature",
        None,
        options=SweepOptions(progress=False),
        output_dir=tmp_path,
    )
    tv = [entry["figures"]["tv_mean"] for entry in result.levels]
    assert tv[0] == 0.0 and all(a < b for a, b in zip(tv, tv[1:]))
    assert set(result.thresholds()) == {"tv_mean", "js_mean", "top1_agreement"}
    assert (tmp_path / "sweep_tv_mean.png").is_file()


@pytest.fixture(scope="module")
def wiki_windows(smollm2, wikitext_text):
    _, tokenizer = smollm2
    return tokenize_corpus(tokenizer, wikitext_text, window=256, max_tokens=768 * SCALE)


@pytest.mark.heavy
def test_smollm2_weight_bits_threshold(smollm2, wiki_windows, tmp_path):
    model, tokenizer = smollm2
    result = run_sweep(
        model,
        tokenizer,
        wiki_windows,
        "bits",
        None,
        options=SweepOptions(cache_root=tmp_path, progress=False),
        output_dir=tmp_path,
    )
    kl = [entry["figures"]["kl_mean"] for entry in result.levels]
    assert kl[0] == 0.0 and all(a < b for a, b in zip(kl, kl[1:]))
    # Six levels barely tell a knee from a smooth bend (bootstrap p = 0.017 on 2,048 tokens): the fit is tested
    # against smooth curves, and where it reports a knee, the knee lies between 4 and 3 bits; else the headline is
    # where the PPL ratio crosses 1.1 (4.8 bits on 2,048 tokens).
    fitted = result.thresholds()["ppl_ratio"]["breakpoint"]
    assert fitted["weighted"] and fitted["p_value"] is not None
    assert len(fitted["leave_one_out_levels"]) == fitted["n_points"] == 6
    threshold = result.threshold()
    assert threshold["figure"] == "ppl_ratio"
    if threshold["rule"] == "breakpoint":
        assert (
            3 <= threshold["level"] <= 4 and threshold["interval"][0] <= threshold["level"] <= threshold["interval"][1]
        )
    else:
        assert 4 <= threshold["level"] <= 6
    # The exact KL (the sweep measures against the exact reference store) stays ≤ 0.1 down to 6 bits; int5-g64
    # exceeds it here (a top-k cache's lower bound of the KL had put it under).
    assert result.thresholds()["kl_mean"]["tolerance"]["level_before"]["level"] == "6"


@pytest.mark.heavy
def test_smollm2_wanda_sparsity_threshold_with_a_task(smollm2, wiki_windows, tmp_path):
    model, tokenizer = smollm2
    piqa = load_task("piqa", shared_data_path("piqa"), limit=12 * SCALE)
    result = run_sweep(
        model,
        tokenizer,
        wiki_windows,
        "sparsity:wanda",
        ["0", "20", "40", "50", "60", "70", "80"],
        tasks=[piqa],
        calibration=CalibrationSettings(n_sequences=4, seq_len=128),
        options=SweepOptions(cache_root=tmp_path, progress=False),
        output_dir=tmp_path,
    )
    figures = [entry["figures"] for entry in result.levels]
    assert figures[0]["kl_max"] == 0.0 and figures[0]["piqa_flip_rate"] == 0.0
    assert figures[-1]["kl_mean"] > 10 * figures[1]["kl_mean"]
    # 12 two-choice items cannot show an accuracy drop above noise; answers changing can.
    assert figures[-1]["piqa_flip_rate"] > figures[1]["piqa_flip_rate"]
    threshold = result.threshold()
    assert threshold["figure"] == "ppl_ratio"
    # A knee, where the fit finds one against smooth curves, lies between 50 and 80 %; else the PPL ratio's 1.1
    # crossing, between 20 and 40 %.
    assert 50 <= threshold["level"] <= 80 if threshold["rule"] == "breakpoint" else 20 <= threshold["level"] <= 40
    assert "piqa_accuracy_modified" in result.thresholds()
    assert len(result.levels[-1]["task_answers"]["piqa"]) == len(piqa)


@pytest.mark.heavy
def test_sweep_command(tmp_path, capsys):
    text = shared_data_path("wikitext-2-raw/wiki.valid.raw")
    code = main(
        [
            "sweep",
            "--reference",
            "default",
            "--family",
            "bits",
            "--levels",
            "32,4,3",
            "--text-file",
            str(text),
            "--max-tokens",
            "512",
            "--window",
            "256",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--quiet",
            "--no-plots",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "(unmodified)" in printed and "int3-g64" in printed and "tolerance" in printed
    assert (tmp_path / "out" / "sweep.json").is_file() and not list((tmp_path / "out").glob("*.png"))
