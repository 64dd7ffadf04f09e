"""Turn a :class:`~hemorrhage_hf.measurement.report.HemorrhageReport` into what people read: a console table, Markdown, PNGs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from .measurement.report import HemorrhageReport

# (key, label, format) of the rows every rendering shows; errors come from "<key>_error" when present.
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
    ("delta_p_mean", "Δp mean", "{:+.4f}"),
    ("delta_p_rms", "Δp RMS", "{:.4f}"),
    ("delta_p_p1", "Δp p1", "{:+.4f}"),
    ("delta_p_p99", "Δp p99", "{:+.4f}"),
    ("n_tokens", "scored tokens", "{:d}"),
    ("non_finite_tokens", "tokens with NaN/inf logits", "{:d}"),
)


def _format(figures: dict, key: str, template: str) -> str:
    value = figures.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—" if value is None else str(value)
    text = template.format(value)
    error = figures.get(f"{key}_error")
    if error is not None and math.isfinite(error) and error > 0:
        text += " ± " + (template.replace("+", "").format(error))
    return text


def summary_rows(report: HemorrhageReport) -> list[tuple[str, str]]:
    rows = [(label, _format(report.figures, key, template)) for key, label, template in SUMMARY_ROWS]
    rows.append(("severity", report.severity))
    return rows


def console_table(report: HemorrhageReport) -> str:
    rows = summary_rows(report)
    width = max(len(label) for label, _ in rows)
    header = f"{report.metadata.get('reference', 'reference')}  vs  {report.metadata.get('modified', 'modified')}"
    return "\n".join([header, "-" * len(header)] + [f"{label:<{width}}  {value}" for label, value in rows])


def delta_p_reading(figures: dict) -> str:
    """llama.cpp's reading rule: a symmetric Δp means noise; a heavy negative side means the model got worse."""
    low, high = figures.get("delta_p_p1"), figures.get("delta_p_p99")
    if low is None or high is None:
        return ""
    if abs(low) > 1.5 * abs(high):
        return "Δp is skewed to the negative side: the modification made the model worse, not just noisier."
    return "Δp is roughly symmetric around 0: the modification mostly adds noise."


def report_markdown(report: HemorrhageReport, plot_files: dict[str, str]) -> str:
    meta = report.metadata
    lines = [
        "# Hemorrhage report",
        "",
        f"- **Reference:** {meta.get('reference', '?')}",
        f"- **Modified:** {meta.get('modified', '?')}",
        f"- **Corpus:** {meta.get('corpus', '?')} ({report.figures.get('n_tokens')} scored tokens, "
        f"window {meta.get('window', '?')}, stride {meta.get('stride', '?')})",
        f"- **Severity:** **{report.severity}**",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [f"| {label} | {value} |" for label, value in summary_rows(report)]
    lines += ["", delta_p_reading(report.figures)]
    if meta.get("reference_cache"):
        cache = meta["reference_cache"]
        lines += [
            "",
            f"**Reference cache:** the reference side came from a cache of its top-{cache['k']} tokens per "
            f"position (mean reference probability outside them: {cache['tail_mass_mean']:.4f}). KL figures are "
            "lower bounds (KL over the k bins plus one tail bin); the other figures are exact.",
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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def save_report(report: HemorrhageReport, output_dir: Path, *, plots: bool) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
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
