"""Where a hemorrhage curve turns into collapse: two documented rules on (strength, damage) points.

**Breakpoint fit** (the default threshold). Hemorrhage grows gradually with the strength ``s`` of a modification,
then, past a critical strength ``s0``, explodes. On a log scale the damage ``y`` (KL mean, PPL ratio − 1, …) is
modelled as two straight lines joined at ``s0``::

    ln y = a + b·(s − s0)   for s ≤ s0        (growth at rate b)
    ln y = a + c·(s − s0)   for s > s0        (collapse at a faster rate c > b)

For each candidate ``s0`` on a fine grid between the second and the second-to-last strength (so each side keeps two
points) the three coefficients are a linear least-squares fit; ``s0`` is the candidate with the least squared
error (SSE). Its 95 % interval comes from a residual bootstrap (refit ``s0`` to the fitted curve plus resampled
residuals, 500 times, seeded; the central 95 % of the refits): change points make the textbook profile-likelihood
interval too narrow. A threshold
is reported only when the curve accelerates (``c > b``) and the hinge explains the points much better than one
straight line (likelihood-ratio statistic ``n·ln(SSE_line/SSE_min) ≥ 6``, the χ²₂ 95 % point: the hinge has two
more free numbers, ``s0`` and ``c``). The paper's follow-up fits power-law growth before ``s0``; over the few levels
a sweep measures, a power law and an exponential are both close to a straight line in ``ln y``, and the straight
line keeps the fit linear and the rule valid for strengths ≤ 0 (bits are swept as strength = −bits).

**Tolerance crossing**. The strongest level whose damage stays within a user tolerance (for KL mean, 0.1 nats: the
edge of the report's "mild" grade), the first level past it, and the strength where the curve crosses the
tolerance, interpolated linearly in ``ln y`` between them.

Both rules take points in strength order and return indices, so callers can print the figures on either side.

Example:
    >>> import numpy as np
    >>> from hemorrhage_hf.threshold import fit_breakpoint, tolerance_crossing
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

from .errors import HemorrhageError

BOOTSTRAP_SAMPLES = 500
#: χ²₂ 95 % point: how much better than one line the hinge must fit to count as a threshold.
MIN_LIKELIHOOD_RATIO = 5.99
GRID_POINTS = 400
#: Residuals are floored at this size in ln y so noise-free curves give finite statistics.
RESIDUAL_FLOOR = 1e-6


@dataclass(frozen=True)
class Breakpoint:
    """The fitted critical strength ``s0`` (None when the points show no threshold; ``reason`` says why)."""

    strength: float | None
    interval: tuple[float, float] | None
    slope_before: float | None
    slope_after: float | None
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


def _residual_makers(s: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``I − H(s0)`` for every candidate ``s0`` ``[G, n, n]``: applied to ln y it gives the hinge fit's residuals."""
    offsets = s[None, :] - candidates[:, None]
    designs = np.stack([np.ones_like(offsets), np.minimum(offsets, 0.0), np.maximum(offsets, 0.0)], axis=-1)
    return np.eye(len(s)) - designs @ np.linalg.pinv(designs)


def _floored(sse, n: int):
    return np.maximum(sse, n * RESIDUAL_FLOOR**2)


def fit_breakpoint(strengths: Sequence[float], values: Sequence[float], *, seed: int = 0) -> Breakpoint:
    """Fit the hinge of this module's docstring to the positive, finite ``values``.

    Zero damage (the unmodified level) and non-finite values (a collapsed model's infinite PPL) carry no slope and
    are left out of the fit; ``n_points`` says how many were used. ``seed`` seeds the bootstrap of the interval.
    """
    strengths, values = _validated(strengths, values)
    usable = np.isfinite(values) & (values > 0)
    s, log_y = strengths[usable], np.log(values[usable])
    n = len(s)

    def nothing(reason: str) -> Breakpoint:
        return Breakpoint(None, None, None, None, None, None, None, n_points=n, reason=reason)

    if n < 5:
        return nothing(f"{n} levels with positive, finite values; the breakpoint fit needs at least 5")
    candidates = np.unique(np.concatenate([np.linspace(s[1], s[-2], GRID_POINTS), s[1:-1]]))
    makers = _residual_makers(s, candidates)
    residuals = makers @ log_y
    sse = _floored((residuals**2).sum(-1), n)
    best = int(np.argmin(sse))
    s0 = float(candidates[best])
    offsets = s - s0
    design = np.stack([np.ones_like(s), np.minimum(offsets, 0.0), np.maximum(offsets, 0.0)], axis=1)
    _, slope_before, slope_after = np.linalg.lstsq(design, log_y, rcond=None)[0]
    line_residuals = log_y - np.polyval(np.polyfit(s, log_y, 1), s)
    likelihood_ratio = float(n * np.log(_floored(line_residuals @ line_residuals, n) / sse[best]))
    if not slope_after > slope_before:
        return nothing(f"the curve does not accelerate (slope {slope_before:.3g} then {slope_after:.3g} in ln y)")
    if likelihood_ratio < MIN_LIKELIHOOD_RATIO:
        return nothing(
            f"one straight line in ln y fits almost as well (likelihood ratio {likelihood_ratio:.2f} < "
            f"{MIN_LIKELIHOOD_RATIO}): no distinct threshold in the levels measured"
        )
    below = int(np.flatnonzero(strengths <= s0)[-1])
    return Breakpoint(
        strength=s0, interval=_bootstrap_interval(makers, candidates, log_y - residuals[best], residuals[best], seed),
        slope_before=float(slope_before), slope_after=float(slope_after), likelihood_ratio=likelihood_ratio,
        below_index=below, above_index=below + 1 if below + 1 < len(strengths) else None, n_points=n, reason="fitted",
    )


def _bootstrap_interval(makers: np.ndarray, candidates: np.ndarray, fitted: np.ndarray, residuals: np.ndarray,
                        seed: int) -> tuple[float, float]:
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
        return ToleranceCrossing(tolerance, len(values) - 1 if len(values) else None, None, None,
                                 "every level is within the tolerance")
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
