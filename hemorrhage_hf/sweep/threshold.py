"""Where a hemorrhage curve turns into collapse: two documented rules on (strength, damage) points.

**Breakpoint fit** (the default threshold). Hemorrhage grows gradually with the strength ``s`` of a modification,
then, past a critical strength ``s0``, explodes (the paper's follow-up: power-law growth up to ``s0``, exponential
collapse beyond). On a log scale the damage ``y`` (KL mean, PPL ratio − 1, …) is modelled as two pieces joined
continuously at ``s0``::

    ln y = a + b·(g(s) − g(s0))   for s ≤ s0      growth: g(s) = ln s (a power law), or g(s) = s (exponential)
    ln y = a + c·(s − s0)         for s > s0      collapse: exponential at rate c

Each level weighs by its own standard error: ``ln y`` has standard error ``σ = SE(y)/y``, so a level with PPL
ratio 1.004 ± 0.004 (damage 0.004 ± 0.004) counts for almost nothing. For each candidate ``s0`` on a fine grid
between the second and the second-to-last strength the three coefficients are a weighted least-squares fit; ``s0``
is the candidate with the least weighted squared error (SSE), and the growth form is the one of the two with the
smaller SSE (the power law needs every strength > 0; bits are swept as strength = −bits and get the exponential).

A curve that merely bends upward has no threshold, so the pieces must beat a **smooth** curve: the best of
``ln y`` quadratic in ``s``, and (for positive strengths) ``a + b·ln s + c·s`` and quadratic in ``ln s``, which
hold every pure exponential, pure power law and smooth convex bend. The statistic ``T = n·ln(SSE_smooth /
SSE_pieces)`` is calibrated by a parametric bootstrap under the smooth fit (the χ² cut does not hold for a change
point): ``T`` is recomputed on the smooth curve plus noise of each level's own size (its standard error, inflated
by the smooth fit's excess scatter if there is any; without standard errors, the smooth fit's residual scatter),
400 times, seeded, and a threshold is reported only when at most 1 % of them reach the observed ``T``
(``p_value`` ≤ 0.01) and the curve accelerates at ``s0`` (``c`` exceeds the growth's own rate there).

Its 95 % interval is a parametric bootstrap under the two-piece fit with the same per-level noise: refit ``s0`` 400
times, the central 95 % of the refits. ``leave_one_out`` gives ``s0`` refitted with each level left out in turn,
so a reader sees how much one level moves it. Levels past the first one within a factor 2 of the largest damage
are left out: once a model has collapsed its figures plateau, and a plateau says nothing about where collapse began.

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
    >>> fit_breakpoint(s, np.exp(0.0005 * s**2)).strength is None  # bends smoothly: no threshold
    True
    >>> crossing = tolerance_crossing(s, y, tolerance=100.0)  # exp(3) = 20 at s = 60, exp(5) = 148 at 65
    >>> float(s[crossing.last_within_index]), float(s[crossing.first_beyond_index])
    (60.0, 65.0)
    >>> round(crossing.crossing_strength, 2)
    64.01
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import HemorrhageError

BOOTSTRAP_SAMPLES = 400
#: The largest bootstrap p-value under the smooth null at which the pieces count as a threshold.
SIGNIFICANCE = 0.01
GRID_POINTS = 200
POWER_LAW, EXPONENTIAL = "power law", "exponential"
#: Levels after the first one whose damage is within this factor of the largest are a plateau, not growth.
SATURATION_FACTOR = 2.0
#: Residuals are floored at this size in ln y so noise-free curves give finite statistics.
RESIDUAL_FLOOR = 1e-6
#: The smallest standard error of ln y a level may claim (a zero error would give it infinite weight).
SIGMA_FLOOR = 1e-4
MIN_POINTS = 5


@dataclass(frozen=True)
class Breakpoint:
    """The fitted critical strength ``s0`` (None when the points show no threshold; ``reason`` says why)."""

    strength: float | None
    interval: tuple[float, float] | None
    growth: str | None  # the form before s0: "power law" or "exponential"
    slope_before: float | None  # d ln y / ds just below s0
    slope_after: float | None  # the collapse rate c
    statistic: float | None  # T = n·ln(SSE_smooth / SSE_pieces)
    p_value: float | None  # share of smooth-null bootstrap curves with T at least as large
    smooth_form: str | None  # the smooth curve the pieces were tested against
    below_index: int | None  # the last level at or below s0, among all points given
    above_index: int | None  # the first level above s0
    n_points: int
    weighted: bool  # True when per-level standard errors weighed the fit
    leave_one_out: list[dict]  # {"left_out": strength, "strength": s0 refitted without it}
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


def _column_bases(designs: np.ndarray) -> np.ndarray:
    """An orthonormal basis ``[..., n, p]`` of each design's column space (columns beyond its rank are zero): a
    fit's SSE is ``‖y‖² − ‖basisᵀ y‖²``."""
    u, singular, _ = np.linalg.svd(designs, full_matrices=False)
    return u * (singular > 1e-10 * singular.max(-1, keepdims=True))[..., None, :]


