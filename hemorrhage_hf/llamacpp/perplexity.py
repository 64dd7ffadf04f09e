"""llama.cpp's own ``llama-perplexity --kl-divergence``, run and read back, to set hemorrhage-hf's figures beside it.

``llama-perplexity`` first stores the base model's logits over ``chunks`` chunks of ``window`` tokens of a text
file (:func:`llamacpp_base_logits`), then compares a quantized model with them (:func:`llamacpp_kl_divergence`)
and prints PPL of both, mean KLD and "same top p", returned here under hemorrhage-hf's names, so a test or a
benchmark can check one against the other on the same chunks.

Example:
    >>> from hemorrhage_hf.llamacpp.perplexity import llamacpp_base_logits, llamacpp_kl_divergence
    >>> logits = llamacpp_base_logits("f32.gguf", "wiki.test.raw", "f32.kld", chunks=8)  # doctest: +SKIP
    >>> figures = llamacpp_kl_divergence("Q4_0.gguf", logits, chunks=8)  # doctest: +SKIP
    >>> sorted(figures)  # doctest: +SKIP
    ['kl_mean', 'kl_mean_error', 'ppl_modified', 'ppl_ratio', 'ppl_reference', 'top1_agreement']
"""

from __future__ import annotations

import os
import re
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


def llamacpp_base_logits(
    base: str | Path, text_file: str | Path, output: str | Path, *, window: int = 512, chunks: int = 16
) -> Path:
    """``llama-perplexity --kl-divergence-base``: ``base``'s logits on the first ``chunks`` chunks, stored once for
    any number of :func:`llamacpp_kl_divergence` comparisons."""
    command = [find_program("llama-perplexity"), "-m", base, "-f", text_file, "--chunks", chunks]
    command += ["--kl-divergence-base", output, *_common_arguments(window)]
    run_program(command, what=f"llama-perplexity base logits of {base}")
    return Path(output)


def llamacpp_kl_divergence(
    model: str | Path, base_logits: str | Path, *, window: int = 512, chunks: int = 16
) -> dict[str, float]:
    """llama.cpp's PPL of both models, PPL ratio, mean KLD (± its error) and same-top agreement (a fraction) of
    ``model`` against logits stored by :func:`llamacpp_base_logits`."""
    command = [find_program("llama-perplexity"), "-m", model, "--kl-divergence-base", base_logits]
    command += ["--kl-divergence", "--chunks", chunks, *_common_arguments(window)]
    output = run_program(command, what=f"llama-perplexity --kl-divergence on {model}")
    figures = {}
    for name, pattern in _FIGURES.items():
        match = re.search(pattern, output)
        if match is None:
            raise LlamaCppToolError(f"llama-perplexity printed no {name}:\n{output[-2000:]}")
        figures[name] = float(match.group(match.lastindex))
    figures["top1_agreement"] /= 100  # printed in percent
    return figures
