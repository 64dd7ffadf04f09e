"""Where hemorrhage-hf plugs into the Hugging Face stack: a transformers quantizer (registered on import, so that
``import hemorrhage_hf`` suffices to reload its checkpoints) and Optimum-style quantizer, pruner and expander
classes (these need the ``optimum`` extra and load on first use)."""

from .transformers import HemorrhageHfQuantizer, HemorrhageQuantConfig, register_with_transformers

_OPTIMUM_STYLE = ("HemorrhageExpander", "HemorrhagePruner", "HemorrhageQuantizer")

__all__ = ["HemorrhageHfQuantizer", "HemorrhageQuantConfig", "register_with_transformers", *_OPTIMUM_STYLE]


def __getattr__(name: str):
    if name in _OPTIMUM_STYLE:
        try:
            from . import optimum
        except ImportError as error:
            raise ImportError(f"{name} needs optimum: pip install 'hemorrhage-hf[optimum]' ({error})") from error
        return getattr(optimum, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
