"""Where a hemorrhage curve turns into collapse: two documented rules on (strength, damage) points.

**Breakpoint fit** (the default threshold). Hemorrhage grows gradually with the strength ``s`` of a modification,
then, past a critical strength ``s0``, explodes (the paper's follow-up: power-law growth up to ``s0``, exponential
collapse beyond). On a log scale the damage ``y`` (KL mean, PPL ratio − 1, …) is modelled as two pieces joined
continuously at ``s0``::

    ln y = a + b·(g(s) − g(s0))   for s ≤ s0      growth: g(s) = ln s (a power law), or g(s) = s (exponential)
    ln y = a + c·(s − s0)         for s > s0      collapse: exponential at rate c

For each candidate ``s0`` on a fine grid between the second and the second-to-last strength (so each side keeps two
points) the three coefficients are a linear least-squares fit of ``ln y``; ``s0`` is the candidate with the least
squared error (SSE), and the growth form is the one of the two with the smaller SSE (the power law needs every
strength > 0; bits are swept as strength = −bits, so they get the exponential form, which suits them: RTN error
grows about 4× per bit removed). Its 95 % interval comes from a residual bootstrap (refit ``s0`` to the fitted
curve plus resampled residuals, 500 times, seeded; the central 95 % of the refits): change points make the
textbook profile-likelihood interval too narrow. A threshold is reported only when the curve accelerates at
``s0`` (the collapse rate ``c`` exceeds the growth's own rate there, ``b`` or ``b/s0``) and the two pieces explain
the points much better than one (likelihood-ratio statistic ``n·ln(SSE_one/SSE_min) ≥ 6``, the χ²₂ 95 % point: the
pieces have two more free numbers, ``s0`` and ``c``; ``SSE_one`` is the better of a single power law and a single
exponential). Levels past the first one within a factor 2 of the largest damage are left out: once a model has
collapsed its figures plateau, and a plateau says nothing about where collapse began.

**Tolerance crossing**. The strongest level whose damage stays within a user tolerance (for KL mean, 0.1 nats: the
edge of the report's "mild" grade), the first level past it, and the strength where the curve crosses the
tolerance, interpolated linearly in ``ln y`` between them.

Both rules take points in strength order and return indices, so callers can print the figures on either side.

Example:
    >>> import numpy as np
    >>> from hemorrhage_hf.sweep.threshold import fit_breakpoint, tolerance_crossing
    >>> s = np.arange(10.0, 95.0, 5.0)
    >>> y = np.exp(np.where(s <= 60, 0.05 * s, 3 + 0.4 * (s - 60)))  # bends at s = 60
    >>> round(fit_breakpoint(s, y).strength, 1)
    60.0
    >>> crossing = tolerance_crossing(s, y, tolerance=100.0)  # exp(3) = 20 at s = 60, exp(5) = 148 at 65
    >>> float(s[crossing.last_within_index]), float(s[crossing.first_beyond_index]), round(crossing.crossing_strength, 2)
    (60.0, 65.0, 64.01)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import HemorrhageError

BOOTSTRAP_SAMPLES = 500
#: χ²₂ 95 % point: how much better than one piece the two must fit to count as a threshold.
MIN_LIKELIHOOD_RATIO = 5.99
GRID_POINTS = 400
POWER_LAW, EXPONENTIAL = "power law", "exponential"
#: Levels after the first one whose damage is within this factor of the largest are a plateau, not growth.
SATURATION_FACTOR = 2.0
#: Residuals are floored at this size in ln y so noise-free curves give finite statistics.
RESIDUAL_FLOOR = 1e-6


@dataclass(frozen=True)
class Breakpoint:
    """The fitted critical strength ``s0`` (None when the points show no threshold; ``reason`` says why)."""

    strength: float | None
    interval: tuple[float, float] | None
    growth: str | None  # the form before s0: "power law" or "exponential"
    slope_before: float | None  # d ln y / ds just below s0
    slope_after: float | None  # the collapse rate c
    likelihood_ratio: float | None
    below_index: int | None  # the last level at or below s0, among all points given
    above_index: int | None  # the first level above s0
    n_points: int
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ToleranceCrossing:
    """The last level within ``tolerance`` and the first past it (None where there is none)."""

    tolerance: float
    last_within_index: int | None
    first_beyond_index: int | None
    crossing_strength: float | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _validated(strengths: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    strengths = np.asarray(strengths, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if strengths.shape != values.shape or strengths.ndim != 1:
        raise HemorrhageError(f"need one value per strength, got {strengths.shape} and {values.shape}")
    if len(strengths) > 1 and not np.all(np.diff(strengths) > 0):
        raise HemorrhageError(f"strengths must increase strictly, got {strengths.tolist()}")
    return strengths, values


def _designs(s: np.ndarray, s0: np.ndarray, growth: str) -> np.ndarray:
    """Design matrices ``[len(s0), n, 3]`` of the two pieces for each candidate ``s0``."""
    g = np.log if growth == POWER_LAW else (lambda x: x)
    joined = np.minimum(s[None, :], s0[:, None])
    before = g(joined) - g(s0)[:, None]
    after = np.maximum(s[None, :] - s0[:, None], 0.0)
    return np.stack([np.ones_like(before), before, after], axis=-1)


def _residual_makers(designs: np.ndarray) -> np.ndarray:
    """``I − H(s0)`` for every candidate: applied to ln y it gives that fit's residuals."""
    return np.eye(designs.shape[1]) - designs @ np.linalg.pinv(designs)


def _floored(sse, n: int):
    return np.maximum(sse, n * RESIDUAL_FLOOR**2)


