"""CLI subcommands, one module each (see :mod:`hemorrhage_hf.cli`)."""
