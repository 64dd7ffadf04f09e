"""Everything people read: console tables, Markdown and PNG plots of reports, sweeps, tasks and decodings.

Every plot goes through :func:`pyplot` (matplotlib's file-only backend, chosen once); every table through
:func:`text_table` (console) or :func:`markdown_table`.

Example:
    >>> print(text_table(["level", "KL"], [["8", "0.0016"], ["4", "0.45"]]))
    level      KL
        8  0.0016
        4    0.45
    >>> print(markdown_table(["level", "KL"], [["8", "0.0016"]]))
    | level | KL |
    |---|---|
    | 8 | 0.0016 |
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_path, atomic_write_text
from .errors import HemorrhageError

if TYPE_CHECKING:
    from .locate.hmap import HemorrhageMap
    from .measurement.report import HemorrhageReport
    from .sweep.runner import Curve, SweepResult

# (key, label, format) of the rows every rendering shows; errors come from "<key>_error" (i.i.d.) and
# "<key>_error_block" (batch means) when present.
SUMMARY_ROWS = (
    ("ppl_reference", "PPL reference", "{:.3f}"),
    ("ppl_modified", "PPL modified", "{:.3f}"),
    ("ppl_ratio", "PPL ratio", "{:.4f}"),
    ("ln_ppl_ratio", "ln(PPL ratio)", "{:.4f}"),
    ("nll_correlation", "Cor(ln PPL ref, ln PPL mod)", "{:.4f}"),
    ("kl_mean", "KL mean (nats)", "{:.5f}"),
    ("kl_median", "KL median", "{:.5f}"),
    ("kl_p90", "KL p90", "{:.5f}"),
    ("kl_p95", "KL p95", "{:.5f}"),
    ("kl_p99", "KL p99", "{:.5f}"),
    ("kl_max", "KL max", "{:.5f}"),
    ("top1_agreement", "top-1 agreement", "{:.2%}"),
    ("top5_agreement", "top-5 agreement (same 5 tokens)", "{:.2%}"),
    ("top10_agreement", "top-10 agreement (same 10 tokens)", "{:.2%}"),
    ("reverse_kl_mean", "reverse KL mean (nats)", "{:.5f}"),
    ("delta_p_mean", "Δp mean", "{:+.4f}"),
    ("delta_p_rms", "Δp RMS", "{:.4f}"),
    ("delta_p_p1", "Δp p1", "{:+.4f}"),
    ("delta_p_p99", "Δp p99", "{:+.4f}"),
    ("n_tokens", "scored tokens", "{:d}"),
    ("non_finite_tokens", "tokens with NaN/inf logits", "{:d}"),
)


def variant_rows(report: HemorrhageReport, variant: str) -> list[tuple[str, str, str]]:
    """(figure, the modified model's value, the value of its ``variant``) for every summary row."""
    transformed = dict(summary_rows(report.variants[variant]))
    return [(label, value, transformed[label]) for label, value in summary_rows(report)]


def variant_table(report: HemorrhageReport, variant: str, *, plain: str = "modified") -> str:
    """The modified model without (``plain``) and with its ``variant`` side by side, as console text."""
    return text_table(["", plain, variant], variant_rows(report, variant), align_left=1)


def variant_markdown(report: HemorrhageReport, variant: str, *, title: str, plain: str = "modified") -> str:
    """The same side by side as a Markdown page."""
    meta = report.metadata
    header = [
        f"# {title}",
        "",
        f"- **Modified:** {meta.get('modified', '?')}",
        f"- **Corpus:** {meta.get('corpus', '?')}",
    ]
    table = markdown_table(["figure", plain, variant], variant_rows(report, variant))
    return "\n".join([*header, "", table]) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display is needed, none is opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, align_left: int = 0) -> str:
    """Columns padded to their widest cell; the first ``align_left`` columns left-aligned, the rest right-aligned."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column < align_left else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in cells
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; a ``|`` inside a cell is escaped so it cannot end the cell."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def figure_text(value: float | None, template: str = "{:.4g}") -> str:
    """A number for a table cell; "—" for a missing one, ``inf``/``nan`` spelled out."""
    if value is None:
        return "—"
    return template.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def _format(figures: dict, key: str, template: str) -> str:
    value = figures.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—" if value is None else str(value)
    text = template.format(value)
    error_template = template.replace("+", "")
    error, block_error = figures.get(f"{key}_error"), figures.get(f"{key}_error_block")
    if error is not None and math.isfinite(error) and error > 0:
        text += " ± " + error_template.format(error)
        if block_error is not None and math.isfinite(block_error):
            text += f" (block ± {error_template.format(block_error)})"
    return text


def summary_rows(report: HemorrhageReport) -> list[tuple[str, str]]:
    rows = [(label, _format(report.figures, key, template)) for key, label, template in SUMMARY_ROWS]
    rows.append(("severity", report.severity))
    return rows


def shipping_lines(report: HemorrhageReport) -> list[str]:
    """What the grade means for shipping, and a warning when the KL mean lies near a grade boundary."""
    from .measurement.report import SHIPPING, grade_boundary_note

    note = grade_boundary_note(report.figures)
    return [f"{report.severity}: {SHIPPING[report.severity]}", *([f"note: {note}"] if note else [])]


def console_table(report: HemorrhageReport) -> str:
    rows = summary_rows(report)
    width = max(len(label) for label, _ in rows)
    header = f"{report.metadata.get('reference', 'reference')}  vs  {report.metadata.get('modified', 'modified')}"
    lines = [header, "-" * len(header)] + [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join([*lines, "", *shipping_lines(report)])


def comparison_rows(report: HemorrhageReport, keys: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(figure, base model, modified model) rows: perplexity of both, then the comparison figures, then severity.

    ``keys`` picks the comparison figures (default: all of :data:`SUMMARY_ROWS`).
    """
    formatted = {key: value for (key, _, _), (_, value) in zip(SUMMARY_ROWS, summary_rows(report))}
    labels = {key: label for key, label, _ in SUMMARY_ROWS}
    keys = [key for key, _, _ in SUMMARY_ROWS if key not in ("ppl_reference", "ppl_modified")] if keys is None else keys
    unknown = [key for key in keys if key not in labels]
    if unknown:
        raise HemorrhageError(f"unknown report figures {unknown}; known: {sorted(labels)}")
    rows = [("perplexity", formatted["ppl_reference"], formatted["ppl_modified"])]
    rows += [(labels[key], "—", formatted[key]) for key in keys]
    rows.append(("severity", "—", report.severity))
    return rows


