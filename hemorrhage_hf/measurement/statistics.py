"""Standard errors of means of per-token series, paired comparisons, and McNemar's exact test.

Per-token figures (KL, Δp, NLL differences, top-1 agreement) are autocorrelated: neighbouring tokens share their
context, and tokens of one article share its difficulty. The i.i.d. standard error sd/√(n−1) (llama.cpp's
convention, kept for comparison with it) then understates the uncertainty of a mean. :func:`block_standard_error`
uses *batch means*: the series is cut into ``a`` consecutive, non-overlapping blocks of ``b`` tokens, and the spread
of the block means estimates the long-run variance σ² = Σ_k γ(k) that governs Var(mean) ≈ σ²/n:

    σ²_BM = b/(a−1) · Σ_j (Ȳ_j − Ȳ)²,    SE = √(σ²_BM / n).

Block length: ``b = ⌊√n⌋`` unless given. It grows with the data, so the estimator is consistent for any
correlation that decays (Flegal & Jones, Ann. Statist. 2010; the default of R's ``mcmcse``), and it is longer than
the MSE-optimal n^(1/3) on purpose: a longer block misses less of slowly decaying correlation (article-level
difficulty), at the price of a noisier SE (relative spread ≈ 1/√(2(a−1)), 6 % at 16k tokens). With ``b = 1`` the
formula is exactly the i.i.d. SE sd/√(n−1), which is also the fallback for series too short to hold two blocks.
Inference on a batch-means SE uses Student's t with a − 1 degrees of freedom.

Example:
    >>> import numpy as np
    >>> from hemorrhage_hf.measurement.statistics import block_standard_error, iid_standard_error, mcnemar_exact
    >>> values = np.repeat([0.0, 1.0, 0.0, 1.0], 4)  # runs of 4: strongly autocorrelated
    >>> round(iid_standard_error(values), 4), round(block_standard_error(values, block_size=4), 4)
    (0.1291, 0.2887)
    >>> round(mcnemar_exact(1, 9), 4)  # 1 vs 9 discordant pairs
    0.0215
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def iid_standard_error(values) -> float:
    """sd/√(n−1) with sd the population standard deviation, as llama.cpp reports it (NaN below 2 values).

    Example:
        >>> iid_standard_error([1.0, 2.0, 3.0])  # sd = √(2/3), n − 1 = 2
        0.5773502691896257
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    return float(values.std() / math.sqrt(len(values) - 1))


def default_block_size(n: int) -> int:
    """⌊√n⌋ tokens per block (at least 1): see the module docstring for why.

    Example:
        >>> default_block_size(16384), default_block_size(254), default_block_size(3)
        (128, 15, 1)
    """
    return max(1, math.isqrt(max(n, 0)))


def _blocks(values: np.ndarray, block_size: int | None) -> tuple[int, int]:
    """(block length, number of whole blocks) for ``values``; block length 1 where fewer than two blocks fit."""
    n = len(values)
    size = default_block_size(n) if block_size is None else int(block_size)
    if size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    if n // size < 2:
        size = 1
    return size, n // size


def block_standard_error(values, block_size: int | None = None) -> float:
    """Batch-means standard error of the mean of an autocorrelated series (NaN below 2 values).

    ``block_size`` defaults to ⌊√n⌋; when fewer than two blocks of it fit, the i.i.d. SE is returned. The
    ``n mod b`` values after the last whole block enter the mean but not the variance estimate.

    Example:
        >>> round(block_standard_error(np.arange(100.0)), 3)  # a trend: blocks see it, the i.i.d. SE does not
        9.574
        >>> round(iid_standard_error(np.arange(100.0)), 3)
        2.901
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) < 2:
        return float("nan")
    size, count = _blocks(values, block_size)
    if size == 1:
        return iid_standard_error(values)
    block_means = values[: size * count].reshape(count, size).mean(axis=1)
    long_run_variance = size * block_means.var(ddof=1)
    return float(math.sqrt(long_run_variance / len(values)))


def block_degrees_of_freedom(n: int, block_size: int | None = None) -> int:
    """Degrees of freedom of the t reference for :func:`block_standard_error`: blocks − 1 (n − 1 for the i.i.d. SE).

    Example:
        >>> block_degrees_of_freedom(16384), block_degrees_of_freedom(5)  # 5 values: two blocks of 2
        (127, 1)
    """
    size, count = _blocks(np.empty(n), block_size)
    return max(count - 1, 0)


def paired_difference(a, b, block_size: int | None = None) -> dict[str, float | int]:
    """Mean of ``a − b`` over identical tokens with its batch-means SE, a two-sided t test of "no difference",
    and a 95 % interval.

    ``a`` and ``b`` are per-token values of two candidates measured on the same tokens in the same order (e.g. the
    KL of two quantizations against one reference). Pairing removes what the tokens share (hard tokens are hard for
    both), so this is far sharper than comparing two means with their own errors. Returns ``mean_difference``,
    ``standard_error`` (batch means), ``standard_error_iid``, ``t``, ``degrees_of_freedom``, ``p_value``,
    ``ci_low``, ``ci_high``, ``n`` and ``block_size``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> shared = rng.gamma(1.0, size=4096)  # what both candidates' per-token KL have in common
        >>> result = paired_difference(shared + 0.02, shared + 0.01 * rng.random(4096))
        >>> round(result["mean_difference"], 3), result["p_value"] < 1e-6, result["block_size"]
        (0.015, True, 64)
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same tokens: {len(a)} vs {len(b)} values")
    if len(a) < 2:
        raise ValueError(f"a paired difference needs at least 2 tokens, got {len(a)}")
    difference = a - b
    mean = float(difference.mean())
    size, count = _blocks(difference, block_size)
    error = block_standard_error(difference, size)
    degrees = count - 1
    if error > 0:
        t = mean / error
        p_value = float(2 * stats.t.sf(abs(t), degrees))
    else:  # identical per-token values (or a constant shift): no noise to test against
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        p_value = 1.0 if mean == 0 else 0.0
    half_width = float(stats.t.ppf(0.975, degrees)) * error
    return {
        "mean_difference": mean,
        "standard_error": error,
        "standard_error_iid": iid_standard_error(difference),
        "t": float(t),
        "degrees_of_freedom": degrees,
        "p_value": p_value,
        "ci_low": mean - half_width,
        "ci_high": mean + half_width,
        "n": len(difference),
        "block_size": size,
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs ``b`` (only the first is right) and ``c`` (only the second)
    tested against Binomial(b + c, ½). 1.0 when there are no discordant pairs.

    Example:
        >>> mcnemar_exact(0, 0), mcnemar_exact(5, 5), round(mcnemar_exact(0, 6), 4)
        (1.0, 1.0, 0.0312)
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got {b} and {c}")
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5).pvalue)
