"""What the Space computes, without any gradio: the model allow-list and cache, one bounded comparison, greedy
generations side by side, and the token-by-token KL rendering. :mod:`hemorrhage_hf.space.ui` lays it out.

Visitors choose a model by its allow-list *label*; only the operator's allow-list maps labels to sources, so a
path or Hub id typed by a visitor is never loaded.

Example:
    >>> from hemorrhage_hf.space.backend import ModelCache, SpaceLimits, run_comparison
    >>> cache = ModelCache()
    >>> comparison = run_comparison(cache, "SmolLM2-135M-Instruct", "int4-g64", "Some text to measure on ...",
    ...                             prompt="What is a list?", limits=SpaceLimits())  # doctest: +SKIP
    >>> comparison.report.severity  # doctest: +SKIP
    'moderate'
"""

from __future__ import annotations

import html
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from ..comparison import resolve_pair
from ..corpus import PYTHON_DOCS, Window, shared_calibration_run, tokenize_corpus
from ..errors import HemorrhageError
from ..measurement.engine import measure
from ..measurement.report import HemorrhageReport
from ..modify import parse_spec
from ..modify.calibration import CalibrationSettings

if TYPE_CHECKING:
    from ..correction.processor import DecodingCorrection
    from ..sweep.runner import SweepResult

DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct"
#: label → model source. The operator may replace it with ``HEMORRHAGE_SPACE_MODELS="label=source,..."``.
DEFAULT_ALLOW_LIST = {DEFAULT_MODEL_LABEL: "default"}
ALLOW_LIST_ENVIRONMENT = "HEMORRHAGE_SPACE_MODELS"
TEXT_LABEL = "text typed in the Space"
#: KL (nats) at which a token's colour saturates in the token view; below it the shade goes as √KL, so that
#: 0.01, 0.1 and 1 nat stay distinguishable.
KL_COLOUR_SATURATION = 4.0


@dataclass(frozen=True)
class SpaceLimits:
    """Bounds on what one request may cost (CPU seconds and memory)."""

    text_tokens: int = 512
    new_tokens: int = 64
    sweep_levels: int = 6
    sweep_tokens: int = 256
    cached_modified_models: int = 2
    #: Python-docs tokens a decoding correction reads, in windows of ``correction_fit_window``, split 3 : 1 : 1 into
    #: fit, select and report shares by document: 400 in 80s is about the least the fit accepts (256 + 64 + 64
    #: tokens). Fitting is the slow part of a first request with correction (tens of seconds on 2 CPU cores); it is
    #: cached.
    correction_fit_tokens: int = 400
    correction_fit_window: int = 80
    correction_iterations: int = 40
    #: Leaderboard tab: candidates per request, tokens they are measured on, tokens the layer map is measured on
    #: (the map costs about 2 + (number of layers) forward passes of that many tokens).
    leaderboard_specs: int = 4
    leaderboard_tokens: int = 256
    map_tokens: int = 128
    #: Calibration data for modifications that need it (Wanda, AWQ...): the fewest tokens the registry accepts
    #: (``MIN_CALIBRATION_TOKENS``), so one request stays interactive. Modified models are fitted on it before any
    #: visitor text is known, so a text that holds these tokens is refused for them (:func:`refuse_calibration_text`).
    calibration: CalibrationSettings = field(
        default_factory=lambda: CalibrationSettings(text_source=PYTHON_DOCS, n_sequences=2, seq_len=128)
    )


def allow_list_from_environment() -> dict[str, str]:
    """The operator's allow-list from :data:`ALLOW_LIST_ENVIRONMENT`, else :data:`DEFAULT_ALLOW_LIST`."""
    configured = os.environ.get(ALLOW_LIST_ENVIRONMENT, "").strip()
    if not configured:
        return dict(DEFAULT_ALLOW_LIST)
    allow_list = {}
    for entry in configured.split(","):
        label, separator, source = entry.partition("=")
        if not separator or not label.strip() or not source.strip():
            raise HemorrhageError(f"{ALLOW_LIST_ENVIRONMENT} entries are label=source, got {entry!r}")
        allow_list[label.strip()] = source.strip()
    return allow_list


