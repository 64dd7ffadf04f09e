"""The Gradio Blocks of the Space: Compare, Threshold, Leaderboard & map and Model card tabs over
:mod:`hemorrhage_hf.space.backend`.

Gradio is imported here only, and this module only by :func:`hemorrhage_hf.space.build_demo`: importing the
package never pays gradio's seconds.

Example:
    >>> from hemorrhage_hf.space import build_demo, launch
    >>> demo = build_demo()  # doctest: +SKIP
    >>> launch(demo, port=7860)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os

import gradio as gr
import pandas

from ..cards import CardOptions, render_section, threshold_from_sweep, update_card_text
from ..errors import HemorrhageError
from ..measurement.report import HemorrhageReport
from ..modify import known_specs, parse_spec
from ..render import comparison_rows
from ..sweep.runner import FAMILIES
from .backend import (
    LEADERBOARD_SPECS,
    ModelCache,
    default_sweep_levels,
    run_comparison,
    run_leaderboard,
    run_threshold_sweep,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Offered in the modification menu when the registry parses them (visitors may type any other spec): each
#: modification next to its mitigated form, activation-aware scaling (awq-, smooth-) and gradient-aware pruning.
SUGGESTED_SPECS = (
    "int8",
    "int4-g128",
    "int4-g64",
    "awq-int4-g64",
    "int3-g64",
    "awq-int3-g64",
    "int2-g64",
    "w8a8",
    "smooth-w8a8",
    "magnitude-50",
    "wanda-50",
    "gradient-50",
    "2:4-magnitude",
    "2:4-wanda",
    "expand-dup-4",
    "heads-25",
    "layers-4",
)
MITIGATIONS = "awq-… and smooth-… (activation-aware scaling), gradient-… (gradient-aware pruning)"
FIGURE_HEADERS = ["figure", "reference", "modified"]
GENERATION_LABELS = {"reference": "Reference", "modified": "Modified", "corrected": "Modified + decoding correction"}

INTRO = """# Model hemorrhage
Pick a model and a modification and watch how much it bleeds: both models read the same text, and every
token's next-token distributions are compared (KL divergence, perplexity, top-1 agreement, Δp), layer by layer.
*Ma et al., 2025, "Model Hemorrhage and the Robustness Limits of Large Language Models"
([arXiv:2503.23924](https://arxiv.org/abs/2503.23924)).*"""


def sample_text() -> str:
    """A passage of Python's own documentation (present in every Python install) to measure on by default."""
    from pydoc_data.topics import topics

    return topics["truth"].split("\n", 3)[3].strip()


def spec_choices() -> list[str]:
    """Suggested specs the registry accepts, then one example of every registered kind."""
    choices = []
    for spec in (*SUGGESTED_SPECS, *known_specs()):
        try:
            canonical = parse_spec(spec).spec
        except HemorrhageError:
            continue
        if canonical not in choices:
            choices.append(canonical)
    return choices


def _gradio_errors(function):
    """Show documented input errors to the visitor as a Gradio error message, not a stack trace."""

    @functools.wraps(function)  # keeps the signature: gradio finds the gr.Progress argument through it
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except HemorrhageError as error:
            raise gr.Error(str(error)) from error

    return wrapper


def build_demo(cache: ModelCache | None = None) -> gr.Blocks:
    """The Space's Blocks (queued; one heavy request at a time, since they all share the CPU)."""
    cache = cache or ModelCache()
    limits = cache.limits
    model_labels = list(cache.allow_list)

    @_gradio_errors
    def compare(model_label, spec, text, prompt, new_tokens, correct, progress=gr.Progress()):
        comparison = run_comparison(
            cache,
            model_label,
            spec,
            text,
            prompt=prompt,
            max_new_tokens=int(new_tokens),
            limits=limits,
            correct=correct,
            on_step=lambda fraction, description: progress(fraction, desc=description),
        )
        report = comparison.report
        report_data = report.to_dict()
        generations = [comparison.generations.get(key, "") for key in GENERATION_LABELS]
        severity = (
            f"### Severity: **{report.severity}**  \n"
            f"{report.metadata['modified']}, {report.figures['n_tokens']} scored tokens"
        )
        return (
            severity,
            [list(row) for row in comparison_rows(report)],
            str(comparison.plots["Per-layer drift and attention divergence"]),
            str(comparison.plots["KL distribution"]),
            comparison.token_html,
            *generations,
            comparison.correction_verdict
            and f"Decoding correction (fitted and checked on Python docs; other text may gain less): "
            f"{comparison.correction_verdict}.",
            report_data,
            report_data,
        )

    @_gradio_errors
    def sweep(model_label, family, levels_text, text, progress=gr.Progress(track_tqdm=True)):
        levels = [level.strip() for level in levels_text.split(",") if level.strip()]
        swept = run_threshold_sweep(cache, model_label, family, levels, text, limits=limits)
        sweep_data = swept.result.to_dict()
        table = pandas.DataFrame(swept.rows, columns=swept.headers)
        return threshold_from_sweep(sweep_data)["text"], str(swept.plot), table, sweep_data

    @_gradio_errors
    def leaderboard(model_label, specs, map_spec, text, progress=gr.Progress(track_tqdm=True)):
        board = run_leaderboard(cache, model_label, list(specs or []), map_spec, text, limits=limits)
        table = pandas.DataFrame(board.rows, columns=board.headers)
        return table, str(board.pareto_plot), str(board.map_plot), board.map_text

    @_gradio_errors
    def card_section(report_data, sweep_data, model_name):
        if not report_data:
            raise HemorrhageError("run a comparison on the Compare tab first")
        report = HemorrhageReport.from_dict(report_data)
        options = CardOptions(
            model_name=model_name.strip() or None, threshold=threshold_from_sweep(sweep_data) if sweep_data else None
        )
        return update_card_text("", report, options), render_section(report, options)

    with gr.Blocks(title="Model hemorrhage") as demo:
        gr.Markdown(INTRO)
        report_state = gr.State(None)
        sweep_state = gr.State(None)
        with gr.Row():
            model = gr.Dropdown(model_labels, value=model_labels[0], label="Model", elem_id="model")
            spec = gr.Dropdown(
                spec_choices(),
                value="int4-g64",
                allow_custom_value=True,
                label="Modification",
                elem_id="spec",
                info=f"Pick one or type a spec (forms: {', '.join(known_specs())}). Mitigations: {MITIGATIONS}.",
            )
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                text = gr.Textbox(
                    sample_text(),
                    lines=8,
                    max_lines=16,
                    max_length=limits.text_tokens * 12,
                    elem_id="text",
                    label=f"Text to measure on (at most {limits.text_tokens} tokens)",
                )
                with gr.Row():
                    prompt = gr.Textbox(
                        "What does the Python `len` function do?", label="Prompt for generations", scale=3
                    )
                    new_tokens = gr.Slider(
                        0,
                        limits.new_tokens,
                        value=min(32, limits.new_tokens),
                        step=1,
                        label="New tokens (greedy)",
                        scale=1,
                    )
                    correct = gr.Checkbox(
                        False,
                        label="Decoding correction",
                        scale=1,
                        elem_id="correct",
                        info="mitigation for the generations, fitted on the Python docs on first use (slow once); "
                        "its gains hold for text like the Python docs, other prompts may gain less",
                    )
                run = gr.Button("Compare", variant="primary", elem_id="compare-button")
                severity = gr.Markdown(elem_id="severity")
                with gr.Row():
                    table = gr.Dataframe(
                        headers=FIGURE_HEADERS,
                        interactive=False,
                        label="Figures",
                        max_height=720,
                        elem_id="figures-table",
                    )
                    kl_plot = gr.Image(type="filepath", label="KL distribution", elem_id="kl-plot", interactive=False)
                layer_plot = gr.Image(
                    type="filepath",
                    label="Per-layer drift and attention divergence",
                    elem_id="layer-plot",
                    interactive=False,
                )
                gr.Markdown("#### Where it bleeds, token by token")
                tokens = gr.HTML(elem_id="token-kl")
                with gr.Row():
                    generation_boxes = [
                        gr.Textbox(
                            label=f"Generation: {title}", lines=6, interactive=False, elem_id=f"generation-{key}"
                        )
                        for key, title in GENERATION_LABELS.items()
                    ]
                correction_verdict = gr.Markdown(elem_id="correction-verdict")
                with gr.Accordion("Report (JSON)", open=False):
                    report_json = gr.JSON()
            with gr.Tab("Threshold", id="threshold"):
                gr.Markdown(
                    f"Sweep one kind of modification over a few strengths, from the weakest to the strongest, on the "
                    f"first {limits.sweep_tokens} tokens of the Compare tab's text, and find where hemorrhage turns "
                    "into collapse (a breakpoint fit on the KL curve, else the level where it crosses a tolerance)."
                )
                with gr.Row():
                    family = gr.Dropdown(
                        list(FAMILIES),
                        value="bits",
                        label="Family",
                        allow_custom_value=True,
                        info="or a spec template with {}, e.g. int{}-g128",
                        elem_id="family",
                    )
                    levels = gr.Textbox(
                        ",".join(default_sweep_levels("bits", limits)),
                        elem_id="levels",
                        label=f"Levels, weakest first (at most {limits.sweep_levels})",
                        scale=2,
                    )
                sweep_button = gr.Button("Sweep", variant="primary", elem_id="sweep-button")
                threshold_text = gr.Markdown(elem_id="threshold-text")
                sweep_plot = gr.Image(
                    type="filepath", label="Sweep curve (threshold marked)", elem_id="sweep-plot", interactive=False
                )
                sweep_table = gr.Dataframe(interactive=False, label="Levels", elem_id="sweep-table")
            with gr.Tab("Leaderboard & map", id="leaderboard"):
                gr.Markdown(
                    f"Rank up to {limits.leaderboard_specs} quantizations on the first {limits.leaderboard_tokens} "
                    "tokens of the Compare tab's text, plot KL against effective bits per weight (scales included; "
                    "the Pareto frontier joined), and map where one of them bleeds: the KL when only one decoder "
                    f"layer is quantized, and when only that one is restored (on {limits.map_tokens} tokens). "
                    "`hemorrhage-hf locate` and `allocate` do the same at full size."
                )
                with gr.Row():
                    board_specs = gr.CheckboxGroup(
                        list(LEADERBOARD_SPECS),
                        value=["int8", "int4-g64", LEADERBOARD_SPECS[-1]],
                        label=f"Candidates (at most {limits.leaderboard_specs})",
                        elem_id="board-specs",
                        scale=3,
                    )
                    map_spec = gr.Dropdown(
                        list(LEADERBOARD_SPECS), value="int4-g64", label="Map this one", elem_id="map-spec", scale=1
                    )
                board_button = gr.Button("Rank and map", variant="primary", elem_id="board-button")
                board_table = gr.Dataframe(interactive=False, label="Leaderboard (lowest KL first)", elem_id="board")
                with gr.Row():
                    pareto_plot = gr.Image(
                        type="filepath", label="KL against bits per weight", elem_id="pareto-plot", interactive=False
                    )
                    map_plot = gr.Image(type="filepath", label="Layer map", elem_id="map-plot", interactive=False)
                map_text = gr.Markdown(elem_id="map-text")
            with gr.Tab("Model card", id="card"):
                gr.Markdown(
                    "The last comparison as a model card: the `model-index` eval results in the YAML header and the "
                    "*Hemorrhage report* section between its markers. `hemorrhage-hf card REPORT --readme README.md` "
                    "merges the same into an existing card, keeping everything else byte for byte."
                )
                with gr.Row():
                    card_model_name = gr.Textbox("my-model", label="Model name (model-index)", scale=3)
                    make_card = gr.Button("Write the card", elem_id="card-button", scale=1)
                card_code = gr.Code(
                    language="markdown", buttons=["copy", "download"], label="README.md", elem_id="card-markdown"
                )
                card_preview = gr.Markdown()

        heavy = dict(concurrency_id="cpu", concurrency_limit=1)
        run.click(
            compare,
            [model, spec, text, prompt, new_tokens, correct],
            [
                severity,
                table,
                layer_plot,
                kl_plot,
                tokens,
                *generation_boxes,
                correction_verdict,
                report_json,
                report_state,
            ],
            api_name="compare",
            **heavy,
        )
        family.change(
            lambda name: ",".join(default_sweep_levels(name, limits)) if name in FAMILIES else gr.skip(),
            family,
            levels,
            api_visibility="private",
        )
        sweep_button.click(
            sweep,
            [model, family, levels, text],
            [threshold_text, sweep_plot, sweep_table, sweep_state],
            api_name="sweep",
            **heavy,
        )
        board_button.click(
            leaderboard,
            [model, board_specs, map_spec, text],
            [board_table, pareto_plot, map_plot, map_text],
            api_name="leaderboard",
            **heavy,
        )
        make_card.click(
            card_section,
            [report_state, sweep_state, card_model_name],
            [card_code, card_preview],
            api_name="card_section",
        )
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, *, host: str | None = None, port: int | None = None, **launch_arguments):
    """Serve the demo on 127.0.0.1 unless told otherwise (Spaces set ``GRADIO_SERVER_NAME``)."""
    host = host or os.environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST)
    port = port or int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT))
    return demo.launch(server_name=host, server_port=port, footer_links=["api"], **launch_arguments)
