"""Wilson intervals and CALVIN chain metrics: the maths the reports print."""

import math

import pytest

from robodit.evaluation.stats import (
    chain_metrics,
    completed_in_row,
    rate_summary,
    wilson_interval,
)


def test_wilson_known_values():
    lo, hi = wilson_interval(5, 10)  # p = 0.5: centre 0.5, half-width 1.96*sqrt(.025+.0096)/(1+.3841)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no trials: know nothing
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


def test_wilson_symmetry_and_shrinkage():
    for n in (1, 7, 30):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            mlo, mhi = wilson_interval(n - k, n)
            assert lo == pytest.approx(1 - mhi) and hi == pytest.approx(1 - mlo)
            assert 0 <= lo <= k / n <= hi <= 1
    widths = [wilson_interval(n // 2, n)[1] - wilson_interval(n // 2, n)[0] for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2]


def test_wilson_coverage_is_close_to_95_percent():
    """Exact coverage over the binomial distribution, not a simulation."""
    for p, n in ((0.3, 30), (0.9, 50), (0.5, 20)):
        cover = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k)
                    for k in range(n + 1) if wilson_interval(k, n)[0] <= p <= wilson_interval(k, n)[1])
        assert 0.92 < cover < 0.99, (p, n, cover)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_rate_summary_and_chain_metrics():
    r = rate_summary([True, False, True, True])
    assert r["episodes"] == 4 and r["successes"] == 3 and r["success_rate"] == 0.75 and len(r["ci95"]) == 2
    chains = [[True] * 5, [True, True, False], [False], [True, True, True, True, False]]
    assert [completed_in_row(c) for c in chains] == [5, 2, 0, 4]
    m = chain_metrics(chains, 5)
    assert [m["success_at_length"][str(k)]["successes"] for k in range(1, 6)] == [3, 3, 2, 2, 1]
    assert m["avg_completed"] == pytest.approx(11 / 4)
    assert m["success_at_length"]["1"]["ci95"] == list(wilson_interval(3, 4))
    lo, hi = m["avg_completed_ci95"]  # a bootstrap over chains: brackets the mean, narrows with more chains
    assert 0 <= lo < 11 / 4 < hi <= 5
    lo4, hi4 = chain_metrics(chains * 25, 5)["avg_completed_ci95"]
    assert lo < lo4 < 11 / 4 < hi4 < hi
