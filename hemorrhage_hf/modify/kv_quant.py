"""KV-cache quantization (``kv4``, ``kv8``, ``kv2-g32``...): every key and value a layer writes to its cache is
quantized per token, asymmetrically, in groups of channels (one head's channels by default).

Keys are quantized as the ``k_proj`` output, before the rotary embedding, as KVQuant's pre-RoPE key quantization
does: the quantizer is then a forward hook on ``k_proj``/``v_proj`` and needs nothing of the attention code, so it
works with every attention implementation (eager, which attention divergence needs, included). Each token's key
and value are rounded once, when written, so a teacher-forced pass sees exactly what generation with such a cache
would see. Unlike transformers' ``QuantizedCache``, no recent tokens are kept in full precision: this is the cost of
quantizing the whole cache. Like ``w8a8``, the hooks are runtime state, restored from ``quantization_config``.

Example:
    >>> from hemorrhage_hf.modify import parse_spec
    >>> parse_spec("kv4")
    KVCacheQuantization('kv4')
    >>> parse_spec("kv2-g32").group_size
    32
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..errors import SpecError
from .architecture import decoder_blocks
from .base import Modification, register
from .quant_ops import fake_quantize
from .quantization import check_bits


class CacheEntryQuantizer:
    """Forward hook that rounds a key or value projection's output per token, in groups of channels."""

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = output.reshape(-1, output.shape[-1])
        return fake_quantize(rows, bits=self.bits, group_size=self.group_size, symmetric=False).reshape(output.shape)

    def __repr__(self) -> str:
        return f"CacheEntryQuantizer(bits={self.bits}, group_size={self.group_size})"


class KVCacheQuantization(Modification):
    runtime_state = True

    def __init__(self, bits: int, group_size: int | None = None):
        check_bits(bits, "KV-cache")
        if group_size is not None and group_size < 1:
            raise SpecError(f"group size must be a positive integer, got {group_size}")
        self.bits, self.group_size = bits, group_size

    @property
    def spec(self) -> str:
        return f"kv{self.bits}{f'-g{self.group_size}' if self.group_size else ''}"

    def apply(
        self, model: PreTrainedModel, calibration: torch.Tensor | None = None, *, progress: bool = False
    ) -> PreTrainedModel:
        return self.restore(model)

    def restore(self, model: PreTrainedModel) -> PreTrainedModel:
        """Install the quantizers on every layer's key and value projections (once: again changes nothing)."""
        head_dim = (
            getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        )
        group_size = self.group_size or head_dim
        projections = [proj for block in decoder_blocks(model) for proj in (block.k_proj, block.v_proj)]
        too_narrow = [proj.out_features for proj in projections if proj.out_features < group_size]
        if too_narrow:
            raise SpecError(f"group size {group_size} is larger than the key/value width ({too_narrow[0]} channels)")
        for projection in projections:
            if not any(isinstance(hook, CacheEntryQuantizer) for hook in projection._forward_hooks.values()):
                projection.register_forward_hook(CacheEntryQuantizer(self.bits, group_size))
        return model


@register(r"kv(?P<bits>\d+)(?:-g(?P<group>\d+))?", example="kv4")
def _kv_cache_quantization(match) -> KVCacheQuantization:
    group = match["group"]
    return KVCacheQuantization(int(match["bits"]), int(group) if group else None)
