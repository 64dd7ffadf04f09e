"""Benchmark of the decoding correction on SmolLM2: KL and PPL-ratio reduction on documents no fit used, and
generation overhead.

For each modification, measured in one run:
  quality  : KL(P_ref ‖ P_mod) mean and PPL ratio without and with the correction, on the report share of
             WikiText-2 (valid): its articles are split 3 : 1 : 1 into fit / select / report shares
             (hemorrhage_hf.correction.fit.plan_shares), and no fit reads the report share's articles.
               in-domain     fitted on WikiText-2 (its fit share; choices on its select share);
               cross-domain  fitted on the prose of Python's docs, judged on the same WikiText-2 report share.
             Both corrections are measured on the same report windows, in one measure() pass each (the corrected
             figures come from the same modified logits); kl_reduction_error is the paired standard error of the
             per-token difference. --fit-dtype bf16 runs both models in bfloat16 during the fits (what
             `correct --dtype bf16` does); the judgement stays fp32. --save DIR keeps each in-domain fit in
             DIR/<modification> (save_pretrained).
  families : (--families-table) KL reduction of each candidate correction family on the report share, each fitted
             on the same fit-share predictions.
  speed    : (--speed-only DTYPE) the fit's two costly parts in fp32 and in DTYPE, alternating: collecting both
             models' states on a window (what the state network's fit does on every window) and one training
             step's head product, forward and backward; the ratios of the medians.
  overhead : one greedy decoding step of the modified model (batch 1, KV cache, 256-token prompt) with and without
             the correction, in alternating pairs (median ratio and its quartiles); and the correction call alone on
             one step's scores. --no-overhead skips it.

Usage: python bench/bench_correction.py [--modifications int4-g64,wanda-50] [--max-tokens 16384] [--window 512]
                                        [--families entropy_temperature,token_bias,state_bias] [--rank 32]
                                        [--network-rank 128] [--network-write-rank K] [--max-iterations 40]
                                        [--sampled-tokens 0] [--fit-dtype fp32] [--save DIR] [--no-cross-domain]
                                        [--families-table] [--steps 32] [--pairs 16] [--no-overhead]
                                        [--overhead-only] [--speed-only bf16]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from hemorrhage_hf.corpus import python_docs_text
from hemorrhage_hf.correction.corrections import CorrectionParameters
from hemorrhage_hf.correction.fit import (
    DEFAULT_FAMILIES,
    DEFAULT_MAX_TOKENS,
    LogitFitOptions,
    NetworkOptions,
    as_documents,
    collect,
    paired_standard_error,
    plan_shares,
)
from hemorrhage_hf.correction.network import BATCH_SIZE, DEFAULT_NETWORK_RANK, DEFAULT_NETWORK_WIDTH, OutputHead
from hemorrhage_hf.correction.ops import DEFAULT_RANK, fit_correction, kl_before_after
from hemorrhage_hf.correction.processor import DecodingCorrection
from hemorrhage_hf.measurement.engine import measure
from hemorrhage_hf.models import DTYPES, load_model
from hemorrhage_hf.modify import apply_modification, parse_spec
from hemorrhage_hf.modify.calibration import CalibrationSettings

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
FAMILY_SETS = (
    ("temperature",),
    ("entropy_temperature",),
    ("token_bias",),
    ("previous_token",),
    ("entropy_temperature", "token_bias"),
    ("entropy_temperature", "token_bias", "previous_token"),
    ("state_bias",),
    ("entropy_temperature", "token_bias", "state_bias"),
)


def modified_model(reference, tokenizer, spec: str):
    calibration = CalibrationSettings().windows(tokenizer) if parse_spec(spec).needs_calibration else None
    return apply_modification(reference, spec, calibration=calibration)


def quality(reference, modified, correction: DecodingCorrection, report_windows) -> dict:
    report = measure(
        reference,
        modified,
        report_windows,
        progress=False,
        modified_variants={"corrected": correction.correct_sequence},
    )
    plain, corrected = report.figures, report.variants["corrected"].figures
    # Both are measured on the same predictions, so the reduction's error is the paired difference's, far below
    # what the two means' own errors suggest.
    difference_error = paired_standard_error(
        torch.from_numpy(report.variants["corrected"].tokens.kl - report.tokens.kl)
    )
    return {
        "report_tokens": plain["n_tokens"],
        "kl_before": plain["kl_mean"],
        "kl_after": corrected["kl_mean"],
        "kl_difference_error": difference_error,
        "kl_reduction": 1 - corrected["kl_mean"] / plain["kl_mean"],
        "kl_reduction_error": difference_error / plain["kl_mean"],
        "ppl_ratio_before": plain["ppl_ratio"],
        "ppl_ratio_after": corrected["ppl_ratio"],
        "top1_before": plain["top1_agreement"],
        "top1_after": corrected["top1_agreement"],
        "fit_summary": correction.summary.to_dict(),
    }


def families_table(reference, modified, fit_windows, held_out) -> list[dict]:
    with tqdm(total=len(fit_windows) + len(held_out), disable=True) as bar:
        fit_data = collect(reference, modified, fit_windows, 1, bar, head=None).logits
        held_out_data = collect(reference, modified, held_out, 1, bar, head=None).logits
    rows = []
    for families in FAMILY_SETS:
        started = time.perf_counter()
        parameters = fit_correction(fit_data, families, output_embeddings=modified.get_output_embeddings().weight)
        fit_seconds = time.perf_counter() - started
        before, after = kl_before_after(held_out_data, parameters)
        fitted_before, fitted_after = kl_before_after(fit_data, parameters)
        difference = (after - before).double()
        rows.append(
            {
                "families": "+".join(families),
                "parameters": sum(t.numel() for t in parameters.trainable())
                + ((2 * parameters.rank + 1) * modified.config.hidden_size if "state_bias" in families else 0),
                "fit_seconds": fit_seconds,
                "in_sample_reduction": 1 - fitted_after.mean().item() / fitted_before.mean().item(),
                "held_out_reduction": 1 - after.mean().item() / before.mean().item(),
                "held_out_reduction_error": paired_standard_error(difference) / before.mean().item(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def dtype_speed(reference, modified, windows, dtype: str, rounds: int) -> dict:
    """Seconds a window of collecting states and a training step's head product take in fp32 and in ``dtype``
    (a name of :data:`DTYPES`)."""

    def collect_states(models, head: OutputHead) -> float:
        with tqdm(disable=True) as bar:
            started = time.perf_counter()
            collect(*models, windows, 1, bar, head=head, keep_logits=False)
        return (time.perf_counter() - started) / len(windows)

    def train_step(head: OutputHead) -> float:
        states = torch.randn(BATCH_SIZE, head.weight.shape[1], requires_grad=True)
        started = time.perf_counter()
        for _ in range(8):
            torch.logsumexp(head.training_scores(states), -1).sum().backward()
        return (time.perf_counter() - started) / 8

    sides = {
        "fp32": (reference, modified),
        dtype: tuple(copy.deepcopy(model).to(DTYPES[dtype]) for model in (reference, modified)),
    }
    heads = {name: OutputHead.of(models[1]) for name, models in sides.items()}  # outside the timed parts
    timings = {name: {"collect_window_s": [], "train_step_s": []} for name in sides}
    for _ in range(rounds):
        for name, models in sides.items():
            timings[name]["collect_window_s"].append(collect_states(models, heads[name]))
            timings[name]["train_step_s"].append(train_step(heads[name]))
    medians = {
        name: {part: statistics.median(times) for part, times in parts.items()} for name, parts in timings.items()
    }
    fast = medians[dtype]
    return {
        "windows": len(windows),
        "rounds": rounds,
        **medians,
        "collect_ratio": medians["fp32"]["collect_window_s"] / fast["collect_window_s"],
        "train_step_ratio": medians["fp32"]["train_step_s"] / fast["train_step_s"],
    }


@torch.no_grad()  # inference_mode breaks quantized tensor subclasses (quanto)
def overhead(modified, correction: DecodingCorrection, prompt_ids: torch.Tensor, steps: int, pairs: int) -> dict:
    """Per-step time of greedy decoding with and without the correction, and of the call alone.

    The two decodings run in ``pairs`` back-to-back pairs, the first of each pair alternating, and the overhead is
    the median of the pairs' ratios with its interquartile range. The medians of each side taken separately (five
    pairs) read +1.6 %, +11.5 % and +1.9 % in three runs on a quiet machine; a pair's ratio cancels the machine's
    slower drifts."""

    def decode(processors) -> float:
        started = time.perf_counter()
        modified.generate(
            prompt_ids,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            logits_processor=processors,
            pad_token_id=0,
        )
        return (time.perf_counter() - started) / steps

    decode(LogitsProcessorList())  # warm-up
    plain, corrected = [], []
    sides = [(plain, LogitsProcessorList()), (corrected, LogitsProcessorList([correction]))]
    for pair in range(pairs):
        for times, processors in sides[:: -1 if pair % 2 else 1]:
            times.append(decode(processors))
    ratios = [with_correction / without - 1 for with_correction, without in zip(corrected, plain)]
    lower_quartile, _, upper_quartile = statistics.quantiles(ratios, n=4)
    scores = modified(prompt_ids).logits[:, -1].float()
    call = []
    for _ in range(200):
        started = time.perf_counter()
        correction(prompt_ids, scores)
        call.append(time.perf_counter() - started)
    step = statistics.median(plain)
    return {
        "step_s": step,
        "step_with_correction_s": statistics.median(corrected),
        "generate_overhead": statistics.median(ratios),
        "generate_overhead_quartiles": [lower_quartile, upper_quartile],
        "call_s": statistics.median(call),
        "call_overhead": statistics.median(call) / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modifications", default="int4-g64,wanda-50")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens each fit reads")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES))
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK, help="rank of the low-rank families")
    parser.add_argument("--network-rank", type=int, default=DEFAULT_NETWORK_RANK, help="the state_network's bottleneck")
    parser.add_argument(
        "--network-write-rank",
        type=int,
        help="cut the trained state_network's write to this many directions (default: no cut)",
    )
    parser.add_argument("--max-iterations", type=int, default=40, help="L-BFGS iterations of each fit")
    parser.add_argument(
        "--sampled-tokens",
        type=int,
        default=0,
        help="tokens of the reference's own samples added to the state_network's fit",
    )
    parser.add_argument(
        "--fit-dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="dtype both models run in during the fit (the held-out judgement stays fp32)",
    )
    parser.add_argument(
        "--speed-only",
        choices=sorted(set(DTYPES) - {"fp32"}),
        help="only the fit's collection and training speed in fp32 and this dtype",
    )
    parser.add_argument("--families-table", action="store_true")
    parser.add_argument("--no-cross-domain", action="store_true")
    parser.add_argument("--no-overhead", action="store_true")
    parser.add_argument("--progress", action="store_true", help="progress bars of each fit, on stderr")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=16, help="decodings with and without the correction")
    parser.add_argument(
        "--save", type=Path, help="keep each in-domain fit under SAVE/<modification> (save_pretrained), for later study"
    )
    parser.add_argument(
        "--overhead-only",
        action="store_true",
        help="only the generation overhead, with the families at their identity values (a fit changes "
        "their values, not their cost)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    reference, tokenizer = load_model("default")
    wiki_text = WIKITEXT.read_text(encoding="utf-8")
    shares = plan_shares(as_documents(wiki_text, tokenizer, window=args.window, stride=None), args.max_tokens, 0)
    families = tuple(args.families.split(","))
    prompt = shares.report[0].input_ids[None, :256]
    if args.overhead_only:
        for spec in args.modifications.split(","):
            modified = modified_model(reference, tokenizer, spec)
            identity = DecodingCorrection(
                CorrectionParameters.identity(
                    families,
                    vocab_size=modified.get_output_embeddings().weight.shape[0],
                    network_shape=(args.network_rank, DEFAULT_NETWORK_WIDTH),
                    network_write_rank=args.network_write_rank,
                )
            )
            print(spec, "overhead", json.dumps(overhead(modified, identity, prompt, args.steps, args.pairs)))
        return
    if args.speed_only:
        for spec in args.modifications.split(","):
            speed = dtype_speed(
                reference, modified_model(reference, tokenizer, spec), shares.fit[:8], args.speed_only, rounds=3
            )
            print(spec, "speed", json.dumps(speed))
        return
    results = {
        "max_tokens": args.max_tokens,
        "fit_dtype": args.fit_dtype,
        "report": f"{shares.tokens[2]} tokens of {shares.documents[2]} WikiText-2 valid articles no fit reads",
    }
    fit_options = {
        "tokenizer": tokenizer,
        "families": families,
        "window": args.window,
        "max_tokens": args.max_tokens,
        "logit_fit": LogitFitOptions(args.rank, max_iterations=args.max_iterations),
        "network": NetworkOptions(
            args.network_rank, write_rank=args.network_write_rank, sampled_tokens=args.sampled_tokens
        ),
        "progress": args.progress,
    }
    for spec in args.modifications.split(","):
        modified = modified_model(reference, tokenizer, spec)
        row = results[spec] = {}
        fit_models = [
            model if args.fit_dtype == "fp32" else copy.deepcopy(model).to(DTYPES[args.fit_dtype])
            for model in (reference, modified)
        ]
        started = time.perf_counter()
        in_domain = DecodingCorrection.fit(*fit_models, wiki_text, **fit_options)
        fit_seconds = time.perf_counter() - started
        if args.save:
            in_domain.save_pretrained(args.save / spec)
        row["in_domain"] = {**quality(reference, modified, in_domain, shares.report), "fit_seconds": fit_seconds}
        print(spec, "in-domain", json.dumps(row["in_domain"]), flush=True)
        if not args.no_cross_domain:
            cross = DecodingCorrection.fit(*fit_models, python_docs_text(), **fit_options)
            row["cross_domain"] = quality(reference, modified, cross, shares.report)
            print(spec, "cross-domain", json.dumps(row["cross_domain"]), flush=True)
        if args.families_table:
            row["families"] = families_table(reference, modified, shares.fit, shares.report)
        if not args.no_overhead:
            row["overhead"] = overhead(modified, in_domain, prompt, args.steps, args.pairs)
            print(spec, "overhead", json.dumps(row["overhead"]), flush=True)
        del modified
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
