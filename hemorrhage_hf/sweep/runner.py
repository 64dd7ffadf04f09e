"""Strength sweeps: measure a modification at every level of its strength, find the robustness threshold, draw it.

A *family* turns a level into a modification spec (``bits``: ``4`` → ``int4-g64``; ``sparsity:wanda``: ``50`` →
``wanda-50``; any template with ``{}``, e.g. ``"int{}-g128"``). Identity levels (sparsity 0, 32 bits, temperature 1)
are the unmodified model, so a sweep's first level shows zero hemorrhage exactly. Model families read the
reference side from an exact :class:`~hemorrhage_hf.measurement.refstore.ReferenceStore` (with ``top_k``, a top-k
:class:`~hemorrhage_hf.measurement.refcache.ReferenceCache` whose KL is a lower bound): one reference pass, then one
pass per level;
decoding families (``temperature``, ``top_p``, ``top_k``, ``typical_p``, ``repetition_penalty``) process the same
logits for every level in one pass (:func:`hemorrhage_hf.measurement.decoding.decoding_divergence`).

Per level the sweep keeps the report's figures (KL, PPL ratio, top-1 agreement, …) and, for tasks, accuracy of
both models, drop and flips. Per curve it applies both rules of :mod:`hemorrhage_hf.sweep.threshold` to the curve's
*damage* (PPL ratio − 1; KL; 1 − agreement; accuracy drop), the breakpoint fit weighing each level by the damage's
standard error there (the block error where measured), and records ``s0`` refitted with each level left out. The
sweep's threshold is the fitted breakpoint of the first curve that has one, in that order (the paper reads its
thresholds on perplexity; for decoding: total variation, JS, agreement), else the first curve's tolerance crossing.

Each level records its figures and its wall time (``seconds``; a decoding sweep's one shared pass is split evenly
over its levels). Levels are listed from the weakest to the strongest modification. Strength is the level's number,
negated when the levels decrease (bits), on a log scale for ``top_k``; ``n:m`` levels count as the sparsity 100·(1 −
n/m).

Output (``save``): ``sweep.json`` (everything), ``sweep.csv`` (one row per level), ``sweep_<figure>.png`` (one
curve per figure, threshold and tolerance marked). ``sweep.json`` is rewritten after every level, and a rerun into
the same folder with the same model, windows and settings skips the levels already measured.

Families and curves live in :mod:`hemorrhage_hf.sweep.families` (no torch: the CLI's help lists them).

Example:
    >>> from hemorrhage_hf.sweep.runner import resolve_family
    >>> family = resolve_family("bits")
    >>> family.spec("4"), family.spec("32"), family.default_levels[:3]
    ('int4-g64', None, ('32', '8', '6'))
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..atomic import atomic_write_text, json_safe, write_json
from ..corpus import Window
from ..errors import HemorrhageError, SpecError
from ..llamacpp.export import GgufLevels
from ..llamacpp.types import parse_types
from ..measurement import distributed
from ..measurement.decoding import Decoding, decoding_divergence
from ..measurement.engine import measure, run_environment
from ..measurement.refcache import model_fingerprint, windows_fingerprint
from ..measurement.refstore import build_reference_file
from ..modify import apply_modification, linear_footprint, parse_spec
from ..modify.calibration import CalibrationSettings
from ..tasks.scoring import Task, TaskAnswers, answer_task, task_hemorrhage
from .families import (
    DECODING_CURVES,
    FAMILIES,
    MODEL_CURVES,
    Curve,
    SweepFamily,
    level_value,
    resolve_family,
    task_curve,
)
from .threshold import fit_breakpoint, tolerance_crossing

__all__ = ["FAMILIES", "SweepFamily", "SweepOptions", "SweepResult", "level_value", "resolve_family", "run_sweep"]

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class StrengthScale:
    """Maps levels to strengths that grow with the modification, and back."""

    sign: float
    log: bool

    @classmethod
    def infer(cls, family: SweepFamily, levels: Sequence[str]) -> StrengthScale:
        values = [level_value(level) for level in levels if level not in family.identity_levels]
        if len(values) > 1 and not (
            all(a < b for a, b in zip(values, values[1:])) or all(a > b for a, b in zip(values, values[1:]))
        ):
            raise SpecError(f"levels must run monotonically from the weakest to the strongest, got {list(levels)}")
        if family.log_strength and any(value <= 0 for value in values):
            raise SpecError(f"{family.name} levels must be positive (besides the identity), got {list(levels)}")
        return cls(-1.0 if len(values) > 1 and values[1] < values[0] else 1.0, family.log_strength)

    def strength(self, level: str) -> float:
        value = level_value(level)
        return self.sign * (math.log(value) if self.log else value)

    def level(self, strength: float) -> float:
        value = strength / self.sign
        return math.exp(value) if self.log else value


def figure_error(figures: dict, key: str) -> float | None:
    """The standard error of figure ``key`` that decisions use: the batch-means one where there is one."""
    block = figures.get(f"{key}_error_block")
    return block if block is not None else figures.get(f"{key}_error")


def _flat_task_figures(figures: dict) -> dict:
    """``{task}_{figure}`` scalars of one task comparison (answers stay out of the per-level figures)."""
    return {f"{figures['task']}_{key}": value for key, value in figures.items() if key not in ("task", "answers")}


@dataclass
class SweepResult:
    """Every level's figures, the thresholds, and what was swept; :meth:`save` writes JSON, CSV and PNGs."""

    family: SweepFamily
    levels: list[dict]
    metadata: dict
    curves: tuple[Curve, ...]
    tolerances: dict[str, float] = field(default_factory=dict)

    @property
    def scale(self) -> StrengthScale:
        return StrengthScale.infer(self.family, [entry["level"] for entry in self.levels])

    def thresholds(self) -> dict[str, dict]:
        """Both rules of :mod:`hemorrhage_hf.sweep.threshold` per curve, in level units, with the figures either
        side."""
        measured = [entry for entry in self.levels if entry["spec"] is not None]
        strengths = [entry["strength"] for entry in measured]
        results = {}
        for curve in self.curves:
            if not any(curve.key in entry["figures"] for entry in measured):
                continue
            damage = [_damage(curve, entry["figures"]) for entry in measured]
            tolerance = self.tolerances.get(curve.key, curve.tolerance)
            breakpoint_ = fit_breakpoint(strengths, damage, _errors(curve, measured, damage)).to_dict()
            crossing = tolerance_crossing(strengths, damage, tolerance).to_dict()
            if breakpoint_["strength"] is not None:
                breakpoint_["level"] = self.scale.level(breakpoint_["strength"])
                breakpoint_["interval_levels"] = sorted(self.scale.level(s) for s in breakpoint_["interval"])
            level_at = {entry["strength"]: entry["level"] for entry in measured}
            breakpoint_["leave_one_out_levels"] = [
                {
                    "left_out": level_at[refit["left_out"]],
                    "level": None if refit["strength"] is None else self.scale.level(refit["strength"]),
                }
                for refit in breakpoint_["leave_one_out"]
            ]
            for rule, below, above in (
                (breakpoint_, "below_index", "above_index"),
                (crossing, "last_within_index", "first_beyond_index"),
            ):
                rule["level_before"] = self._neighbour(measured, rule[below])
                rule["level_after"] = self._neighbour(measured, rule[above])
            if crossing["crossing_strength"] is not None:
                crossing["crossing_level"] = self.scale.level(crossing["crossing_strength"])
            results[curve.key] = {"label": curve.label, "breakpoint": breakpoint_, "tolerance": crossing}
        return results

    def _neighbour(self, measured: list[dict], index: int | None) -> dict | None:
        if index is None:
            return None
        entry = measured[index]
        return {
            "level": entry["level"],
            "spec": entry["spec"],
            "figures": {curve.key: entry["figures"].get(curve.key) for curve in self.curves},
        }

    def threshold(self) -> dict:
        """The sweep's headline: the breakpoint of the first curve that has one (curve order: PPL ratio, KL, top-1
        agreement, tasks; for decoding TV, JS, top-1), else the first curve's tolerance crossing."""
        thresholds = self.thresholds()
        if not thresholds:
            return {"rule": None, "reason": "no curve was measured"}
        for key, rules in thresholds.items():
            fitted = rules["breakpoint"]
            if fitted["strength"] is not None:
                return {
                    "figure": key,
                    "rule": "breakpoint",
                    "level": fitted["level"],
                    "interval": fitted["interval_levels"],
                    "growth": fitted["growth"],
                    "p_value": fitted["p_value"],
                    "leave_one_out": fitted["leave_one_out_levels"],
                    "level_before": fitted["level_before"],
                    "level_after": fitted["level_after"],
                }
        key, first = next(iter(thresholds.items()))
        fitted, crossing = first["breakpoint"], first["tolerance"]
        return {
            "figure": key,
            "rule": "tolerance",
            "tolerance": crossing["tolerance"],
            "level": crossing.get("crossing_level"),
            "breakpoint_reason": fitted["reason"],
            "level_before": crossing["level_before"],
            "level_after": crossing["level_after"],
            "reason": crossing["reason"],
        }

    def curve_points(self, curve: Curve) -> list[tuple[float, float | None, float | None]]:
        """(level value, figure, its error) of every modified level, for plotting ``curve``.

        The error is the batch-means one (``<figure>_error_block``) where the figure is a mean over correlated tokens,
        else ``<figure>_error`` (task accuracies: their items are independent).
        """
        return [
            (level_value(entry["level"]), entry["figures"].get(curve.key), figure_error(entry["figures"], curve.key))
            for entry in self.levels
            if entry["spec"] is not None
        ]

    def curve_path(self, curve: Curve, steps: int = 32) -> tuple[list[float], list[float]]:
        """(levels, figure values) joining consecutive modified levels the way the tolerance rule interpolates:
        linearly in strength and in ln damage (linearly in damage where a side has none). Drawn through these
        points, the curve crosses the tolerance line exactly at the crossing level the rule reports."""
        measured = [entry for entry in self.levels if entry["spec"] is not None and curve.key in entry["figures"]]
        xs: list[float] = []
        ys: list[float] = []
        for left, right in zip(measured, measured[1:]):
            low, high = _damage(curve, left["figures"]), _damage(curve, right["figures"])
            if not (math.isfinite(low) and math.isfinite(high)):
                continue
            logarithmic = low > 0 and high > 0
            for t in [i / steps for i in range(steps + 1)]:
                damage = (
                    math.exp((1 - t) * math.log(low) + t * math.log(high)) if logarithmic else low + t * (high - low)
                )
                xs.append(self.scale.level((1 - t) * left["strength"] + t * right["strength"]))
                ys.append(curve.value_at_damage(left["figures"], damage))
        return xs, ys

    def to_dict(self) -> dict:
        return json_safe(
            {
                "family": {
                    "name": self.family.name,
                    "template": self.family.template,
                    "kind": self.family.kind,
                    "identity_levels": list(self.family.identity_levels),
                },
                "metadata": self.metadata,
                "levels": self.levels,
                "threshold": self.threshold(),
                "thresholds": self.thresholds(),
                "tolerances": {curve.key: self.tolerances.get(curve.key, curve.tolerance) for curve in self.curves},
            }
        )

    def to_csv(self) -> str:
        keys: list[str] = []
        for entry in self.levels:
            keys += [
                key
                for key, value in entry["figures"].items()
                if key not in keys and not isinstance(value, (list, dict))
            ]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["level", "spec", "strength", "seconds", *keys])
        for entry in self.levels:
            writer.writerow(
                [
                    entry["level"],
                    entry["spec"] or "",
                    entry["strength"],
                    f"{entry['seconds']:.2f}",
                    *(entry["figures"].get(key, "") for key in keys),
                ]
            )
        return buffer.getvalue()

    def save(self, output_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write ``sweep.json``, ``sweep.csv`` and (unless ``plots`` is off) one PNG per curve, each atomically."""
        output_dir = Path(output_dir)
        written = {"json": output_dir / SWEEP_FILE, "csv": output_dir / "sweep.csv"}
        write_json(written["json"], self.to_dict())
        atomic_write_text(written["csv"], self.to_csv())
        if plots:
            from ..render import plot_sweep_curve

            thresholds = self.thresholds()
            for curve in self.curves:
                if curve.key in thresholds:
                    written[curve.key] = output_dir / f"sweep_{curve.key}.png"
                    plot_sweep_curve(self, curve, thresholds[curve.key], written[curve.key])
        return written


def _errors(curve: Curve, measured: list[dict], damage: list[float]) -> list[float] | None:
    """Each level's standard error of ``curve``'s damage, or None unless every level with a finite damage has one
    (collapsed levels, left out of the fit anyway, need none)."""
    errors = [figure_error(entry["figures"], curve.error_key or curve.key) for entry in measured]
    errors = [error if isinstance(error, (int, float)) and math.isfinite(error) else math.nan for error in errors]
    if any(math.isnan(error) for error, value in zip(errors, damage) if math.isfinite(value)):
        return None
    return errors


def _damage(curve: Curve, figures: dict) -> float:
    """A curve's damage at one level; a figure that is missing, null or NaN (a collapsed model) is unbounded."""
    try:
        value = curve.damage(figures)
    except (KeyError, TypeError):  # summarize() leaves KL out when no token is finite; JSON stores inf as null
        return math.inf
    return value if value == value else math.inf


def _resume_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(part) for part in parts]).encode()).hexdigest()[:24]


