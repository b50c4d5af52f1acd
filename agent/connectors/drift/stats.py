"""Drift statistics on histogram counts, vectorised with numpy.

Every function takes counts (not raw values) over the same frozen bins and works on
the last axis, so a stack of windows (shape ``(W, B)``) is evaluated in one call.
A row whose counts sum to zero yields ``nan``; callers refuse to judge such windows
long before that (``min_window_count``).

Conventions (DRIFT.md):

- ``ref`` is the reference side, ``cur`` the current window.
- Empty bins: PSI takes logarithms of proportions, so proportions are floored at
  ``PROPORTION_FLOOR`` (1e-4, the value Evidently and most PSI write-ups use) and
  renormalised. Jensen–Shannon needs no floor (its mixture is positive wherever
  either side is) and uses the raw proportions.
- Numeric bins are ``[underflow, regular bins..., overflow]`` over frozen edges
  ``e_0 < ... < e_B`` (see ``reference.py``); the distance statistics place each
  bin's mass at the bin's centre, and the underflow/overflow mass at ``e_0`` and
  ``e_B``.

Runtime code must not need scipy (it is a test dependency only), so the chi-squared,
normal and hypergeometric tail probabilities are computed here; tests check them
against scipy.
"""

from __future__ import annotations

import functools
import math

import numpy as np

PROPORTION_FLOOR = 1e-4
"""Floor for empty-bin proportions in PSI (then renormalised), so PSI stays finite."""

RELATIVE_EPS = 1e-9
"""Differences of means below this share of their magnitude are rounding, not change."""

MIN_EXPECTED = 5.0
"""Chi-squared cells with an expected count below this are pooled into one "other" cell."""