class ModelCache:
    """Reference models by allow-list label, and modified copies by (label, spec), least recently used first out.

    One lock serialises loads and modifications: two requests for the same model never load it twice.
    """

    def __init__(self, allow_list: dict[str, str] | None = None, limits: SpaceLimits | None = None):
        self.allow_list = dict(allow_list if allow_list is not None else allow_list_from_environment())
        self.limits = limits or SpaceLimits()
        self._references: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
        self._modified: OrderedDict[tuple[str, str], PreTrainedModel] = OrderedDict()
        self._corrections: OrderedDict[tuple[str, str], DecodingCorrection] = OrderedDict()
        self._calibration_ids: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()
        #: Reference caches of threshold sweeps live for this process only (visitor texts are not kept).
        self.reference_cache_root = Path(tempfile.mkdtemp(prefix="hemorrhage-space-refcache-"))

    def _source(self, label: str) -> str:
        if label not in self.allow_list:
            raise HemorrhageError(f"model {label!r} is not offered here; choose one of {sorted(self.allow_list)}")
        return self.allow_list[label]

    def reference(self, label: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        source = self._source(label)
        with self._lock:
            if label not in self._references:
                from ..models import load_model

                self._references[label] = load_model(source)
            return self._references[label]

    def modified(self, label: str, spec: str) -> PreTrainedModel:
        """``spec`` applied to a copy of the labelled model (validated before any work)."""
        spec = parse_spec(spec).spec
        reference, tokenizer = self.reference(label)
        key = (label, spec)
        with self._lock:
            if key in self._modified:
                self._modified.move_to_end(key)
                return self._modified[key]
            _, modified, _ = resolve_pair(
                reference, modification=spec, tokenizer=tokenizer, calibration=self.limits.calibration
            )
            self._modified[key] = modified
            _evict_oldest(self._modified, self.limits.cached_modified_models)
            return modified

    def calibration_ids(self, label: str, calibration: CalibrationSettings | None = None) -> torch.Tensor:
        """The ``[n_sequences, seq_len]`` token ids that ``calibration`` (default: this cache's limits') gives the
        labelled model's tokenizer: what its calibrated modifications are fitted on. Tokenized once per setting."""
        calibration = calibration or self.limits.calibration
        _, tokenizer = self.reference(label)
        key = (label, repr(calibration))
        with self._lock:
            if key not in self._calibration_ids:
                self._calibration_ids[key] = calibration.windows(tokenizer)
            return self._calibration_ids[key]

    def correction(self, label: str, spec: str) -> DecodingCorrection:
        """A decoding correction of ``spec`` towards the labelled model, fitted on the fly on the Python docs.

        It is fitted on Python docs, never on the visitor's text, and checked on Python docs it never used
        (``summary``): the visitor's text, of another kind, may gain less or lose. Fitted corrections are cached like
        modified models.
        """
        from ..corpus import python_docs_text
        from ..correction.fit import LogitFitOptions
        from ..correction.processor import CorrectionWarning, DecodingCorrection

        spec = parse_spec(spec).spec
        reference, tokenizer = self.reference(label)
        modified = self.modified(label, spec)
        key = (label, spec)
        with self._lock:
            if key not in self._corrections:
                with warnings.catch_warnings():
                    # A correction that does not help is shown with its verdict, not raised as a warning.
                    warnings.simplefilter("ignore", CorrectionWarning)
                    self._corrections[key] = DecodingCorrection.fit(
                        reference,
                        modified,
                        python_docs_text(),
                        tokenizer=tokenizer,
                        window=self.limits.correction_fit_window,
                        max_tokens=self.limits.correction_fit_tokens,
                        logit_fit=LogitFitOptions(max_iterations=self.limits.correction_iterations),
                        progress=False,
                        metadata={"reference": label, "modification": spec, "text": PYTHON_DOCS},
                    )
                _evict_oldest(self._corrections, self.limits.cached_modified_models)
            self._corrections.move_to_end(key)
            return self._corrections[key]


def _evict_oldest(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


def bounded_text_windows(tokenizer: PreTrainedTokenizerBase, text: str, limits: SpaceLimits):
    """The text as one window, refused (not cut) when longer than the limit so the visitor sees what was measured."""
    n_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    if n_tokens > limits.text_tokens:
        raise HemorrhageError(f"the text has {n_tokens} tokens; this Space measures at most {limits.text_tokens}")
    return tokenize_corpus(tokenizer, text, window=max(n_tokens, 2))


def refuse_calibration_text(
    cache: ModelCache,
    model_label: str,
    specs: Iterable[str],
    windows: Sequence[Window],
    calibration: CalibrationSettings,
) -> None:
    """Refuse to judge the calibrated ones of ``specs`` (Wanda, AWQ, GPTQ...) on ``windows`` that share a run of
    tokens with the ``calibration`` they are fitted on: a modification judged on its own calibration tokens looks
    better than it is. The CLI keeps calibration off the judged tokens instead; the Space fits (and caches) its
    models before it sees any text, so it can only refuse. Specs that need no calibration are never refused.
    """
    calibrated = [spec for spec in specs if parse_spec(spec).needs_calibration]
    if not calibrated:
        return
    shared = shared_calibration_run([w.input_ids for w in windows], cache.calibration_ids(model_label, calibration))
    if shared is None:
        return
    source = "Python-docs" if calibration.text_source == PYTHON_DOCS else repr(calibration.text_source)
    raise HemorrhageError(
        f"the text contains the {source} passage that calibrated modifications ({', '.join(calibrated)}) are fitted "
        f"on here (its tokens {shared.start}–{shared.stop} are calibration tokens): judged on it, they would look "
        "better than they are; measure on other text, or pick a spec that needs no calibration"
    )


def leading_window(
    tokenizer: PreTrainedTokenizerBase, text: str, most: int, *, least: int = 2, purpose: str = "a measurement"
) -> list[Window]:
    """The first ``most`` tokens of ``text`` (all of them where it is shorter) as one window; a text of fewer than
    ``least`` tokens is refused, naming the ``purpose`` it is too short for."""
    n_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    if n_tokens < least:
        raise HemorrhageError(f"the text has {n_tokens} tokens; {purpose} needs at least {least}")
    window = min(n_tokens, most)
    return tokenize_corpus(tokenizer, text, window=window, max_tokens=window)


def token_pieces(tokenizer: PreTrainedTokenizerBase, text: str, target_ids: np.ndarray) -> list[str]:
    """The text of each scored token (all but the first), sliced from the text itself so it reads exactly.

    Each token gets the text from its start to the next token's start (byte-level tokens that split one
    character share it: the first gets it, the others get ""). Without offsets (slow tokenizers) tokens are decoded.
    """
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    ids = encoding.input_ids
    if not tokenizer.is_fast or list(ids[1:]) != target_ids.tolist():
        return [tokenizer.decode([int(token)]) for token in target_ids]
    starts = [start for start, _ in encoding.offset_mapping] + [len(text)]
    starts = np.maximum.accumulate(starts).tolist()
    return [text[starts[i] : starts[i + 1]] for i in range(1, len(ids))]


def token_kl_html(first_piece: str, pieces: list[str], kl: np.ndarray, finite: np.ndarray) -> str:
    """The text with every token's background red in proportion to its KL; hovering shows the number."""
    spans = [f'<span title="context only">{html.escape(first_piece)}</span>']
    for piece, value, ok in zip(pieces, kl.tolist(), finite.tolist()):
        if not piece:
            continue
        if not ok:
            spans.append(f'<span style="background:#000;color:#fff" title="NaN/inf logits">{html.escape(piece)}</span>')
            continue
        alpha = min(max(value, 0.0) / KL_COLOUR_SATURATION, 1.0) ** 0.5 * 0.85
        style = f"background:rgba(178,34,34,{alpha:.3f})"
        spans.append(f'<span style="{style}" title="KL {value:.4f} nats">{html.escape(piece)}</span>')
    legend = (
        f"<p style='font-size:0.85em'>Shade = KL(P_ref ‖ P_mod) of the two models' predictions of that token "
        f"(√ scale, full red at {KL_COLOUR_SATURATION:g} nats or more). Hover a token for its value.</p>"
    )
    body = "".join(spans)
    return f"<div class='hemorrhage-tokens' style='white-space:pre-wrap;line-height:1.7'>{body}</div>{legend}"


def chat_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """The prompt as one user turn when the tokenizer has a chat template, else as plain text."""
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids


@torch.no_grad()  # not inference_mode: quanto and torchao tensors fail under it
def greedy_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    logits_processor: LogitsProcessorList | None = None,
) -> str:
    """Greedy continuation, so that any difference between models comes from the models, not from sampling."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    output = model.generate(
        prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        generation_config=config,
        logits_processor=logits_processor,
    )
    return tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True)


@dataclass
class Comparison:
    """One request's results: the report and what the page shows of it."""

    report: HemorrhageReport
    token_html: str
    plots: dict[str, Path]
    #: "reference", "modified" and, with correction, "corrected" continuations of the prompt
    generations: dict[str, str]
    #: the decoding correction's verdict on its own held-out text, when one was used
    correction_verdict: str = ""


def run_comparison(
    cache: ModelCache,
    model_label: str,
    spec: str,
    text: str,
    *,
    prompt: str = "",
    max_new_tokens: int = 32,
    limits: SpaceLimits | None = None,
    attention: bool = True,
    correct: bool = False,
    output_dir: Path | None = None,
    on_step: Callable[[float, str], None] = lambda fraction, description: None,
) -> Comparison:
    """Measure ``spec`` applied to the labelled model on ``text``; plot it; generate from ``prompt`` with both,
    and with ``correct`` also with the modified model under a decoding correction (fitted on first use).

    ``on_step(fraction_done, description)`` is told as each stage starts (the Space's progress bar).
    """
    from ..render import plot_kl_distribution, plot_layers

    limits = limits or cache.limits
    if not 0 <= max_new_tokens <= limits.new_tokens:
        raise HemorrhageError(f"new tokens must be between 0 and {limits.new_tokens}, got {max_new_tokens}")
    modification = parse_spec(spec)  # a bad spec fails before any model loads
    on_step(0.0, f"loading {model_label}")
    reference, tokenizer = cache.reference(model_label)
    windows = bounded_text_windows(tokenizer, text, limits)
    # The cached modified model was calibrated with the cache's own limits, whatever limits this request has.
    refuse_calibration_text(cache, model_label, [modification.spec], windows, cache.limits.calibration)
    on_step(0.15, f"applying {modification.spec}")
    modified = cache.modified(model_label, modification.spec)
    on_step(0.35, "measuring")
    metadata = {
        "reference": model_label,
        "modified": f"{model_label} + {modification.spec}",
        "modification": modification.spec,
        "corpus": TEXT_LABEL,
        "window": len(windows[0].input_ids),
        "stride": len(windows[0].input_ids),
        "n_windows": len(windows),
    }
    report = measure(reference, modified, windows, layers=True, attention=attention, progress=False, metadata=metadata)
    pieces = token_pieces(tokenizer, text, report.tokens.target_ids)
    first_piece = tokenizer.decode(windows[0].input_ids[:1])
    token_html = token_kl_html(first_piece, pieces, report.tokens.kl, report.tokens.finite)

    on_step(0.6, "plotting")
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="hemorrhage-space-"))
    plots = {
        "Per-layer drift and attention divergence": output_dir / "layer_drift.png",
        "KL distribution": output_dir / "kl_distribution.png",
    }
    plot_layers(report, plots["Per-layer drift and attention divergence"])
    plot_kl_distribution(report, plots["KL distribution"])

    generations, verdict = {}, ""
    if prompt.strip() and max_new_tokens > 0:
        on_step(0.65, "generating")
        prompt_ids = chat_input_ids(tokenizer, prompt)
        generations["reference"] = greedy_generation(reference, tokenizer, prompt_ids, max_new_tokens)
        generations["modified"] = greedy_generation(modified, tokenizer, prompt_ids, max_new_tokens)
        if correct:
            on_step(0.8, "fitting the decoding correction")
            correction = cache.correction(model_label, modification.spec)
            verdict = correction.summary.verdict()
            generations["corrected"] = greedy_generation(
                modified, tokenizer, prompt_ids, max_new_tokens, LogitsProcessorList([correction])
            )
    return Comparison(
        report=report, token_html=token_html, plots=plots, generations=generations, correction_verdict=verdict
    )


