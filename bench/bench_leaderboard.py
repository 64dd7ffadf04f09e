"""Benchmark of `hemorrhage-hf leaderboard` against the bare cost of ranking K candidates on one reference.

Prints, measured side by side in one run on the same windows (repeats interleaved, so drifts in machine load hit both
sides alike):
  leaderboard_s = rank_candidates() over K specs, minus its model loading and quantizing: the reference pass into a
                  fresh exact store (written to disk), each candidate's forward pass, the store's head products and
                  every per-token figure, the ranking and the paired tests
  bare_s        = K + 1 bare forward passes (the reference and each quantized candidate, logits only, no_grad,
                  use_cache=False) plus the K head products the store needs (stored hidden states × head weight,
                  256 rows at a time)
  ratio         = leaderboard_s / bare_s, per repeat
  prepare_s     = what the leaderboard spent loading the reference and quantizing the candidates, reported apart

Usage: python bench/bench_leaderboard.py [--tokens 2048] [--window 512] [--repeats 3] [--specs int8 int4-g64 int3-g64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from hemorrhage_hf.comparison import TextSource
from hemorrhage_hf.corpus import python_docs_text
from hemorrhage_hf.leaderboard import rank_candidates
from hemorrhage_hf.measurement.engine import batch_windows
from hemorrhage_hf.measurement.head import OutputHead
from hemorrhage_hf.models import load_model
from hemorrhage_hf.modify import apply_modification

#: Rows per bare head product: large enough that streaming the head's weight costs little beside the arithmetic.
HEAD_ROWS = 256


@torch.no_grad()
def bare_seconds(models: list, windows, head: OutputHead) -> float:
    """K + 1 forward passes over ``windows`` and K head products over every scored position's hidden state."""
    started = time.perf_counter()
    hidden = []
    keep = models[0].get_output_embeddings().register_forward_pre_hook(lambda module, args: hidden.append(args[0]))
    try:
        for model in models:
            for batch in batch_windows(windows, 1):
                model(batch.input_ids, use_cache=False)
    finally:
        keep.remove()
    stored = torch.cat([batch.scored(h) for batch, h in zip(batch_windows(windows, 1), hidden)])
    for _ in models[1:]:
        for start in range(0, len(stored), HEAD_ROWS):
            head(stored[start : start + HEAD_ROWS])
    return time.perf_counter() - started


def leaderboard_seconds(specs: list[str], source: TextSource) -> dict:
    with tempfile.TemporaryDirectory() as root:  # a fresh store: the reference pass is counted every time
        board = rank_candidates("default", specs, source=source, store_root=root, progress=False)
    seconds = board.seconds
    prepare = seconds["load"] + sum(entry.seconds["prepare"] for entry in board.entries)
    return {
        "leaderboard_s": seconds["total"] - prepare,
        "prepare_s": prepare,
        "store_s": seconds["store"],
        "measure_s": {entry.name: entry.seconds["measure"] for entry in board.entries},
        "n_tokens": board.entries[0].figures["n_tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--specs", nargs="+", default=["int8", "int4-g64", "int3-g64"])
    args = parser.parse_args()

    source = TextSource(text=python_docs_text(), window=args.window, max_tokens=args.tokens)
    reference, tokenizer = load_model("default")
    models = [reference] + [apply_modification(reference, spec) for spec in args.specs]
    windows = source.windows(tokenizer)
    head = OutputHead.of(reference)
    with torch.no_grad():  # warm-up: first calls allocate and pick kernels
        for model in models:
            model(windows[0].input_ids[None], use_cache=False)
    runs = []
    for _ in range(args.repeats):
        bare = bare_seconds(models, windows, head)
        board = leaderboard_seconds(args.specs, source)
        runs.append({"bare_s": bare, **board, "ratio": board["leaderboard_s"] / bare})
        print(json.dumps(runs[-1]), flush=True)
    ratios = [run["ratio"] for run in runs]
    print(
        json.dumps(
            {
                "specs": args.specs,
                "tokens": runs[0]["n_tokens"],
                "window": args.window,
                "threads": torch.get_num_threads(),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "bare_s_median": statistics.median(run["bare_s"] for run in runs),
                "leaderboard_s_median": statistics.median(run["leaderboard_s"] for run in runs),
                "prepare_s_median": statistics.median(run["prepare_s"] for run in runs),
            }
        )
    )


if __name__ == "__main__":
    main()