def delta_p_reading(figures: dict) -> str:
    """llama.cpp's reading rule: a symmetric Δp means noise; a heavy negative side means the model got worse."""
    low, high = figures.get("delta_p_p1"), figures.get("delta_p_p99")
    if low is None or high is None:
        return ""
    if abs(low) > 1.5 * abs(high):
        return "Δp is skewed to the negative side: the modification made the model worse, not just noisier."
    return "Δp is roughly symmetric around 0: the modification mostly adds noise."


def engine_description(meta: dict) -> str:
    """Which engine ran each side: torch, or llama.cpp's own kernels on a GGUF file."""
    sides = []
    for role in ("reference", "modified"):
        engine = meta.get(f"{role}_engine")
        sides.append(f"{role}: llama.cpp ({engine['description']})" if engine else f"{role}: torch")
    return "; ".join(sides)


def modification_lines(details: dict | None) -> tuple[str, str]:
    """(who made the modification and how, how its Linear weights are stored) for reports and cards.

    Example:
        >>> modification_lines({"backend": "bitsandbytes", "version": "0.50.2", "bits": 4, "group_size": 64,
        ...     "scheme": "nf4", "simulated": False, "footprint": {"n_weights": 1000, "weight_bytes": 566,
        ...     "bits_per_weight": 4.528, "source": "measured"}})
        ('bitsandbytes 0.50.2: 4 bits, groups of 64, nf4', '4.528 bits per weight (measured), 566 B')
    """
    if not details:
        return "", ""
    config = [f"{details['bits']} bits" if details.get("bits") else ""]
    config.append(f"groups of {details['group_size']}" if details.get("group_size") else "")
    config.append(details.get("scheme") or "")
    if details.get("quantization_config"):
        config.append(json.dumps(details["quantization_config"], default=str, sort_keys=True))
    made_by = f"{details.get('backend', '?')} {details.get('version', '')}".strip()
    if details.get("simulated"):
        made_by += " (simulated: weights rounded, kept in float)"
    made_by += ": " + ", ".join(part for part in config if part) if any(config) else ""
    footprint = details.get("footprint") or {}
    if not footprint:
        return made_by, ""
    storage = (
        f"{footprint['bits_per_weight']:.4g} bits per weight ({footprint['source']}), "
        f"{_bytes(footprint['weight_bytes'])}"
    )
    return made_by, storage


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def confidence_lines(figures: dict) -> list[str]:
    """KL by bucket of the reference's top-1 probability, as Markdown (empty for reports without it)."""
    from .measurement.report import CONFIDENCE_BUCKETS

    rows = []
    for low, high in CONFIDENCE_BUCKETS:
        key = f"confidence_{low:g}_{high:g}"
        if f"tokens_{key}" in figures:
            value = figures.get(f"kl_mean_{key}")
            text = "—" if value is None or not math.isfinite(value) else f"{value:.5f}"
            rows.append(f"| {low:g} – {high:g} | {figures[f'tokens_{key}']} | {text} |")
    if not rows:
        return []
    head = ["", "KL by the reference's confidence (its top-1 probability):", "", "| confidence | tokens | KL mean |"]
    return head + ["|---|---|---|", *rows]


