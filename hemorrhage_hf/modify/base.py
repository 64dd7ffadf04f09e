"""The modification registry: every kind of modification is one class, addressed by a spec string.

A new kind (say, RoPE scaling) is one new module that subclasses :class:`Modification` and registers its spec
pattern with :func:`register`; the CLI, sweeps, metric and Space then accept its specs unchanged.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("int4-g64")
    WeightQuantization(bits=4, group_size=64, symmetric=True)
"""

from __future__ import annotations

import copy
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..errors import ModificationError, SpecError

MODIFICATION_ATTRIBUTE = "hemorrhage_modification"


class Modification(ABC):
    """Changes a model in place. Subclasses validate their arguments in ``__init__``, before any weight changes."""

    #: True when :meth:`apply` needs calibration token windows.
    needs_calibration: bool = False

    @abstractmethod
    def apply(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> PreTrainedModel:
        """Modify ``model`` in place and return it. ``calibration`` is a ``[n, seq_len]`` LongTensor of token ids."""


@dataclass(frozen=True)
class _Entry:
    pattern: re.Pattern
    example: str
    factory: Callable[[re.Match], Modification]


_REGISTRY: list[_Entry] = []


def register(pattern: str, example: str) -> Callable:
    """Register ``factory(match) -> Modification`` for specs that fully match ``pattern``."""

    def decorator(factory: Callable[[re.Match], Modification]) -> Callable[[re.Match], Modification]:
        _REGISTRY.append(_Entry(re.compile(pattern), example, factory))
        return factory

    return decorator


def known_specs() -> list[str]:
    """One example spec per registered kind."""
    return [entry.example for entry in _REGISTRY]


def parse_spec(spec: str) -> Modification:
    """The :class:`Modification` a spec string names; :class:`SpecError` for anything malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"a modification spec must be a non-empty string, got {spec!r}")
    for entry in _REGISTRY:
        match = entry.pattern.fullmatch(spec.strip().lower())
        if match:
            return entry.factory(match)
    raise SpecError(f"unknown modification spec {spec!r}; known forms: {', '.join(known_specs())}")


def apply_modification(
    model: PreTrainedModel,
    spec: str | Modification,
    *,
    calibration: torch.Tensor | None = None,
    in_place: bool = False,
) -> PreTrainedModel:
    """Return a modified copy of ``model`` (or ``model`` itself with ``in_place``), recording the spec in its config."""
    modification = parse_spec(spec) if isinstance(spec, str) else spec
    if modification.needs_calibration and calibration is None:
        raise ModificationError(f"{modification!r} needs calibration data (token windows)")
    target = model if in_place else copy.deepcopy(model)
    modification.apply(target, calibration)
    setattr(target.config, MODIFICATION_ATTRIBUTE, str(spec) if isinstance(spec, str) else repr(spec))
    return target


def target_linears(model: PreTrainedModel) -> dict[str, torch.nn.Linear]:
    """The Linear layers modifications act on: all of them except the output head (often tied to the embeddings)."""
    head = model.get_output_embeddings()
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    if not linears:
        raise ModificationError(f"{type(model).__name__} has no Linear layers to modify (besides its output head)")
    return linears