def _sse(bases: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """SSE ``[..., B]`` of the least-squares fit of each column of ``columns`` ``[n, B]`` in each basis."""
    return (columns**2).sum(0) - ((np.swapaxes(bases, -1, -2) @ columns) ** 2).sum(-2)


def _piece_designs(s: np.ndarray, s0: np.ndarray, growth: str) -> np.ndarray:
    """Design matrices ``[len(s0), n, 3]`` of the two pieces for each candidate ``s0``."""
    g = np.log if growth == POWER_LAW else (lambda x: x)
    joined = np.minimum(s[None, :], s0[:, None])
    before = g(joined) - g(s0)[:, None]
    after = np.maximum(s[None, :] - s0[:, None], 0.0)
    return np.stack([np.ones_like(before), before, after], axis=-1)


def _smooth_designs(s: np.ndarray) -> dict[str, np.ndarray]:
    """The smooth null curves of ln y: quadratic in s; for s > 0 also a + b·ln s + c·s and quadratic in ln s."""
    one = np.ones_like(s)
    forms = {"quadratic in s": np.stack([one, s, s**2], axis=-1)}
    if np.all(s > 0):
        log_s = np.log(s)
        forms["power law × exponential"] = np.stack([one, log_s, s], axis=-1)
        forms["quadratic in ln s"] = np.stack([one, log_s, log_s**2], axis=-1)
    return forms


class _WeightedFits:
    """Every fit of this module on one set of strengths and per-level weights, for many ln-y columns at once.

    Working in weighted units (each row divided by its σ) turns weighted least squares into ordinary ones.
    """

    def __init__(self, s: np.ndarray, sigma: np.ndarray):
        self.s, self.sigma, self.n = s, sigma, len(s)
        self.candidates = np.unique(np.concatenate([np.linspace(s[1], s[-2], GRID_POINTS), s[1:-1]]))
        self.growths = (EXPONENTIAL, POWER_LAW) if np.all(s > 0) else (EXPONENTIAL,)
        weigh = (1 / sigma)[:, None]
        self.piece_bases = np.stack(
            [_column_bases(_piece_designs(s, self.candidates, growth) * weigh) for growth in self.growths]
        )
        smooth = _smooth_designs(s)
        self.smooth_forms = list(smooth)
        self.smooth_designs = np.stack([design * weigh for design in smooth.values()])
        self.smooth_bases = _column_bases(self.smooth_designs)

    def weighted(self, log_y: np.ndarray) -> np.ndarray:
        return log_y / self.sigma if log_y.ndim == 1 else log_y / self.sigma[:, None]

    def pieces(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(SSE, growth index, candidate index) of the best two-piece fit of each weighted column ``[n, B]``."""
        sse = _floored(_sse(self.piece_bases, columns), self.n)
        flat = sse.reshape(-1, sse.shape[-1]).argmin(0)
        growth, candidate = np.unravel_index(flat, sse.shape[:2])
        return sse[growth, candidate, np.arange(sse.shape[-1])], growth, candidate

    def smooth(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(SSE, form index) of the best smooth fit of each weighted column ``[n, B]``."""
        sse = _floored(_sse(self.smooth_bases, columns), self.n)
        return sse.min(0), sse.argmin(0)

    def statistic(self, columns: np.ndarray) -> np.ndarray:
        return self.n * np.log(self.smooth(columns)[0] / self.pieces(columns)[0])


def _floored(sse, n: int):
    return np.maximum(sse, n * RESIDUAL_FLOOR**2)


def _noise_scale(sse: float, n: int, n_parameters: int, weighted: bool) -> float:
    """Noise of a bootstrap curve in weighted units: the standard errors (1), inflated by any excess scatter of the
    fit; without standard errors, the fit's residual scatter alone."""
    dispersion = sse / max(n - n_parameters, 1)
    return math.sqrt(max(dispersion, 1.0) if weighted else dispersion)


def _usable_points(
    strengths: np.ndarray, values: np.ndarray, errors: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(strengths, ln y, σ of ln y) of the levels with positive, finite damage before the collapsed plateau."""
    usable = np.isfinite(values) & (values > 0)
    if errors is not None:
        usable &= np.isfinite(errors)
    s, log_y = strengths[usable], np.log(values[usable])
    sigma = np.ones_like(s) if errors is None else np.maximum(errors[usable] / values[usable], SIGMA_FLOOR)
    if len(s):  # the plateau of a collapsed model says nothing about where collapse began
        last = int(np.flatnonzero(log_y >= log_y.max() - math.log(SATURATION_FACTOR))[0])
        s, log_y, sigma = s[: last + 1], log_y[: last + 1], sigma[: last + 1]
    return s, log_y, sigma


def fit_breakpoint(
    strengths: Sequence[float],
    values: Sequence[float],
    errors: Sequence[float] | None = None,
    *,
    seed: int = 0,
    leave_one_out: bool = True,
) -> Breakpoint:
    """Fit and test the two pieces of this module's docstring on the positive, finite ``values``.

    ``errors``: each value's standard error (None: equal, unknown errors, estimated from the scatter). Zero damage
    (the unmodified level) and non-finite values (a collapsed model's infinite PPL) carry no slope and are left
    out, and so are the levels after the first one within a factor 2 of the largest damage (a collapsed model's
    figures plateau); ``n_points`` says how many were used. ``seed`` seeds both bootstraps.
    """
    strengths, values = _validated(strengths, values)
    if errors is not None:
        errors = np.asarray(errors, dtype=np.float64)
        if errors.shape != values.shape:
            raise HemorrhageError(f"need one standard error per value, got {errors.shape} and {values.shape}")
    s, log_y, sigma = _usable_points(strengths, values, errors)
    n, weighted = len(s), errors is not None

    def nothing(reason: str, **found) -> Breakpoint:
        fields = dict.fromkeys(
            ("strength", "interval", "growth", "slope_before", "slope_after", "statistic", "p_value", "smooth_form")
        )
        fields.update(below_index=None, above_index=None, leave_one_out=[])
        fields.update(found)
        return Breakpoint(**fields, n_points=n, weighted=weighted, reason=reason)

    if n < MIN_POINTS:
        return nothing(
            f"{n} level{'' if n == 1 else 's'} with positive, finite, unsaturated damage; the fit needs {MIN_POINTS}"
        )
    fits = _WeightedFits(s, sigma)
    column = fits.weighted(log_y)[:, None]
    sse_pieces, growth_index, candidate_index = (a[0] for a in fits.pieces(column))
    s0, growth = float(fits.candidates[candidate_index]), fits.growths[growth_index]
    _, b, collapse_rate = _coefficients(s, log_y, sigma, _piece_designs(s, np.array([s0]), growth)[0])
    growth_rate = b / s0 if growth == POWER_LAW else b  # d ln y / ds just below s0
    sse_smooth, form_index = (a[0] for a in fits.smooth(column))
    statistic = float(n * np.log(sse_smooth / sse_pieces))
    rng = np.random.default_rng(seed)
    smooth_design = fits.smooth_designs[form_index]
    smooth_fit = smooth_design @ np.linalg.lstsq(smooth_design, column[:, 0], rcond=None)[0]
    scale = _noise_scale(float(sse_smooth), n, 3, weighted)
    null = smooth_fit[:, None] + scale * rng.standard_normal((n, BOOTSTRAP_SAMPLES))
    p_value = float((1 + np.sum(fits.statistic(null) >= statistic)) / (1 + BOOTSTRAP_SAMPLES))
    found = dict(
        statistic=statistic,
        p_value=p_value,
        smooth_form=fits.smooth_forms[form_index],
        leave_one_out=_leave_one_out(s, log_y, sigma) if leave_one_out else [],
    )
    if not collapse_rate > growth_rate:
        return nothing(f"the curve does not accelerate (d ln y/ds {growth_rate:.3g} then {collapse_rate:.3g})", **found)
    if p_value > SIGNIFICANCE:
        return nothing(
            f"a smooth curve ({found['smooth_form']}) explains the levels as well as a threshold would "
            f"(bootstrap p = {p_value:.3f} > {SIGNIFICANCE})",
            **found,
        )
    below = int(np.flatnonzero(strengths <= s0)[-1])
    basis = fits.piece_bases[growth_index, candidate_index]
    pieces_fit = basis @ (basis.T @ column[:, 0])
    samples = pieces_fit[:, None] + _noise_scale(float(sse_pieces), n, 4, weighted) * rng.standard_normal(
        (n, BOOTSTRAP_SAMPLES)
    )
    sse = _sse(fits.piece_bases[growth_index], samples)
    low, high = np.percentile(fits.candidates[sse.argmin(0)], [2.5, 97.5])
    return Breakpoint(
        strength=s0,
        interval=(float(low), float(high)),
        growth=growth,
        slope_before=float(growth_rate),
        slope_after=float(collapse_rate),
        below_index=below,
        above_index=below + 1 if below + 1 < len(strengths) else None,
        n_points=n,
        weighted=weighted,
        reason="fitted",
        **found,
    )


def _coefficients(s: np.ndarray, log_y: np.ndarray, sigma: np.ndarray, design: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(design / sigma[:, None], log_y / sigma, rcond=None)[0]


def _leave_one_out(s: np.ndarray, log_y: np.ndarray, sigma: np.ndarray) -> list[dict]:
    """``s0`` of the best two-piece fit with each level left out in turn (None where too few levels remain)."""
    refits = []
    for left_out in range(len(s)):
        keep = np.arange(len(s)) != left_out
        if keep.sum() < MIN_POINTS:
            refits.append({"left_out": float(s[left_out]), "strength": None})
            continue
        fits = _WeightedFits(s[keep], sigma[keep])
        _, _, candidate = fits.pieces(fits.weighted(log_y[keep])[:, None])
        refits.append({"left_out": float(s[left_out]), "strength": float(fits.candidates[candidate[0]])})
    return refits


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
