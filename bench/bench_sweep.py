"""Benchmark of `hemorrhage-hf sweep` against the forward passes it cannot avoid.

Prints, measured side by side in one run on the same windows:
  time ratio = run_sweep over K levels (reference cache built from scratch, every level's modification applied and
               measured, sweep.json written; no PNGs) / (K + 1) bare forward passes of the model over the windows
  time ratio with modifications = the same sweep / (K + 1) bare passes + one timed application of the family's
               modification for each level that modifies (calibrated methods such as Wanda run the model over their
               calibration tokens at every level: a cost of the method, not of the sweep)
  cache size = bytes of the reference cache's shard files per scored token

Bare passes and sweep alternate ``--repeats`` times; the ratio is min(sweep) / min(bare), the usual way to read
timings on a machine shared with other work (every raw time is printed too).

Usage: python bench/bench_sweep.py [--tokens 4096] [--window 256] [--levels 32,8,6,5,4,3,2] [--top-k 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from hemorrhage_hf.corpus import load_corpus, python_docs_text, tokenize_corpus
from hemorrhage_hf.measurement.engine import batch_windows, model_outputs
from hemorrhage_hf.models import load_model
from hemorrhage_hf.modify import apply_modification, parse_spec
from hemorrhage_hf.modify.calibration import CalibrationSettings
from hemorrhage_hf.sweep.runner import SweepOptions, resolve_family, run_sweep


@torch.no_grad()  # inference_mode breaks quantized tensor subclasses (quanto)
def bare_passes(model, windows, n_passes: int) -> float:
    started = time.perf_counter()
    for _ in range(n_passes):
        for batch in batch_windows(windows, 1):
            model_outputs(model, batch.input_ids)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--family", default="bits")
    parser.add_argument("--levels", default="32,8,6,5,4,3,2")
    parser.add_argument("--top-k", type=int, default=None, help="a top-k cache instead of the exact store")
    parser.add_argument("--text-file", default=None, help="default: the prose of Python's own docs")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model, tokenizer = load_model("default")
    text = load_corpus(args.text_file) if args.text_file else python_docs_text()
    windows = tokenize_corpus(tokenizer, text, window=args.window, max_tokens=args.tokens)
    levels = args.levels.split(",")
    family = resolve_family(args.family)
    bare_passes(model, windows[:1], 1)  # warm-up: first calls allocate and pick kernels

    bare, sweeps = [], []
    for _ in range(args.repeats):
        bare.append(bare_passes(model, windows, len(levels) + 1))
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            result = run_sweep(
                model,
                tokenizer,
                windows,
                family,
                levels,
                options=SweepOptions(top_k=args.top_k, cache_root=Path(folder) / "cache", plots=False, progress=False),
                output_dir=Path(folder) / "out",
            )
            sweeps.append(time.perf_counter() - started)
    spec = next(spec for spec in map(family.spec, levels) if spec is not None)
    # The sweep's own default calibration (16 × 512 tokens of Python's docs) for specs that need it, e.g. wanda.
    calibration = CalibrationSettings().windows(tokenizer) if parse_spec(spec).needs_calibration else None
    started = time.perf_counter()
    apply_modification(model, spec, calibration=calibration)
    modification_s = time.perf_counter() - started

    n_modified = sum(family.spec(level) is not None for level in levels)
    cache = result.metadata.get("reference_cache") or result.metadata["reference_store"]
    print(
        json.dumps(
            {
                "family": family.name,
                "levels": levels,
                "top_k": args.top_k,
                "tokens_scored": result.levels[0]["figures"]["n_tokens"],
                "window": args.window,
                "threads": torch.get_num_threads(),
                "bare_forward_passes": len(levels) + 1,
                "bare_s": [round(t, 2) for t in bare],
                "sweep_s": [round(t, 2) for t in sweeps],
                "last_sweep": {
                    "reference_s": round(result.metadata["reference_seconds"], 2),
                    "level_s": [round(entry["seconds"], 2) for entry in result.levels],
                },
                f"apply_{spec}_s": round(modification_s, 2),
                "time_ratio": round(min(sweeps) / min(bare), 3),
                "time_ratio_with_modifications": round(min(sweeps) / (min(bare) + n_modified * modification_s), 3),
                "cache_bytes_per_token": round(cache["bytes_per_token"], 1),
                "tail_mass_mean": cache.get("tail_mass_mean"),
                "threshold": {key: result.threshold().get(key) for key in ("figure", "rule", "level", "interval")},
                "curve": {
                    entry["level"]: {
                        key: entry["figures"].get(key) for key in ("ppl_ratio", "kl_mean", "top1_agreement")
                    }
                    for entry in result.levels
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
