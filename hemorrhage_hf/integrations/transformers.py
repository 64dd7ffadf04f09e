"""hemorrhage-hf quantization as a transformers quantizer: ``from_pretrained(..., quantization_config=...)``.

``HemorrhageQuantConfig(spec=...)`` accepts every quantization spec (``int4-g64``, ``w8a8``, ``awq-int3-g128``,
``smooth-w8a8``...). Loading a full-precision checkpoint with it quantizes the model as it loads (calibrating on
the tokens the config names, with the tokenizer saved beside the weights); ``save_pretrained`` writes the config
into config.json, and loading that checkpoint again restores what the weights cannot carry (the activation
quantizers of ``w8a8``), because importing :mod:`hemorrhage_hf` registers the quantizer with transformers.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> from hemorrhage_hf.integrations import HemorrhageQuantConfig
    >>> model = AutoModelForCausalLM.from_pretrained(
    ...     "path/to/model", quantization_config=HemorrhageQuantConfig(spec="awq-int4-g64"))  # doctest: +SKIP
    >>> model.config.hemorrhage_scaling["groups"]["model.layers.0.mlp.down_proj"]  # doctest: +SKIP
    {'exponent': 0.45, 'error_unscaled': ..., 'error': ...}
"""

from __future__ import annotations

from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..corpus import PYTHON_DOCS
from ..errors import HemorrhageError, SpecError
from ..models import load_tokenizer
from ..modify import BackendQuantization, Modification, apply_modification, parse_spec
from ..modify.base import on_runtime_state
from ..modify.calibration import CalibrationSettings

QUANT_METHOD = "hemorrhage"


class HemorrhageQuantConfig(QuantizationConfigMixin):
    """A hemorrhage-hf quantization spec and the calibration it needs, as a transformers quantization config."""

    def __init__(
        self,
        spec: str = "int4-g64",
        calibration_source: str = PYTHON_DOCS,
        calibration_sequences: int = 16,
        calibration_length: int = 512,
        calibration_seed: int = 0,
        **kwargs,
    ):
        modification = parse_spec(spec)
        if modification.family != "quantization":
            raise SpecError(
                f"{spec!r} is a {modification.family} spec; a quantization config takes quantization specs "
                "(int4-g64, w8a8, awq-int4-g64...) — use HemorrhagePruner or `hemorrhage-hf prune` for pruning"
            )
        if isinstance(modification, BackendQuantization):
            raise SpecError(
                f"{spec!r} is made by {modification.distribution}: load with that library's own config "
                "(BitsAndBytesConfig, TorchAoConfig...), or build it with apply_modification(model, spec)"
            )
        self.quant_method = QUANT_METHOD
        self.spec = modification.spec
        self.calibration_source = calibration_source
        self.calibration_sequences = calibration_sequences
        self.calibration_length = calibration_length
        self.calibration_seed = calibration_seed

    def modification(self) -> Modification:
        return parse_spec(self.spec)

    def calibration_settings(self) -> CalibrationSettings:
        return CalibrationSettings(
            self.calibration_source, self.calibration_sequences, self.calibration_length, self.calibration_seed
        )


class HemorrhageHfQuantizer(HfQuantizer):
    """Applies the config's modification after the weights load, or restores it on a checkpoint that has it."""

    requires_calibration = False

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        modification = self.quantization_config.modification()
        if self.pre_quantized:
            return modification.restore(model)
        calibration = None
        if modification.needs_calibration:
            tokenizer = load_tokenizer(model.name_or_path)
            calibration = self.quantization_config.calibration_settings().windows(tokenizer)
        return apply_modification(model, modification, calibration=calibration, in_place=True)

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


@on_runtime_state
def attach_quantization_config(model: PreTrainedModel, spec: str) -> None:
    """Mark a model modified outside ``from_pretrained`` as hemorrhage-quantized, so its checkpoint restores it."""
    existing = getattr(model.config, "quantization_config", None)
    if isinstance(existing, HemorrhageQuantConfig) and existing.spec == spec:
        return
    config = HemorrhageQuantConfig(spec=spec)
    model.config.quantization_config = config
    model.hf_quantizer = HemorrhageHfQuantizer(config, pre_quantized=True)


def register_with_transformers() -> None:
    """Register the config and quantizer under ``quant_method="hemorrhage"``; calling it again is harmless.

    transformers refuses a second registration of a name. A re-executed copy of this module (``importlib.reload``)
    replaces its earlier classes; a different package's ``"hemorrhage"`` is an error, not silently overwritten.
    """
    for mapping, cls, decorator in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, HemorrhageQuantConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, HemorrhageHfQuantizer, register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is not None:
            if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
                raise HemorrhageError(
                    f"transformers already has a {QUANT_METHOD!r} quantization registered by "
                    f"{existing.__module__}.{existing.__qualname__}"
                )
            del mapping[QUANT_METHOD]
        decorator(QUANT_METHOD)(cls)


register_with_transformers()