def _single_curve_sse(s: np.ndarray, log_y: np.ndarray) -> float:
    """SSE of the better single piece: one exponential (line in s), or one power law (line in ln s) if s > 0."""
    abscissas = [s, np.log(s)] if np.all(s > 0) else [s]
    return min(float(((log_y - np.polyval(np.polyfit(x, log_y, 1), x)) ** 2).sum()) for x in abscissas)


def fit_breakpoint(strengths: Sequence[float], values: Sequence[float], *, seed: int = 0) -> Breakpoint:
    """Fit the two pieces of this module's docstring to the positive, finite ``values``.

    Zero damage (the unmodified level) and non-finite values (a collapsed model's infinite PPL) carry no slope and
    are left out of the fit, and so are the levels after the first one within a factor 2 of the largest damage (a
    collapsed model's figures plateau: PPL near that of a uniform guess over the vocabulary); ``n_points`` says how
    many were used. ``seed`` seeds the bootstrap of the interval.
    """
    strengths, values = _validated(strengths, values)
    usable = np.isfinite(values) & (values > 0)
    s, log_y = strengths[usable], np.log(values[usable])
    if len(s):  # the plateau of a collapsed model says nothing about where collapse began
        last = int(np.flatnonzero(log_y >= log_y.max() - math.log(SATURATION_FACTOR))[0])
        s, log_y = s[: last + 1], log_y[: last + 1]
    n = len(s)

    def nothing(reason: str) -> Breakpoint:
        return Breakpoint(None, None, None, None, None, None, None, None, n_points=n, reason=reason)

    if n < 5:
        return nothing(f"{n} level{'' if n == 1 else 's'} with positive, finite, unsaturated damage; the fit needs 5")
    candidates = np.unique(np.concatenate([np.linspace(s[1], s[-2], GRID_POINTS), s[1:-1]]))
    fits = []
    for growth in (EXPONENTIAL, POWER_LAW) if np.all(s > 0) else (EXPONENTIAL,):
        makers = _residual_makers(_designs(s, candidates, growth))
        residuals = makers @ log_y
        sse = _floored((residuals**2).sum(-1), n)
        best = int(np.argmin(sse))
        fits.append((float(sse[best]), growth, makers, residuals[best], float(candidates[best])))
    sse_min, growth, makers, residuals, s0 = min(fits, key=lambda fit: fit[0])
    _, b, collapse_rate = np.linalg.lstsq(_designs(s, np.array([s0]), growth)[0], log_y, rcond=None)[0]
    growth_rate = b / s0 if growth == POWER_LAW else b  # d ln y / ds just below s0
    likelihood_ratio = float(n * np.log(_floored(_single_curve_sse(s, log_y), n) / sse_min))
    if not collapse_rate > growth_rate:
        return nothing(f"the curve does not accelerate (d ln y/ds {growth_rate:.3g} then {collapse_rate:.3g})")
    if likelihood_ratio < MIN_LIKELIHOOD_RATIO:
        return nothing(
            f"one power law or exponential fits almost as well (likelihood ratio {likelihood_ratio:.2f} < "
            f"{MIN_LIKELIHOOD_RATIO}): no distinct threshold in the levels measured"
        )
    below = int(np.flatnonzero(strengths <= s0)[-1])
    return Breakpoint(
        strength=s0,
        interval=_bootstrap_interval(makers, candidates, log_y - residuals, residuals, seed),
        growth=growth,
        slope_before=float(growth_rate),
        slope_after=float(collapse_rate),
        likelihood_ratio=likelihood_ratio,
        below_index=below,
        above_index=below + 1 if below + 1 < len(strengths) else None,
        n_points=n,
        reason="fitted",
    )


def _bootstrap_interval(
    makers: np.ndarray, candidates: np.ndarray, fitted: np.ndarray, residuals: np.ndarray, seed: int
) -> tuple[float, float]:
    """Central 95 % of s0 refitted to the fitted curve plus resampled residuals (inflated for the 4 fitted numbers)."""
    n = len(fitted)
    scaled = residuals * math.sqrt(n / max(n - 4, 1))
    samples = fitted + np.random.default_rng(seed).choice(scaled, size=(BOOTSTRAP_SAMPLES, n), replace=True)
    sse = ((makers @ samples.T) ** 2).sum(1)
    estimates = candidates[np.argmin(sse, axis=0)]
    low, high = np.percentile(estimates, [2.5, 97.5])
    return float(low), float(high)


def tolerance_crossing(strengths: Sequence[float], values: Sequence[float], tolerance: float) -> ToleranceCrossing:
    """The first level whose value exceeds ``tolerance`` (a non-finite value exceeds any tolerance)."""
    strengths, values = _validated(strengths, values)
    beyond = np.flatnonzero(~(values <= tolerance))
    if len(beyond) == 0:
        return ToleranceCrossing(
            tolerance, len(values) - 1 if len(values) else None, None, None, "every level is within the tolerance"
        )
    first = int(beyond[0])
    if first == 0:
        return ToleranceCrossing(tolerance, None, 0, None, "the first level already exceeds the tolerance")
    low, high = values[first - 1], values[first]
    if np.isfinite(high) and low > 0:
        fraction = (math.log(tolerance) - math.log(low)) / (math.log(high) - math.log(low))
    elif np.isfinite(high):
        fraction = (tolerance - low) / (high - low)
    else:
        fraction = 0.0  # the next level collapsed outright: nothing to interpolate towards
    crossing = strengths[first - 1] + fraction * (strengths[first] - strengths[first - 1])
    return ToleranceCrossing(tolerance, first - 1, first, float(crossing), "crossed")
