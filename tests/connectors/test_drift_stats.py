"""The drift statistics against scipy and against direct textbook implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st
from hypothesis import given, settings
from hypothesis import strategies as hs
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import jensenshannon

from agent.connectors.drift import stats
from agent.connectors.drift.compare import Pending, Side, Window, compare
from agent.connectors.drift.reference import (
    NumericHist,
    Reference,
    SubjectKey,
    build_numeric,
    build_score,
)


def test_chi2_sf_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(0, 300, 400), [0.0, 1e-6, 0.5, 1.0, 1e3]])
    df = rng.integers(1, 150, x.size)
    np.testing.assert_allclose(stats.chi2_sf(x, df), st.chi2.sf(x, df), rtol=1e-9, atol=1e-15)
    assert stats.chi2_sf(5.0, 0) == 1.0  # nothing tested
    assert stats.chi2_sf(math.inf, 3) == 0.0


def test_normal_sf_matches_scipy() -> None:
    z = np.linspace(-8, 8, 101)
    np.testing.assert_allclose(stats.normal_sf(z), st.norm.sf(z), rtol=1e-12, atol=1e-300)


def test_chi2_homogeneity_matches_chi2_contingency_when_cells_are_large() -> None:
    rng = np.random.default_rng(2)
    ref = rng.integers(20, 400, (200, 8))
    cur = rng.integers(20, 400, (200, 8))
    stat, df, p = stats.chi2_homogeneity(ref, cur)  # all 200 tables in one call
    for i in range(200):
        res = st.chi2_contingency(np.stack([ref[i], cur[i]]), correction=False)
        assert stat[i] == pytest.approx(res.statistic, rel=1e-10)
        assert df[i] == res.dof
        assert p[i] == pytest.approx(res.pvalue, rel=1e-8, abs=1e-300)


def test_chi2_homogeneity_pools_cells_with_small_expected_counts() -> None:
    # Labels "d" and "e" are rare: expected < 5 in the window row, pooled into "other".
    ref = np.array([500, 300, 190, 6, 4])
    cur = np.array([50, 30, 19, 1, 0])
    _, df, p = stats.chi2_homogeneity(ref, cur)
    merged = np.array([[500, 300, 190, 10], [50, 30, 19, 1]])
    # The pooled column is still small (expected < 5), so it is folded into the
    # smallest kept column ("c"): a 2 x 3 table.
    folded = np.array([[500, 300, 200], [50, 30, 20]])
    res = st.chi2_contingency(folded, correction=False)
    assert df == res.dof == 2
    assert p == pytest.approx(res.pvalue)
    assert st.chi2_contingency(merged, correction=False).dof == 3  # what pooling alone gives


def test_values_outside_the_reference_range_are_not_infinite_evidence() -> None:
    # Frozen edges: the reference has nothing in underflow/overflow; a couple of
    # current values land there. Without pooling the statistic would explode.
    ref = np.array([0, 100, 100, 100, 100, 100, 0]) * 10
    cur = np.array([1, 200, 199, 201, 200, 198, 1])
    _, _, p = stats.chi2_homogeneity(ref, cur)
    assert p > 0.1


def _direct_psi(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    p = p_counts / p_counts.sum()
    q = q_counts / q_counts.sum()
    p = np.maximum(p, 1e-4)
    q = np.maximum(q, 1e-4)
    p, q = p / p.sum(), q / q.sum()
    return float(sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q, strict=True)))


def _direct_js(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    p = p_counts / p_counts.sum()
    q = q_counts / q_counts.sum()
    m = (p + q) / 2
    kl = lambda a, b: sum(ai * math.log2(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)  # noqa: E731
    return math.sqrt(0.5 * kl(p, m) + 0.5 * kl(q, m))


def test_psi_and_js_match_direct_implementations() -> None:
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 50, (50, 12))
    cur = rng.integers(0, 50, (50, 12))
    ref[:, 3] = 0  # empty bins exercise the floor
    cur[:, 5] = 0
    psi, js = stats.psi(ref, cur), stats.js_distance(ref, cur)
    for i in range(50):
        assert psi[i] == pytest.approx(_direct_psi(ref[i], cur[i]), rel=1e-10)
        assert js[i] == pytest.approx(_direct_js(ref[i], cur[i]), rel=1e-10)
        assert js[i] == pytest.approx(jensenshannon(ref[i], cur[i], base=2), rel=1e-9)


def test_psi_under_no_drift_is_about_its_null_mean() -> None:
    # DRIFT.md: PSI without drift is about (B - 1)(1/n + 1/m), which is why it is
    # reported but never compared with a fixed bound.
    rng = np.random.default_rng(4)
    b, n, m = 10, 10_000, 200
    p = np.full(b, 1 / b)
    ref = rng.multinomial(n, p, size=2000)
    cur = rng.multinomial(m, p, size=2000)
    assert stats.psi(ref, cur).mean() == pytest.approx((b - 1) * (1 / n + 1 / m), rel=0.1)


def _hist_pair(shift: float, seed: int = 5) -> tuple[NumericHist, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, 20_000)
    b = rng.normal(shift, 1, 20_000)
    h = build_numeric(a, 50)
    return h, a, b


@pytest.mark.parametrize("shift", [0.0, 0.1, 0.5, 1.0])
def test_binned_ks_approximates_ks_2samp(shift: float) -> None:
    h, a, b = _hist_pair(shift)
    binned = float(stats.ks_binned(h.counts, h.bin(b)))
    raw = st.ks_2samp(a, b).statistic
    # The binned CDFs are the raw ones sampled at the edges: never larger, and with
    # 50 quantile bins at most one bin's mass (2 %) smaller.
    assert binned <= raw + 1e-12
    assert raw - binned <= 0.02


@pytest.mark.parametrize("shift", [0.0, 0.25, 0.5, 1.0])
def test_binned_wasserstein(shift: float) -> None:
    h, a, b = _hist_pair(shift)
    cur = h.bin(b)
    w = float(stats.wasserstein_binned(h.counts, cur, h.edges))
    centres = stats.bin_centres(h.edges)
    # Exact for the discretised distributions ...
    assert w == pytest.approx(st.wasserstein_distance(centres, centres, h.counts, cur), rel=1e-9)
    # ... and close to the raw-sample distance: within 0.05 std, or 6 % once the
    # shifted mass piles into the wide tail bins of the quantile grid.
    raw = st.wasserstein_distance(a, b)
    assert abs(w - raw) <= max(0.05, 0.06 * raw)


@pytest.mark.parametrize("shift", [-20.0, -5.0, 0.5, 2.0, 5.0, 20.0])
def test_wasserstein_follows_a_window_beyond_the_reference_range(shift: float) -> None:
    """Through the connector's own path (Window, compare): the distance beyond the edges
    is added, so shifts of 5 and 20 std no longer read 3.20 and 3.22 (scipy 5.21, 20.56)."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 1000)
    ref = Reference(SubjectKey("s", "m", "1"), "baseline", 1000)
    ref.features["x"] = build_numeric(a, 10)
    b = rng.normal(shift, 1, 1000)
    w = Window(ref, 1)
    p = Pending()
    p.rows, p.features = list(range(1000)), {"x": b.tolist()}
    w.add(p)
    ev = compare(ref, Side.of_reference(ref), w.side(), alpha=0.002)
    want = st.wasserstein_distance(a, b) / a.std()
    half_bin = 0.5 * float(np.diff(ref.features["x"].edges).max()) / a.std()
    assert ev.signals["feature:x"]["wasserstein"] == pytest.approx(want, abs=half_bin)
    # Both sides windows (a canary comparison): the tails are compared with each other.
    assert stats.wasserstein_binned(np.array([0, 0, 10]), np.array([0, 0, 10]), np.array([0.0, 1.0]),
                                    excess_ref=np.array([0.0, 2.0]),
                                    excess_cur=np.array([0.0, 5.0])) == pytest.approx(3.0)


