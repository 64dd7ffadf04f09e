"""Loading never measures garbage: a checkpoint whose weights do not all load is refused, naming keys and cause."""

import importlib.util
import shutil

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from hemorrhage_hf.comparison import TextSource, compare
from hemorrhage_hf.errors import ModelLoadError
from hemorrhage_hf.models import default_model_dir, load_model


def _with_tokenizer(folder):
    for tokenizer_file in default_model_dir().glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)


def _save_without(folder, *removed: str, added: dict | None = None) -> None:
    tiny_llama(n_layers=1).save_pretrained(folder)
    _with_tokenizer(folder)
    weights = load_file(folder / "model.safetensors")
    for key in removed:
        del weights[key]
    weights.update(added or {})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_missing_a_weight_is_refused(tmp_path):
    _save_without(tmp_path, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ModelLoadError, match=r"random initialisation: missing model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(str(tmp_path))


def test_a_checkpoint_with_unused_weights_is_refused_before_measuring(tmp_path):
    _save_without(tmp_path, added={"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    with pytest.raises(ModelLoadError, match=r"unexpected model\.layers\.0\.mlp\.extra\.weight"):
        compare("default", str(tmp_path), source=TextSource(text="Some words to measure on.", window=8))


@pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="hqq is not installed (make install adds it)")
def test_a_checkpoint_in_hqq_own_format_names_it(tmp_path):
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    model = tiny_llama(n_layers=1, hidden=64)
    AutoHQQHFModel.quantize_model(
        model, quant_config=BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu"
    )
    _with_tokenizer(tmp_path)
    model.save_pretrained(tmp_path)  # HQQ's own keys (W_q, meta...): transformers leaves the Linear weights random
    with pytest.raises(ModelLoadError, match=r"missing model\.layers\.0\..*HQQ's own save format"):
        load_model(str(tmp_path))
