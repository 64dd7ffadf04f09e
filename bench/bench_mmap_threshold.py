"""Benchmark of what ``--sequential``'s fixed malloc threshold costs in time.

Sequential mode runs inside :func:`hemorrhage_hf.measurement.memory.large_blocks_returned`: every block of 1 MiB or
more is mapped and unmapped each time, so freed temporaries leave the process (lower peak memory), at the price of a
page fault per 4 KiB of each such block. This measures that price on the both-models path: the same ``compare`` of
``default`` against ``int4-g64`` on the first ``--tokens`` tokens of Python's docs, each run in a fresh process, with
glibc's default (dynamic) threshold and with ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, alternating. Model loading
and one warm-up measurement (512 tokens) are outside the timed part. Prints every time and the ratio of the medians.

Usage: python bench/bench_mmap_threshold.py [--tokens 1024] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import copy, sys, time, torch
from hemorrhage_hf.comparison import TextSource, compare
from hemorrhage_hf.models import load_model
from hemorrhage_hf.modify.base import apply_modification

torch.set_num_threads(2)
reference, tokenizer = load_model("default")
modified = copy.deepcopy(reference)
apply_modification(modified, "int4-g64")
compare(reference, modified, tokenizer=tokenizer, source=TextSource(max_tokens=512))
started = time.perf_counter()
compare(reference, modified, tokenizer=tokenizer, source=TextSource(max_tokens=int(sys.argv[1])))
print(time.perf_counter() - started)
"""
SETTINGS = {"glibc default": {}, "fixed at 1 MiB": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def timed_run(tokens: int, environment: dict[str, str]) -> float:
    finished = subprocess.run(
        [sys.executable, "-c", CHILD, str(tokens)],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    seconds = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, environment in SETTINGS.items():
            seconds[name].append(timed_run(args.tokens, environment))
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    print(json.dumps(seconds))
    print(f"fixed / default (medians): {medians['fixed at 1 MiB'] / medians['glibc default']:.2f}")


if __name__ == "__main__":
    main()
