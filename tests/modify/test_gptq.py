"""GPTQ rounding: onto the RTN format's grid, with less output error than RTN where the inputs are correlated, on
tokens it was fitted on and on fresh ones from the same distribution; composed with awq and mixed formats."""

import pytest
import torch
from conftest import tiny_llama

from hemorrhage_hf.errors import ModificationError, SpecError
from hemorrhage_hf.modify import GptqQuantization, apply_modification, parse_spec
from hemorrhage_hf.modify.gptq_ops import gptq_round
from hemorrhage_hf.modify.quant_ops import group_grid

CALIBRATION = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))


def _correlated_inputs(n: int, seed: int, channels: int = 96) -> torch.Tensor:
    """Rows whose channels share a few latent factors, as a layer's inputs do."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, channels, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 8, generator=generator) @ mixing + 0.1 * torch.randn(n, channels, generator=generator)


def _output_error(rounded: torch.Tensor, weight: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(((rounded - weight) @ inputs.T).square().sum())


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_stays_on_the_grid_and_cuts_output_error_on_fitted_and_fresh_inputs(symmetric):
    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(1))
    fitted, fresh = _correlated_inputs(2048, seed=2), _correlated_inputs(2048, seed=3)
    grid = group_grid(weight, bits=3, group_size=32, symmetric=symmetric)
    rounded = gptq_round(weight, fitted.T @ fitted, grid, damping=0.01)

    assert torch.equal(grid.round(rounded), rounded)  # every weight is a grid point
    assert not torch.equal(rounded, grid.round(weight))
    for inputs in (fitted, fresh):
        assert _output_error(rounded, weight, inputs) < 0.5 * _output_error(grid.round(weight), weight, inputs)


def test_channels_the_calibration_never_saw_round_to_nearest():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    inputs = _correlated_inputs(256, seed=5, channels=64)
    inputs[:, 10] = 0
    grid = group_grid(weight, bits=4, group_size=None, symmetric=True)
    rounded = gptq_round(weight, inputs.T @ inputs, grid)
    assert torch.equal(rounded[:, 10], grid.round(weight)[:, 10])
    assert not torch.equal(rounded, grid.round(weight))


def _layer_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.dim() == 2 and ".layers." in name}


def _most_values_per_group(weight: torch.Tensor, group_size: int) -> int:
    """The most distinct values any (row, group) holds: at most 2^bits on a b-bit grid, whatever its range."""
    groups = weight.reshape(-1, group_size)
    return max(len(group.unique()) for group in groups)


def test_gptq_rounds_each_layer_onto_the_grid_of_its_own_format():
    model = tiny_llama(n_layers=3, hidden=64, heads=4, kv_heads=2)
    original = _layer_weights(model)
    mixed = _layer_weights(apply_modification(model, "gptq-int4-g32-asym+int8@layers.1.mlp", calibration=CALIBRATION))
    rtn = _layer_weights(apply_modification(model, "int4-g32-asym+int8@layers.1.mlp"))
    for name, weight in mixed.items():
        grid = parse_spec("int8" if "layers.1.mlp" in name else "int4-g32-asym").grid(original[name])
        assert torch.equal(grid.round(weight), weight), name
        assert not torch.equal(weight, rtn[name]), name


def test_awq_gptq_rounds_after_scaling_onto_grids_of_the_right_width():
    model = tiny_llama(n_layers=3, hidden=64, heads=4, kv_heads=2)
    spec = "awq-gptq-int4-g32-asym+int8@layers.1.mlp"
    rounded = _layer_weights(apply_modification(model, spec, calibration=CALIBRATION))
    rtn = _layer_weights(apply_modification(model, spec.replace("gptq-", ""), calibration=CALIBRATION))
    for name, weight in rounded.items():
        if "layers.1.mlp" in name:
            assert 16 < _most_values_per_group(weight, 32) and _most_values_per_group(weight, weight.shape[1]) <= 256
        else:
            assert _most_values_per_group(weight, 32) <= 16, name
        assert not torch.equal(weight, rtn[name]), name


def test_gptq_costs_its_grid_footprint_and_refuses_no_damping_and_linears_it_would_leave_unrounded():
    model = tiny_llama(n_layers=1, hidden=64, heads=4, kv_heads=2)
    assert parse_spec("gptq-int4-g64-asym").footprint(model) == parse_spec("int4-g64-asym").footprint(model)
    assert parse_spec("gptq-int4-g64-asym").needs_calibration
    with pytest.raises(SpecError, match="damping must be positive"):
        GptqQuantization(4, 64, damping=0)
    model.model.adapter = torch.nn.Linear(64, 64)
    for spec in ("gptq-int4-g32", "awq-gptq-int4-g32"):
        with pytest.raises(ModificationError, match="model.adapter lie outside them"):
            apply_modification(model, spec, calibration=CALIBRATION)
