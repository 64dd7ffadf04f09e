"""Export a reference to GGUF with llama.cpp's own converter and quantizer, optionally with an importance matrix.

One command makes the GGUF candidates a comparison needs: the reference converted once to an f32 (or bf16) GGUF,
then one file per quantization type, each measured later with ``--engine llama.cpp`` against that f32 file.

Example:
    >>> from hemorrhage_hf.llamacpp.export import export_gguf
    >>> files = export_gguf("default", ["Q8_0", "Q4_K_M"], "gguf/")  # doctest: +SKIP
    >>> sorted(files)  # doctest: +SKIP
    ['Q4_K_M', 'Q8_0', 'f32']
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..corpus import load_corpus
from ..errors import ModelLoadError, SpecError
from ..models import DEFAULT_MODEL, default_model_dir, resolve_model_source
from .engine import repack_is_safe
from .tools import find_converter, find_program, run_program
from .types import parse_types

BASE_TYPES = ("f32", "bf16", "f16")


def reference_checkpoint(reference: str) -> Path:
    """The transformers folder of ``reference`` (``default``, a folder, a cached Hub id) for the converter."""
    if reference == DEFAULT_MODEL:
        return default_model_dir()
    source, gguf_file = resolve_model_source(reference)
    if gguf_file is not None:
        raise ModelLoadError(f"{reference} is already a GGUF file; export needs a transformers checkpoint")
    folder = Path(source)
    if not folder.is_dir():
        raise ModelLoadError(f"{reference!r} is not a local checkpoint folder or a cached Hub model")
    return folder


def convert(checkpoint: Path, output: Path, *, outtype: str = "f32") -> Path:
    """``convert_hf_to_gguf.py`` on a transformers folder (kept if ``output`` exists already)."""
    if outtype not in BASE_TYPES:
        raise SpecError(f"the converted reference must be one of {', '.join(BASE_TYPES)}, got {outtype!r}")
    if output.is_file():
        return output
    script = find_converter()
    partial = output.with_name(output.name + ".partial")
    run_program(
        [sys.executable, script, checkpoint, "--outtype", outtype, "--outfile", partial],
        what=f"converting {checkpoint} to GGUF",
    )
    os.replace(partial, output)
    return output


def importance_matrix(base: Path, text_file: Path, output: Path, *, window: int = 512, chunks: int = 32) -> Path:
    """``llama-imatrix`` of ``base`` on ``chunks`` chunks of ``window`` tokens of ``text_file``."""
    load_corpus(str(text_file))  # a missing or empty file fails here, with the path in the message
    command = [find_program("llama-imatrix"), "-m", base, "-f", text_file, "-o", output, "-c", window]
    command += ["--chunks", chunks, "-t", os.cpu_count() or 1]
    if not repack_is_safe():
        command.append("--no-repack")
    run_program(command, what=f"computing an importance matrix on {text_file}")
    return output


def quantize(base: Path, output: Path, gguf_type: str, *, imatrix: Path | None = None) -> Path:
    """``llama-quantize`` of ``base`` to ``gguf_type``."""
    partial = output.with_name(output.name + ".partial")
    command = [find_program("llama-quantize")]
    if imatrix is not None:
        command += ["--imatrix", imatrix]
    command += [base, partial, gguf_type, os.cpu_count() or 1]
    run_program(command, what=f"quantizing {base.name} to {gguf_type}")
    os.replace(partial, output)
    return output


def export_gguf(
    reference: str,
    types: str | Sequence[str],
    output_dir: str | Path,
    *,
    outtype: str = "f32",
    imatrix_text: str | Path | None = None,
    imatrix_chunks: int = 32,
    window: int = 512,
) -> dict[str, Path]:
    """Convert ``reference`` to ``<name>-<outtype>.gguf`` and quantize it to each of ``types`` in ``output_dir``.

    With ``imatrix_text`` the quantizer weighs rounding errors by an importance matrix computed on that text.
    Returns type → file, the base under its ``outtype`` name. Existing files are kept (rerunning adds types).
    """
    gguf_types = parse_types(types)
    checkpoint = reference_checkpoint(reference)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint.name
    base = convert(checkpoint, output_dir / f"{name}-{outtype}.gguf", outtype=outtype)
    files = {outtype: base}
    imatrix = None
    if imatrix_text is not None:
        imatrix = importance_matrix(
            base, Path(imatrix_text), output_dir / f"{name}-imatrix.gguf", window=window, chunks=imatrix_chunks
        )
        files["imatrix"] = imatrix
    for gguf_type in gguf_types:
        target = output_dir / f"{name}-{gguf_type}{'-imatrix' if imatrix else ''}.gguf"
        files[gguf_type] = target if target.is_file() else quantize(base, target, gguf_type, imatrix=imatrix)
    return files


class GgufLevels:
    """The levels of a ``gguf`` sweep: ``base`` quantized to each type on first use (files kept in ``folder``),
    run by llama.cpp (``engine="llama.cpp"``) or loaded through transformers, dequantized (``engine="torch"``).

    Example:
        >>> levels = GgufLevels(Path("gguf/model-f32.gguf"), Path("gguf"), engine="llama.cpp")  # doctest: +SKIP
        >>> levels.model("Q4_K_M").n_vocab  # doctest: +SKIP
        49152
    """

    def __init__(self, base: Path, folder: Path, *, engine: str):
        self.base, self.folder, self.engine = Path(base), Path(folder), engine

    def file(self, gguf_type: str) -> Path:
        (gguf_type,) = parse_types([gguf_type])
        stem = self.base.stem.removesuffix("-f32").removesuffix("-bf16").removesuffix("-f16")
        target = self.folder / f"{stem}-{gguf_type}.gguf"
        return target if target.is_file() else quantize(self.base, target, gguf_type)

    def model(self, gguf_type: str):
        from ..models import load_model
        from .engine import ENGINE_NAME, LlamaCppModel

        path = self.file(gguf_type)
        return LlamaCppModel(path) if self.engine == ENGINE_NAME else load_model(str(path))[0]
