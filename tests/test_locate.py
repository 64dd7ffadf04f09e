"""The hemorrhage map and the allocation it drives: exact mechanics on a tiny Llama, one real map on SmolLM2."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama

from hemorrhage_hf.corpus import make_windows, tokenize_corpus
from hemorrhage_hf.errors import HemorrhageError
from hemorrhage_hf.locate import HemorrhageMap, Unit, locate
from hemorrhage_hf.locate.allocate import allocate, measure_specs
from hemorrhage_hf.locate.stack import layer_inputs, resume
from hemorrhage_hf.measurement.engine import measure
from hemorrhage_hf.modify import apply_modification
from hemorrhage_hf.modify.architecture import decoder_layers

WINDOWS = make_windows(torch.randint(0, 64, (120,), generator=torch.Generator().manual_seed(0)), window=40)


@pytest.fixture(scope="module")
def reference():
    return tiny_llama(n_layers=4, hidden=64)


def test_resuming_from_any_layer_reproduces_the_full_pass_exactly(reference):
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    inputs, logits = layer_inputs(reference, ids)
    layers = list(decoder_layers(reference))
    assert len(inputs) == 4
    for start in range(4):
        assert torch.equal(resume(reference, layers[start:], inputs[start]), logits)
    assert list(decoder_layers(reference)) == layers  # the stack is put back


def test_damage_confined_to_one_mlp_is_located_there_exactly(reference):
    modified = copy.deepcopy(reference)
    with torch.no_grad():
        modified.model.layers[2].mlp.down_proj.weight.mul_(3.0)
    hmap = locate(reference, modified, WINDOWS, parts=True, progress=False)
    assert hmap.full_kl > 1e-4
    damaged, damaged_mlp = hmap.figures(Unit(2)), hmap.figures(Unit(2, "mlp"))
    # Only layer 2 differs, so modifying it alone is the whole modified model, and restoring it is the reference.
    assert damaged.isolated_kl == pytest.approx(hmap.full_kl, rel=1e-6)
    assert damaged_mlp.isolated_kl == pytest.approx(hmap.full_kl, rel=1e-6)
    assert damaged.restored_kl == pytest.approx(0, abs=1e-7)
    assert hmap.figures(Unit(2, "attn")).isolated_kl == pytest.approx(0, abs=1e-7)
    for layer in (0, 1, 3):
        assert hmap.figures(Unit(layer)).isolated_kl == pytest.approx(0, abs=1e-7)
        assert hmap.figures(Unit(layer)).restored_kl == pytest.approx(hmap.full_kl, rel=1e-6)
    assert hmap.ranked()[0] == (Unit(2), pytest.approx(1.0))
    assert hmap.concentration(1) == pytest.approx(1.0)


def test_damage_confined_to_one_linear_layer_is_located_on_it_exactly(reference, tmp_path):
    modified = copy.deepcopy(reference)
    with torch.no_grad():
        modified.model.layers[1].self_attn.v_proj.weight.mul_(3.0)
    hmap = locate(reference, modified, WINDOWS, linears=True, progress=False)
    assert hmap.full_kl > 1e-4 and not hmap.part_units() and len(hmap.linear_units()) == 4 * 7
    damaged = hmap.figures(Unit(1, "v_proj"))
    assert damaged.isolated_kl == pytest.approx(hmap.full_kl, rel=1e-6)
    assert damaged.restored_kl == pytest.approx(0, abs=1e-7)
    for unit in hmap.linear_units():
        if unit != Unit(1, "v_proj"):
            assert hmap.figures(unit).isolated_kl == pytest.approx(0, abs=1e-7), unit.name
            assert hmap.figures(unit).restored_kl == pytest.approx(hmap.full_kl, rel=1e-6), unit.name
    assert hmap.ranked(hmap.linear_units())[0] == (Unit(1, "v_proj"), pytest.approx(1.0))
    written = hmap.save(tmp_path)
    assert "|  | layers.1.v_proj | 100.0% |" in written["markdown"].read_text()
    assert HemorrhageMap.load(tmp_path).linear_units() == hmap.linear_units()


def test_a_map_by_linear_layer_refuses_scales_migrated_into_a_norm(reference):
    modified = apply_modification(reference, "awq-int4-g16", calibration=torch.randint(0, 64, (4, 64)))
    with pytest.raises(HemorrhageError, match="layer 0's input norm differs .* map by parts"):
        locate(reference, modified, WINDOWS, linears=True, progress=False)
    assert locate(reference, modified, WINDOWS[:1], parts=True, progress=False).part_units()


def test_the_map_agrees_with_the_measurement_engine_and_round_trips(reference, tmp_path):
    modified = apply_modification(reference, "int3-g16")
    hmap = locate(reference, modified, WINDOWS, progress=False, metadata={"modification": "int3-g16"})
    report = measure(reference, modified, WINDOWS, progress=False)
    assert hmap.n_tokens == report.figures["n_tokens"]
    assert hmap.full_kl == pytest.approx(report.figures["kl_mean"], rel=1e-5)
    written = hmap.save(tmp_path)
    assert written["plot"].stat().st_size > 10_000
    assert "top 3 layers" in written["markdown"].read_text()
    reloaded = HemorrhageMap.load(tmp_path)
    assert reloaded.ranked() == hmap.ranked() and reloaded.metadata["modification"] == "int3-g16"


def test_a_model_of_another_depth_is_refused(reference):
    shorter = tiny_llama(n_layers=3, hidden=64)
    with pytest.raises(HemorrhageError, match="4 and 3 decoder layers"):
        locate(reference, shorter, WINDOWS, progress=False)


def test_allocation_upgrades_the_damaged_part_first_and_keeps_the_budget(reference):
    modified = apply_modification(reference, "int3-g16")
    with torch.no_grad():  # on top of the rounding, much worse damage in one MLP
        modified.model.layers[1].mlp.up_proj.weight.add_(0.2 * torch.randn(128, 64, generator=torch.Generator()))
    hmap = locate(reference, modified, WINDOWS, parts=True, progress=False)
    allocation = allocate(reference, hmap, base="int3-g16", budget_bits=4.3)
    assert next(iter(allocation.upgrades)) == "layers.1.mlp"
    assert 4.0 < allocation.bits_per_weight <= 4.3
    with pytest.raises(HemorrhageError, match="below the lowest format, int3-g16 .4 bits per weight"):
        allocate(reference, hmap, base="int3-g16", budget_bits=3.9)
    with pytest.raises(HemorrhageError, match="unknown allocation family"):
        allocate(reference, hmap, base="int3-g16", budget_bits=4.5, family="sparsity")


def test_allocation_by_linear_layer_upgrades_the_damaged_one_alone(reference):
    modified = apply_modification(reference, "int3-g16")
    with torch.no_grad():  # on top of the rounding, much worse damage in one Linear layer
        modified.model.layers[2].self_attn.v_proj.weight.add_(0.3 * torch.randn(32, 64, generator=torch.Generator()))
    hmap = locate(reference, modified, WINDOWS, linears=True, progress=False)
    allocation = allocate(reference, hmap, base="int3-g16", budget_bits=4.05)
    assert next(iter(allocation.upgrades)) == "layers.2.v_proj"
    assert "@layers.2.v_proj" in allocation.spec and 4.0 < allocation.bits_per_weight <= 4.05
    with pytest.raises(HemorrhageError, match="allocates by parts: the map was measured by Linear layer only"):
        allocate(reference, hmap, base="awq-int3-g16", budget_bits=4.5)


@pytest.mark.heavy
def test_int4_map_of_smollm2_and_its_allocation_on_held_out_text(smollm2, wikitext_text, tmp_path):
    model, tokenizer = smollm2
    seen = tokenize_corpus(tokenizer, wikitext_text, window=128, max_tokens=128)
    held_out = tokenize_corpus(tokenizer, wikitext_text, window=256, max_tokens=256, skip_tokens=128)
    modified = apply_modification(model, "int4-g64")
    hmap = locate(model, modified, seen, progress=False)
    assert hmap.n_layers == 30 and 0.2 < hmap.full_kl < 1.0
    allocation = allocate(model, hmap, base="int4-g64", budget_bits=4.5)
    assert 4.25 < allocation.bits_per_weight <= 4.5
    base, mixed = measure_specs(model, tokenizer, held_out, ["int4-g64", allocation.spec], progress=False)
    assert mixed["kl_mean"] < 0.85 * base["kl_mean"] and mixed["vs_first"]["p_value"] < 0.05


def test_allocate_refuses_held_out_text_the_map_has_seen(tmp_path):
    (tmp_path / "map").mkdir()
    hmap = HemorrhageMap(0.5, 0.01, 512, [], {"corpus": "wiki.txt", "max_tokens": 512, "modification": "int4-g64"})
    (tmp_path / "map" / "locate.json").write_text(json.dumps(hmap.to_dict()))
    (tmp_path / "wiki.txt").write_text("text " * 100)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hemorrhage_hf.cli",
            "allocate",
            "--reference",
            "default",
            "--map",
            str(tmp_path / "map"),
        ]
        + ["--budget-bits", "4.5", "--text-file", "wiki.txt", "--skip-tokens", "100", "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2
    assert "would judge on tokens the map was measured on (the first 512 of wiki.txt)" in result.stderr
    assert not (tmp_path / "o").exists()