def _previous_run(output_dir: Path | None, resume_key: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """Levels and reference task answers of an earlier run of the same sweep (none if the settings differ or the
    file is unreadable)."""
    if output_dir is None or not (output_dir / SWEEP_FILE).is_file():
        return {}, {}
    try:
        previous = json.loads((output_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}, {}
    if previous.get("metadata", {}).get("resume_key") != resume_key:
        return {}, {}
    levels = {entry["level"]: entry for entry in previous.get("levels", [])}
    return levels, previous["metadata"].get("reference_answers", {})


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep measures (reference cache size and place, batch sizes), judges (tolerances) and reports.

    Example:
        >>> SweepOptions(top_k=32, tolerances={"kl_mean": 0.05}).top_k
        32
    """

    top_k: int | None = None
    batch_size: int = 1
    cache_root: str | Path | None = None
    task_batch_size: int = 16
    #: damage tolerated per curve key before the tolerance rule fires (default: each curve's own)
    tolerances: Mapping[str, float] = field(default_factory=dict)
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.top_k is not None and self.top_k < 1) or self.batch_size < 1 or self.task_batch_size < 1:
            raise HemorrhageError(
                f"top_k, batch_size and task_batch_size must be at least 1, got {self.top_k}, {self.batch_size}, "
                f"{self.task_batch_size}"
            )


def run_sweep(
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    windows: Sequence[Window],
    family: SweepFamily | str,
    levels: Sequence[str] | None = None,
    *,
    tasks: Sequence[Task] = (),
    calibration: CalibrationSettings | None = None,
    options: SweepOptions | None = None,
    output_dir: str | Path | None = None,
    metadata: dict | None = None,
    gguf_levels: GgufLevels | None = None,
) -> SweepResult:
    """Measure ``family`` at each of ``levels`` (default: the family's) against ``reference`` on ``windows``.

    A ``gguf`` family takes its level models from ``gguf_levels`` (``reference`` is then the base GGUF as
    llama.cpp runs it, or the torch reference it was converted from).

    With ``output_dir`` the result is saved after every level and finished levels of an earlier identical run are
    reused. ``tasks`` are scored for the reference once and for every level's model; ``calibration`` names the
    tokens levels that look at activations (Wanda) calibrate on.

    Example:
        >>> from hemorrhage_hf import load_model, tokenize_corpus, python_docs_text
        >>> reference, tokenizer = load_model("default")  # doctest: +SKIP
        >>> windows = tokenize_corpus(tokenizer, python_docs_text(), window=256, max_tokens=2048)  # doctest: +SKIP
        >>> result = run_sweep(reference, tokenizer, windows, "bits", ["32", "8", "4", "3", "2"])  # doctest: +SKIP
        >>> result.threshold()["level"]  # doctest: +SKIP
    """
    options = options or SweepOptions()
    batch_size, progress = options.batch_size, options.progress
    family = resolve_family(family) if isinstance(family, str) else family
    levels = [str(level).strip() for level in (levels or family.default_levels)]
    if not levels:
        raise SpecError(f"no levels to sweep for {family.name}; pass some (e.g. --levels 0,10,20)")
    if len(set(levels)) != len(levels):
        raise SpecError(f"sweep levels repeat: {levels}")
    scale = StrengthScale.infer(family, levels)
    specs = [family.spec(level) for level in levels]
    check_spec = {"decoding": Decoding.parse, "gguf": parse_types}.get(family.kind, parse_spec)
    if family.kind == "gguf" and gguf_levels is None:
        raise HemorrhageError("a gguf sweep needs the base GGUF file to quantize (gguf_levels)")
    for spec in filter(None, specs):
        check_spec(spec)  # a bad level fails here, before any model runs
    if family.kind == "decoding" and tasks:
        raise HemorrhageError("tasks score a model's answers; decoding sweeps change sampling, not the model")
    output_dir = Path(output_dir) if output_dir is not None else None
    # Under `accelerate launch` every process resumes alike and holds the merged figures; the first writes them.
    writes = output_dir is not None and distributed.is_main_process()
    started = time.perf_counter()
    curves = (DECODING_CURVES if family.kind == "decoding" else MODEL_CURVES) + tuple(task_curve(t.name) for t in tasks)
    result = SweepResult(family, [], {**run_environment(), **(metadata or {})}, curves, dict(options.tolerances))

    def record(level: str, spec: str | None, figures: dict, seconds: float, **extra) -> None:
        strength = None if spec is None else scale.strength(level)
        result.levels.append(
            {"level": level, "spec": spec, "strength": strength, "figures": figures, "seconds": seconds, **extra}
        )
        if writes:
            result.metadata["total_seconds"] = time.perf_counter() - started
            result.save(output_dir, plots=False)

    if family.kind == "decoding":
        fingerprint = model_fingerprint(reference)
        result.metadata.update(
            resume_key=_resume_key(fingerprint, windows_fingerprint(windows), batch_size, family, levels)
        )
        all_figures = decoding_divergence(
            reference, windows, [Decoding.parse(spec or "") for spec in specs], batch_size=batch_size, progress=progress
        )
        seconds = (time.perf_counter() - started) / len(levels)
        for level, spec, figures in zip(levels, specs, all_figures):
            record(level, spec, figures, seconds)
    else:
        cache_started = time.perf_counter()
        cache = build_reference_file(
            reference,
            windows,
            top_k=options.top_k,
            tokenizer=tokenizer,
            batch_size=batch_size,
            root=options.cache_root,
            description={"model": result.metadata.get("reference")},
            progress=progress,
        )
        task_signature = [(task.name, task.source, len(task)) for task in tasks]
        result.metadata.update(
            **cache.metadata(),
            reference_seconds=time.perf_counter() - cache_started,
            resume_key=_resume_key(cache.header["key"], family, task_signature, calibration),
        )
        previous, previous_answers = _previous_run(output_dir, result.metadata["resume_key"])
        reference_answers = [
            TaskAnswers(**previous_answers[task.name])
            if task.name in previous_answers
            else answer_task(reference, tokenizer, task, batch_size=options.task_batch_size)
            for task in tasks
        ]
        result.metadata["reference_answers"] = {answers.task: answers.to_dict() for answers in reference_answers}
        calibration_ids = None
        for level, spec in zip(levels, specs):
            if level in previous and previous[level]["spec"] == spec:
                result.levels.append(previous[level])
                continue
            level_started = time.perf_counter()
            if spec is None:
                modified = reference
            elif family.kind == "gguf":
                modified = gguf_levels.model(spec)
            else:
                if calibration_ids is None and parse_spec(spec).needs_calibration:
                    calibration_ids = (calibration or CalibrationSettings()).windows(tokenizer)
                modified = apply_modification(
                    reference, spec, calibration=calibration_ids, tokenizer=tokenizer, progress=progress
                )
            label = f"level {level} ({spec or 'unmodified'})"
            # Read before running it (some backends repack on the first pass); a llama.cpp model's weights are its
            # GGUF file's, whose bits per weight the gguf family's strength already is.
            bits = linear_footprint(modified).bits_per_weight if isinstance(modified, PreTrainedModel) else None
            report = measure(cache, modified, windows, batch_size=batch_size, progress=progress, description=label)
            figures = dict(report.figures)
            figures["bits_per_weight"] = bits
            answers = {}
            for task, task_reference in zip(tasks, reference_answers):
                task_figures = task_hemorrhage(
                    task_reference, modified, tokenizer, task, batch_size=options.task_batch_size
                )
                answers[task.name] = task_figures["answers"]["modified"]
                figures.update(_flat_task_figures(task_figures))
            del modified
            record(level, spec, figures, time.perf_counter() - level_started, task_answers=answers)
    result.metadata["total_seconds"] = time.perf_counter() - started
    if writes:
        result.save(output_dir, plots=options.plots)
    return result
