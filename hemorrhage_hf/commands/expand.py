"""``hemorrhage-hf expand``: save a depth-expanded checkpoint with its layer map."""

from __future__ import annotations

from .common import add_spec_command

EPILOG = """examples:
  hemorrhage-hf expand --reference default --modification expand-identity-4 --output out/identity-4
  hemorrhage-hf expand --reference default --modification expand-dup-4 --output out/dup-4
  hemorrhage-hf report --reference default --modified out/dup-4 --attention --output out/report
"""


def add_parser(subparsers) -> None:
    add_spec_command(
        subparsers,
        name="expand",
        family="expansion",
        description="Insert copies of decoder layers into a copy of REF and save it as safetensors with its "
        "tokenizer: expand-dup-K (depth up-scaling) or expand-identity-K (LLaMA-Pro: zeroed output projections, "
        "so the model is unchanged until trained). config.json records hemorrhage_layer_map, which the report "
        "command uses to compare layers.",
        epilog=EPILOG,
    )
