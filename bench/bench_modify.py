"""Benchmark of the modifications on SmolLM2-135M-Instruct: quality on WikiText-2 and the time each takes.

Prints, measured side by side in one run on the same calibration tokens and the same evaluation windows:
  pruning:  WikiText-2 perplexity of magnitude / Wanda pruning (50 % unstructured and 2:4), the ratio
            PPL(wanda)/PPL(magnitude), and seconds to prune (gradient-aware pruning: the gradient group);
  scaling:  mean KL to the reference of plain RTN and of its activation-aware scaled variant, the ratio
            KL(scaled)/KL(plain), and seconds to search the scales;
  expansion: mean KL of identity and duplicated expansion;
  kv:       mean KL and PPL ratio of KV-cache quantization at 8, 4 and 3 bits;
  gradient: WikiText-2 perplexity of Wanda and of gradient-aware pruning (α chosen on held-out calibration
            sequences), 50 % and 2:4, once per calibration seed (--seeds), with the ratio PPL(gradient)/PPL(wanda)
            per seed and its mean ± standard deviation over the seeds. Seeds may run in separate processes
            (--seeds 0 --save s0.json, ...) and be summarised together with --summarize s0.json s1.json ...

Times scale with the number of calibration tokens (one forward pass per layer step, plus one backward pass per
sequence for gradient-aware pruning); pass 128 × 512 with --calibration-sequences 128, or a smaller
size to extrapolate from.

Usage: python bench/bench_modify.py [--calibration-sequences 16] [--calibration-length 512] [--eval-tokens 4096]
       [--group pruning,scaling,expansion,kv,gradient] [--seeds 0,1,2] [--threads 2]
       [--time-only gradient-50,awq-int4-g64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from hemorrhage_hf.corpus import calibration_windows, python_docs_text, tokenize_corpus
from hemorrhage_hf.measurement.engine import measure
from hemorrhage_hf.models import load_model
from hemorrhage_hf.modify import apply_modification

WIKITEXT = os.environ.get(
    "HEMORRHAGE_WIKITEXT",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-raw", "wiki.valid.raw"),
)
PRUNING = {"50%": ("magnitude-50", "wanda-50"), "2:4": ("2:4-magnitude", "2:4-wanda")}
SCALING = (("int4-g64", "awq-int4-g64"), ("int3-g128", "awq-int3-g128"), ("int8", "awq-int8"), ("w8a8", "smooth-w8a8"))
#: Modifications that need no calibration, measured by their KL to the reference.
UNCALIBRATED = {"expansion": ("expand-identity-4", "expand-dup-4"), "kv": ("kv8", "kv4", "kv3")}
GRADIENT = {"50%": ("wanda-50", "gradient-50"), "2:4": ("2:4-wanda", "2:4-gradient")}


@torch.no_grad()  # inference_mode breaks quantized tensor subclasses (quanto)
def perplexity(model, windows) -> float:
    total, count = 0.0, 0
    for window in windows:
        ids = window.input_ids[None]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


def timed(reference, spec, calibration):
    started = time.perf_counter()
    modified = apply_modification(reference, spec, calibration=calibration)
    return modified, time.perf_counter() - started


def gradient_against_wanda(reference, tokenizer, windows, seeds: list[int], sequences: int, length: int) -> dict:
    """Wanda and gradient-aware pruning on the same calibration draw, once per seed."""
    rows: dict[str, dict] = {pattern: {"seeds": {}} for pattern in GRADIENT}
    for seed in seeds:
        calibration = calibration_windows(
            tokenizer, python_docs_text(), n_sequences=sequences, seq_len=length, seed=seed
        )
        for pattern, (wanda_spec, gradient_spec) in GRADIENT.items():
            wanda, _ = timed(reference, wanda_spec, calibration)
            gradient, seconds = timed(reference, gradient_spec, calibration)
            choice = gradient.config.hemorrhage_pruning_alpha
            row = {
                "wanda_ppl": perplexity(wanda, windows),
                "gradient_ppl": perplexity(gradient, windows),
                "alpha": choice["alpha"],
                "held_out_loss": dict(zip(map(str, choice["candidates"]), choice["held_out_loss"])),
                "gradient_seconds": seconds,
            }
            row["ratio"] = row["gradient_ppl"] / row["wanda_ppl"]
            rows[pattern]["seeds"][seed] = row
            print(
                f"seed {seed} {pattern:4s} Wanda PPL {row['wanda_ppl']:8.2f}  gradient PPL {row['gradient_ppl']:8.2f}"
                f"  ratio {row['ratio']:.4f}  α {row['alpha']:g}  {seconds:6.1f} s",
                flush=True,
            )
    return rows


def spread_over_seeds(runs: list[dict]) -> dict:
    """Per pattern, mean, standard deviation, min and max over every seed of ``runs`` of both perplexities and
    their ratio."""
    summary = {}
    for pattern in GRADIENT:
        seeds = {seed: row for run in runs for seed, row in run[pattern]["seeds"].items()}
        summary[pattern] = {"seeds": sorted(seeds, key=int), "alphas": [seeds[seed]["alpha"] for seed in seeds]}
        for key in ("wanda_ppl", "gradient_ppl", "ratio"):
            values = [row[key] for row in seeds.values()]
            summary[pattern][key] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else None,
                "min": min(values),
                "max": max(values),
            }
        ratio = summary[pattern]["ratio"]
        print(
            f"{pattern:4s} PPL(gradient)/PPL(wanda) over {len(values)} seeds: {ratio['mean']:.4f} ± "
            f"{ratio['sd'] or 0:.4f} (sd; {ratio['min']:.4f}–{ratio['max']:.4f}); α chosen "
            + ", ".join(f"{alpha:g}" for alpha in summary[pattern]["alphas"]),
            flush=True,
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-sequences", type=int, default=16)
    parser.add_argument("--calibration-length", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--group", default="pruning,scaling,expansion,kv")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds of the gradient group")
    parser.add_argument("--save", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument(
        "--summarize", nargs="+", default=None, metavar="FILE", help="only summarise earlier --save files"
    )
    parser.add_argument(
        "--time-only",
        default=None,
        metavar="SPECS",
        help="only time applying these comma-separated specs on the calibration (no evaluation)",
    )
    args = parser.parse_args()
    if args.summarize:
        runs = []
        for name in args.summarize:
            with open(name, encoding="utf-8") as handle:
                runs.append(json.load(handle)["gradient"])
        spread_over_seeds(runs)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    reference, tokenizer = load_model("default")
    calibration = calibration_windows(
        tokenizer, python_docs_text(), n_sequences=args.calibration_sequences, seq_len=args.calibration_length, seed=0
    )
    if args.time_only:
        for spec in args.time_only.split(","):
            _, seconds = timed(reference, spec, calibration)
            print(
                json.dumps(
                    {
                        "spec": spec,
                        "calibration": list(calibration.shape),
                        "seconds": round(seconds, 1),
                        "threads": torch.get_num_threads(),
                        "load_average": os.getloadavg()[0],
                    }
                ),
                flush=True,
            )
        return
    with open(WIKITEXT, encoding="utf-8") as handle:
        windows = tokenize_corpus(tokenizer, handle.read(), window=512, max_tokens=args.eval_tokens)
    results = {
        "calibration": list(calibration.shape),
        "eval_tokens": args.eval_tokens,
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
    }
    groups = args.group.split(",")
    if "gradient" in groups:
        results["dense_ppl"] = perplexity(reference, windows)
        seeds = [int(seed) for seed in args.seeds.split(",")]
        results["gradient"] = gradient_against_wanda(
            reference, tokenizer, windows, seeds, args.calibration_sequences, args.calibration_length
        )
        results["gradient_spread"] = spread_over_seeds([results["gradient"]])
    if "pruning" in groups:
        results["dense_ppl"] = perplexity(reference, windows)
        for pattern, specs in PRUNING.items():
            row = {}
            for spec in specs:
                modified, seconds = timed(reference, spec, calibration)
                row[spec] = {"ppl": perplexity(modified, windows), "seconds": seconds}
                print(f"{spec:15s} PPL {row[spec]['ppl']:9.2f}  {seconds:7.1f} s", flush=True)
            magnitude, wanda = (row[spec]["ppl"] for spec in specs)
            row["ratio_wanda_over_magnitude"] = wanda / magnitude
            results[f"pruning {pattern}"] = row
    if "scaling" in groups:
        for plain, scaled in SCALING:
            row = {}
            for spec in (plain, scaled):
                modified, seconds = timed(reference, spec, calibration)
                figures = measure(reference, modified, windows, progress=False).figures
                row[spec] = {
                    "kl": figures["kl_mean"],
                    "kl_error": figures["kl_mean_error"],
                    "ppl": figures["ppl_modified"],
                    "top1": figures["top1_agreement"],
                    "seconds": seconds,
                }
                print(
                    f"{spec:15s} KL {figures['kl_mean']:.4f} ± {figures['kl_mean_error']:.4f}  "
                    f"PPL {figures['ppl_modified']:.2f}  {seconds:7.1f} s",
                    flush=True,
                )
            row["ratio_kl_scaled_over_plain"] = row[scaled]["kl"] / row[plain]["kl"]
            results[f"scaling {plain}"] = row
    for spec in (spec for group in groups for spec in UNCALIBRATED.get(group, ())):
        modified, seconds = timed(reference, spec, None)
        figures = measure(reference, modified, windows, progress=False).figures
        results[spec] = {
            "kl": figures["kl_mean"],
            "kl_max": figures["kl_max"],
            "ppl_ratio": figures["ppl_ratio"],
            "seconds": seconds,
        }
        print(
            f"{spec:18s} KL {figures['kl_mean']:.3g} (max {figures['kl_max']:.3g})  PPL ratio "
            f"{figures['ppl_ratio']:.3f}",
            flush=True,
        )
    results["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    if args.save:
        with open(args.save, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
