"""Modifications that cause hemorrhage, each addressable by a spec string (see :func:`parse_spec`)."""

from . import quantization  # noqa: F401  (registers its specs)
from .base import Modification, apply_modification, known_specs, parse_spec, register, target_linears
from .quantization import WeightQuantization

__all__ = [
    "Modification",
    "WeightQuantization",
    "apply_modification",
    "known_specs",
    "parse_spec",
    "register",
    "target_linears",
]
