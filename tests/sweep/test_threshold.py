"""The threshold rules on synthetic curves whose knee is known."""

import math

import numpy as np
import pytest

from hemorrhage_hf.errors import HemorrhageError
from hemorrhage_hf.sweep.threshold import fit_breakpoint, tolerance_crossing

LEVELS = np.arange(10.0, 95.0, 5.0)
STEP = 5.0
#: Smooth curves of ln y with no threshold: a quadratic, a pure power law, a pure exponential.
SMOOTH = {
    "quadratic": 0.0005 * LEVELS**2,
    "power law": np.log(1e-3 * LEVELS**1.5),
    "exponential": 0.08 * LEVELS - 5,
}


def two_rate_curve(s, s0, before, after, noise, seed):
    """exp(before·s) up to s0, then exp at the faster rate ``after``, with multiplicative log-normal noise."""
    log_y = np.where(s <= s0, before * s, before * s0 + after * (s - s0))
    return np.exp(log_y + np.random.default_rng(seed).normal(0, noise, len(s)))


@pytest.mark.parametrize("shape", list(SMOOTH))
def test_smooth_curves_have_no_threshold_with_or_without_noise(shape):
    exact = fit_breakpoint(LEVELS, np.exp(SMOOTH[shape]))
    assert exact.strength is None and exact.leave_one_out, exact
    for seed in range(20):
        y = np.exp(SMOOTH[shape] + np.random.default_rng(seed).normal(0, 0.05, len(LEVELS)))
        for errors in (None, 0.05 * y):  # 5 % noise, with and without each level's standard error given
            fit = fit_breakpoint(LEVELS, y, errors, leave_one_out=False)
            assert fit.strength is None and fit.p_value > 0.01, (seed, fit)


def test_the_quadratic_of_the_report_loses_its_threshold():
    """ln y = 0.0005·s² bends upward everywhere; the χ² cut gave it s0 = 46 with likelihood ratio 29."""
    fit = fit_breakpoint(LEVELS, np.exp(0.0005 * LEVELS**2))
    assert fit.strength is None and fit.smooth_form == "quadratic in s" and "smooth curve" in fit.reason


@pytest.mark.parametrize("s0", [35.0, 52.5, 70.0])
def test_breakpoint_of_noisy_two_rate_curves_is_within_one_level_step(s0):
    fits = [
        fit_breakpoint(LEVELS, y, 0.05 * y, seed=seed, leave_one_out=False)
        for seed in range(30)
        for y in [two_rate_curve(LEVELS, s0, 0.03, 0.3, noise=0.05, seed=seed)]
    ]
    assert all(fit.reason == "fitted" and fit.p_value <= 0.01 for fit in fits)
    assert max(abs(fit.strength - s0) for fit in fits) < STEP
    assert all(fit.interval[1] - fit.interval[0] < 3 * STEP for fit in fits)
    fit = fits[0]
    assert fit.slope_before == pytest.approx(0.03, abs=0.01) and fit.slope_after == pytest.approx(0.3, rel=0.15)
    assert LEVELS[fit.below_index] <= fit.strength < LEVELS[fit.above_index]


@pytest.mark.parametrize("weighted", [True, False])
def test_interval_covers_the_true_knee_at_least_90_percent_of_the_time(weighted):
    """Nominal 95 %, over 200 simulated curves with 5 % noise and knees on and between levels."""
    covered = []
    for index in range(200):
        s0 = (35.0, 43.0, 52.5, 70.0)[index % 4]
        y = two_rate_curve(LEVELS, s0, 0.03, 0.3, noise=0.05, seed=1000 + index)
        fit = fit_breakpoint(LEVELS, y, 0.05 * y if weighted else None, seed=index, leave_one_out=False)
        covered.append(fit.strength is not None and fit.interval[0] <= s0 <= fit.interval[1])
    assert np.mean(covered) >= 0.90


def test_each_level_weighs_by_its_own_standard_error():
    """A weak level whose damage is mostly noise (0.004 ± 0.004 read as 3× its true size) must not move s0."""
    y = two_rate_curve(LEVELS, 60.0, 0.05, 0.4, noise=0.0, seed=0)
    noisy = y.copy()
    noisy[:3] *= (4.0, 0.25, 4.0)
    errors = 0.02 * y
    errors[:3] = noisy[:3]  # ± 100 %: these levels say almost nothing
    weighted, unweighted = fit_breakpoint(LEVELS, noisy, errors), fit_breakpoint(LEVELS, noisy)
    assert abs(weighted.strength - 60) < 0.1 and weighted.slope_before == pytest.approx(0.05, rel=0.01)
    assert weighted.interval[1] - weighted.interval[0] < 0.5
    # Read with equal weights, the three noisy levels bend the growth slope and spread the interval over levels.
    assert abs(unweighted.slope_before - 0.05) > 0.01 and unweighted.interval[1] - unweighted.interval[0] > STEP
    # Larger standard errors, wider interval.
    clean = two_rate_curve(LEVELS, 52.5, 0.03, 0.3, noise=0.02, seed=3)
    narrow, wide = (fit_breakpoint(LEVELS, clean, share * clean).interval for share in (0.02, 0.2))
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])


