"""``hemorrhage-hf export-gguf``: the reference as GGUF files made by llama.cpp's own converter and quantizer."""

from __future__ import annotations

import argparse

from .common import add_reference_argument

EPILOG = """examples:
  hemorrhage-hf export-gguf --reference default --type Q8_0,Q4_K_M,Q4_0,Q2_K --output gguf/
  hemorrhage-hf export-gguf --reference ./my-model --type Q4_K_M --imatrix-text wiki.train.raw --output gguf/

then measure each file as llama.cpp runs it:
  hemorrhage-hf report --reference gguf/SmolLM2-135M-Instruct-f32.gguf \\
      --modified gguf/SmolLM2-135M-Instruct-Q4_K_M.gguf --engine llama.cpp --scoring llama.cpp --output out/

needs llama.cpp's programs: `hemorrhage-hf install-llama-cpp` (run by `make install`).
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-gguf",
        help="convert the reference to GGUF and quantize it with llama.cpp's own tools",
        description="Convert the reference (a transformers checkpoint, not a .gguf) with llama.cpp's "
        "convert_hf_to_gguf.py to an f32 (or bf16) GGUF and quantize it with llama-quantize to each --type, "
        "optionally weighing rounding errors by an importance matrix computed with llama-imatrix on calibration "
        "text. Files already in --output are kept.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reference_argument(parser)
    parser.add_argument("--type", required=True, metavar="T,T,...", help="e.g. Q8_0,Q4_K_M,Q4_0,Q2_K")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the .gguf files")
    parser.add_argument(
        "--outtype", choices=("f32", "bf16", "f16"), default="f32", help="the converted reference (default: f32)"
    )
    parser.add_argument("--imatrix-text", metavar="F", help="UTF-8 text to compute an importance matrix on")
    parser.add_argument(
        "--imatrix-chunks", type=int, default=32, metavar="N", help="chunks of --window for the matrix (default: 32)"
    )
    parser.add_argument("--window", type=int, default=512, metavar="W", help="imatrix chunk length (default: 512)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..llamacpp.export import export_gguf, parse_types

    types = parse_types(args.type)  # a bad type fails before any conversion
    files = export_gguf(
        args.reference,
        types,
        args.output,
        outtype=args.outtype,
        imatrix_text=args.imatrix_text,
        imatrix_chunks=args.imatrix_chunks,
        window=args.window,
    )
    for name, path in files.items():
        print(f"{name:<8} {path}  ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0
