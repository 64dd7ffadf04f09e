"""The modification registry: every kind of modification is one class, addressed by a spec string.

A new kind (say, RoPE scaling) is one new module that subclasses :class:`Modification` and registers its spec
pattern with :func:`register`; the CLI, sweeps, metric and Space then accept its specs unchanged.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("int4-g64")
    WeightQuantization('int4-g64')
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config_keys import MODIFICATION_ATTRIBUTE
from ..errors import ModificationError, SpecError
from .detect import refuse_quantized
from .footprint import WeightFootprint

#: Fewer calibration tokens than this give activation statistics too noisy to rank weights or search scales on.
MIN_CALIBRATION_TOKENS = 256


class Modification(ABC):
    """Changes a model in place. Subclasses validate their arguments in ``__init__``, and the model in
    :meth:`apply` before its first weight change, so a bad input never leaves a half-modified model."""

    #: True when :meth:`apply` needs calibration token windows.
    needs_calibration: bool = False
    #: "quantization", "pruning" or "expansion": which front end (HfQuantizer, pruner, ``expand``) accepts it.
    family: str = "quantization"
    #: True when part of the modification lives outside the weights (activation quantizers) and a model reloaded
    #: from a checkpoint needs :meth:`restore`.
    runtime_state: bool = False
    #: True when the modification cannot change a model in place and :meth:`modified_copy` builds a new one
    #: (backends that quantize while a checkpoint loads).
    builds_new_model: bool = False

    @property
    @abstractmethod
    def spec(self) -> str:
        """The canonical spec string: ``parse_spec(m.spec)`` rebuilds an equal modification."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash((type(self), self.spec))

    @abstractmethod
    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        """Modify ``model`` in place and return it. ``calibration`` is a ``[n, seq_len]`` LongTensor of token ids."""

    def with_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> Modification:
        """This modification, given the model's tokenizer. Only a backend whose library insists on one keeps it
        (``gptq-w*``: llm-compressor); the others need none and return themselves."""
        return self

    def restore(self, model: PreTrainedModel) -> PreTrainedModel:
        """Re-install what the saved weights cannot carry, on a model reloaded from a checkpoint of this
        modification."""
        return model

    #: False where the result cannot be saved as a checkpoint that reloads to the same model; then says why.
    saveable: bool = True
    not_saveable_reason: str = ""

    def save(self, model: PreTrainedModel, save_dir) -> None:
        """Save a model this modification made as a checkpoint (safetensors and config)."""
        model.save_pretrained(save_dir)

    def modified_copy(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        """A modified copy of a float ``model``, which stays untouched; quantized models are refused, not copied."""
        refuse_quantized(model, self.spec)
        return self.apply(copy.deepcopy(model), calibration, progress=progress)

    def config(self) -> dict:
        """The modification's parameters as a report names them (bits, group size, scheme...)."""
        return {}

    def describe(self) -> dict:
        """Spec, the library that made it (hemorrhage-hf itself here) and its version, and :meth:`config`.
        ``simulated``: the weights stay in float, so storage figures are nominal."""
        return {
            "spec": self.spec,
            "backend": "hemorrhage-hf",
            "version": _version(),
            "simulated": True,
            **self.config(),
        }

    def footprint(self, model: PreTrainedModel) -> WeightFootprint | None:
        """The nominal storage of ``model``'s Linear weights in this modification's format, for formats that are
        simulated (weights kept in float); None where what the model stores is the truth (measure it instead)."""
        return None


def _version() -> str:
    try:
        return importlib.metadata.version("hemorrhage-hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


#: Called as ``hook(model, spec)`` after a modification with runtime state is applied. The transformers integration
#: registers one that records the spec as the model's ``quantization_config``, so that its checkpoint restores what
#: the weights cannot carry; modify itself never imports an integration.
_RUNTIME_STATE_HOOKS: list[Callable[[PreTrainedModel, str], None]] = []


def on_runtime_state(hook: Callable[[PreTrainedModel, str], None]) -> Callable[[PreTrainedModel, str], None]:
    """Register ``hook(model, spec)`` to run after every modification with runtime state (once per hook)."""
    if hook not in _RUNTIME_STATE_HOOKS:
        _RUNTIME_STATE_HOOKS.append(hook)
    return hook


def apply_modification(
    model: PreTrainedModel,
    spec: str | Modification,
    *,
    calibration: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    in_place: bool = False,
    progress: bool = False,
) -> PreTrainedModel:
    """Return a modified copy of ``model`` (or ``model`` itself with ``in_place``), recording the spec in its config.

    ``tokenizer`` is the model's, for a backend whose library needs one (llm-compressor's ``gptq-w4a16``); without
    it, such a backend loads the one ``model.name_or_path`` holds, and refuses the model before any weight changes if
    there is none.

    A quantized ``model`` is never copied (that would corrupt some backends' packed state): it is refused, unless
    ``in_place``. Backends that quantize while loading (bitsandbytes, torchao) always return a new model, built
    from a temporary save of ``model``.

    A modification with runtime state (activation quantization) is then handed to the hooks of
    :func:`on_runtime_state`: with :mod:`hemorrhage_hf.integrations` imported (``hemorrhage_hf.apply_modification``
    imports it) it records itself as the model's ``quantization_config``, so that ``save_pretrained`` →
    ``from_pretrained`` restores it.
    """
    modification = parse_spec(spec) if isinstance(spec, str) else spec
    if tokenizer is not None:
        modification = modification.with_tokenizer(tokenizer)
    if modification.needs_calibration:
        check_calibration(calibration, model, modification)
    if in_place and not modification.builds_new_model:
        target = modification.apply(model, calibration, progress=progress)
    else:
        target = modification.modified_copy(model, calibration, progress=progress)
    setattr(target.config, MODIFICATION_ATTRIBUTE, modification.spec)
    if modification.runtime_state:
        for hook in _RUNTIME_STATE_HOOKS:
            hook(target, modification.spec)
    return target


def check_calibration(calibration: torch.Tensor | None, model: PreTrainedModel, modification: Modification) -> None:
    """Refuse calibration data that is missing, malformed or too short, before any weight changes."""
    if calibration is None:
        raise ModificationError(f"{modification.spec} needs calibration data (a [n, seq_len] tensor of token ids)")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
        raise ModificationError("calibration must be a 2-D integer tensor of token ids [n_sequences, seq_len]")
    if calibration.numel() < MIN_CALIBRATION_TOKENS:
        raise ModificationError(
            f"calibration too short for {modification.spec}: {calibration.numel()} tokens "
            f"({calibration.shape[0]} × {calibration.shape[1]}), at least {MIN_CALIBRATION_TOKENS} needed"
        )
    vocab_size = model.get_input_embeddings().num_embeddings
    if int(calibration.min()) < 0 or int(calibration.max()) >= vocab_size:
        raise ModificationError(f"calibration token ids must lie in [0, {vocab_size}) for this model")


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
