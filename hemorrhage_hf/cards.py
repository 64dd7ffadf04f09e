"""Model-card sections: a "Hemorrhage report" in the card's Markdown and its figures in the card's ``model-index``.

A model's publisher states, in the card every user reads, how much the model bled versus its base. The section
is rendered from the Jinja templates in ``model_cards/``; the eval results go through ``huggingface_hub``'s
:class:`~huggingface_hub.EvalResult` and ``model-index`` conversion, so the Hub reads them as it reads any other.

:func:`update_card_text` is idempotent and surgical: the section lives between :data:`SECTION_START` and
:data:`SECTION_END` (appended at the end the first time), and only the YAML header's top-level ``model-index:``
block is rewritten, and only when its results change. Every other byte of the card stays as it was.

Example:
    >>> from hemorrhage_hf.cards import CardOptions, update_card_text
    >>> from hemorrhage_hf.measurement.report import HemorrhageReport
    >>> report = HemorrhageReport(
    ...     figures={"ppl_reference": 10.0, "ppl_modified": 11.0, "ppl_ratio": 1.1, "kl_mean": 0.05,
    ...              "top1_agreement": 0.9, "n_tokens": 1000, "severity": "mild"},
    ...     metadata={"reference": "org/base", "modified": "org/base + int4-g64", "modification": "int4-g64",
    ...               "corpus": "python-docs", "window": 512, "stride": 512})
    >>> card = update_card_text("# My model\\n", report, CardOptions(model_name="my-model"))
    >>> card.startswith("---\\nmodel-index:\\n- name: my-model")
    True
    >>> update_card_text(card, report, CardOptions(model_name="my-model")) == card
    True
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import yaml_dump

from .atomic import atomic_path
from .corpus import PYTHON_DOCS
from .errors import HemorrhageError
from .measurement.report import (
    COLLAPSE_PPL_RATIO,
    COLLAPSE_TOP1_AGREEMENT,
    SEVERITY_KL_BANDS,
    SHIPPING,
    HemorrhageReport,
    grade_boundary_note,
)
from .render import comparison_rows, delta_p_reading, modification_lines, task_rows

# The templates live in the repository's model_cards/; hemorrhage_hf/model_cards links there, and a wheel holds a copy.
TEMPLATE_DIR = Path(__file__).resolve().parent / "model_cards"
SECTION_TEMPLATE = "hemorrhage_section.md"
CARD_TEMPLATE = "modelcard.md"
SECTION_START = (
    "<!-- hemorrhage-hf:start (written by `hemorrhage-hf card`; edits between these markers are replaced) -->"
)
SECTION_END = "<!-- hemorrhage-hf:end -->"
TASK_TYPE = "text-generation"
TASK_NAME = "Hemorrhage versus the base model"

#: Figures of the card's table, in order; perplexity is shown for both models on one row.
CARD_TABLE_KEYS = (
    "ppl_ratio",
    "kl_mean",
    "kl_median",
    "kl_p99",
    "top1_agreement",
    "delta_p_mean",
    "delta_p_rms",
    "nll_correlation",
)
#: (figure key, model-index metric type, metric name) of the eval results a report contributes.
EVAL_METRICS = (
    ("ppl_modified", "perplexity", "Perplexity"),
    ("ppl_ratio", "perplexity_ratio", "Perplexity ratio to the base model"),
    ("kl_mean", "kl_divergence", "Mean KL(base ‖ this model), nats"),
    ("top1_agreement", "top1_agreement", "Top-1 agreement with the base model"),
    ("delta_p_mean", "delta_p", "Mean Δp of the true token"),
)
#: (task figure, model-index metric type, metric name) each task of ``CardOptions.tasks`` reports.
TASK_EVAL_METRICS = (
    ("accuracy_modified", "accuracy", "Accuracy"),
    ("flip_rate", "flip_rate", "Answer flips versus the base model"),
)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_TOP_LEVEL_KEY = re.compile(r"^(?P<key>[^\s#:\-][^:]*):(\s|$)")


@dataclass
class CardOptions:
    """What the report alone does not say: names for the card, and optional threshold, task and plot results.

    ``dataset_type``/``dataset_name`` default to what :func:`dataset_identity` derives from the report's corpus.
    ``threshold`` is ``{"text": sentence, "value": number, "name": what it is}``; ``tasks`` are
    :func:`hemorrhage_hf.tasks.flips.compare_answers` results each with a ``"task"`` name; ``plots`` maps an image
    title to its path relative to the card.
    """

    model_name: str | None = None
    base_model: str | None = None
    dataset_type: str | None = None
    dataset_name: str | None = None
    threshold: dict | None = None
    tasks: Sequence[dict] = ()
    plots: dict[str, str] = field(default_factory=dict)


def base_model_id(report: HemorrhageReport) -> str | None:
    """The Hub id of the report's reference model, when it is one.

    The embedded ``default`` model has none: its weights are the Q4_1 GGUF of SmolLM2-135M-Instruct dequantized,
    not the weights the Hub id names, so the card does not claim that id (``--base-model`` sets one explicitly).
    """
    reference = report.metadata.get("reference") or ""
    return reference if _HUB_ID.fullmatch(reference) else None


def dataset_identity(corpus: str) -> tuple[str, str]:
    """(type, name) for the model-index from a report's corpus label: the Python docs, a dataset or a file.

    The type is a name, never a path: a `datasets` id (``wikitext/wikitext-2-raw-v1:test`` → ``wikitext``), or for
    a local file its name without extensions (pass ``--dataset-type`` to name the Hub dataset it came from).

    Example:
        >>> dataset_identity("/data/wikitext-2-raw/wiki.valid.raw")
        ('wiki', 'wikitext-2-raw/wiki.valid.raw')
        >>> dataset_identity("wikitext/wikitext-2-raw-v1:test")
        ('wikitext', 'wikitext/wikitext-2-raw-v1:test')
    """
    if corpus == PYTHON_DOCS:
        return PYTHON_DOCS, "Python documentation prose (pydoc_data.topics)"
    path = Path(corpus)
    if path.is_absolute() or path.suffix:
        return path.name.split(".")[0] or path.name, "/".join(path.parts[-2:])
    return corpus.split("/")[0].split(":")[0], corpus


def severity_legend() -> str:
    """The grading rule of :mod:`hemorrhage_hf.measurement.report`, in one line."""
    bands, lower = [], None
    for grade, upper in SEVERITY_KL_BANDS:
        bands.append(f"{grade} < {upper:g}" if lower is None else f"{lower:g} ≤ {grade} < {upper:g}")
        lower = upper
    bands.append(f"severe ≥ {lower:g}")
    return (
        "; ".join(bands)
        + f"; collapse when the perplexity ratio is ≥ {COLLAPSE_PPL_RATIO:g}, top-1 agreement is below "
        f"{COLLAPSE_TOP1_AGREEMENT:.0%} or any logit is NaN/inf"
    )


def threshold_from_sweep(sweep: dict) -> dict:
    """The headline threshold of a ``sweep.json`` (:meth:`hemorrhage_hf.sweep.runner.SweepResult.to_dict`), as
    :attr:`CardOptions.threshold`: a sentence, the level (None when no threshold was found) and its name."""
    try:
        family, headline, curves = sweep["family"]["name"], sweep["threshold"], sweep["thresholds"]
        levels = [entry["level"] for entry in sweep["levels"]]
    except (KeyError, TypeError) as error:
        raise HemorrhageError(f"not a sweep result (sweep.json): missing {error}") from error
    figure = headline.get("figure")
    label = curves.get(figure, {}).get("label", figure)

    def at(neighbour: dict | None) -> str:
        if neighbour is None:
            return "—"
        value = neighbour["figures"].get(figure)
        return f"level {neighbour['level']} ({label} {'non-finite' if value is None else f'{value:.3g}'})"

    swept = f"Swept over {family} levels {', '.join(levels)} (hemorrhage-hf sweep)"
    level, rule = headline.get("level"), headline.get("rule")
    if rule == "breakpoint":
        low, high = headline["interval"]
        text = (
            f"{swept}: the {label} curve bends into collapse at level **{level:.3g}** (95 % interval "
            f"{low:.3g}–{high:.3g}, breakpoint fit), between {at(headline['level_before'])} and "
            f"{at(headline['level_after'])}."
        )
    elif rule == "tolerance" and level is not None:
        text = (
            f"{swept}: no distinct breakpoint ({headline['breakpoint_reason']}); {label} crosses its tolerance "
            f"({headline['tolerance']:g}) at level **{level:.3g}**, between {at(headline['level_before'])} and "
            f"{at(headline['level_after'])}."
        )
    else:
        reason = headline.get("reason") or headline.get("breakpoint_reason") or "nothing measured"
        text, level = f"{swept}: no threshold within the levels measured ({reason}).", None
    return {"text": text, "value": level, "name": f"Robustness threshold ({family} level, {rule} rule)"}


def _environment():
    import jinja2

    if not (TEMPLATE_DIR / SECTION_TEMPLATE).is_file():
        raise HemorrhageError(f"model-card templates not found in {TEMPLATE_DIR}")
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    # A "|" inside a table cell would end the cell.
    environment.filters["cell"] = lambda value: str(value).replace("|", "\\|").replace("\n", " ")
    return environment


def render_section(report: HemorrhageReport, options: CardOptions | None = None) -> str:
    """The Markdown "Hemorrhage report" section (without markers)."""
    options = options or CardOptions()
    meta, figures = report.metadata, report.figures
    layers = None
    if report.layers is not None:
        ranked = sorted(range(len(report.layers.cosine_distance)), key=lambda i: -report.layers.cosine_distance[i])
        layers = [(i, f"{report.layers.cosine_distance[i]:.4f}") for i in ranked[:3]]
    made_by, storage = modification_lines(meta.get("modification_details"))
    text = (
        _environment()
        .get_template(SECTION_TEMPLATE)
        .render(
            reference=meta.get("reference", "?"),
            modified=meta.get("modified", "?"),
            modification=meta.get("modification"),
            made_by=made_by,
            storage=storage,
            corpus=options.dataset_name or dataset_identity(meta.get("corpus", "?"))[1],
            n_tokens=figures.get("n_tokens"),
            window=meta.get("window", "?"),
            stride=meta.get("stride", "?"),
            severity=report.severity,
            shipping=SHIPPING[report.severity],
            boundary_note=grade_boundary_note(figures),
            rows=comparison_rows(report, CARD_TABLE_KEYS)[:-1],
            delta_p_reading=delta_p_reading(figures),
            non_finite_tokens=figures.get("non_finite_tokens"),
            threshold=options.threshold,
            tasks=task_rows(options.tasks),
            layers=layers,
            plots=sorted(options.plots.items()),
            severity_legend=severity_legend(),
        )
    )
    return text.strip() + "\n"


def eval_results(report: HemorrhageReport, options: CardOptions | None = None) -> list[EvalResult]:
    """The report's figures (and threshold, task accuracies) as model-index eval results."""
    options = options or CardOptions()
    dataset_type, dataset_name = dataset_identity(report.metadata.get("corpus", "?"))
    dataset_type, dataset_name = options.dataset_type or dataset_type, options.dataset_name or dataset_name
    base = options.base_model or base_model_id(report) or report.metadata.get("reference")
    versus = {
        key: value
        for key, value in (("base_model", base), ("modification", report.metadata.get("modification")))
        if value
    }
    common = dict(task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=dataset_type, dataset_name=dataset_name)
    results = [
        # Comparative figures say versus what; the model's own perplexity needs no such note.
        EvalResult(
            **common,
            metric_type=metric_type,
            metric_name=name,
            metric_value=report.figures[key],
            metric_args=(versus or None) if key != "ppl_modified" else None,
        )
        for key, metric_type, name in EVAL_METRICS
        if report.figures.get(key) is not None
    ]
    if options.threshold and options.threshold.get("value") is not None:
        results.append(
            EvalResult(
                **common,
                metric_type="hemorrhage_threshold",
                metric_value=options.threshold["value"],
                metric_name=options.threshold.get("name", "Robustness threshold"),
            )
        )
    results += [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=TASK_NAME,
            dataset_type=task["task"],
            dataset_name=task["task"],
            metric_type=metric_type,
            metric_value=task[key],
            metric_name=name,
        )
        for task in options.tasks
        for key, metric_type, name in TASK_EVAL_METRICS
    ]
    return results


