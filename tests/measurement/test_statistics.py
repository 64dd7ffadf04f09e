"""Standard errors against series whose true uncertainty is known: AR(1) processes have an analytic variance of the
mean, so the batch-means SE, its t interval and the paired test are checked by simulation, not by their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hemorrhage_hf.measurement.statistics import (
    block_standard_error,
    iid_standard_error,
    mcnemar_exact,
    paired_difference,
)

SERIES, LENGTH = 600, 4096


def ar1(rho: float, series: int = SERIES, length: int = LENGTH, seed: int = 0) -> np.ndarray:
    """Stationary AR(1) rows x_t = ρ x_{t−1} + e_t with unit innovations (γ₀ = 1/(1−ρ²))."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((series, length))
    values = np.empty_like(noise)
    values[:, 0] = noise[:, 0] / math.sqrt(1 - rho**2)
    for t in range(1, length):
        values[:, t] = rho * values[:, t - 1] + noise[:, t]
    return values


def ar1_variance_of_mean(rho: float, n: int) -> float:
    """Exact Var(x̄) of n consecutive stationary AR(1) values: γ₀/n · [1 + 2 Σ_k (1 − k/n) ρ^k]."""
    lags = np.arange(1, n)
    return (1 / (1 - rho**2)) / n * (1 + 2 * np.sum((1 - lags / n) * rho**lags))


def test_block_se_matches_the_analytic_variance_of_an_ar1_mean():
    rho = 0.5
    values = ar1(rho)
    true_variance = ar1_variance_of_mean(rho, LENGTH)
    # The simulation itself is right: the spread of the 600 means matches the formula (sampling error ~6 %).
    assert np.var(values.mean(axis=1)) == pytest.approx(true_variance, rel=0.15)
    block = np.array([block_standard_error(row) for row in values])
    iid = np.array([iid_standard_error(row) for row in values])
    # Batch means with blocks of 64 recover Var(x̄) (bias ≈ −Σ_k 2kγ_k/(bσ²) ≈ −2 % here) ...
    assert np.mean(block**2) == pytest.approx(true_variance, rel=0.06)
    # ... where the i.i.d. SE sees a third of it: (1 − ρ)/(1 + ρ).
    assert np.mean(iid**2) / true_variance == pytest.approx((1 - rho) / (1 + rho), rel=0.05)


def test_block_t_interval_covers_the_true_mean_95_percent_of_the_time():
    values = ar1(0.5, seed=1)
    means = values.mean(axis=1)
    block = np.array([block_standard_error(row) for row in values])
    iid = np.array([iid_standard_error(row) for row in values])
    t975 = 1.998  # Student t, 63 degrees of freedom (64 blocks of 64)
    block_coverage = np.mean(np.abs(means) <= t975 * block)
    iid_coverage = np.mean(np.abs(means) <= 1.96 * iid)
    # 600 intervals: binomial sd of a 95 % coverage is 0.9 points.
    assert 0.925 <= block_coverage <= 0.975
    assert iid_coverage < 0.80


def test_block_se_of_independent_values_is_the_iid_se():
    values = np.random.default_rng(2).standard_normal((SERIES, LENGTH))
    ratio = np.array([block_standard_error(row) / iid_standard_error(row) for row in values])
    assert np.mean(ratio) == pytest.approx(1.0, abs=0.02)


def test_iid_se_is_llama_cpp_sd_over_root_n_minus_1():
    values = np.random.default_rng(3).exponential(size=257)
    population_sd = math.sqrt(sum((v - values.mean()) ** 2 for v in values) / len(values))
    assert iid_standard_error(values) == pytest.approx(population_sd / math.sqrt(256), rel=1e-12)
    # Blocks of one token are the i.i.d. estimator, exactly.
    assert block_standard_error(values, block_size=1) == pytest.approx(iid_standard_error(values), rel=1e-12)


def test_short_series_fall_back_to_the_iid_se():
    assert math.isnan(block_standard_error([1.0]))
    assert block_standard_error([1.0, 2.0, 4.0]) == iid_standard_error([1.0, 2.0, 4.0])
    # A requested block that leaves fewer than two blocks falls back too, instead of dividing by zero.
    assert block_standard_error(np.arange(10.0), block_size=8) == iid_standard_error(np.arange(10.0))
    with pytest.raises(ValueError, match="block_size"):
        block_standard_error(np.arange(10.0), block_size=0)


def test_paired_test_holds_its_size_on_correlated_differences_and_finds_a_real_one():
    rho = 0.5
    shared = np.abs(ar1(0.3, seed=4)) * 3  # what both candidates' per-token values share
    difference = ar1(rho, seed=5) * 0.1
    null_p = np.array([paired_difference(s + d, s)["p_value"] for s, d in zip(shared, difference)])
    # Under "no difference" the test rejects ~5 % (binomial sd 0.9 points over 600) ...
    assert 0.025 <= np.mean(null_p < 0.05) <= 0.08
    # ... where a test on the i.i.d. SE would reject far more often.
    iid_z = np.array([d.mean() / iid_standard_error(d) for d in difference])
    assert np.mean(np.abs(iid_z) > 1.96) > 0.15
    shifted = paired_difference(shared[0] + difference[0] + 0.02, shared[0])
    true_error = math.sqrt(ar1_variance_of_mean(rho, LENGTH)) * 0.1
    assert shifted["p_value"] < 1e-3
    assert 0 < shifted["ci_low"] < shifted["ci_high"]
    assert shifted["standard_error"] == pytest.approx(true_error, rel=0.35)
    assert shifted["standard_error"] > 1.3 * shifted["standard_error_iid"]


def test_paired_difference_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same tokens"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0], [2.0])


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (3, 3), (2, 9), (9, 2), (17, 40), (120, 95)])
def test_mcnemar_exact_is_the_two_sided_binomial_tail(b, c):
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n if n else 0.5
    assert mcnemar_exact(b, c) == pytest.approx(min(1.0, 2 * tail), rel=1e-9)
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 3)
