"""Progress bars say what runs: which level is measured, and the modification being applied meanwhile."""

import torch
from conftest import tiny_llama

from hemorrhage_hf.corpus import make_windows
from hemorrhage_hf.sweep.runner import SweepOptions, run_sweep


def test_sweep_bars_name_the_level_and_the_quantization(tmp_path, capsys):
    windows = make_windows(torch.arange(200) * 7 % 64, window=40)
    options = SweepOptions(top_k=8, cache_root=tmp_path, progress=True)
    run_sweep(tiny_llama(hidden=64), None, windows, "bits", ["32", "8"], options=options)
    printed = capsys.readouterr().err
    assert "level 32 (unmodified)" in printed and "level 8 (int8-g64)" in printed
    assert "quantizing int8-g64" in printed
