"""``hemorrhage-hf prune``: save a pruned checkpoint that plain transformers loads."""

from __future__ import annotations

from .common import add_spec_command

EPILOG = """examples:
  hemorrhage-hf prune --reference default --modification wanda-50 --output out/wanda-50
  hemorrhage-hf prune --reference default --modification 2:4-gradient --calibration-sequences 32 \\
      --output out/2-4-gradient
  hemorrhage-hf prune --reference default --modification heads-25 --output out/heads
  hemorrhage-hf report --reference default --modified out/wanda-50 --output out/report

specs: {magnitude,wanda,gradient}-P (P % of every row), N:M-{magnitude,wanda,gradient} (keep N of every M),
  heads-P, channels-P (attention heads, MLP channels), layers-K (remove K decoder layers)
"""


def add_parser(subparsers) -> None:
    add_spec_command(
        subparsers,
        name="prune",
        family="pruning",
        description="Prune a copy of REF with SPEC and save it as safetensors with its tokenizer. The sparsity "
        "reached per layer is recorded in config.json (hemorrhage_sparsity); structured pruning shrinks the "
        "shapes and the config, and layer removal records the layer map the report command uses.",
        epilog=EPILOG,
    )
