"""llama.cpp's quantization types by name, with their nominal bits per weight (torch-free: the sweep's family table
and ``--help`` read it).

Example:
    >>> parse_types("q8_0,Q4_K_M")
    ['Q8_0', 'Q4_K_M']
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import SpecError

#: llama.cpp quantization types and their nominal bits per weight (llama.cpp's ``quantize --help``; the real
#: figure of a file depends on which tensors the type's mix keeps at higher precision)
GGUF_TYPES: dict[str, float] = {
    "Q8_0": 8.5,
    "Q6_K": 6.5625,
    "Q5_K_M": 5.5,
    "Q5_0": 5.5,
    "Q4_K_M": 4.85,
    "Q4_K_S": 4.58,
    "Q4_0": 4.5,
    "Q3_K_M": 3.91,
    "Q3_K_S": 3.5,
    "Q2_K": 2.63,
}


def parse_types(types: str | Sequence[str]) -> list[str]:
    """``"Q8_0,Q4_K_M"`` → ``["Q8_0", "Q4_K_M"]``, each checked against :data:`GGUF_TYPES` (case-insensitive)."""
    names = [part.strip() for part in types.split(",")] if isinstance(types, str) else list(types)
    by_upper = {name.upper(): name for name in GGUF_TYPES}
    parsed = []
    for name in filter(None, names):
        if name.upper() not in by_upper:
            raise SpecError(f"unknown GGUF type {name!r}; choose from {', '.join(GGUF_TYPES)}")
        parsed.append(by_upper[name.upper()])
    if not parsed:
        raise SpecError("no GGUF type given (e.g. --type Q8_0,Q4_K_M)")
    return parsed
