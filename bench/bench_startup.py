"""Benchmark of the command line's start-up: how long `hemorrhage-hf --help` takes next to a bare interpreter.

Prints, measured side by side in one run (each command in a fresh interpreter, alternating):
  python -c pass                       the interpreter alone
  python -m hemorrhage_hf.cli --help   the command list
  python -m hemorrhage_hf.cli report --help
  python -c "import torch"             for scale: what loading torch alone costs
and for each the ratio of its time to the bare interpreter's. Every command runs ``--repeats`` times; the figure is
the minimum, the usual way to read timings on a machine shared with other work (every raw time is printed too).

Usage: python bench/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "hemorrhage-hf --help": [sys.executable, "-m", "hemorrhage_hf.cli", "--help"],
    "hemorrhage-hf report --help": [sys.executable, "-m", "hemorrhage_hf.cli", "report", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            times[name].append(wall_seconds(command))
    bare = min(times["python -c pass"])
    print(f"{'command':<30} {'min s':>7} {'× python -c pass':>17}")
    for name, samples in times.items():
        print(f"{name:<30} {min(samples):>7.3f} {min(samples) / bare:>17.1f}")
    print(json.dumps({name: [round(t, 4) for t in samples] for name, samples in times.items()}))


if __name__ == "__main__":
    main()