@functools.lru_cache(maxsize=64)
def _lgamma_rows(kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``lgamma(k + 1)`` and ``lgamma(k + 3/2)`` for ``k < kmax`` (chi2_sf's denominators)."""
    return (np.array([math.lgamma(k + 1.0) for k in range(kmax)]),
            np.array([math.lgamma(k + 1.5) for k in range(kmax)]))


def _f(counts: np.ndarray | list[float] | float) -> np.ndarray:
    return np.asarray(counts, dtype=np.float64)


def proportions(counts: np.ndarray) -> np.ndarray:
    """Counts -> proportions along the last axis (``nan`` where a row is empty)."""
    c = _f(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c / c.sum(axis=-1, keepdims=True)


def _floored(counts: np.ndarray) -> np.ndarray:
    p = np.maximum(proportions(counts), PROPORTION_FLOOR)
    return p / p.sum(axis=-1, keepdims=True)


def psi(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Population stability index ``sum((q - p) * ln(q / p))`` with floored proportions.

    Under no drift PSI is about ``(B - 1) * (1/n + 1/m)``: it is reported, never
    compared with a fixed bound (the decisions use calibrated p-values).
    """
    p, q = _floored(ref), _floored(cur)
    return np.sum((q - p) * np.log(q / p), axis=-1)


def js_distance(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Jensen–Shannon distance, base 2 (in [0, 1]), on raw proportions."""
    p, q = proportions(ref), proportions(cur)
    m = 0.5 * (p + q)
    with np.errstate(invalid="ignore", divide="ignore"):
        kp = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=-1)
        kq = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=-1)
    return np.sqrt(np.maximum(0.5 * (kp + kq), 0.0))


def ks_binned(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Kolmogorov–Smirnov statistic: the largest gap between the binned CDFs."""
    gap = np.cumsum(proportions(ref), axis=-1) - np.cumsum(proportions(cur), axis=-1)
    return np.max(np.abs(gap), axis=-1)


def bin_centres(edges: np.ndarray) -> np.ndarray:
    """Support points of ``[underflow, bins..., overflow]``: e_0, bin midpoints, e_B."""
    e = _f(edges)
    return np.concatenate([e[:1], 0.5 * (e[:-1] + e[1:]), e[-1:]])


def wasserstein_binned(ref: np.ndarray, cur: np.ndarray, edges: np.ndarray, *,
                       excess_ref: np.ndarray | None = None,
                       excess_cur: np.ndarray | None = None) -> np.ndarray:
    """Wasserstein-1 distance between the binned distributions (mass at ``bin_centres``),
    plus the distance beyond the edges.

    ``excess_*`` (last axis: below, above) is each side's mean distance beyond the edges,
    ``sum(e_0 - x for x < e_0) / n`` and ``sum(x - e_B for x >= e_B) / n``: the binned
    part stops at ``e_0`` and ``e_B``, so without it a window that has left the
    reference's range entirely reads the same however far it went. Adding
    ``|excess_cur - excess_ref|`` per tail is exact when only one side reaches beyond an
    edge (a learned baseline never does: its edges span all its values) and a lower
    bound otherwise. Inside the edges it is exact for the discretised distributions;
    against raw samples it is within about half a bin width. Divide by the reference
    std to compare features.
    """
    x = bin_centres(edges)
    gap = np.cumsum(proportions(ref), axis=-1) - np.cumsum(proportions(cur), axis=-1)
    inside = np.sum(np.abs(gap[..., :-1]) * np.diff(x), axis=-1)
    if excess_ref is None and excess_cur is None:
        return inside
    er = _f(0.0 if excess_ref is None else excess_ref)
    ec = _f(0.0 if excess_cur is None else excess_cur)
    return inside + np.sum(np.abs(np.broadcast_to(ec - er, np.broadcast_shapes(
        er.shape, ec.shape, (2,)))), axis=-1)


def entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of a count vector."""
    p = proportions(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=-1)


def binary_entropy_bits(scores: np.ndarray) -> np.ndarray:
    """Per score ``s`` in [0, 1]: ``-s log2 s - (1-s) log2 (1-s)`` (out-of-range clipped)."""
    s = np.clip(_f(scores), 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = -(np.where(s > 0, s * np.log2(s), 0.0) + np.where(s < 1, (1 - s) * np.log2(1 - s), 0.0))
    return h


# --------------------------------------------------------------------------- tail probabilities


def chi2_sf(x: np.ndarray | float, df: np.ndarray | int) -> np.ndarray:
    """Upper tail ``P(X >= x)`` of a chi-squared distribution with integer ``df``.

    scipy's ``chi2.sf`` without scipy, through the closed forms for integer degrees
    of freedom (Abramowitz & Stegun 26.4.4-5), with ``z = x/2`` and ``m = df // 2``:
    even ``df``: ``exp(-z) * sum_{k<m} z^k / k!``; odd ``df``:
    ``erfc(sqrt(z)) + exp(-z) * sum_{k<m} z^(k+1/2) / Gamma(k+3/2)``. Every term is
    positive (no cancellation) and computed in log space (no overflow); all inputs
    are evaluated at once on an ``(inputs, m)`` grid. ``df <= 0`` gives 1 (nothing
    was tested).
    """
    xs, dfs = np.broadcast_arrays(_f(x), np.asarray(df, dtype=np.int64))
    z = 0.5 * xs
    out = np.ones(z.shape)
    valid = (dfs > 0) & (z > 0)
    out[np.isnan(z)] = np.nan
    if not valid.any():
        return out
    zv, dv = z[valid], dfs[valid]
    m, odd = dv // 2, (dv % 2) == 1
    kmax = int(m.max())
    k = np.arange(kmax, dtype=np.float64)
    lg_int, lg_half = _lgamma_rows(kmax)
    half = np.where(odd, 0.5, 0.0)[:, None]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_terms = (-zv[:, None] + (k + half) * np.log(zv)[:, None]
                     - np.where(odd[:, None], lg_half, lg_int))
        terms = np.where(k < m[:, None], np.exp(log_terms), 0.0)
    q = terms.sum(axis=1)
    if odd.any():
        q[odd] += [math.erfc(v) for v in np.sqrt(zv[odd]).tolist()]
    out[valid] = np.clip(np.where(np.isposinf(zv), 0.0, q), 0.0, 1.0)
    return out


def normal_sf(z: np.ndarray | float) -> np.ndarray:
    """Upper tail of the standard normal, ``P(Z >= z)``."""
    zs = _f(z)
    flat = [0.5 * math.erfc(v / math.sqrt(2.0)) for v in zs.ravel().tolist()]
    return np.asarray(flat).reshape(zs.shape)


# --------------------------------------------------------------------------- tests


def chi2_homogeneity(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chi-squared test that two count vectors come from one distribution.

    The 2 x B contingency table (reference row, current row). Columns in which either
    row's expected count is below ``MIN_EXPECTED`` are pooled into one "other" column;
    when that pooled column is itself still below ``MIN_EXPECTED`` it is folded into
    the smallest remaining column (a handful of values outside the reference's range
    must not look like infinite evidence). Columns empty in both rows carry no
    information and are ignored. Returns ``(statistic, df, p_value)``, each with the
    leading shape of the inputs; ``df == 0`` (a single informative column) gives p = 1
    and an empty row gives NaN.
    """
    r, c = np.broadcast_arrays(_f(ref), _f(cur))
    n_r = r.sum(axis=-1, keepdims=True)
    n_c = c.sum(axis=-1, keepdims=True)
    total = n_r + n_c
    share = np.minimum(n_r, n_c) / np.where(total > 0, total, 1.0)  # of the smaller row
    col = r + c
    small = (col * share < MIN_EXPECTED) & (col > 0)
    keep = ~small & (col > 0)
    pooled_r = np.where(small, r, 0.0).sum(axis=-1, keepdims=True)
    pooled_c = np.where(small, c, 0.0).sum(axis=-1, keepdims=True)
    pooled = pooled_r + pooled_c
    pool_ok = (pooled > 0) & (pooled * share >= MIN_EXPECTED)
    fold = (pooled > 0) & ~pool_ok & keep.any(axis=-1, keepdims=True)
    # Fold an undersized pool into the kept column with the smallest total.
    target = np.argmin(np.where(keep, col, np.inf), axis=-1)[..., None]
    into = fold & (np.arange(r.shape[-1]) == target)
    r = r + np.where(into, pooled_r, 0.0)
    c = c + np.where(into, pooled_c, 0.0)

    def contrib(o_r: np.ndarray, o_c: np.ndarray) -> np.ndarray:
        s = o_r + o_c
        with np.errstate(invalid="ignore", divide="ignore"):
            e_r, e_c = s * n_r / total, s * n_c / total
            out = (o_r - e_r) ** 2 / e_r + (o_c - e_c) ** 2 / e_c
        return np.where(s > 0, out, 0.0)

    stat = np.where(keep, contrib(r, c), 0.0).sum(axis=-1)
    stat = stat + np.where(pool_ok, contrib(pooled_r, pooled_c), 0.0)[..., 0]
    df = np.maximum(keep.sum(axis=-1) + pool_ok[..., 0].astype(np.int64) - 1, 0)
    p = chi2_sf(stat, df)
    empty = (n_r[..., 0] == 0) | (n_c[..., 0] == 0)
    return stat, df, np.where(empty, np.nan, p)


def mean_drop_p(ref_mean: float, ref_var: float, ref_n: float, cur_mean: float, cur_var: float,
                cur_n: float) -> float:
    """One-sided p-value that the current mean is *below* the reference mean.

    Welch's z: the difference over ``sqrt(var_ref/n + var_cur/m)``, the spread of
    chunk means of that size (DRIFT.md's "k·σ of reference chunk means", with
    k = Φ⁻¹(1 − α)).

    A constant score (variance 0, or ~1e-17 from rounding) must not turn a one-ulp
    difference of means into an infinite z: differences within ``RELATIVE_EPS`` of the
    means' magnitude count as none, and the standard error is floored at that scale.
    A real fall of a constant score is still certain (p = 0).
    """
    scale = RELATIVE_EPS * max(1.0, abs(ref_mean), abs(cur_mean))
    se = math.sqrt(max(ref_var, 0.0) / max(ref_n, 1.0) + max(cur_var, 0.0) / max(cur_n, 1.0))
    diff = ref_mean - cur_mean
    if abs(diff) <= scale:
        diff = 0.0
    return float(normal_sf(diff / max(se, scale)))


def proportion_rise_p(ref_k: float, ref_n: float, cur_k: float, cur_n: float) -> float:
    """One-sided p-value that the share ``cur_k/cur_n`` exceeds ``ref_k/ref_n``.

    Fisher's exact test (one-sided): given the ``K = ref_k + cur_k`` events of both
    sides, the window's count is hypergeometric (``K`` of ``ref_n + cur_n`` drawn
    ``cur_n`` times) under no change, and the p-value is its upper tail at ``cur_k``
    (scipy's ``hypergeom.sf(cur_k - 1, ...)``). Exact, so it keeps its false-alarm rate
    at the low counts of small windows, where a normal approximation fires too often;
    it is conservative (a discrete test) and a lone low score against a reference
    without any is no evidence. Counts are rounded to integers.
    """
    n, m = round(ref_n), round(cur_n)
    if n <= 0 or m <= 0:
        return 1.0
    k_cur = round(cur_k)
    big_k = round(ref_k) + k_cur
    total = n + m
    lo, hi = max(0, m - (total - big_k)), min(big_k, m)
    if k_cur <= lo:
        return 1.0
    if k_cur > hi:
        return 0.0

    def log_choose(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    first = log_choose(big_k, k_cur) + log_choose(total - big_k, m - k_cur) - log_choose(total, m)
    # The tail's terms k_cur .. hi from the first by the pmf ratio pmf(j+1)/pmf(j).
    j = np.arange(k_cur, hi, dtype=np.float64)
    steps = (np.log((big_k - j) * (m - j)) - np.log((j + 1) * (total - big_k - m + j + 1)))
    logs = first + np.concatenate([[0.0], np.cumsum(steps)])
    top = float(logs.max())
    return float(min(1.0, math.exp(top) * float(np.exp(logs - top).sum())))


def adjusted_min_p(p_values: np.ndarray, method: str = "bonferroni") -> float:
    """The family's adjusted p-value: the smallest ``alpha`` at which it would reject.

    ``bonferroni``: ``min(p) * k``. ``bh`` (Benjamini–Hochberg): ``min(p_(i) * k / i)``.
    Under the global null (no drift anywhere) both bound the false-alarm rate of
    "adjusted p <= alpha" by ``alpha``. NaN p-values (untestable signals) are left
    out of ``k``; an empty family gives NaN.
    """
    p = _f(p_values)
    p = np.sort(p[~np.isnan(p)])
    k = p.size
    if k == 0:
        return math.nan
    if method == "bh":
        return float(min(1.0, np.min(p * k / np.arange(1, k + 1))))
    return float(min(1.0, p[0] * k))