def report_markdown(report: HemorrhageReport, plot_files: dict[str, str]) -> str:
    meta = report.metadata
    lines = [
        "# Hemorrhage report",
        "",
        f"- **Reference:** {meta.get('reference', '?')}",
        f"- **Modified:** {meta.get('modified', '?')}",
        *(
            f"- **{label}:** {text}"
            for label, text in zip(
                ("Made by", "Linear weights as stored"), modification_lines(meta.get("modification_details"))
            )
            if text
        ),
        f"- **Corpus:** {meta.get('corpus', '?')} ({report.figures.get('n_tokens')} scored tokens, "
        f"window {meta.get('window', '?')}, stride {meta.get('stride', '?')})",
        f"- **Scoring:** {meta.get('scoring_description', 'sliding windows')}",
        f"- **Engine:** {engine_description(meta)}",
        f"- **Severity:** **{report.severity}**",
        *(f"- {line[0].upper()}{line[1:]}" for line in shipping_lines(report)),
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [f"| {label} | {value} |" for label, value in summary_rows(report)]
    lines += ["", delta_p_reading(report.figures)]
    lines += confidence_lines(report.figures)
    if report.figures.get("error_block_tokens"):
        lines += [
            "",
            "± is the standard error sd/√(n−1) that llama.cpp prints, which treats tokens as independent; "
            f'"block ±" is the batch-means standard error over blocks of {report.figures["error_block_tokens"]} '
            "consecutive tokens, which allows for their correlation: use it to compare.",
        ]
    if meta.get("reference_cache"):
        cache = meta["reference_cache"]
        lines += [
            "",
            f"**Reference cache:** the reference side came from a cache of its top-{cache['k']} tokens per "
            f"position (mean reference probability outside them: {cache['tail_mass_mean']:.4f}). KL figures are "
            "lower bounds (KL over the k bins plus one tail bin); the other figures are exact.",
        ]
    if meta.get("reference_store"):
        store = meta["reference_store"]
        lines += [
            "",
            f"**Reference store:** the reference side came from its stored final hidden states ({store['dtype']}, "
            f"{store['bytes_per_token']:,.0f} bytes per token) and output head; every figure is exact.",
        ]
    if report.figures.get("non_finite_tokens"):
        lines += [
            "",
            f"**Warning:** {report.figures['non_finite_tokens']} tokens got NaN/inf logits from the "
            "modified model; they are counted, excluded from the KL/Δp averages, and make PPL infinite.",
        ]
    if report.layers is not None:
        layers = report.layers
        lines += [
            "",
            "## Per-layer drift (information loss cascade)",
            "",
            "| layer | → modified layer | cosine distance | relative L2 |"
            + (" attention JS |" if layers.attention_js else ""),
            "|---|---|---|---|" + ("---|" if layers.attention_js else ""),
        ]
        for index, mapped in enumerate(layers.layer_map):
            row = f"| {index} | {mapped} | {layers.cosine_distance[index]:.5f} | {layers.relative_l2[index]:.4f} |"
            if layers.attention_js:
                row += f" {layers.attention_js[index]:.5f} |"
            lines.append(row)
    for title, file_name in plot_files.items():
        lines += ["", f"![{title}]({file_name})"]
    return "\n".join(lines) + "\n"


def plot_kl_distribution(report: HemorrhageReport, path: Path) -> None:
    import numpy as np

    plt = pyplot()
    kl = report.tokens.kl[report.tokens.finite]
    figure, axis = plt.subplots(figsize=(7, 4))
    # Log-spaced bins: per-token KL spans many orders of magnitude.
    positive = kl[kl > 0]
    if len(positive):
        bins = np.logspace(np.log10(max(positive.min(), 1e-8)), np.log10(positive.max() + 1e-12), 60)
        axis.hist(positive, bins=bins, color="#b22222")
        axis.set_xscale("log")
    for key, style in (("kl_mean", "-"), ("kl_median", "--"), ("kl_p99", ":")):
        value = report.figures.get(key)
        if value and value > 0:
            axis.axvline(value, color="black", linestyle=style, label=f"{key.removeprefix('kl_')} {value:.3g}")
    axis.set_xlabel("per-token KL(P_ref ‖ P_mod), nats")
    axis.set_ylabel("tokens")
    axis.set_title(f"KL distribution — severity: {report.severity}")
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    _save_figure(figure, path)


def plot_layers(report: HemorrhageReport, path: Path) -> None:
    import numpy as np

    plt = pyplot()
    layers = report.layers
    panels = [("cosine distance", layers.cosine_distance), ("relative L2", layers.relative_l2)]
    if layers.attention_js:
        panels.append(("attention JS divergence", layers.attention_js))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
    for axis, (label, values) in zip(np.atleast_1d(axes), panels):
        axis.plot(range(len(values)), values, marker="o", color="#b22222")
        axis.set_xlabel("reference layer")
        axis.set_title(label)
    figure.suptitle("Per-layer drift of the modified model")
    _save_figure(figure, path)


def _save_figure(figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    pyplot().close(figure)


def save_report(report: HemorrhageReport, output_dir: Path, *, plots: bool) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (with ``plots``) its PNGs into ``output_dir``."""
    written: dict[str, Path] = {}
    plot_files: dict[str, str] = {}
    if plots and report.tokens is not None:
        written["kl_plot"] = output_dir / "kl_distribution.png"
        plot_kl_distribution(report, written["kl_plot"])
        plot_files["KL distribution"] = written["kl_plot"].name
    if plots and report.layers is not None:
        written["layer_plot"] = output_dir / "layer_drift.png"
        plot_layers(report, written["layer_plot"])
        plot_files["Per-layer drift"] = written["layer_plot"].name
    written["json"] = output_dir / "report.json"
    atomic_write_text(written["json"], report.to_json() + "\n")
    written["markdown"] = output_dir / "report.md"
    atomic_write_text(written["markdown"], report.to_markdown(plot_files))
    return written


# ---- sweeps ----


def sweep_rows(result: SweepResult, curves: Sequence[Curve] | None = None) -> list[list[str]]:
    """One row per level: the level, its spec ("(unmodified)" for an identity level), each curve's figure."""
    curves = result.curves if curves is None else curves
    return [
        [entry["level"], entry["spec"] or "(unmodified)", *(figure_text(entry["figures"].get(c.key)) for c in curves)]
        for entry in result.levels
    ]


def describe_threshold(rules: dict) -> str:
    """One line: the fitted breakpoint (or why there is none) and the tolerance crossing."""
    fitted, crossing = rules["breakpoint"], rules["tolerance"]
    if fitted["strength"] is not None:
        low, high = fitted["interval_levels"]
        refits = [refit["level"] for refit in fitted.get("leave_one_out_levels", []) if refit["level"] is not None]
        text = (
            f"breakpoint at level {fitted['level']:.3g} (95 % {low:.3g}–{high:.3g}, between "
            f"{fitted['level_before']['level']} and {fitted['level_after']['level'] if fitted['level_after'] else '—'}"
            f"; smooth-curve bootstrap p = {fitted['p_value']:.3g}"
            + (f"; one level left out: {min(refits):.3g}–{max(refits):.3g})" if refits else ")")
        )
    else:
        text = f"no breakpoint ({fitted['reason']})"
    if crossing.get("crossing_level") is not None:
        return text + f"; crosses tolerance {crossing['tolerance']:g} at level {crossing['crossing_level']:.3g}"
    return text + f"; tolerance {crossing['tolerance']:g}: {crossing['reason']}"


def sweep_table(result: SweepResult) -> str:
    """Levels and their main figures, then the thresholds, as console text."""
    lines = [text_table(["level", "spec", *(curve.key for curve in result.curves)], sweep_rows(result)), ""]
    for rules in result.thresholds().values():
        lines.append(f"{rules['label']}: " + describe_threshold(rules))
    headline = result.threshold()
    lines.append(
        f"\nthreshold of the sweep ({headline.get('figure')}, {headline.get('rule')}): "
        + ("none" if headline.get("level") is None else f"{headline['level']:.3g}")
    )
    return "\n".join(lines)


def sweep_curve_figure(result: SweepResult, curve: Curve, threshold: dict):
    """The curve with error bars, the breakpoint (line + 95 % band) and the tolerance line and crossing.

    Levels are joined as the tolerance rule interpolates them (linearly in ln damage), so the drawn curve meets
    the tolerance line exactly at the crossing level reported. Identity levels are left out: the unmodified
    model's point (32 bits, say) would stretch the axis, and its damage is zero by construction.
    """
    plt = pyplot()
    points = [
        (x, y, error)
        for x, y, error in result.curve_points(curve)
        if y is not None and math.isfinite(y) and (y > 0 or not curve.log_scale)
    ]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    color = "#b22222"
    if points:
        xs, ys, errors = zip(*points)
        errors = [error if error is not None and math.isfinite(error) else 0.0 for error in errors]
        axis.errorbar(xs, ys, yerr=errors, fmt="o", color=color, capsize=3)
        axis.plot(*result.curve_path(curve), color=color, label=curve.label)
    if curve.log_scale:
        axis.set_yscale("log")
    if result.family.log_strength:
        axis.set_xscale("log")
    if result.scale.sign < 0:
        axis.invert_xaxis()
    fitted, crossing = threshold["breakpoint"], threshold["tolerance"]
    if fitted["strength"] is not None:
        low, high = fitted["interval_levels"]
        axis.axvspan(low, high, color="black", alpha=0.08)
        axis.axvline(
            fitted["level"], color="black", label=f"threshold {fitted['level']:.3g} (95 %: {low:.3g}–{high:.3g})"
        )
    measured = [e["figures"] for e in result.levels if e["spec"] is not None and curve.key in e["figures"]]
    if measured:
        tolerance_value = curve.value_at_damage(measured[0], crossing["tolerance"])
        axis.axhline(tolerance_value, color="#555555", linestyle="--", label=f"tolerance {tolerance_value:.3g}")
        if crossing.get("crossing_level") is not None:
            axis.plot(
                [crossing["crossing_level"]],
                [tolerance_value],
                marker="D",
                color="#555555",
                linestyle="none",
                label=f"crosses tolerance at {crossing['crossing_level']:.3g}",
            )
    axis.set_xlabel(f"{result.family.name} level")
    axis.set_ylabel(curve.label)
    axis.set_title(f"{curve.label} vs {result.family.name}")
    axis.legend(fontsize=8)
    return figure


def plot_sweep_curve(result: SweepResult, curve: Curve, threshold: dict, path: Path) -> None:
    """Save :func:`sweep_curve_figure` as a PNG."""
    _save_figure(sweep_curve_figure(result, curve, threshold), path)


# ---- tasks and decodings ----


def task_rows(tasks: Sequence[Mapping]) -> list[dict]:
    """A model card's task rows from :func:`hemorrhage_hf.tasks.flips.compare_answers` results named by ``"task"``."""
    rows = []
    for task in tasks:
        if "task" not in task or "accuracy_modified" not in task:
            raise HemorrhageError(
                f"a task result needs 'task' and the compare_answers figures; got keys {sorted(task)}"
            )
        rows.append(
            {
                "name": task["task"],
                "n_items": task["n_items"],
                "accuracy_reference": f"{task['accuracy_reference']:.2%}",
                "accuracy_modified": f"{task['accuracy_modified']:.2%}",
                # Results saved before the drop carried its paired error show the drop alone.
                "accuracy_drop": f"{task['accuracy_drop']:+.2%}"
                + (f" ± {task['accuracy_drop_error']:.2%}" if "accuracy_drop_error" in task else ""),
                "correct_to_incorrect": task["correct_to_incorrect"],
                "incorrect_to_correct": task["incorrect_to_correct"],
                "flip_rate": f"{task['flip_rate']:.2%}",
            }
        )
    return rows


def tasks_table(results: Mapping[str, Mapping]) -> str:
    """`hemorrhage-hf tasks` results (task name → :func:`~hemorrhage_hf.tasks.scoring.task_hemorrhage` figures).

    Multiple-choice tasks show acc_norm (per-character log-likelihood, their main rule, with its standard error)
    beside acc (plain sums); greedy tasks (LAMBADA) have acc only. Drop and flips follow the main rule; the drop's
    error is paired, and McNemar's exact p says whether the flips lean one way beyond chance.

    Example:
        >>> figures = dict(n_items=100, metric="acc_norm", accuracy_reference=0.62, accuracy_reference_error=0.049,
        ...     accuracy_modified=0.55, accuracy_modified_error=0.05, accuracy_unnormalized_reference=0.6,
        ...     accuracy_unnormalized_modified=0.56, accuracy_drop=0.07, accuracy_drop_error=0.039, flip_rate=0.15,
        ...     correct_to_incorrect=11, incorrect_to_correct=4, mcnemar_p_value=0.1185)
        >>> print(tasks_table({"piqa": figures}))
        task    n  acc_norm ref.  acc_norm mod.          drop  McNemar p  acc ref.  acc mod.  flips  c→i  i→c
        piqa  100   62.0% ± 4.9%   55.0% ± 5.0%  +7.0% ± 3.9%      0.118     60.0%     56.0%    15%   11    4
    """

    def accuracy(figures: Mapping, side: str) -> str:
        return f"{figures[f'accuracy_{side}']:.1%} ± {figures[f'accuracy_{side}_error']:.1%}"

    rows = []
    for name, figures in results.items():
        normalized = figures["metric"] == "acc_norm"
        plain = {
            side: figures.get(f"accuracy_unnormalized_{side}", figures[f"accuracy_{side}"])
            for side in ("reference", "modified")
        }
        rows.append(
            [
                name,
                figures["n_items"],
                accuracy(figures, "reference") if normalized else "—",
                accuracy(figures, "modified") if normalized else "—",
                f"{figures['accuracy_drop']:+.1%} ± {figures['accuracy_drop_error']:.1%}",
                f"{figures['mcnemar_p_value']:.3g}",
                *(f"{plain[side]:.1%}" for side in ("reference", "modified")),
                f"{figures['flip_rate']:.0%}",
                figures["correct_to_incorrect"],
                figures["incorrect_to_correct"],
            ]
        )
    header = [
        "task",
        "n",
        "acc_norm ref.",
        "acc_norm mod.",
        "drop",
        "McNemar p",
        "acc ref.",
        "acc mod.",
        "flips",
        "c→i",
        "i→c",
    ]
    return text_table(header, rows, align_left=1)


def decoding_table(distributions: Sequence[Mapping], generations: Sequence[Mapping]) -> str:
    """`hemorrhage-hf decode` results: distribution divergences and generation agreement per decoding."""
    rows = [
        [
            distribution["decoding"],
            f"{distribution['tv_mean']:.4f}",
            f"{distribution['js_mean']:.4f}",
            f"{distribution['kl_mean']:.4f} ± {distribution['kl_mean_error_block']:.4f}",
            f"{distribution['kl_infinite_fraction']:.1%}",
            f"{distribution['top1_agreement']:.1%}",
            f"{generation['token_agreement']:.1%}",
            figure_text(generation["first_divergence_mean"], "{:.1f}"),
        ]
        for distribution, generation in zip(distributions, generations)
    ]
    header = ["decoding", "TV", "JS", "KL ± block SE", "KL=inf", "top-1", "tokens same", "1st diff"]
    return text_table(header, rows, align_left=1)


def hemorrhage_map_summary(hmap: HemorrhageMap) -> str:
    """The full KL, how concentrated it is (among layers, and among Linear layers where measured), and how
    additive the layers' damage is."""
    top3 = ", ".join(unit.name for unit, _ in hmap.ranked()[:3])
    isolated_sum = sum(hmap.figures(unit).isolated_kl for unit in hmap.layer_units())
    lines = [
        f"- KL with every layer modified: **{hmap.full_kl:.4f} ± {hmap.full_kl_error:.4f}** nats",
        f"- the top 3 layers ({top3}) carry **{hmap.concentration(3):.1%}** of it; "
        f"the top 5 {hmap.concentration(5):.1%}",
        f"- sum of the layers' isolated KLs: {isolated_sum:.4f} (vs {hmap.full_kl:.4f} all together: "
        f"{'superadditive' if hmap.full_kl > isolated_sum else 'subadditive'})",
    ]
    if hmap.linear_units():
        ranked = hmap.ranked(hmap.linear_units())
        top = sum(share for _, share in ranked[:10])
        lines.append(
            f"- the top 10 of {len(ranked)} Linear layers ({', '.join(unit.name for unit, _ in ranked[:3])}, ...) "
            f"carry {top:.1%} of the Linear layers' damage"
        )
    return "\n".join(lines)


def hemorrhage_map_markdown(hmap: HemorrhageMap, plot: Path | None = None) -> str:
    """locate.md: the summary lines, the plot, then every layer ranked by its share of the damage."""
    ranked = hmap.ranked()
    lines = [
        "# Hemorrhage map",
        "",
        f"{hmap.metadata.get('reference', 'reference')} vs {hmap.metadata.get('modified', 'modified')}, "
        f"{hmap.n_tokens} scored tokens of {hmap.metadata.get('corpus', 'text')}.",
        "",
        hemorrhage_map_summary(hmap),
        "",
    ]
    if plot is not None:
        lines += [f"![hemorrhage map]({plot.name})", ""]
    lines += [
        "share = mean of (KL with only this layer modified) and (KL recovered by restoring only this layer), over "
        "the sum of all layers'.",
        "",
        "| rank | unit | share | KL only it modified | KL only it restored |",
        "|---:|---|---:|---:|---:|",
    ]
    finer = [units for units in (hmap.part_units(), hmap.linear_units()) if units]
    finer_rows = [sorted(hmap.shares(units).items(), key=lambda item: -item[1]) for units in finer]
    for rank, (unit, share) in enumerate(ranked + [row for rows in finer_rows for row in rows], 1):
        figures = hmap.figures(unit)
        lines.append(
            f"| {rank if unit.part is None else ''} | {unit.name} | {share:.1%} | "
            f"{figures.isolated_kl:.4f} ± {figures.isolated_error:.4f} | "
            f"{figures.restored_kl:.4f} ± {figures.restored_error:.4f} |"
        )
    if hmap.part_units():
        lines += ["", "Part rows (attention, MLP) give shares among all parts."]
    if hmap.linear_units():
        lines += ["", "Linear rows (q_proj ... down_proj) give shares among all Linear layers."]
    return "\n".join(lines) + "\n"


def plot_hemorrhage_map(hmap: HemorrhageMap, path: Path) -> None:
    """Bars of each layer's share of the damage (stacked by Linear layer or by attention/MLP when the map has them)."""
    import numpy as np

    from .locate.stack import LINEARS, Unit

    plt = pyplot()
    layers = hmap.layer_units()
    figure, (share_axis, kl_axis) = plt.subplots(2, 1, figsize=(max(7, 0.3 * len(layers)), 6.5), sharex=True)
    positions = np.arange(len(layers))
    if hmap.linear_units():
        finer, colors = hmap.linear_units(), zip(LINEARS, plt.get_cmap("tab10").colors)
    else:
        finer, colors = hmap.part_units(), (("attn", "#e9967a"), ("mlp", "#b22222"))
    if finer:
        piece_shares = hmap.shares(finer)
        bottom = np.zeros(len(layers))
        for piece, color in colors:
            values = np.array([piece_shares.get(Unit(unit.layer, piece), 0.0) for unit in layers])
            share_axis.bar(positions, values, bottom=bottom, color=color, label=piece)
            bottom += values
        share_axis.legend(ncol=2 if hmap.linear_units() else 1)
    else:
        shares = hmap.shares(layers)
        share_axis.bar(positions, [shares[unit] for unit in layers], color="#b22222")
    share_axis.set_ylabel("share of the damage")
    share_axis.set_title(
        f"Hemorrhage map: KL {hmap.full_kl:.3f}; top 3 layers carry {hmap.concentration(3):.0%} "
        f"({hmap.metadata.get('modified', 'modified')})"
    )
    isolated = [hmap.figures(unit).isolated_kl for unit in layers]
    recovered = [hmap.full_kl - hmap.figures(unit).restored_kl for unit in layers]
    kl_axis.plot(positions, isolated, marker="o", color="#b22222", label="KL with only this layer modified")
    kl_axis.plot(positions, recovered, marker="s", color="#4682b4", label="KL recovered restoring only this layer")
    kl_axis.set_xlabel("decoder layer")
    kl_axis.set_ylabel("nats")
    kl_axis.legend()
    _save_figure(figure, path)


def allocation_markdown(result: dict) -> str:
    """allocate.md: the chosen spec, its estimate from the map, and the held-out measurements."""
    allocation = result["allocation"]
    lines = [
        "# Mixed-precision allocation",
        "",
        f"Budget {allocation['budget_bits']} bits per weight; chosen **`{allocation['spec']}`** "
        f"({allocation['bits_per_weight']:.4f} bits per weight, base {allocation['base_bits_per_weight']:.4f}).",
        f"Estimated from the map ({result['map']}): KL {allocation['base_kl']:.4f} → {allocation['estimated_kl']:.4f}.",
        "",
    ]
    judged = result.get("judged")
    if judged:
        held_out = result["held_out"]
        lines += [
            f"Held-out text: {held_out['corpus']} after its first {held_out['skip_tokens']} tokens, "
            f"{judged[0]['n_tokens']} scored tokens. ± are batch-means standard errors; Δ is paired against "
            f"`{judged[0]['spec']}`.",
            "",
            "| spec | bits/weight | KL mean | Δ KL (paired) | KL cut | top-1 | PPL ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in judged:
            paired = row.get("vs_first")
            delta = f"{paired['mean_difference']:+.4f} ± {paired['standard_error']:.4f}" if paired else "—"
            cut = f"{row['kl_cut']:.1%}" if "kl_cut" in row else "—"
            lines.append(
                f"| `{row['spec']}` | {row['bits_per_weight']:.4f} | {row['kl_mean']:.4f} ± {row['kl_mean_error']:.4f} "
                f"| {delta} | {cut} | {row['top1_agreement']:.1%} | {row['ppl_ratio']:.4f} |"
            )
        chosen = next((row for row in judged if row["spec"] == allocation["spec"]), None)
        compared = [row for row in judged[1:] if chosen is not None and row is not chosen]
        if compared:
            lines.append("")
        for row in compared:
            paired = chosen["vs"][row["spec"]]
            lines.append(
                f"The allocation against `{row['spec']}` ({row['bits_per_weight']:.4f} bits per weight): "
                f"Δ KL {paired['mean_difference']:+.4f} ± {paired['standard_error']:.4f} (paired), "
                f"{1 - chosen['kl_mean'] / row['kl_mean']:.1%} less KL."
            )
    return "\n".join(lines) + "\n"


def leaderboard_markdown(data: Mapping, plot: str | None) -> str:
    """The leaderboard as Markdown: the ranking table, the paired test between neighbours, a section per task
    (accuracy, drop, McNemar between neighbours), and the Pareto plot."""
    ranking = data["ranking"]
    lines = [
        f"# Leaderboard against {data['reference']}",
        "",
        f"{ranking[0]['n_tokens']} scored tokens of {data['metadata'].get('corpus', 'text')}, every candidate against "
        "one exact reference store. ± are batch-means standard errors; bits per weight count scales and zero points "
        "(nominal for simulated formats, measured for packed ones).",
        "",
        "| rank | candidate | KL mean | KL p99 | top-1 | PPL ratio | Δp mean | bits/weight | weight bytes | tokens/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, row in enumerate(ranking, 1):
        bits = figure_text(row["bits_per_weight"], "{:.3f}")
        weight_bytes = _bytes(row["weight_bytes"]) if row["weight_bytes"] else "—"
        lines.append(
            f"| {rank} | `{row['candidate']}` | {row['kl_mean']:.4f} ± {row['kl_mean_error_block']:.4f} "
            f"| {row['kl_p99']:.3f} | {row['top1_agreement']:.1%} | {row['ppl_ratio']:.4f} "
            f"| {row['delta_p_mean']:+.4f} "
            f"| {bits} | {weight_bytes} | {row['tokens_per_second']:.0f} |"
        )
    if data["neighbour_tests"]:
        lines += [
            "",
            "Each candidate against the one ranked above it (paired per-token KL difference, batch-means SE, t test):",
            "",
            "| better | worse | Δ KL | 95 % interval | p |",
            "|---|---|---:|---|---:|",
        ]
        for test in data["neighbour_tests"]:
            lines.append(
                f"| `{test['better']}` | `{test['worse']}` "
                f"| {test['mean_difference']:+.4f} ± {test['standard_error']:.4f} "
                f"| {test['ci_low']:+.4f} … {test['ci_high']:+.4f} | {test['p_value']:.2g} |"
            )
    for task, reference in data.get("reference_tasks", {}).items():
        lines += _leaderboard_task_lines(task, reference, ranking, data["neighbour_tests"])
    if plot:
        lines += ["", f"![KL against bits per weight]({plot})"]
    return "\n".join(lines) + "\n"


def _leaderboard_task_lines(task: str, reference: Mapping, ranking: Sequence[Mapping], tests: Sequence[Mapping]):
    """One task's section of the leaderboard: each candidate's accuracy and drop, then McNemar between neighbours."""
    metric = reference["metric"]
    lines = [
        "",
        f"## {task}",
        "",
        f"{reference['n_items']} items of {reference['source']}, scored as lm-evaluation-harness does ({metric}; "
        f"± standard errors, the drop's paired). Reference: {reference['accuracy']:.1%} ± "
        f"{reference['accuracy_error']:.1%}. McNemar's exact p tests the flips (c→i against i→c).",
        "",
        f"| rank | candidate | {metric} | drop vs reference | c→i | i→c | McNemar p |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for rank, row in enumerate(ranking, 1):
        lines.append(
            f"| {rank} | `{row['candidate']}` | {row[f'{task}_accuracy']:.1%} ± {row[f'{task}_accuracy_error']:.1%} "
            f"| {row[f'{task}_accuracy_drop']:+.1%} ± {row[f'{task}_accuracy_drop_error']:.1%} "
            f"| {row[f'{task}_correct_to_incorrect']} | {row[f'{task}_incorrect_to_correct']} "
            f"| {row[f'{task}_mcnemar_p_value']:.2g} |"
        )
    if tests:
        lines += [
            "",
            "Each candidate against the one ranked above it by KL (items only one of the two got right):",
            "",
            f"| better by KL | worse by KL | Δ {metric} | only better right | only worse right | McNemar p |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for test in tests:
            figures = test["tasks"][task]
            lines.append(
                f"| `{test['better']}` | `{test['worse']}` "
                f"| {figures['accuracy_difference']:+.1%} ± {figures['accuracy_difference_error']:.1%} "
                f"| {figures['only_better_correct']} | {figures['only_worse_correct']} "
                f"| {figures['mcnemar_p_value']:.2g} |"
            )
    return lines


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (bits, KL) points no other point beats on both (fewer or equal bits and lower KL), by bits.

    Example:
        >>> pareto_frontier([(4.25, 0.45), (4.5, 0.40), (4.5, 0.31), (8.25, 0.003), (6.25, 0.02), (5.25, 0.09)])
        [0, 2, 5, 4, 3]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    frontier, best = [], math.inf
    for index in order:
        if points[index][1] < best:
            frontier.append(index)
            best = points[index][1]
    return frontier


def plot_pareto(rows: Sequence[Mapping], path: Path, *, title: str = "") -> None:
    """KL (log scale) against effective bits per weight, one labelled point per row, the frontier joined."""
    plt = pyplot()

    points = [(row["bits_per_weight"], row["kl_mean"]) for row in rows]
    frontier = pareto_frontier(points)
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for index, (row, (bits, kl)) in enumerate(zip(rows, points)):
        on_frontier = index in frontier
        axis.errorbar(bits, kl, yerr=row.get("kl_mean_error"), fmt="o", color="#b22222" if on_frontier else "#999999")
        label = row["spec"] if len(row["spec"]) <= 28 else row["spec"][:26] + "…"
        axis.annotate(label, (bits, kl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axis.plot(*zip(*(points[i] for i in frontier)), color="#b22222", linewidth=1, label="Pareto frontier")
    axis.set_yscale("log")
    axis.set_xlabel("effective bits per Linear weight (scales included)")
    axis.set_ylabel("KL mean vs reference (nats)")
    axis.set_title(f"KL against bits{': ' + title if title else ''}")
    axis.legend()
    _save_figure(figure, path)
