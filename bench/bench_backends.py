"""Real quantization backends next to hemorrhage-hf's own quantizers, on SmolLM2-135M-Instruct (``default``).

Every spec is applied to the same float reference and measured against it on the same held-out WikiText-2 validation
windows, in one run: KL mean ± standard error (i.i.d. and batch-means), p99, top-1 agreement, PPL ratio, the bits per
Linear weight (measured from the stored tensors for backends, nominal for hemorrhage-hf's simulated formats) and
their bytes, and the seconds each quantization took. The calibrated specs (awq-…, gptq-…) calibrate on the same
tokens of Python's docs (never on the evaluation text). Then, per real 4-bit backend, the paired KL difference of
hemorrhage-hf's best 4-bit mitigation (``--ours``) against it on the same tokens, with its batch-means error.

A spec whose backend is not installed is listed as skipped, with the reason.

Usage: python bench/bench_backends.py [--eval-tokens 4096] [--calibration-sequences 8] [--threads 2]
       [--specs int8,int4-g64,...] [--ours awq-int4-g64,SPEC…] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import numpy as np
import torch

from hemorrhage_hf.corpus import calibration_windows, python_docs_text, tokenize_corpus
from hemorrhage_hf.errors import HemorrhageError
from hemorrhage_hf.measurement.engine import measure
from hemorrhage_hf.measurement.statistics import block_standard_error
from hemorrhage_hf.models import load_model
from hemorrhage_hf.modify import apply_modification, describe_model, parse_spec

WIKITEXT = os.environ.get(
    "HEMORRHAGE_WIKITEXT",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-raw", "wiki.valid.raw"),
)
#: The 4-bit specs first (the goal compares them), then the 8-bit ones.
SPECS = (
    "int4-g64",
    "awq-int4-g64",
    "hqq-int4-g64",
    "bnb-nf4",
    "quanto-int4",
    "ct-w4a16-g64",
    "gptq-w4a16-g64",
    "bnb-fp4",
    "int8",
    "bnb-int8",
    "torchao-int8wo",
    "quanto-int8",
    "ct-w8a16",
)


def table_row(row: dict) -> str:
    if "skipped" in row:
        return f"| `{row['spec']}` | skipped: {row['skipped']} | | | | | | | |"
    f, d = row["figures"], row["details"]
    footprint = d["footprint"]
    return (
        f"| `{row['spec']}` | {d['backend']} {d['version']} | {f['kl_mean']:.4f} ± {f['kl_mean_error']:.4f} "
        f"({f['kl_mean_error_block']:.4f}) | {f['kl_p99']:.3f} | {100 * f['top1_agreement']:.1f} % | "
        f"{f['ppl_ratio']:.4f} | {footprint['bits_per_weight']:.3f} ({footprint['source']}) | "
        f"{footprint['weight_bytes'] / 2**20:.1f} MiB | {row['seconds']:.1f} |"
    )


def split_specs(specs: str) -> list[str]:
    """Comma-separated specs; a comma followed by a digit continues a mixed spec's layer list.

    Example:
        >>> split_specs("int8,awq-int4-g64+int5-g64@layers.2,11,int4-g64")
        ['int8', 'awq-int4-g64+int5-g64@layers.2,11', 'int4-g64']
    """
    return re.split(r",(?=\D)", specs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument(
        "--skip-tokens", type=int, default=0, help="evaluate after this many tokens (text an allocation map never saw)"
    )
    parser.add_argument("--calibration-sequences", type=int, default=8)
    parser.add_argument("--calibration-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument(
        "--ours",
        default="awq-int4-g64",
        help="mitigations, comma-separated, also measured; per 4-bit backend the best at ≤ its bits is paired with it",
    )
    parser.add_argument("--json", default=None, help="also write every figure here")
    parser.add_argument(
        "--combine",
        default=None,
        metavar="JSON,JSON",
        help="measure nothing: print one table from parts written by --json on the same windows (a spec measured in "
        "several parts must have identical per-token KL in each)",
    )
    args = parser.parse_args()
    if args.combine:
        rows, kl_per_token = combine(args.combine.split(","))
        print_tables(rows, kl_per_token, args.ours)
        return
    torch.set_num_threads(args.threads)

    reference, tokenizer = load_model("default")
    with open(WIKITEXT, encoding="utf-8") as handle:
        windows = tokenize_corpus(
            tokenizer, handle.read(), window=args.window, max_tokens=args.eval_tokens, skip_tokens=args.skip_tokens
        )
    calibration = calibration_windows(
        tokenizer, python_docs_text(), n_sequences=args.calibration_sequences, seq_len=args.calibration_length
    )
    print(
        f"# {len(windows)} windows of {args.window} WikiText-2 validation tokens after the first {args.skip_tokens}; "
        f"calibration "
        f"{args.calibration_sequences}×{args.calibration_length} tokens of Python's docs; {args.threads} threads"
    )

    rows, kl_per_token = [], {}
    specs = split_specs(args.specs)
    specs += [spec for spec in split_specs(args.ours) if spec not in specs]
    for spec in specs:
        try:
            modification = parse_spec(spec)
        except HemorrhageError as error:
            rows.append({"spec": spec, "skipped": str(error)})
            continue
        started = time.perf_counter()
        modified = apply_modification(
            reference, modification, calibration=calibration if modification.needs_calibration else None
        )
        seconds = time.perf_counter() - started
        details = describe_model(modified, modification)  # before its first forward pass (bitsandbytes repacks)
        report = measure(reference, modified, windows, progress=False)
        figures = report.figures
        kl_per_token[spec] = report.tokens.kl
        rows.append({"spec": spec, "seconds": seconds, "details": details, "figures": figures})
        del modified
        print("  done " + table_row(rows[-1]), flush=True)
        if args.json:  # after every spec, with per-token KL: runs on the same windows can be paired later
            with open(args.json, "w", encoding="utf-8") as handle:
                kl_lists = {name: [float(value) for value in kl] for name, kl in kl_per_token.items()}
                json.dump({"rows": rows, "kl_per_token": kl_lists}, handle, default=float)

    print_tables(rows, kl_per_token, args.ours)


def combine(paths: list[str]) -> tuple[list[dict], dict]:
    """The rows and per-token KL of several parts; a spec in more than one part proves they shared the windows."""
    rows, kl_per_token = {}, {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            part = json.load(handle)
        for row in part["rows"]:
            spec = row["spec"]
            kl = part["kl_per_token"].get(spec)
            if spec in kl_per_token and kl is not None and kl != kl_per_token[spec]:
                raise SystemExit(f"{path}: {spec} differs from an earlier part's: the parts measured other windows")
            rows.setdefault(spec, row)
            if kl is not None:
                kl_per_token.setdefault(spec, kl)
    return list(rows.values()), kl_per_token


def print_tables(rows: list[dict], kl_per_token: dict, ours: str) -> None:
    print()
    print("| spec | backend | KL mean ± SE (block SE) | KL p99 | top-1 | PPL ratio | bits/weight | Linear bytes | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(table_row(row))
    print_goal(rows, kl_per_token, [spec for spec in split_specs(ours) if spec in kl_per_token])


def print_goal(rows: list[dict], kl_per_token: dict, ours: list[str]) -> None:
    """Per real 4-bit backend: the lowest-KL of ``ours`` at ≤ its bits per weight, paired on the same tokens."""
    if not ours:
        return
    measured = {row["spec"]: row for row in rows if "skipped" not in row}
    bits = {spec: row["details"]["footprint"]["bits_per_weight"] for spec, row in measured.items()}
    print()
    print("Goal: per real 4-bit backend, the lowest-KL mitigation of --ours at ≤ its bits per weight, paired on the")
    print("same tokens (negative difference: the mitigation is closer to the reference):")
    print(
        "| 4-bit backend | its bits | its KL | mitigation at ≤ its bits | its bits | Δ KL (ours − backend) ± block SE |"
    )
    print("|---|---|---|---|---|---|")
    for spec, row in measured.items():
        if row["details"]["simulated"] or row["details"].get("bits") != 4:
            continue
        eligible = [name for name in ours if bits[name] <= bits[spec] + 1e-9]
        if not eligible:
            print(f"| `{spec}` | {bits[spec]:.3f} | {row['figures']['kl_mean']:.4f} | none at ≤ its bits | | |")
            continue
        best = min(eligible, key=lambda name: measured[name]["figures"]["kl_mean"])
        difference = np.asarray(kl_per_token[best], dtype=np.float64) - np.asarray(kl_per_token[spec], dtype=np.float64)
        print(
            f"| `{spec}` | {bits[spec]:.3f} | {row['figures']['kl_mean']:.4f} | `{best}` | {bits[best]:.3f} | "
            f"{difference.mean():+.4f} ± {block_standard_error(difference):.4f} |"
        )


if __name__ == "__main__":
    main()