def merge_eval_results(existing: Sequence[EvalResult], new: Sequence[EvalResult]) -> list[EvalResult]:
    """``existing`` with every result that ``new`` measures again (same task, dataset and metric) replaced."""
    replaced = {(result.unique_identifier, result.metric_type) for result in new}
    kept = [result for result in existing if (result.unique_identifier, result.metric_type) not in replaced]
    return kept + list(new)


def _line_break(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _splice_section(body: str, section: str, line_break: str) -> str:
    block = f"{SECTION_START}\n{section}{SECTION_END}".replace("\n", line_break)
    start, end = body.find(SECTION_START), body.find(SECTION_END)
    if start >= 0 and end > start:
        return body[:start] + block + body[end + len(SECTION_END) :]
    if start >= 0 or end >= 0:
        raise HemorrhageError("the card has only one of the hemorrhage-hf section markers; fix or remove it by hand")
    if not body or body.endswith(line_break * 2):
        separator = ""
    else:
        separator = line_break if body.endswith(line_break) else line_break * 2
    return body + separator + block + line_break


def _model_index_span(yaml_lines: list[str]) -> tuple[int, int] | None:
    """[first, end) line indices of the top-level ``model-index:`` block of a YAML header, or None."""
    for first, line in enumerate(yaml_lines):
        match = _TOP_LEVEL_KEY.match(line)
        if match and match["key"].strip().strip("'\"") == "model-index":
            end = first + 1
            while end < len(yaml_lines) and (
                not _TOP_LEVEL_KEY.match(yaml_lines[end]) and not yaml_lines[end].startswith("#")
            ):
                end += 1
            while end > first + 1 and not yaml_lines[end - 1].strip():
                end -= 1  # blank lines after the block belong to the rest of the header
            return first, end
    return None


def _update_header(text: str, results: list[EvalResult], model_name: str | None, line_break: str) -> str:
    """Merge ``results`` into the card's model-index, rewriting that one YAML block only if it changes."""
    import yaml

    match = REGEX_YAML_BLOCK.search(text)
    header_yaml = match.group(2) if match else ""
    data = yaml.safe_load(header_yaml) if header_yaml.strip() else {}
    if not isinstance(data, dict):
        raise HemorrhageError("the card's YAML header is not a mapping")
    old_index = data.get("model-index")
    existing_name, existing = model_index_to_eval_results(old_index) if old_index else (None, [])
    name = model_name or existing_name or data.get("model_name")
    if not name:
        raise HemorrhageError("the card has no model-index name yet; pass a model name (--model-name)")
    new_index = eval_results_to_model_index(name, merge_eval_results(existing, results))
    if new_index == old_index:
        return text
    block = yaml_dump({"model-index": new_index}, sort_keys=False).rstrip("\n").replace("\n", line_break)
    if match is None:
        return f"---{line_break}{block}{line_break}---{line_break}{text}"
    lines = header_yaml.split(line_break) if header_yaml else []
    span = _model_index_span(lines)
    lines = lines[: span[0]] + [block] + lines[span[1] :] if span else lines + [block]
    return text[: match.start(2)] + line_break.join(lines) + text[match.end(2) :]


def update_card_text(card_text: str, report: HemorrhageReport, options: CardOptions | None = None) -> str:
    """The card with the hemorrhage section and eval results inserted or updated; nothing else changes."""
    options = options or CardOptions()
    line_break = _line_break(card_text)
    with_header = _update_header(card_text, eval_results(report, options), options.model_name, line_break)
    match = REGEX_YAML_BLOCK.search(with_header)
    cut = match.end() if match else 0
    return with_header[:cut] + _splice_section(with_header[cut:], render_section(report, options), line_break)


def new_card_text(report: HemorrhageReport, options: CardOptions) -> str:
    """A whole new model card (from ``model_cards/modelcard.md``) holding the section and eval results."""
    if not options.model_name:
        raise HemorrhageError("a new model card needs a model name (--model-name)")
    base_model = options.base_model or base_model_id(report)
    card_data = ModelCardData(
        model_name=options.model_name,
        base_model=base_model,
        tags=["hemorrhage-hf"],
        eval_results=eval_results(report, options),
    )
    section = f"{SECTION_START}\n{render_section(report, options)}{SECTION_END}"
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_DIR / CARD_TEMPLATE),
        hemorrhage_section=section,
        model_name=options.model_name,
    )
    return str(card).rstrip("\n") + "\n"


