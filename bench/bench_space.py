"""Benchmark of the Space's request path: what its model cache saves, and how long the Threshold tab's sweeps take.

Prints, measured in one run with the Space's own limits (SpaceLimits defaults):
  compare cold / warm  = first comparison (load the model, modify it, measure, plot, generate) / the same request
                         again (model, modified copy and correction cached), with and without decoding correction
  sweep seconds        = the Threshold tab's default sweep of each family given, on the default text

Usage: python bench/bench_space.py [--families bits,temperature,sparsity:wanda] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import time

from hemorrhage_hf.space.backend import (
    DEFAULT_MODEL_LABEL,
    ModelCache,
    default_sweep_levels,
    run_comparison,
    run_threshold_sweep,
)
from hemorrhage_hf.space.ui import sample_text


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def compare_cold_warm(spec: str, new_tokens: int, correct: bool) -> dict:
    cache = ModelCache()
    text = sample_text()

    def request():
        run_comparison(
            cache,
            DEFAULT_MODEL_LABEL,
            spec,
            text,
            prompt="What does the Python `len` function do?",
            max_new_tokens=new_tokens,
            correct=correct,
        )

    cold, warm = _timed(request), _timed(request)
    return {
        "spec": spec,
        "correct": correct,
        "cold_s": round(cold, 2),
        "warm_s": round(warm, 2),
        "cold_over_warm": round(cold / warm, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="int4-g64")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--families", default="bits,temperature,sparsity:wanda")
    args = parser.parse_args()
    results = {"compare": [compare_cold_warm(args.spec, args.new_tokens, correct) for correct in (False, True)]}
    cache = ModelCache()
    cache.reference(DEFAULT_MODEL_LABEL)  # loading is the compare's cost, not the sweep's
    results["sweeps"] = []
    for family in args.families.split(","):
        levels = default_sweep_levels(family, cache.limits)
        seconds = _timed(
            lambda family=family, levels=levels: run_threshold_sweep(
                cache, DEFAULT_MODEL_LABEL, family, levels, sample_text()
            )
        )
        results["sweeps"].append({"family": family, "levels": levels, "seconds": round(seconds, 1)})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