def test_entropy_helpers() -> None:
    assert float(stats.entropy_bits(np.array([1, 1, 1, 1]))) == pytest.approx(2.0)
    assert float(stats.entropy_bits(np.array([5, 0]))) == 0.0
    h = stats.binary_entropy_bits(np.array([0.0, 0.5, 1.0, 0.9]))
    np.testing.assert_allclose(h, [0.0, 1.0, 0.0, st.entropy([0.9, 0.1], base=2)])


def test_mean_drop_and_proportion_rise_are_one_sided_tests() -> None:
    p = stats.mean_drop_p(0.8, 0.01, 1000, 0.79, 0.01, 1000)
    z = 0.01 / math.sqrt(0.01 / 1000 * 2)
    assert p == pytest.approx(st.norm.sf(z))
    assert stats.mean_drop_p(0.8, 0.01, 1000, 0.85, 0.01, 1000) > 0.5  # a rise is no collapse
    assert stats.proportion_rise_p(50, 1000, 150, 1000) < 1e-10
    assert stats.proportion_rise_p(50, 1000, 40, 1000) > 0.5
    # No low scores in the reference: one in the window is not overwhelming evidence.
    assert stats.proportion_rise_p(0, 1000, 1, 1000) > 0.05


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 0.9, 0.95, 1.0])
def test_a_constant_score_is_not_a_confidence_collapse(value: float) -> None:
    """A model that always answers ``value``: the reference mean differs from the
    window's by an ulp and its std is ~1e-17, which used to give p = 0 (an alarm every
    window, e.g. for 0.1, 0.9 and 0.95)."""
    ref = Reference(SubjectKey("s", "m", "1"), "baseline", 1000)
    ref.score = build_score(np.full(1000, value), 10, 0.5)
    w = Window(ref, 1)
    p = Pending()
    p.rows, p.scores = list(range(1000)), [value] * 1000
    w.add(p)
    ev = compare(ref, Side.of_reference(ref), w.side(), alpha=0.002)
    assert ev.detected["confidence"] is False and ev.kind_p["confidence"] == 1.0
    # A real fall of a constant score is still certain.
    assert stats.mean_drop_p(value, 0.0, 1000, value - 0.01, 0.0, 1000) == 0.0


