"""Benchmark of GGUF measurement: the llama.cpp engine against llama.cpp's own tool, and against the torch path.

Two parts, each measured in one run:
  agreement : for each --types file exported from `default` (llama.cpp's converter and quantizer), hemorrhage-hf's
              mean KL, same-top agreement and PPL ratio with --engine llama.cpp --scoring llama.cpp beside
              `llama-perplexity --kl-divergence` on the same text file and chunk count, and beside the same file
              loaded through transformers (dequantized to fp32, torch engine, same llama.cpp scoring).
  cost      : wall time and peak resident memory of `compare(f32.gguf, TYPE.gguf)` on the same windows with each
              engine, each in its own process (peak RSS is per process), run alternately --repeats times; the
              median ratio llama.cpp / torch.

Usage: python bench/bench_llamacpp.py [--types Q8_0,Q4_K_M,Q4_0,Q2_K] [--chunks 16] [--window 512]
                                      [--text ../shared/data/wikitext-2-raw/wiki.valid.raw] [--gguf-dir DIR]
                                      [--cost-type Q4_K_M] [--repeats 3] [--skip-agreement] [--skip-cost]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hemorrhage_hf.comparison import LoadOptions, MeasureOptions, TextSource, compare
from hemorrhage_hf.llamacpp.export import export_gguf
from hemorrhage_hf.llamacpp.perplexity import llamacpp_base_logits, llamacpp_kl_divergence
from hemorrhage_hf.models import cache_dir

FIGURES = ("kl_mean", "top1_agreement", "ppl_ratio", "ppl_reference")


def measure_once(base: str, model: str, text_file: str, window: int, chunks: int, engine: str) -> dict:
    """compare() of two GGUF files with llama.cpp scoring; figures, seconds and this process's peak RSS."""
    text = Path(text_file).read_text(encoding="utf-8")
    started = time.perf_counter()
    report = compare(
        base,
        model,
        source=TextSource(text=text, window=window, max_tokens=window * chunks, scoring="llama.cpp"),
        load=LoadOptions(engine=engine),
        options=MeasureOptions(progress=False),
    )
    seconds = time.perf_counter() - started
    figures = {key: report.figures[key] for key in FIGURES} | {"n_tokens": report.figures["n_tokens"]}
    return figures | {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_in_process(*arguments: str) -> dict:
    command = [sys.executable, __file__, "--child", *arguments]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="Q8_0,Q4_K_M,Q4_0,Q2_K")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument(
        "--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.valid.raw")
    )
    parser.add_argument("--gguf-dir", default=str(cache_dir() / "bench-gguf"))
    parser.add_argument("--cost-type", default="Q4_K_M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--skip-dequantized", action="store_true", help="agreement without the transformers rows")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--child", nargs=5, metavar=("BASE", "MODEL", "TEXT", "WINDOW,CHUNKS", "ENGINE"))
    args = parser.parse_args()
    if args.child:
        base, model, text_file, sizes, engine = args.child
        window, chunks = (int(part) for part in sizes.split(","))
        print(json.dumps(measure_once(base, model, text_file, window, chunks, engine)))
        return

    types = args.types.split(",")
    files = export_gguf("default", types, args.gguf_dir)
    base = str(files["f32"])
    # The first chunks × window tokens are all either side reads; a short file keeps llama-perplexity's tokenizing fast.
    text = Path(args.text).read_text(encoding="utf-8")[: 6_000 * args.chunks * args.window // 512]
    with tempfile.TemporaryDirectory() as folder:
        text_file = str(Path(folder) / "text.txt")
        Path(text_file).write_text(text, encoding="utf-8")
        sizes = f"{args.window},{args.chunks}"
        if not args.skip_agreement:
            base_logits = llamacpp_base_logits(
                base, text_file, Path(folder) / "base.kld", window=args.window, chunks=args.chunks
            )
            print(f"agreement: {args.chunks} chunks of {args.window} tokens of {args.text}", flush=True)
            print("type     engine            KL mean    same top   PPL ratio   PPL ref")
            for gguf_type in types:
                rows = {
                    "llama-perplexity": llamacpp_kl_divergence(
                        files[gguf_type], base_logits, window=args.window, chunks=args.chunks
                    ),
                    "llama.cpp engine": measure_once(
                        base, str(files[gguf_type]), text_file, args.window, args.chunks, "llama.cpp"
                    ),
                }
                if not args.skip_dequantized:
                    rows["torch (dequant.)"] = measure_once(
                        base, str(files[gguf_type]), text_file, args.window, args.chunks, "torch"
                    )
                for name, figures in rows.items():
                    print(
                        f"{gguf_type:<8} {name:<16} {figures['kl_mean']:>9.5f} "
                        f"{100 * figures['top1_agreement']:>9.2f} % "
                        f"{figures['ppl_ratio']:>10.4f} {figures['ppl_reference']:>9.4f}"
                    )
                kl_gap = rows["llama.cpp engine"]["kl_mean"] / rows["llama-perplexity"]["kl_mean"] - 1
                print(f"{gguf_type:<8} KL vs llama-perplexity: engine {kl_gap:+.2%}", end="")
                if "torch (dequant.)" in rows:
                    dequantized_gap = rows["torch (dequant.)"]["kl_mean"] / rows["llama-perplexity"]["kl_mean"] - 1
                    print(f", dequantized {dequantized_gap:+.2%}", end="")
                print(flush=True)
        if not args.skip_cost:
            model = str(files[args.cost_type])
            runs = {"llama.cpp": [], "torch": []}
            for _ in range(args.repeats):
                for engine in runs:
                    runs[engine].append(measure_in_process(base, model, text_file, sizes, engine))
            print(
                f"\ncost: f32 vs {args.cost_type}, {args.chunks} chunks of {args.window}, "
                f"{args.repeats} alternating runs"
            )
            for engine, results in runs.items():
                print(
                    f"{engine:<10} median {statistics.median(r['seconds'] for r in results):7.1f} s, "
                    f"peak RSS {statistics.median(r['peak_rss_mib'] for r in results):7.0f} MiB"
                )
            time_ratio = statistics.median(
                a["seconds"] / b["seconds"] for a, b in zip(runs["llama.cpp"], runs["torch"])
            )
            memory_ratio = statistics.median(
                a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in zip(runs["llama.cpp"], runs["torch"])
            )
            print(f"llama.cpp / torch: time {time_ratio:.2f}×, peak memory {memory_ratio:.2f}×")


if __name__ == "__main__":
    main()