def copy_plots(report_dir: Path, readme: Path, subfolder: str = "hemorrhage") -> dict[str, str]:
    """Copy the PNG plots that ``report --output`` wrote beside ``report.json`` next to the card.

    Returns ``{title: path relative to the card}``; files already identical are left untouched.
    """
    titles = {"kl_distribution.png": "KL distribution", "layer_drift.png": "Per-layer drift"}
    plots = {}
    for file_name, title in titles.items():
        source = report_dir / file_name
        if not source.is_file():
            continue
        target = readme.parent / subfolder / file_name
        if not target.is_file() or target.read_bytes() != source.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        plots[title] = f"{subfolder}/{file_name}"
    return plots


def write_card(readme: str | Path, report: HemorrhageReport, options: CardOptions) -> bool:
    """Insert or update the section in ``readme`` (created when missing); True when the file changed."""
    readme = Path(readme)
    if readme.is_file():
        # newline="" keeps CRLF cards CRLF; decoding is strict so a non-UTF-8 card is refused, not mangled.
        with readme.open(encoding="utf-8", newline="") as handle:
            before = handle.read()
        after = update_card_text(before, report, options)
    else:
        before, after = None, new_card_text(report, options)
    if after == before:
        return False
    with atomic_path(readme) as temporary:
        temporary.write_bytes(after.encode("utf-8"))  # bytes: no newline translation
        if before is not None:
            os.chmod(temporary, readme.stat().st_mode)
    return True
