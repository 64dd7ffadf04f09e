"""llama.cpp's own ``llama-perplexity --kl-divergence``, run and read back, to set hemorrhage-hf's figures beside it.

``llama-perplexity`` first stores the base model's logits over ``chunks`` chunks of ``window`` tokens of a text
file (``--kl-divergence-base``), then compares a quantized model with them (``--kl-divergence``) and prints PPL of
both, mean KLD and "same top p". :func:`llamacpp_kl_divergence` runs both steps and returns those figures under
hemorrhage-hf's names, so a test or a benchmark can check one against the other on the same chunks.

Example:
    >>> from hemorrhage_hf.llamacpp.perplexity import llamacpp_kl_divergence
    >>> figures = llamacpp_kl_divergence("f32.gguf", "Q4_0.gguf", "wiki.test.raw", chunks=8)  # doctest: +SKIP
    >>> sorted(figures)  # doctest: +SKIP
    ['kl_mean', 'kl_mean_error', 'ppl_modified', 'ppl_ratio', 'ppl_reference', 'top1_agreement']
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .engine import repack_is_safe
from .tools import LlamaCppToolError, find_program, run_program

_NUMBER = r"([-+0-9.eE]+|nan|inf)"
_FIGURES = {
    "ppl_modified": rf"Mean PPL\(Q\)\s*:\s*{_NUMBER}",
    "ppl_reference": rf"Mean PPL\(base\)\s*:\s*{_NUMBER}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUMBER}",
    "kl_mean": rf"Mean\s+KLD:\s*{_NUMBER}",
    "kl_mean_error": rf"Mean\s+KLD:\s*{_NUMBER}\s*±\s*{_NUMBER}",
    "top1_agreement": rf"Same top p:\s*{_NUMBER}",
}


def _common_arguments(window: int) -> list[str | int]:
    arguments: list[str | int] = ["-c", window, "-b", max(window, 2048), "-t", os.cpu_count() or 1]
    return arguments + ([] if repack_is_safe() else ["--no-repack"])


def llamacpp_perplexity(model: str | Path, text_file: str | Path, *, window: int = 512, chunks: int = 16) -> float:
    """``llama-perplexity``'s final PPL estimate of ``model`` on the first ``chunks`` chunks of ``text_file``."""
    command = [find_program("llama-perplexity"), "-m", model, "-f", text_file, "--chunks", chunks]
    output = run_program(command + _common_arguments(window), what=f"llama-perplexity on {Path(model).name}")
    match = re.search(rf"Final estimate: PPL = {_NUMBER}", output)
    if match is None:
        raise LlamaCppToolError(f"llama-perplexity printed no final estimate:\n{output[-2000:]}")
    return float(match.group(1))


def llamacpp_kl_divergence(
    base: str | Path, model: str | Path, text_file: str | Path, *, window: int = 512, chunks: int = 16
) -> dict[str, float]:
    """llama.cpp's PPL of both models, PPL ratio, mean KLD (± its error) and same-top agreement (a fraction)."""
    program = find_program("llama-perplexity")
    with tempfile.TemporaryDirectory(prefix="hemorrhage-kld-") as folder:
        logits = Path(folder) / "base.kld"
        base_command = [program, "-m", base, "-f", text_file, "--chunks", chunks, "--kl-divergence-base", logits]
        run_program(base_command + _common_arguments(window), what=f"llama-perplexity base logits of {base}")
        command = [program, "-m", model, "--kl-divergence-base", logits, "--kl-divergence", "--chunks", chunks]
        output = run_program(command + _common_arguments(window), what=f"llama-perplexity --kl-divergence on {model}")
    figures = {}
    for name, pattern in _FIGURES.items():
        match = re.search(pattern, output)
        if match is None:
            raise LlamaCppToolError(f"llama-perplexity printed no {name}:\n{output[-2000:]}")
        figures[name] = float(match.group(match.lastindex))
    figures["top1_agreement"] /= 100  # printed in percent
    return figures