def default_sweep_levels(family: str, limits: SpaceLimits) -> list[str]:
    """At most ``limits.sweep_levels`` of the family's default levels, spread from its weakest to its strongest."""
    from ..sweep.runner import resolve_family

    levels = resolve_family(family).default_levels
    picks = np.unique(np.linspace(0, len(levels) - 1, min(limits.sweep_levels, len(levels))).round().astype(int))
    return [levels[i] for i in picks]


@dataclass
class ThresholdSweep:
    """A small sweep's result, its first curve's plot (threshold marked) and a table of its levels."""

    result: SweepResult
    plot: Path
    rows: list[list[str]]
    headers: list[str]


def run_threshold_sweep(
    cache: ModelCache,
    model_label: str,
    family: str,
    levels: list[str],
    text: str,
    *,
    limits: SpaceLimits | None = None,
    output_dir: Path | None = None,
) -> ThresholdSweep:
    """Sweep ``family`` over ``levels`` on the first ``limits.sweep_tokens`` tokens of ``text``.

    Progress goes through the sweep's tqdm bars (the Space shows them with ``gr.Progress(track_tqdm=True)``).
    """
    from ..render import sweep_rows
    from ..sweep.runner import SweepOptions, resolve_family, run_sweep

    limits = limits or cache.limits
    resolved = resolve_family(family)
    if not 2 <= len(levels) <= limits.sweep_levels:
        raise HemorrhageError(f"give between 2 and {limits.sweep_levels} levels, got {len(levels)}: {levels}")
    reference, tokenizer = cache.reference(model_label)
    windows = leading_window(tokenizer, text, limits.sweep_tokens, purpose="a threshold sweep")
    if resolved.kind == "model":  # decoding families change sampling, not the model: nothing is calibrated
        specs = [spec for spec in map(resolved.spec, levels) if spec is not None]
        refuse_calibration_text(cache, model_label, specs, windows, limits.calibration)
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="hemorrhage-space-sweep-"))
    result = run_sweep(
        reference,
        tokenizer,
        windows,
        family,
        levels,
        calibration=limits.calibration,
        options=SweepOptions(cache_root=cache.reference_cache_root),
        output_dir=output_dir,
        metadata={"reference": model_label, "corpus": TEXT_LABEL, "window": len(windows[0].input_ids)},
    )
    curves = [curve for curve in result.curves if any(curve.key in entry["figures"] for entry in result.levels)]
    return ThresholdSweep(
        result,
        output_dir / f"sweep_{curves[0].key}.png",
        sweep_rows(result, curves),
        ["level", "spec", *(curve.label for curve in curves)],
    )


