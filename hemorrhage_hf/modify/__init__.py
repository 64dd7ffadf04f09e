"""Modifications that cause hemorrhage, each addressable by a spec string (see :func:`parse_spec`)."""

from . import act_quant, backends, expansion, gptq, kv_quant, mixed, pruning, quantization, scaling, structured  # noqa: F401  (register their specs)
from .act_quant import ActivationQuantization
from .backends import BackendQuantization, describe_model
from .base import Modification, apply_modification, known_specs, parse_spec, register, target_linears
from .detect import quantized_backend
from .expansion import LayerExpansion
from .footprint import WeightFootprint, linear_footprint
from .gptq import GptqQuantization
from .kv_quant import KVCacheQuantization
from .mixed import MixedPrecision
from .pruning import WeightPruning, measured_sparsity
from .quantization import WeightQuantization
from .scaling import ActivationAwareScaling
from .structured import ChannelPruning, HeadPruning, LayerRemoval

__all__ = [
    "ActivationAwareScaling",
    "ActivationQuantization",
    "BackendQuantization",
    "ChannelPruning",
    "GptqQuantization",
    "HeadPruning",
    "KVCacheQuantization",
    "LayerExpansion",
    "LayerRemoval",
    "MixedPrecision",
    "Modification",
    "WeightFootprint",
    "WeightPruning",
    "WeightQuantization",
    "apply_modification",
    "describe_model",
    "known_specs",
    "linear_footprint",
    "measured_sparsity",
    "parse_spec",
    "quantized_backend",
    "register",
    "target_linears",
]
