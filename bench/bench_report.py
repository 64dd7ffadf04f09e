"""Benchmark of `hemorrhage-hf report`'s engine against the bare cost it cannot avoid.

Prints, measured side by side in one run on the same windows:
  time ratio  = measure() without layer statistics / (reference forward + modified forward, logits only)
  memory ratio = peak RSS growth while loading, modifying and measuring a long corpus / bytes of the two models'
                 weights, with both models in memory and in --sequential mode (each in a fresh subprocess so
                 earlier allocations do not hide the peak)

Usage: python bench/bench_report.py [--tokens 8192] [--memory-tokens 100000] [--window 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from hemorrhage_hf.corpus import python_docs_text, tokenize_corpus
from hemorrhage_hf.measurement.engine import batch_windows, measure
from hemorrhage_hf.models import load_model, load_tokenizer
from hemorrhage_hf.modify import apply_modification


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def time_ratio(n_tokens: int, window: int, repeats: int) -> dict:
    reference, tokenizer = load_model("default")
    modified = apply_modification(reference, "int4-g64")
    windows = tokenize_corpus(tokenizer, python_docs_text(), window=window, max_tokens=n_tokens)
    with torch.no_grad():  # warm-up: first calls allocate and pick kernels
        reference(windows[0].input_ids[None])
        modified(windows[0].input_ids[None])
    bare, engine = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both sides alike
        started = time.perf_counter()
        with torch.no_grad():
            for batch in batch_windows(windows, 1):
                reference(batch.input_ids, use_cache=False)
                modified(batch.input_ids, use_cache=False)
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        measure(reference, modified, windows, progress=False)
        engine.append(time.perf_counter() - started)
    return {
        "tokens": n_tokens,
        "window": window,
        "bare_forward_s": min(bare),
        "report_s": min(engine),
        "time_ratio": min(engine) / min(bare),
    }


def memory_child(n_tokens: int, window: int, sequential: bool) -> None:
    import numpy as np  # noqa: F401  (imported before the baseline so its pages count there)

    from hemorrhage_hf.comparison import MeasureOptions, TextSource, compare

    load_tokenizer("default")  # not load_model: its weights would raise the peak before the baseline
    text = python_docs_text()
    weight_bytes = 2 * 134_515_008 * 4  # two fp32 SmolLM2-135M models (134.5 M parameters each)
    baseline = _current_rss_bytes()  # not the peak so far: tokenizing the corpus peaks higher than it ends
    # In sequential mode the reference is loaded (and its cache built, or found from an earlier run) before the
    # modification is applied in place: the peak holds one model either way.
    report = compare(
        "default",
        modification="int4-g64",
        source=TextSource(text=text, window=window, max_tokens=n_tokens),
        options=MeasureOptions(sequential=sequential, progress=False),
    )
    growth = _peak_rss_bytes() - baseline
    print(
        json.dumps(
            {
                "mode": "sequential" if sequential else "both models",
                "tokens": report.figures["n_tokens"],
                "two_models_weights_bytes": weight_bytes,
                "peak_growth_bytes": growth,
                "memory_ratio": growth / weight_bytes,
                "kl_mean": report.figures["kl_mean"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--memory-tokens", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_tokens, args.window, args.sequential)
        return
    print(f"torch threads: {torch.get_num_threads()}")
    print(json.dumps(time_ratio(args.tokens, args.window, args.repeats)))
    for mode in ([], ["--sequential"]):
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                "--memory-tokens",
                str(args.memory_tokens),
                "--window",
                str(args.window),
                *mode,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        print(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
