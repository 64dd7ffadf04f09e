"""The ``hemorrhage`` `evaluate` metric. ``metrics/hemorrhage/hemorrhage.py`` and the copy that
:func:`install_metric` puts into evaluate's module cache both import :class:`Hemorrhage` from here, so there is one
implementation whichever way it is loaded.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import datasets
import evaluate

from .atomic import atomic_write_text
from .comparison import LoadOptions, MeasureOptions, TextSource, compare
from .tasks.flips import compare_answers

METRIC_NAME = "hemorrhage"
# The whole loader script; evaluate picks the first EvaluationModule subclass in its namespace.
METRIC_SCRIPT = (
    '"""The hemorrhage metric; its implementation lives in hemorrhage_hf.metric."""\n\n'
    "from hemorrhage_hf.metric import Hemorrhage  # noqa: F401\n"
)

_CITATION = """\
@article{ma2025hemorrhage,
  title={Model Hemorrhage and the Robustness Limits of Large Language Models},
  author={Ma, Ziyang and others},
  journal={arXiv preprint arXiv:2503.23924},
  year={2025}
}
@article{dutta2024accuracy,
  title={Accuracy is Not All You Need},
  author={Dutta, Abhinav and Krishnan, Sanjeev and Kwatra, Nipun and Ramjee, Ramachandran},
  journal={arXiv preprint arXiv:2407.09141},
  year={2024}
}
"""

_DESCRIPTION = """\
Model hemorrhage is the quality an LLM loses when it is modified for deployment (quantized, pruned, expanded,
decoded differently). The default config runs a reference and a modified model over the same texts and returns
perplexity of both and their ratio, KL(P_ref || P_mod) statistics, top-1 agreement, Δp of the true token, optional
per-layer hidden-state drift and attention divergence, and a severity grade. The `answers` config compares two
models' answers on a multiple-choice task: accuracy of each, accuracy drop, and flips in both directions.
"""

_KWARGS_DESCRIPTION = """
Args (config "default"):
    predictions (`list[str]`): texts to measure on; each is windowed on its own.
    reference_model (`str` or `PreTrainedModel`): "default" (embedded SmolLM2-135M-Instruct), a folder, a .gguf
        file, a Hub id, or a loaded model.
    modified_model (`str` or `PreTrainedModel`, optional): the modified model, same forms.
    modification (`str`, optional): instead of `modified_model`, a spec applied to a copy of the reference
        (e.g. "int8", "int4-g64").
    tokenizer (optional): the tokenizer, when `reference_model` is a model object without a loadable name.
    window (`int`, default 512), stride (`int`, optional), batch_size (`int`, default 1).
    layers (`bool`): add per-layer drift arrays. attention (`bool`): add per-layer attention JS divergence.
Args (config "answers"):
    predictions (`list[int]`): the modified model's answers (or 0/1 correctness when `gold` is omitted).
    references (`list[int]`): the reference model's answers (or 0/1 correctness).
    gold (`list[int]`, optional): the correct answers.
Returns:
    A flat dict. "default": ppl_reference, ppl_modified, ppl_ratio, ln_ppl_ratio, kl_mean, kl_median, kl_p90,
    kl_p95, kl_p99, kl_max, top1_agreement, delta_p_mean, delta_p_rms, delta_p_p1, delta_p_p99, severity, ... with
    `<figure>_error` standard errors, and layer_* arrays when asked. "answers": accuracy_reference,
    accuracy_modified, accuracy_drop, flip_rate, correct_to_incorrect, incorrect_to_correct, wrong_to_other_wrong.
Examples:
    >>> import evaluate
    >>> flips = evaluate.load("hemorrhage", "answers")  # doctest: +SKIP
    >>> flips.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0])["flip_rate"]  # doctest: +SKIP
    0.5
    >>> hemorrhage = evaluate.load("hemorrhage")  # doctest: +SKIP
    >>> result = hemorrhage.compute(predictions=["The cat sat on the mat."], reference_model="default",
    ...                             modification="int8")  # doctest: +SKIP
    >>> result["severity"]  # doctest: +SKIP
    'none'
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Hemorrhage(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "answers":
            features = datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            )
        elif self.config_name == "default":
            features = datasets.Features({"predictions": datasets.Value("string")})
        else:
            raise ValueError(
                f"unknown config {self.config_name!r} of the hemorrhage metric: use 'default' or 'answers'"
            )
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            homepage="https://arxiv.org/abs/2503.23924",
        )

    def _compute(self, predictions, references=None, gold=None, **kwargs):
        if self.config_name == "answers":
            return compare_answers(reference=references, modified=predictions, gold=gold)
        return _text_hemorrhage(list(predictions), **kwargs)


def _text_hemorrhage(
    texts: list[str],
    reference_model,
    modified_model=None,
    modification: str | None = None,
    tokenizer=None,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    layers: bool = False,
    attention: bool = False,
    dtype: str = "fp32",
) -> dict:
    report = compare(
        reference_model,
        modified_model,
        modification=modification,
        source=TextSource(texts=texts, window=window, stride=stride),
        load=LoadOptions(dtype=dtype),
        options=MeasureOptions(batch_size=batch_size, layers=layers, attention=attention, progress=False),
        tokenizer=tokenizer,
    )
    flat = report.to_dict()
    flat.pop("metadata")
    return flat


def install_metric(modules_cache: str | Path | None = None) -> Path:
    """Write the metric into evaluate's module cache so ``evaluate.load("hemorrhage")`` works offline by bare name.

    evaluate resolves a bare name on the Hub as ``evaluate-metric/<name>`` and, when that fails, falls back to the
    newest cached copy under ``<HF_MODULES_CACHE>/evaluate_modules/metrics/evaluate-metric--<name>/<hash>/``.
    """
    import hashlib

    from evaluate.loading import init_dynamic_modules

    if modules_cache is None:
        root = Path(init_dynamic_modules())
    else:
        root = Path(modules_cache)
    script_hash = hashlib.sha256(METRIC_SCRIPT.encode()).hexdigest()
    folder = root / "metrics" / f"evaluate-metric--{METRIC_NAME}" / script_hash
    folder.mkdir(parents=True, exist_ok=True)
    for package_dir in (folder.parent.parent, folder.parent, folder):
        (package_dir / "__init__.py").touch(exist_ok=True)
    atomic_write_text(folder / f"{METRIC_NAME}.py", METRIC_SCRIPT)
    readme = inspect.cleandoc(_DESCRIPTION)
    atomic_write_text(folder / "README.md", f"# hemorrhage\n\n{readme}\n")
    return folder / f"{METRIC_NAME}.py"
