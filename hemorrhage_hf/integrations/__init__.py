"""Where hemorrhage-hf plugs into the Hugging Face stack: a transformers quantizer (registered on import) and
Optimum-style quantizer, pruner and expander classes."""

from .optimum import HemorrhageExpander, HemorrhagePruner, HemorrhageQuantizer
from .transformers import HemorrhageHfQuantizer, HemorrhageQuantConfig, register_with_transformers

__all__ = [
    "HemorrhageExpander",
    "HemorrhageHfQuantizer",
    "HemorrhagePruner",
    "HemorrhageQuantConfig",
    "HemorrhageQuantizer",
    "register_with_transformers",
]