def test_low_share_rise_is_fishers_exact_test() -> None:
    for a, n, b, m in [(0, 1000, 1, 1000), (6, 1000, 3, 100), (50, 1000, 150, 1000),
                       (40, 1000, 4, 100), (300, 1000, 3000, 10_000), (0, 1000, 100, 100)]:
        want = st.hypergeom.sf(b - 1, n + m, a + b, m)
        assert stats.proportion_rise_p(a, n, b, m) == pytest.approx(want, rel=1e-9, abs=1e-300)


def _low_share_false_alarm_rate(share: float, n: int, m: int, alpha: float) -> float:
    """Exactly: P(the low-share test alarms) when reference and window share ``share``."""
    ks_ref = np.arange(int(st.binom.ppf(1 - 1e-12, n, share)) + 1)
    ks_cur = np.arange(m + 1)
    p_ref, p_cur = st.binom.pmf(ks_ref, n, share), st.binom.pmf(ks_cur, m, share)
    return sum(pa * pb for a, pa in zip(ks_ref, p_ref, strict=True)
               for b, pb in zip(ks_cur, p_cur, strict=True)
               if pb > 1e-15 and stats.proportion_rise_p(a, n, b, m) <= alpha)


@pytest.mark.parametrize("share", [0.002, 0.006, 0.02, 0.05])
@pytest.mark.parametrize("m", [100, 300])
def test_low_share_test_keeps_its_false_alarm_rate_in_small_windows(share: float, m: int) -> None:
    """The level the default uses (alpha / 2 = 0.001 per confidence test): the normal
    approximation alarmed in 0.76 % (share 0.2 %) and 0.71 % (0.6 %) of 100-prediction
    windows; the exact test stays below 0.1 %."""
    assert _low_share_false_alarm_rate(share, 1000, m, 0.001) <= 0.001


def test_adjusted_min_p_bonferroni_and_bh() -> None:
    p = np.array([0.001, 0.02, 0.04, 0.3, math.nan])
    assert stats.adjusted_min_p(p, "bonferroni") == pytest.approx(0.004)
    assert stats.adjusted_min_p(p, "bh") == pytest.approx(
        float(st.false_discovery_control(p[:4]).min()))
    assert math.isnan(stats.adjusted_min_p(np.array([math.nan])))


counts = arrays(np.int64, hs.integers(2, 20), elements=hs.integers(0, 10_000))


@settings(max_examples=200, deadline=None)
@given(counts, hs.data())
def test_statistics_stay_in_range_for_any_counts(ref: np.ndarray, data: hs.DataObject) -> None:
    cur = data.draw(arrays(np.int64, ref.shape, elements=hs.integers(0, 10_000)))
    if ref.sum() == 0 or cur.sum() == 0:
        assert math.isnan(float(stats.chi2_homogeneity(ref, cur)[2]))
        return
    assert float(stats.psi(ref, cur)) >= -1e-12
    js = float(stats.js_distance(ref, cur))
    assert 0.0 <= js <= 1.0 + 1e-12
    assert js == pytest.approx(float(stats.js_distance(cur, ref)), abs=1e-12)
    assert 0.0 <= float(stats.ks_binned(ref, cur)) <= 1.0 + 1e-12
    _, df, p = stats.chi2_homogeneity(ref, cur)
    assert 0.0 <= float(p) <= 1.0 and df >= 0