def test_leave_one_out_refits_show_how_much_each_level_moves_the_knee():
    y = two_rate_curve(LEVELS, 52.5, 0.03, 0.3, noise=0.05, seed=7)
    fit = fit_breakpoint(LEVELS, y, 0.05 * y)
    assert [refit["left_out"] for refit in fit.leave_one_out] == LEVELS.tolist()
    assert all(abs(refit["strength"] - 52.5) < STEP for refit in fit.leave_one_out)


def test_power_law_growth_then_exponential_collapse():
    """The paper's follow-up model: y = a·s^b up to s0, exponential beyond; the hinge finds s0."""
    s0 = 60.0
    y = np.where(LEVELS <= s0, 1e-3 * LEVELS**1.5, 1e-3 * s0**1.5 * np.exp(0.35 * (LEVELS - s0)))
    fit = fit_breakpoint(LEVELS, y)
    assert fit.reason == "fitted" and fit.growth == "power law" and abs(fit.strength - s0) < 1
    assert fit.interval[0] <= s0 <= fit.interval[1]
    assert fit.slope_before == pytest.approx(1.5 / s0, rel=0.05) and fit.slope_after == pytest.approx(0.35, rel=0.05)


def test_noise_free_knee_is_exact_and_sharp():
    s = np.arange(1.0, 11.0)
    fit = fit_breakpoint(s, np.exp(np.where(s <= 6, 0.1 * s, 0.6 + 1.0 * (s - 6))))
    assert fit.strength == pytest.approx(6.0, abs=1e-6)
    assert fit.interval[1] - fit.interval[0] < 0.1


def test_bits_swept_as_negative_strength():
    """KL of RTN grows ~4^−bits until it collapses; strength = −bits puts the collapse on the right."""
    bits = np.array([8, 7, 6, 5, 4, 3, 2], dtype=float)
    kl = np.where(bits >= 3, 0.0016 * 4.0 ** (8 - bits), 0.0016 * 4.0**5 * 20)
    fit = fit_breakpoint(-bits, kl)
    assert fit.reason == "fitted" and fit.growth == "exponential" and -fit.strength == pytest.approx(3, abs=0.5)


def test_a_plateau_after_collapse_is_left_out():
    """Collapse at 60, then the damage plateaus from 75 on: the plateau must not drag the breakpoint."""
    log_y = np.where(LEVELS <= 60, 0.03 * LEVELS, 1.8 + 0.3 * (LEVELS - 60))
    plateau = np.minimum(log_y, 1.8 + 0.3 * 15 + 0.01 * (LEVELS - 75))
    fit = fit_breakpoint(LEVELS, np.exp(plateau))
    assert fit.reason == "fitted" and abs(fit.strength - 60) < 1 and fit.n_points == list(LEVELS).index(75) + 1
    growth_then_plateau = fit_breakpoint(
        LEVELS, np.exp(np.where(LEVELS <= 50, 0.2 * LEVELS, 10 + 0.01 * (LEVELS - 50)))
    )
    assert growth_then_plateau.strength is None


def test_zero_and_infinite_damage_are_left_out_of_the_fit():
    values = two_rate_curve(LEVELS, 50, 0.03, 0.3, noise=0.0, seed=0)
    values[0], values[-1] = 0.0, math.inf
    fit = fit_breakpoint(LEVELS, values)
    assert fit.n_points == len(LEVELS) - 2 and abs(fit.strength - 50) < 1e-6
    assert fit_breakpoint([1, 2, 3, 4], [1, 2, 4, 100]).reason.startswith("4 levels")
    assert fit_breakpoint([1, 2, 3, 4, 5, 6], [1, 2, 4, 100, 101, 102]).reason.startswith("4 levels")  # a plateau


def test_tolerance_crossing_interpolates_in_log_space():
    crossing = tolerance_crossing([1, 2, 3, 4], [0.01, 0.05, 0.2, 2.0], tolerance=0.1)
    assert (crossing.last_within_index, crossing.first_beyond_index) == (1, 2)
    assert crossing.crossing_strength == pytest.approx(2.5)  # 0.1 is the geometric middle of 0.05 and 0.2


def test_tolerance_edge_cases():
    assert tolerance_crossing([1, 2], [0.01, 0.02], 0.1).reason == "every level is within the tolerance"
    first = tolerance_crossing([1, 2], [0.5, 0.7], 0.1)
    assert first.first_beyond_index == 0 and first.last_within_index is None
    collapsed = tolerance_crossing([1, 2, 3], [0.01, 0.05, math.inf], 0.1)
    assert collapsed.first_beyond_index == 2 and collapsed.crossing_strength == 2.0
    nan = tolerance_crossing([1, 2], [0.01, math.nan], 0.1)
    assert nan.first_beyond_index == 1


def test_bad_input_is_refused():
    with pytest.raises(HemorrhageError, match="increase strictly"):
        fit_breakpoint([1, 3, 2, 4, 5], [1, 2, 3, 4, 5])
    with pytest.raises(HemorrhageError, match="one value per strength"):
        tolerance_crossing([1, 2, 3], [1, 2], 0.1)
    with pytest.raises(HemorrhageError, match="one standard error per value"):
        fit_breakpoint([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [0.1, 0.1])
