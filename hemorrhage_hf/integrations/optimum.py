"""Optimum-style front ends: load a model, apply one spec, save a checkpoint plain transformers loads.

:class:`HemorrhageQuantizer` subclasses ``optimum.quantization_base.OptimumQuantizer``; :class:`HemorrhagePruner`
and :class:`HemorrhageExpander` have the same shape (Optimum has no pruning API of its own). The ``hemorrhage-hf
quantize|prune|expand`` commands are these classes.

Example:
    >>> from hemorrhage_hf.integrations import HemorrhagePruner, HemorrhageQuantizer
    >>> HemorrhageQuantizer.from_pretrained("default").quantize("out/int4", spec="awq-int4-g64")  # doctest: +SKIP
    PosixPath('out/int4')
    >>> HemorrhagePruner.from_pretrained("default").prune("out/wanda", spec="wanda-50")  # doctest: +SKIP
    PosixPath('out/wanda')
"""

from __future__ import annotations

from pathlib import Path

from optimum.quantization_base import OptimumQuantizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import BackendError, HemorrhageError, SpecError
from ..models import load_model, load_tokenizer
from ..modify import Modification, apply_modification, parse_spec
from ..modify.calibration import CalibrationSettings


class _SpecApplier:
    """Holds a model and its tokenizer; applies a spec of one family to a copy and saves it as safetensors."""

    family: str

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | Path | PreTrainedModel,
        file_name: str | None = None,
        *,
        dtype: str = "fp32",
        trust_remote_code: bool = False,
    ):
        """A model object, ``"default"``, a checkpoint folder, a Hub id, or a folder plus a ``.gguf`` ``file_name``."""
        if isinstance(model_or_path, PreTrainedModel):
            return cls(model_or_path, load_tokenizer(model_or_path.name_or_path, trust_remote_code=trust_remote_code))
        source = str(Path(model_or_path) / file_name) if file_name else str(model_or_path)
        return cls(*load_model(source, dtype=dtype, trust_remote_code=trust_remote_code))

    @classmethod
    def check_spec(cls, spec: str) -> Modification:
        """The spec's modification; :class:`SpecError` if it is malformed or of another family."""
        modification = parse_spec(spec)
        if modification.family != cls.family:
            raise SpecError(f"{spec!r} is a {modification.family} spec, not a {cls.family} one")
        if not modification.saveable:
            raise BackendError(
                f"{spec} cannot be saved: {modification.not_saveable_reason}. Measure it without saving: "
                f"hemorrhage-hf report --reference REF --modification {spec}"
            )
        return modification

    def apply_and_save(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        *,
        spec: str,
        calibration: CalibrationSettings | None = None,
        progress: bool = True,
    ) -> Path:
        """Apply ``spec`` to a copy of the model; save weights (safetensors), config and tokenizer in ``save_dir``."""
        if file_prefix is not None:
            raise HemorrhageError("file_prefix is not supported: checkpoints are saved under transformers' own names")
        modification = self.check_spec(spec)
        calibration_ids = (
            (calibration or CalibrationSettings()).windows(self.tokenizer) if modification.needs_calibration else None
        )
        modified = apply_modification(
            self.model, modification, calibration=calibration_ids, tokenizer=self.tokenizer, progress=progress
        )
        save_dir = Path(save_dir)
        modification.save(modified, save_dir)
        self.tokenizer.save_pretrained(save_dir)
        return save_dir


class HemorrhageQuantizer(_SpecApplier, OptimumQuantizer):
    family = "quantization"

    def quantize(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        *,
        spec: str = "int4-g64",
        calibration: CalibrationSettings | None = None,
        progress: bool = True,
    ) -> Path:
        """Quantize a copy of the model with ``spec`` and save it (safetensors, config, tokenizer) in ``save_dir``."""
        return self.apply_and_save(save_dir, file_prefix, spec=spec, calibration=calibration, progress=progress)


class HemorrhagePruner(_SpecApplier):
    family = "pruning"

    def prune(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        *,
        spec: str = "wanda-50",
        calibration: CalibrationSettings | None = None,
        progress: bool = True,
    ) -> Path:
        """Prune a copy of the model with ``spec`` and save it in ``save_dir``; it loads with plain transformers."""
        return self.apply_and_save(save_dir, file_prefix, spec=spec, calibration=calibration, progress=progress)


class HemorrhageExpander(_SpecApplier):
    family = "expansion"

    def expand(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        *,
        spec: str = "expand-identity-4",
        progress: bool = True,
    ) -> Path:
        """Expand a copy of the model with ``spec`` and save it in ``save_dir``; it loads with plain transformers."""
        return self.apply_and_save(save_dir, file_prefix, spec=spec, progress=progress)


#: The front end for each modification family (the CLI's quantize, prune and expand commands use these).
APPLIERS: dict[str, type[_SpecApplier]] = {
    applier.family: applier for applier in (HemorrhageQuantizer, HemorrhagePruner, HemorrhageExpander)
}
