"""Data-parallel measurement under `accelerate launch` (2 CPU processes, gloo) gives the single-process
report byte for byte; the sequential (one model at a time) mode gives the same exact figures and a KL bound.

The launcher gives each process one thread (OMP_NUM_THREADS=1), and CPU kernels round differently with another
thread count (measured: the last digits of KL p95 and of the perplexities move between 1 and 2 threads), so "the
single-process report" is that of one process with one thread; at the default thread count every figure agrees to
fp32 rounding (measured: 5e-6 relative at most, 2e-7 absolute on a median near 0)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hemorrhage_hf.comparison import MeasureOptions, TextSource, compare
from hemorrhage_hf.errors import HemorrhageError
from hemorrhage_hf.measurement.distributed import shard_bounds


def accelerate_launcher() -> str:
    """The `accelerate` script of this interpreter's environment: a virtual environment that is not activated is
    not on PATH, and another environment's launcher would run another Python."""
    beside = Path(sys.executable).with_name("accelerate")
    if beside.is_file():
        return str(beside)
    found = shutil.which("accelerate")
    if found is None:
        pytest.fail(f"no accelerate launcher beside {sys.executable} nor on PATH: install accelerate")
    return found


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # what the launcher gives each of its processes


@pytest.mark.parametrize(
    ("n_windows", "batch_size", "n_processes"), [(9, 1, 2), (10, 2, 3), (1, 1, 2), (7, 3, 2), (5, 1, 8)]
)
def test_shards_cover_every_window_once_on_batch_boundaries(n_windows, batch_size, n_processes):
    bounds = shard_bounds(n_windows=n_windows, batch_size=batch_size, n_processes=n_processes)
    covered = [index for start, stop in bounds for index in range(start, stop)]
    assert covered == list(range(n_windows))
    assert all(start % batch_size == 0 for start, _ in bounds)
    n_batches = [-(-(stop - start) // batch_size) for start, stop in bounds]
    assert max(n_batches) - min(n_batches) <= 1


@pytest.mark.heavy
def approximately(value):
    """``value`` with its numbers compared to float rounding; names, grades and nulls compared exactly."""
    if isinstance(value, dict):
        return {key: approximately(item) for key, item in value.items()}
    if isinstance(value, list):
        return [approximately(item) for item in value]
    if isinstance(value, float | int) and not isinstance(value, bool):
        return pytest.approx(value, rel=1e-5, abs=1e-6)
    return value


def test_two_processes_give_the_single_process_report_byte_for_byte(tmp_path, wikitext_text):
    accelerate = accelerate_launcher()
    assert accelerate, "accelerate's launcher is installed with the package"
    text_file = tmp_path / "t.txt"
    text_file.write_text(wikitext_text[:20_000], encoding="utf-8")
    # 5 windows over 2 processes: an uneven split (3 + 2).
    arguments = [
        "report",
        "--reference",
        "default",
        "--modification",
        "int4-g64",
        "--text-file",
        str(text_file),
        "--max-tokens",
        "600",
        "--window",
        "128",
        "--layers",
        "--quiet",
        "--no-plots",
    ]
    for name, environment in (("one", ONE_THREAD), ("default_threads", None)):
        subprocess.run(
            [sys.executable, "-m", "hemorrhage_hf.cli", *arguments, "--output", str(tmp_path / name)],
            check=True,
            capture_output=True,
            timeout=600,
            env=environment,
        )
    launched = subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "-m",
            "hemorrhage_hf.cli",
            *arguments,
            "--output",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "data-parallel over 2 processes (gloo)" in launched.stderr
    single = (tmp_path / "one" / "report.json").read_bytes()
    assert (tmp_path / "two" / "report.json").read_bytes() == single
    assert b'"n_tokens": 595' in single  # 5 windows of the first 600 tokens, each window's first token unscored
    default_threads = json.loads((tmp_path / "default_threads" / "report.json").read_text())
    assert default_threads["metadata"].pop("threads") >= 1 and json.loads(single)["metadata"]["threads"] == 1
    for name, value in json.loads(single).items():
        if name == "metadata":
            value.pop("threads")
            assert default_threads[name] == value  # what ran and on what: the same whatever the thread count
            continue
        assert default_threads[name] == approximately(value), name


@pytest.mark.heavy
def test_two_processes_sweep_like_one(tmp_path, wikitext_text):
    """A cached sweep under `accelerate launch`: each process caches and measures its share; the figures of every
    level equal the single-process sweep's, and the parallel-built cache covers every token once."""
    accelerate = accelerate_launcher()
    text_file = tmp_path / "t.txt"
    text_file.write_text(wikitext_text[:20_000], encoding="utf-8")
    arguments = [
        "sweep",
        "--reference",
        "default",
        "--family",
        "bits",
        "--levels",
        "32,4,3",
        "--text-file",
        str(text_file),
        "--max-tokens",
        "600",
        "--window",
        "128",
        "--quiet",
        "--no-plots",
    ]
    runs = {
        "one": [sys.executable, "-m", "hemorrhage_hf.cli"],
        "two": [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "-m", "hemorrhage_hf.cli"],
    }
    sweeps = {}
    for name, command in runs.items():
        launched = subprocess.run(
            [*command, *arguments, "--cache-dir", str(tmp_path / name / "cache"), "--output", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=600,
            env=ONE_THREAD,
        )
        assert launched.returncode == 0, launched.stderr[-3000:]
        sweeps[name] = json.loads((tmp_path / name / "sweep.json").read_text())
    assert [level["figures"] for level in sweeps["two"]["levels"]] == [
        level["figures"] for level in sweeps["one"]["levels"]
    ]
    assert (
        sweeps["one"]["levels"][0]["figures"]["kl_max"] == 0.0
        and sweeps["one"]["levels"][0]["figures"]["n_tokens"] == 595
    )
    headers = {name: json.loads(next((tmp_path / name / "cache").glob("*/header.json")).read_text()) for name in runs}
    assert [shard["windows"] for shard in headers["two"]["shards"]] == [[0, 3], [3, 5]]  # one shard per process
    assert headers["two"]["complete"] and headers["two"]["key"] == headers["one"]["key"]


def test_sequential_mode_matches_exact_figures_and_bounds_kl(tmp_path, smollm2, wikitext_text, monkeypatch):
    monkeypatch.setenv("HEMORRHAGE_HF_CACHE", str(tmp_path / "cache"))
    model, tokenizer = smollm2
    options = dict(
        modification="int4-g64", source=TextSource(text=wikitext_text, window=128, max_tokens=512), tokenizer=tokenizer
    )
    full = compare(model, options=MeasureOptions(progress=False), **options).figures
    sequential = compare(model, options=MeasureOptions(sequential=True, top_k=64, progress=False), **options)
    figures = sequential.figures
    for exact in ("ppl_reference", "ppl_modified", "top1_agreement", "delta_p_mean", "n_tokens"):
        assert figures[exact] == pytest.approx(full[exact], rel=1e-5), exact
    # A lower bound; on int4 SmolLM2 with k=64 it holds ~85% of the full KL (the tail merges the rest).
    assert 0.75 * full["kl_mean"] < figures["kl_mean"] <= full["kl_mean"]
    assert sequential.metadata["reference_cache"]["kl_is_lower_bound"] is True
    assert model.model.layers[0].self_attn.q_proj.weight.unique().numel() > 1000  # a passed-in model is not modified
    with pytest.raises(HemorrhageError, match="cannot compare layers"):
        compare(model, options=MeasureOptions(sequential=True, layers=True), **options)