#: What the Leaderboard tab offers (visitors choose among these only): uniform formats from 8 to 3 bits, and a mix
#: that gives wider formats to the layers that carry most of SmolLM2's int4-g64 damage (``hemorrhage-hf allocate``
#: at 4.5 bits per weight).
LEADERBOARD_SPECS = (
    "int8",
    "int6-g64",
    "int5-g64",
    "int4-g32",
    "int4-g64",
    "int3-g64",
    "int4-g64+int4-g32@layers.17,18+int5-g64@layers.2,11,15,19,20+int6-g64@layers.29",
)


@dataclass
class LeaderboardResult:
    """Rows of the small leaderboard, its KL-vs-bits plot, and the layer map of one of its candidates."""

    rows: list[list[str]]
    headers: list[str]
    pareto_plot: Path
    map_plot: Path
    map_text: str


def run_leaderboard(
    cache: ModelCache,
    model_label: str,
    specs: list[str],
    map_spec: str,
    text: str,
    *,
    limits: SpaceLimits | None = None,
    output_dir: Path | None = None,
) -> LeaderboardResult:
    """Measure the allow-listed ``specs`` on the first ``limits.leaderboard_tokens`` tokens of ``text`` and locate
    ``map_spec``'s damage on its first ``limits.map_tokens``; every choice is checked before any model runs."""
    from ..locate import locate
    from ..locate.allocate import measure_specs
    from ..render import hemorrhage_map_summary, plot_hemorrhage_map, plot_pareto

    limits = limits or cache.limits
    offered = [spec for spec in specs if spec in LEADERBOARD_SPECS]
    if offered != list(specs) or map_spec not in LEADERBOARD_SPECS:
        raise HemorrhageError(f"the leaderboard offers only {', '.join(LEADERBOARD_SPECS)}")
    if not 1 <= len(specs) <= limits.leaderboard_specs:
        raise HemorrhageError(f"pick between 1 and {limits.leaderboard_specs} candidates, got {len(specs)}")
    reference, tokenizer = cache.reference(model_label)
    windows = leading_window(tokenizer, text, limits.leaderboard_tokens, least=16, purpose="the leaderboard")
    map_windows = leading_window(tokenizer, text, limits.map_tokens)
    refuse_calibration_text(cache, model_label, specs, windows, limits.calibration)
    refuse_calibration_text(cache, model_label, [map_spec], map_windows, cache.limits.calibration)
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="hemorrhage-space-leaderboard-"))
    measured = measure_specs(
        reference,
        tokenizer,
        windows,
        specs,
        calibration=limits.calibration,
        store_root=cache.reference_cache_root,
        progress=True,
    )
    measured.sort(key=lambda row: row["kl_mean"])
    plot_pareto(measured, output_dir / "pareto.png", title=f"{model_label}, {measured[0]['n_tokens']} tokens")
    hmap = locate(
        reference,
        cache.modified(model_label, map_spec),
        map_windows,
        metadata={"reference": model_label, "modified": map_spec, "corpus": TEXT_LABEL},
    )
    plot_hemorrhage_map(hmap, output_dir / "locate.png")
    rows = [
        [
            row["spec"],
            f"{row['bits_per_weight']:.3f}",
            f"{row['kl_mean']:.4f} ± {row['kl_mean_error']:.4f}",
            f"{row['top1_agreement']:.1%}",
            f"{row['ppl_ratio']:.3f}",
        ]
        for row in measured
    ]
    return LeaderboardResult(
        rows,
        ["spec", "bits per weight", "KL mean (nats)", "top-1 agreement", "PPL ratio"],
        output_dir / "pareto.png",
        output_dir / "locate.png",
        f"**Layer map of `{map_spec}`** on {hmap.n_tokens} tokens:\n\n" + hemorrhage_map_summary(hmap),
    )
