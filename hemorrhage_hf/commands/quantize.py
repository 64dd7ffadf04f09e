"""``hemorrhage-hf quantize``: save a quantized checkpoint (RTN, W8A8, AWQ/SmoothQuant scaling)."""

from __future__ import annotations

from .common import add_spec_command

EPILOG = """examples:
  hemorrhage-hf quantize --reference default --modification int4-g64 --output out/int4-g64
  hemorrhage-hf quantize --reference default --modification awq-int3-g128 --calibration-sequences 128 \\
      --output out/awq-int3
  hemorrhage-hf quantize --reference ./my-model --modification smooth-w8a8 --calibration-text corpus.txt \\
      --output out/w8a8
  hemorrhage-hf report --reference default --modified out/awq-int3 --output out/report

specs: intB[-gG][-asym] (B = 2..8, groups of G inputs), wBaA[-gG] (per-token activations),
  awq-<spec> / smooth-<spec> (activation-aware scales, searched per layer and recorded in config.json)
"""


def add_parser(subparsers) -> None:
    add_spec_command(
        subparsers,
        name="quantize",
        family="quantization",
        description="Quantize a copy of REF with SPEC and save it as safetensors with its tokenizer. The "
        "checkpoint records the spec as its quantization_config: loading it with hemorrhage_hf imported restores "
        "run-time parts (activation quantizers); weight-only specs load with plain transformers too.",
        epilog=EPILOG,
    )
